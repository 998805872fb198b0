"""Process-wide kernel choices, set explicitly by :func:`overlock.compute.configure` and read by the models.

A leaf module (it imports nothing of the project): the models read it without importing the compute layer,
and the stage kernel sets it in the driver and in every Ray Train / torchrun worker from ``compute.*``.
Nothing travels through the environment: a worker on another node gets the value its own ``configure``
call sets. ``None`` means "not configured" (a library user, a benchmark): the model code then falls back
to its own default.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

_contmix_backend: str | None = None


def set_contmix_backend(name: str | None) -> str | None:
    """Set the ContMix backend of this process (``auto``, ``fast``, ``gather``, ...); returns the old one."""
    global _contmix_backend
    old, _contmix_backend = _contmix_backend, name
    return old


def contmix_backend() -> str | None:
    """The configured ContMix backend (None when nothing configured it)."""
    return _contmix_backend


@contextlib.contextmanager
def contmix_backend_override(name: str) -> Iterator[None]:
    """Use ``name`` as the ContMix backend inside the block (e.g. ``gather`` for jit tracing)."""
    old = set_contmix_backend(name)
    try:
        yield
    finally:
        set_contmix_backend(old)
