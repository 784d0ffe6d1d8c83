"""U-SAM model zoo: U-shaped Segment Anything and baselines for rectal-cancer CT."""

from __future__ import annotations

from usam.models.registry import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__"]
