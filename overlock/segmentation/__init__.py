"""Semantic segmentation: UperNet (mmsegmentation 0.30) on the OverLoCK segmentation backbone.

``backbone`` (the mmseg adapter, importable without mmseg), ``registration`` (mmseg's BACKBONES),
``config`` (the UperNet configs for T/S/B and the demo), ``metrics`` (IoU, calibration of the pixel logits),
``stage`` (the ``segment`` stage) and ``figures``.
"""
