"""Model families. Importing this package registers them with timm (``timm.create_model("overlock_t")``).

Each family lives in its own module; add one import line per family below.
"""
from .checkpoint import CheckpointLoadReport, load_official_checkpoint, save_official_checkpoint
from .overlock import (
    OVERLOCK_ARCHS,
    OverLoCK,
    OverLoCKBackbone,
    create_overlock,
    overlock_arch,
    reparameterize,
)
