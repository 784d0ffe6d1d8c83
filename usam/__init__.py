"""U-SAM model zoo: U-shaped Segment Anything and baselines for rectal-cancer CT."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `usam --help` and `import usam.data` do not build the model zoo.
    if name in ("create_model", "list_models"):
        from usam.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'usam' has no attribute {name!r}")
