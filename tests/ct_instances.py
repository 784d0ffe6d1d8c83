"""The start of every CT file the tests write by hand: an empty CT image instance with its file meta."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def new_ct_instance(transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """A dataset holding only its file meta (CT Image Storage, `transfer_syntax`) and a new SOP instance UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    return ds
