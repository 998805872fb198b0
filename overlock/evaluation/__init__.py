"""Evaluation: validation accuracy, COCO AP, complexity, ERF, Grad-CAM, the report and ``overlock predict``."""
