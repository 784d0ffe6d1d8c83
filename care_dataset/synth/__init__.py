"""Synthetic CARE-like raw data: a pelvic CT phantom and its export as messy raw case folders."""
