"""The registered MLflow models: the classifier and the detector as pyfunc models that serve.

``overlock-classifier`` and ``overlock-detector`` (alias ``latest-pipeline``) are logged by the calibrate
stage (:func:`overlock.serving.package.register_served_models`) with everything they need to answer requests
on their own: the chosen weights (tag ``overlock.weights``), the preprocessing, the fitted calibration and a
copy of the ``overlock`` package (``code/``), so ``mlflow models serve`` needs no checkout of this repository.

Request (both): a DataFrame with one column ``image`` of encoded image files (JPEG, PNG, ... any size or mode);
over HTTP the column is base64 (the signature types it ``binary``)::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a JPEG>"], ...]}}

Answers: ``classifier_model`` and ``detector_model`` describe them.
"""

WEIGHTS_FILE = "weights.pth"  # the registered classifier's weights ("state_dict" only), beside its model.json
