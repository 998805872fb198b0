"""Keep a training worker's console to the stage's own lines (Ray's stay in the session's log files)."""
from __future__ import annotations

import logging


def quiet_worker_logs() -> None:
    """Ray Train logs each ``report`` at INFO through a logger named by its file path (outside the ``ray.train``
    logger that ``RunConfig(logging_config=...)`` filters): that logger goes to WARNING."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
