"""``care-export``: a converted folder as nnU-Net v2 raw data or a MONAI datalist, one NIfTI volume per case and
the converted folder's splits (docs/format.md#exports). Only care_dataset.cli imports this stage."""
