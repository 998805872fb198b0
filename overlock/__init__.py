"""overlock-pipeline: the OverLoCK ConvNet from raw data to a calibrated, evaluated model."""
__version__ = "0.1.0"
