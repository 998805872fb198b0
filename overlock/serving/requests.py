"""Decoding the ``image`` column of a request to the served models (bytes, or base64 text)."""
from __future__ import annotations

import base64
import binascii

IMAGE_COLUMN = "image"


def image_column(model_input) -> list[bytes]:
    """The encoded images of a request: DataFrame column ``image`` (or its only column), a dict with
    ``image``, or a list; each value bytes or base64 text. Raises ValueError naming the problem."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            values = model_input[IMAGE_COLUMN].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise ValueError(f"the request needs a column {IMAGE_COLUMN!r} of encoded images (base64 in JSON); "
                             f"got columns {list(model_input.columns)}")
    elif isinstance(model_input, dict):
        values = model_input.get(IMAGE_COLUMN)
        if values is None:
            raise ValueError(f"the request needs the key {IMAGE_COLUMN!r}; got {sorted(model_input)}")
        values = list(values) if isinstance(values, (list, tuple)) else [values]
    else:
        values = list(model_input)
    return [_as_bytes(v, i) for i, v in enumerate(values)]


def _as_bytes(value, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"row {row}: the {IMAGE_COLUMN!r} value is text but not base64 ({err})") from None
    raise ValueError(f"row {row}: the {IMAGE_COLUMN!r} value is a {type(value).__name__}; send the image file's "
                     "bytes (base64 in JSON)")
