"""CARE: convert, de-identify, store and publish rectal-cancer CT slices.

Stages, each a subpackage importing only from those before it: raw (find and read raw cases) -> deid
(pseudonyms, DICOM de-identification, leak check) -> format (the converted and published folders: writer,
readers, splits) -> convert (care-convert) -> publish (care-publish); synth writes synthetic raw data.
"""

from care_dataset.format.published import PublishedDataset, open_any
from care_dataset.format.reader import CareDataset, open_dataset
from care_dataset.version import __version__

__all__ = ["CareDataset", "PublishedDataset", "open_any", "open_dataset", "__version__"]
