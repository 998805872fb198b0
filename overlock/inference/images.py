"""Reading any image a user hands over as the RGB picture the models take.

One reader for ``overlock predict`` and the served MLflow models: a path or the file's bytes, any format PIL
reads, any size and mode. 8-bit modes convert as the training data loader converts them (``convert("RGB")``:
grayscale is replicated, alpha is dropped, CMYK by PIL's formula); 16-bit and 32-bit grayscale (16-bit PNG)
is scaled to 8 bits first (PIL's own conversion would clip it to white). A file that is not a readable image
raises :class:`ImageReadError` naming it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

__all__ = ["ImageReadError", "read_rgb"]

HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageReadError(ValueError):
    """The input is not an image PIL can decode (the message names it and why)."""


def _high_bit_to_8bit(img):
    from PIL import Image

    values = np.asarray(img, dtype=np.float64)
    scale = 257.0 if img.mode.startswith("I;16") or img.format == "PNG" or values.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(values / scale + 0.5, 0, 255).astype(np.uint8), "L")


def read_rgb(source: str | os.PathLike | bytes, name: str | None = None):
    """A PIL RGB image of ``source`` (a path or encoded bytes); :class:`ImageReadError` when unreadable."""
    from PIL import Image

    label = name or (f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else str(source))
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(source)))
        else:
            img = Image.open(Path(source))
        with img:
            img.load()
            if img.mode in HIGH_BIT_MODES:
                return _high_bit_to_8bit(img).convert("RGB")
            if img.mode == "F":
                values = np.asarray(img, dtype=np.float64)
                scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
                return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
            if img.mode == "P" and "transparency" in img.info:
                return img.convert("RGBA").convert("RGB")
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{label}: is a directory, not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # UnidentifiedImageError is an OSError; truncated data raises OSError; broken headers ValueError
        raise ImageReadError(f"{label}: not a readable image ({type(err).__name__}: {err})") from None
