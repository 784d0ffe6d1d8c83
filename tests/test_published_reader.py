"""PublishedDataset: a published folder reads back exactly as the converted folder it was published from."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from care_dataset import PublishedDataset, open_any
from care_dataset.format import layout, reader
from care_dataset.publish.job import publish
from converted_folders import make_converted

# zarr with one in-plane size (Array2D features), small shards so cases span Parquet files and row groups;
# HDF5 with differing in-plane sizes (nested List features)
SOURCES = {
    "zarr-array2d": dict(storage="zarr", shapes=[(12, 40, 40)] * 5, seed=11, max_shard_mb=0.03),
    "h5-lists": dict(storage="h5", shapes=[(6, 48, 40), (5, 40, 40), (7, 48, 56)], seed=3, max_shard_mb=400.0),
}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def folders(request, tmp_path_factory, hf_offline):  # noqa: F811
    """(converted folder, published folder)."""
    options = SOURCES[request.param]
    base = tmp_path_factory.mktemp(request.param)
    source = make_converted(base / "converted", options["storage"], options["shapes"], options["seed"])
    output = base / "care"
    publish(source, output, max_shard_mb=options["max_shard_mb"])
    return source, output


def assert_arrays_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and got.flags.writeable
    np.testing.assert_array_equal(got, want)


def test_every_case_reads_as_from_the_converted_folder(folders):
    source, output = folders
    care, published = reader.open_dataset(source), open_any(output)
    assert isinstance(published, PublishedDataset)
    assert published.class_names == care.class_names and published.num_classes == care.num_classes
    assert published.splits == care.splits and published.case_ids() == care.case_ids()
    assert published.cases == care.cases
    assert published.manifest == care.manifest
    for split in care.splits:
        assert published.case_ids(split) == care.case_ids(split)
        np.testing.assert_array_equal(published.slice_index(split), care.slice_index(split))
        for i in range(care.num_slices(split)):
            got, want = published.sample(split, i), care.sample(split, i)
            assert got.keys() == want.keys()
            assert_arrays_equal(got.pop("image"), want.pop("image"))
            assert_arrays_equal(got.pop("label"), want.pop("label"))
            assert got == want
    for case_id in care.case_ids():
        for got, want in zip(published.read_case(case_id), care.read_case(case_id)):
            assert_arrays_equal(got, want)
        assert_arrays_equal(published.read_labels(case_id), care.read_labels(case_id))
        for position in range(care.cases[case_id]["num_slices"]):
            for got, want in zip(published.read_slice(case_id, position), care.read_slice(case_id, position)):
                assert_arrays_equal(got, want)
        image, label = published.read_case(case_id)
        assert layout.content_checksum(image, label) == care.cases[case_id]["checksum"]
    assert published.missing_cases(care.case_ids() + ["nope"]) == ["nope"]
    with pytest.raises(KeyError, match="no split"):
        published.case_ids("validation")
    with pytest.raises(KeyError, match="unknown case"):
        published.read_slice("nope", 0)
    with pytest.raises(IndexError):
        published.read_slice(care.case_ids()[0], care.cases[care.case_ids()[0]]["num_slices"])


def test_reader_pickles_for_dataloader_workers(folders):
    source, output = folders
    published = open_any(output)
    case_id = published.case_ids("test")[0]
    published.read_slice(case_id, 0)
    again = pickle.loads(pickle.dumps(published))
    for got, want in zip(again.read_slice(case_id, 2), reader.open_dataset(source).read_slice(case_id, 2)):
        assert_arrays_equal(got, want)


def test_without_metadata_the_parquet_columns_give_what_they_carry(folders, tmp_path):
    source, output = folders
    care = reader.open_dataset(source)
    bare = tmp_path / "care"
    shutil.copytree(output, bare)
    shutil.rmtree(bare / "metadata")
    published = open_any(bare)
    assert published.class_names == care.class_names
    assert {s: published.case_ids(s) for s in published.splits} == {s: care.case_ids(s) for s in published.splits}
    for case_id, geometry in published.cases.items():
        assert set(geometry) == {"split", "num_slices", "kept_slices", "spacing", "canonical", "checksum"}
        assert geometry == {key: care.cases[case_id][key] for key in geometry}
    case_id = care.case_ids("train")[1]
    for got, want in zip(published.read_case(case_id), care.read_case(case_id)):
        assert_arrays_equal(got, want)


def test_damaged_or_inconsistent_folders_fail_with_one_line(folders, tmp_path):
    _, output = folders
    truncated = tmp_path / "truncated"
    shutil.copytree(output, truncated)
    shard = sorted((truncated / "volumes").glob("train-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:300])  # an interrupted download of the configuration not read
    with pytest.raises(ValueError, match=rf"^volumes/{shard.name}: not a readable Parquet file \(.*Parquet"):
        open_any(truncated)

    for name, edit, reason in (
        ("cases.json", lambda cases, c: cases[c].update(kept_slices=cases[c]["kept_slices"][::-1]),
         "kept slices or spacing"),
        ("splits.json", lambda splits, c: splits["train"].reverse(), "split 'train'"),
    ):
        changed = tmp_path / name
        shutil.copytree(output, changed)
        path = changed / "metadata" / name
        content = json.loads(path.read_text())
        case_id = open_any(output).case_ids("train")[0]
        edit(content, case_id)
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=reason) as error:
            open_any(changed)
        assert "\n" not in str(error.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        open_any(tmp_path / "empty")
