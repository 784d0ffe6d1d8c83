"""U-SAM model zoo: U-shaped Segment Anything and baselines for rectal-cancer CT."""
__version__ = "0.1.0"
