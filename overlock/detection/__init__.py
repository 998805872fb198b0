"""MMDetection fine-tuning of OverLoCK (and baseline) backbones: configs, the stage and its MLflow hook.

Importing this package applies the mmcv-1.7.2-on-torch-2.x shims (``overlock.compat``) first, so every
mmcv/mmdet code path used below runs with them.
"""
import overlock.compat  # noqa: F401  (must precede any mmcv/mmdet use)
