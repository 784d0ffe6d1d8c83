"""Profiles for the real third-party cases in ../shared/data (see its README)."""

# dcmqi_ct3slice: the GE series with its manual liver (1) and spine (2) annotation
LIVER_SPINE = """
name = "liver-spine"
[classes]
names = ["background", "liver", "spine"]
[labels]
values = { 0 = 0, 1 = 1, 2 = 2 }
[slices]
keep_classes = [1]
"""

# totalseg_example_ct_sm: TotalSegmentator's organ values, liver (5) and colon (20) kept, the others background
LIVER_COLON = """
name = "liver-colon"
[classes]
names = ["background", "liver", "colon"]
[labels]
patterns = ["*_seg.*"]
values = { 0 = 0, 5 = 1, 20 = 2 }
unmapped = "background"
[slices]
keep_classes = [2]
"""
