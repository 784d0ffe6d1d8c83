"""U-SAM model zoo: U-shaped Segment Anything and baselines for rectal-cancer CT."""

from __future__ import annotations

from care_dataset.version import __version__

__all__ = ["create_model", "list_models", "__version__"]


def __getattr__(name: str):
    if name in ("create_model", "list_models"):
        from usam.models import registry  # deferred: `usam --help` and `import usam.data` need no model zoo

        return getattr(registry, name)
    raise AttributeError(f"module 'usam' has no attribute {name!r}")
