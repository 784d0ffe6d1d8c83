"""Splits the source gives (``split = "folders"``, ``split_file``) and ``[slices] margin = "all"``: WORD's official
membership kept per split, a release's case lists honoured or refused in one line, every slice kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from care_dataset.cli import convert_main
from care_dataset.convert.pipeline import ConvertError, convert_dataset
from care_dataset.format import reader
from care_dataset.format.layout import whole_scan
from care_dataset.raw.discover import discover_cases
from care_dataset.raw.profiles import PROFILE_DIR, ProfileError, load_profile, parse_profile
from care_dataset.raw.split_lists import assign_splits

KEY = b"test-key-not-secret"
DEPTH, LABELLED = 8, range(2, 6)  # z slices of each synthetic volume; the ones holding the organ
OFFICIAL = {  # WORD's layout: image folder -> its cases; the split each folder gives
    "train": ("imagesTr", ["word_0001", "word_0002", "word_0003", "word_0004"]),
    "val": ("imagesVal", ["word_0101", "word_0102", "word_0103"]),
    "test": ("imagesTs", ["word_0201", "word_0202", "word_0203"]),
}
ALL_NAMES = [name for _, names in OFFICIAL.values() for name in names]


def write_pair(raw: Path, image_dir: str, name: str, seed: int) -> None:
    """A 32 x 32 x DEPTH CT-like NIfTI pair: air, a body disc, an organ blob on the LABELLED slices."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    image = np.full((DEPTH, 32, 32), -1000, np.int16)
    image[:, (yy - 16) ** 2 + (xx - 16) ** 2 < 13 ** 2] = 40
    label = np.zeros((DEPTH, 32, 32), np.uint8)
    cy, cx = 16 + rng.integers(-3, 4), 16 + rng.integers(-3, 4)
    label[LABELLED.start:LABELLED.stop, (yy - cy) ** 2 + (xx - cx) ** 2 < 5 ** 2] = 1 + seed % 16
    for folder, array in ((image_dir, image), (image_dir.replace("images", "labels"), label)):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing((0.8, 0.8, 2.5))
        (raw / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume, str(raw / folder / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def word_raw(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("word") / "raw"
    for seed, name in enumerate(ALL_NAMES):
        image_dir = next(folder for folder, names in OFFICIAL.values() if name in names)
        write_pair(raw, image_dir, name, seed)
    return raw


def membership(out: Path, private_map: Path) -> dict[str, list[str]]:
    """Raw case names per split of a conversion, read back through the private map."""
    raw_of = {case_id: raw for raw, case_id in json.loads(private_map.read_text()).items()}
    splits = json.loads((out / "splits.json").read_text())
    return {name: sorted(raw_of[c] for c in ids) for name, ids in splits.items() if isinstance(ids, list)}


def profile_file(folder: Path, edits: dict[str, str]) -> Path:
    """word.toml with lines replaced (old line -> new text), written into ``folder``."""
    text = (PROFILE_DIR / "word.toml").read_text()
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    path = folder / "word_variant.toml"
    path.write_text(text)
    return path


FOLDERS_LINE = 'split = "folders"'
LAYOUT_SPLITS = 'splits = { imagesTr = "train", imagesVal = "val", imagesTs = "test" }'


def file_profile(folder: Path, lists: object) -> Path:
    """A WORD profile taking its splits from ``release.json`` (beside it) holding ``lists``."""
    (folder / "release.json").write_text(lists if isinstance(lists, str) else json.dumps(lists))
    return profile_file(folder, {FOLDERS_LINE: 'split_file = "release.json"', LAYOUT_SPLITS: ""})


def test_word_folders_convert_with_the_official_membership_per_split(word_raw, tmp_path):
    out, private_map = tmp_path / "out", tmp_path / "map.json"
    summary = convert_dataset(word_raw, out, load_profile("word"), KEY, True, seed=3, private_map=private_map,
                              progress=False)
    assert summary.converted == 10, summary.failures
    assert membership(out, private_map) == {split: names for split, (_, names) in OFFICIAL.items()}
    splits = json.loads((out / "splits.json").read_text())
    assert set(splits) == {"seed", "strategy", "train", "val", "test"} and splits["strategy"] == "folders"
    assert {name: stats["cases"] for name, stats in summary.split_stats.items()} == {"train": 4, "val": 3, "test": 3}
    ds = reader.open_dataset(out)
    assert all(ds.cases[c]["split"] == split for split in ("train", "val", "test") for c in ds.case_ids(split))
    for path in out.glob("*.json"):  # the raw names were matched in memory only
        text = path.read_text()
        assert not any(name in text for name in ALL_NAMES), path.name
    other_seed, other_map = tmp_path / "seed9", tmp_path / "map9.json"
    convert_dataset(word_raw, other_seed, load_profile("word"), KEY, True, seed=9, private_map=other_map,
                    progress=False)
    assert membership(other_seed, other_map) == membership(out, private_map)  # the seed decides no membership


def test_a_name_in_two_image_folders_pairs_with_its_own_label_folder(tmp_path):
    raw = tmp_path / "raw"
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (raw / folder).mkdir(parents=True)
        (raw / folder / "case1.nii.gz").write_bytes(b"x")
    word = load_profile("word")
    cases = discover_cases(raw, word)
    assert [(c.key, c.folder, c.label_path.parent.name) for c in cases] == [
        ("imagesTr/case1", "imagesTr", "labelsTr"), ("imagesTs/case1", "imagesTs", "labelsTs")]
    assert assign_splits(cases, word).of_raw == {"imagesTr/case1": "train", "imagesTs/case1": "test"}


def test_a_split_file_is_honoured_and_unlisted_cases_are_left_out(word_raw, tmp_path, capsys):
    lists = {"train": ["word_0001", "word_0101.nii.gz", "word_0201"], "val": ["word_0002"],
             "test": ["word_0003", "word_0102", "word_0202", "word_0203"]}
    profile = load_profile(file_profile(tmp_path, lists))
    out, private_map = tmp_path / "out", tmp_path / "map.json"
    summary = convert_dataset(word_raw, out, profile, KEY, True, private_map=private_map, progress=False)
    assert summary.converted == 8, summary.failures
    expected = {split: sorted(name.removesuffix(".nii.gz") for name in names) for split, names in lists.items()}
    assert membership(out, private_map) == expected
    assert json.loads((out / "splits.json").read_text())["strategy"] == "file"
    notes = capsys.readouterr().err
    assert notes.count("it is in no split of the split file") == 2  # word_0004 and word_0103, on the terminal


@pytest.mark.parametrize("lists, reason", [
    ({"train": ["word_0001", "word_0002", "nosuch"], "test": ["word_0003"]},
     "1 entry match no raw case, the first 'train' entry 3"),
    ({"train": ["word_0001"], "test": ["word_0002", "word_0001.nii.gz"]},
     "'test' entry 2 names the raw case 'train' entry 1 names; a case belongs to one split"),
    ({"train": ["word_0001", "word_0001"]}, "'train' entry 2 names the raw case 'train' entry 1 names"),
    ("{not json", "not JSON"),
    (["word_0001"], "expected a JSON object of split name -> case names"),
    ({"train": ["word_0001", 7]}, "split number 1 is not a list of case names"),
    ({"train and test": ["word_0001"]}, "split number 1 has a name that is not a split name"),
])
def test_a_bad_split_file_is_refused_in_one_line_before_any_output(word_raw, tmp_path, lists, reason):
    profile = load_profile(file_profile(tmp_path, lists))
    with pytest.raises(ConvertError) as error:
        convert_dataset(word_raw, tmp_path / "out", profile, KEY, True, progress=False)
    message = str(error.value)
    assert message.startswith(f"split file {tmp_path / 'release.json'}: ") and reason in message
    assert "\n" not in message and "nosuch" not in message and "word_0001" not in message  # positions, not names
    assert not (tmp_path / "out").exists()


def test_a_missing_split_file_is_a_usage_error(word_raw, tmp_path, capsys):
    profile = file_profile(tmp_path, {"train": ["word_0001"]})
    (tmp_path / "release.json").unlink()
    code = convert_main([str(word_raw), str(tmp_path / "out"), "--profile", str(profile), "--random-key", "--quiet"])
    assert code == 2
    assert f"split file {tmp_path / 'release.json'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_margin_all_keeps_every_slice_and_says_so(word_raw, tmp_path):
    profile = load_profile(profile_file(tmp_path, {"margin = 0 ": 'margin = "all" '}))
    assert profile.all_slices
    convert_dataset(word_raw, tmp_path / "all", profile, KEY, True, progress=False)
    convert_dataset(word_raw, tmp_path / "labelled", load_profile("word"), KEY, True, progress=False)
    every, labelled = reader.open_dataset(tmp_path / "all"), reader.open_dataset(tmp_path / "labelled")
    assert every.case_ids() == labelled.case_ids() and len(every.case_ids()) == 10
    for case_id in every.case_ids():
        case, few = every.cases[case_id], labelled.cases[case_id]
        assert case["kept_slices"] == list(range(DEPTH)) and case["num_slices"] == DEPTH
        assert case["slice_selection"] == "all" and whole_scan(case)
        assert case["voxels_before"] == case["voxels_after"]
        assert few["kept_slices"] == list(LABELLED) and few["slice_selection"] == "labelled" and not whole_scan(few)
        image, label = every.read_case(case_id)
        kept_image, kept_label = labelled.read_case(case_id)
        np.testing.assert_array_equal(image[LABELLED.start:LABELLED.stop], kept_image)
        np.testing.assert_array_equal(label[LABELLED.start:LABELLED.stop], kept_label)
        assert not label[:LABELLED.start].any() and not label[LABELLED.stop:].any()


BASE = {"classes": {"names": ["background", "organ"]}}
PAIRED = {"kind": "paired_folders", "images": ["imagesTr", "imagesTs"], "labels": ["labelsTr", "labelsTs"]}


@pytest.mark.parametrize("raw, reason", [
    ({"slices": {"margin": "every"}}, 'margin must be a whole number of slices >= 0 or "all"'),
    ({"split": "random"}, 'split must be "folders" or a [split] table of sizes'),
    ({"split": "folders"}, 'split = "folders" needs [layout] kind = "paired_folders"'),
    ({"split": "folders", "layout": PAIRED}, "split = \"folders\" needs [layout] splits"),
    ({"split": "folders", "layout": {**PAIRED, "splits": {"imagesTr": "train"}}},
     "gives no split for images folder 'imagesTs'"),
    ({"split": "folders", "layout": {**PAIRED, "splits": {"imagesTr": "train", "imagesTs": "test", "x": "val"}}},
     "names 'x', not one of the images folders"),
    ({"split": "folders", "layout": {**PAIRED, "splits": {"imagesTr": "train", "imagesTs": "te st"}}},
     "is not a split name"),
    ({"split_file": "lists.json", "split": {"train": 1}}, "give split_file or split, not both"),
    ({"split_file": ""}, "split_file must be a path to a JSON file"),
])
def test_profile_split_and_margin_settings_are_checked(raw, reason):
    with pytest.raises(ProfileError, match="^profile <profile>: ") as error:
        parse_profile({**BASE, **raw})
    assert reason in str(error.value)


def test_profiles_keep_their_split_unless_they_say_otherwise(tmp_path):
    care = load_profile("care")
    assert care.split_strategy == "patient" and care.split_sizes == {"train": 318, "test": 81}
    assert not care.all_slices and care.margin == 0
    word = load_profile("word")
    assert word.split_strategy == "folders" and word.folder_splits == {
        "imagesTr": "train", "imagesVal": "val", "imagesTs": "test"}
    relative = load_profile(file_profile(tmp_path, {"train": ["a"]}))
    assert relative.split_strategy == "file" and relative.split_file == tmp_path / "release.json"
