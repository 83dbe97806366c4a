"""The public Python API over the default registry of installed plugins."""

from __future__ import annotations

from typing import Any

from kdcore.plugins import default_registry


def available(kind: str) -> list[str]:
    """Sorted names registered for ``kind`` (loss, divergence, transform,
    scheduler, backbone, dataset)."""
    return default_registry().available(kind)


def create(kind: str, name: str, **params: Any) -> Any:
    """Build the component ``name`` of ``kind`` with keyword ``params``."""
    return default_registry().create(kind, name, **params)
