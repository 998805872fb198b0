"""Data: the ``download`` and ``extract`` stages, the built-in demo data and the datasets training reads.

Modules: :mod:`~overlock.data.sources` (archive tables), :mod:`~overlock.data.download`,
:mod:`~overlock.data.extract` (safe extraction, stage), :mod:`~overlock.data.layouts` (dataset layouts,
splits, integrity report), :mod:`~overlock.data.demo` (generators) and :mod:`~overlock.data.datasets`.
"""
from overlock.data.datasets import (ClassificationDataset, classification_root, coco_categories, coco_split_files,
                                    detection_root, load_classes)

__all__ = ["ClassificationDataset", "classification_root", "detection_root", "coco_split_files", "coco_categories",
           "load_classes"]
