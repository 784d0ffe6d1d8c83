"""Raw cases: find the case folders, read DICOM series and volume files, bring images to the canonical grid."""
