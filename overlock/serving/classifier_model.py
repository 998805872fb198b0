"""``overlock-classifier`` as an MLflow pyfunc model: encoded images in, calibrated top-k classes out.

Request: column ``image`` (see ``overlock.serving``); param ``top_k`` (default 5). Answer, one row per image::

    {"classes": ["tabby", ...], "class_ids": [3, ...], "probabilities": [0.81, ...]}

``probabilities`` are ``softmax(logits / T)`` of the deploy form (the fitted temperature ``T``; 1 when the
model was registered without one), sorted descending; they sum to at most 1 (exactly 1 over all classes).
"""
from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

from overlock.serving import WEIGHTS_FILE  # the chosen weights ("state_dict" only) beside model.json


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Loads :class:`overlock.inference.predictor.ClassifierPredictor` from the model's artifacts."""

    def load_context(self, context):
        from overlock.inference.predictor import ClassifierPredictor

        artifacts = context.artifacts
        self.predictor = ClassifierPredictor.load(Path(artifacts["classifier"]) / WEIGHTS_FILE,
                                                  artifacts.get("calibration"))

    def predict(self, context, model_input, params=None):
        import pandas as pd
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        from overlock.inference.images import ImageReadError, read_rgb
        from overlock.serving.requests import image_column

        top_k = int((params or {}).get("top_k") or 5)
        try:
            if top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {top_k}")
            images = [read_rgb(data, name=f"row {i}") for i, data in enumerate(image_column(model_input))]
        except (ValueError, ImageReadError) as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        rows = self.predictor.top_k(self.predictor.probabilities(images), top_k) if images else []
        return pd.DataFrame({"classes": [r.classes for r in rows], "class_ids": [r.class_ids for r in rows],
                             "probabilities": [r.probabilities for r in rows]})
