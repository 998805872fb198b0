"""``overlock-detector`` as an MLflow pyfunc model: encoded images in, calibrated detections out.

Request: column ``image`` (see ``overlock.serving``); param ``score_threshold`` (raw score, default 0.05).
Answer, one row per image, detections sorted by calibrated score::

    {"boxes": [[x1, y1, x2, y2], ...], "labels": ["circle", ...], "label_ids": [0, ...],
     "scores": [0.93, ...], "raw_scores": [0.99, ...], "masks": [{"size": [h, w], "counts": "..."}, ...]}

``scores`` are the fitted score calibration of the raw scores (the probability that a detection is correct,
IoU-matched as the calibrate stage fitted it); ``masks`` are COCO RLE (``pycocotools.mask.decode``), present
for Mask R-CNN (an empty list per image for a box-only detector).
"""
from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc


class DetectorModel(mlflow.pyfunc.PythonModel):
    """Loads :class:`overlock.inference.detector.DetectorPredictor` from the model's artifacts."""

    def load_context(self, context):
        from overlock.inference.detector import DetectorPredictor

        artifacts = context.artifacts
        self.predictor = DetectorPredictor.load(Path(artifacts["detector"]), artifacts.get("calibration"))

    def predict(self, context, model_input, params=None):
        import pandas as pd
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        from overlock.inference.images import ImageReadError, read_rgb
        from overlock.serving.requests import image_column

        params = params or {}
        self.predictor.score_threshold = float(params.get("score_threshold", 0.05))
        try:
            images = [read_rgb(data, name=f"row {i}") for i, data in enumerate(image_column(model_input))]
        except (ValueError, ImageReadError) as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        per_image = self.predictor.detect(images)
        return pd.DataFrame({
            "boxes": [[d["bbox"] for d in dets] for dets in per_image],
            "labels": [[d["label"] for d in dets] for dets in per_image],
            "label_ids": [[d["label_id"] for d in dets] for dets in per_image],
            "scores": [[d["score"] for d in dets] for dets in per_image],
            "raw_scores": [[d["raw_score"] for d in dets] for dets in per_image],
            "masks": [[d["mask"] for d in dets if "mask" in d] for dets in per_image],
        })
