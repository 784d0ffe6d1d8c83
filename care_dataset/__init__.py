"""CARE: convert, de-identify, store and publish rectal-cancer CT slices."""

from care_dataset.published import PublishedDataset, open_any
from care_dataset.store import CareDataset, open_dataset

__version__ = "0.1.0"
__all__ = ["CareDataset", "PublishedDataset", "open_any", "open_dataset", "__version__"]
