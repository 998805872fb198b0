"""Using the trained models: load the classifier and the detector from the stage outputs, run them over a
split (logits, COCO predictions) and apply the fitted calibration.

Below both ``overlock.calibration`` and ``overlock.evaluation`` (and ``overlock predict``), which share it and
never import each other. Submodules: ``classifier``, ``detector``, ``calibrated``.
"""
