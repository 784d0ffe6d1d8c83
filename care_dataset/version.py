"""The care-usam version, written into every output (dataset.json, DICOM DeidentificationMethod, dataset card)."""

__version__ = "0.1.0"
