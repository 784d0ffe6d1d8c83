"""CARE: convert, de-identify, store and publish rectal-cancer CT slices."""
__version__ = "0.1.0"
