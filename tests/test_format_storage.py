"""Storage writer and reader: zarr and HDF5 hold the same arrays; the fast slice path agrees with zarr."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from care_dataset.format import layout, reader, writer


def _write_minimal_dataset(root, storage, cases):
    writer.init_store(root, storage)
    for case_id, (image, label) in cases.items():
        writer.write_case(root, storage, case_id, image, label)
    (root / "dataset.json").write_text(json.dumps({
        "format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION, "storage": storage,
        "classes": ["background", "normal rectum", "tumor"]}))
    (root / "cases.json").write_text(json.dumps({
        cid: {"num_slices": int(img.shape[0]), "kept_slices": list(range(5, 5 + img.shape[0])),
              "spacing": [0.8, 0.8, 2.5], "checksum": layout.content_checksum(img, lab)}
        for cid, (img, lab) in cases.items()}))
    ids = sorted(cases)
    (root / "splits.json").write_text(json.dumps({"seed": 0, "train": ids[:-1], "test": ids[-1:]}))
    return reader.open_dataset(root)


@pytest.fixture()
def cases():
    rng = np.random.default_rng(7)
    out = {}
    for i, (h, w) in enumerate([(48, 40), (32, 56), (40, 40)]):
        n = 4 + i
        image = rng.integers(-1024, 1500, (n, h, w)).astype(np.int16)
        label = np.zeros((n, h, w), np.uint8)
        label[:, h // 3:h // 2, w // 3:w // 2] = 1
        label[1:, h // 2:h // 2 + 3, w // 2:w // 2 + 3] = 2
        label[0] = 0  # an all-background slice: zarr stores no chunk for it
        out[f"care_{i:012x}"] = (image, label)
    return out


@pytest.mark.parametrize("storage", ["zarr", "h5"])
def test_round_trip_every_slice_and_case(tmp_path, cases, storage):
    ds = _write_minimal_dataset(tmp_path, storage, cases)
    assert ds.storage == storage and ds.class_names[2] == "tumor"
    for case_id, (image, label) in cases.items():
        got_image, got_label = ds.read_case(case_id)
        assert got_image.dtype == np.int16 and got_label.dtype == np.uint8
        np.testing.assert_array_equal(got_image, image)
        np.testing.assert_array_equal(got_label, label)
        for p in range(image.shape[0]):
            s_image, s_label = ds.read_slice(case_id, p)
            np.testing.assert_array_equal(s_image, image[p])
            np.testing.assert_array_equal(s_label, label[p])
    train = ds.case_ids("train")
    assert ds.num_slices("train") == sum(cases[c][0].shape[0] for c in train)
    last = ds.sample("train", ds.num_slices("train") - 1)
    assert last["case_id"] == train[-1]
    assert last["slice_index"] == 5 + cases[train[-1]][0].shape[0] - 1
    np.testing.assert_array_equal(last["image"], cases[train[-1]][0][-1])
    assert last["spacing"] == (0.8, 0.8, 2.5)


def test_fast_slice_path_is_used_and_matches_zarr(tmp_path, cases):
    ds = _write_minimal_dataset(tmp_path, "zarr", cases)
    case_id = next(iter(cases))
    fast_image, fast_label = ds._arrays(case_id)
    assert isinstance(fast_image, reader.ShardedSlices)
    reference = zarr.open_group(str(tmp_path / layout.ZARR_DIR / case_id), mode="r")
    for p in range(cases[case_id][0].shape[0]):
        np.testing.assert_array_equal(fast_image[p], reference["image"][p])
        np.testing.assert_array_equal(fast_label[p], reference["label"][p])
    with pytest.raises(IndexError):
        fast_image[len(cases[case_id][0])]
    for key in (Ellipsis, slice(None)):  # whole arrays: one read of the shard, chunks decoded in place
        for fast, name in ((fast_image, "image"), (fast_label, "label")):
            whole = fast[key]
            assert whole.dtype == reference[name].dtype and whole.flags.writeable
            np.testing.assert_array_equal(whole, reference[name][...])
    np.testing.assert_array_equal(fast_image[1:3], reference["image"][1:3])  # other keys: zarr


def test_same_arrays_give_identical_checksums_and_bytes(tmp_path, cases):
    a = _write_minimal_dataset(tmp_path / "a", "zarr", cases)
    b = _write_minimal_dataset(tmp_path / "b", "zarr", cases)
    for case_id in cases:
        shard = f"{layout.ZARR_DIR}/{case_id}/image/c/0/0/0"
        assert (a.root / shard).read_bytes() == (b.root / shard).read_bytes()
        assert layout.content_checksum(*a.read_case(case_id)) == layout.content_checksum(*cases[case_id])


def test_write_is_atomic_and_rejects_bad_arrays(tmp_path, cases):
    writer.init_store(tmp_path, "zarr")
    image, label = next(iter(cases.values()))
    with pytest.raises(TypeError, match="int16"):
        writer.write_case(tmp_path, "zarr", "care_bad", image.astype(np.float32), label)
    with pytest.raises(ValueError, match="non-empty"):
        writer.write_case(tmp_path, "zarr", "care_bad", image[:0], label[:0])
    assert not writer.case_exists(tmp_path, "zarr", "care_bad")
    writer.write_case(tmp_path, "zarr", "care_ok", image, label)
    writer.write_case(tmp_path, "zarr", "care_ok", image, label)  # overwrite in place
    assert list((tmp_path / layout.TMP_DIR).iterdir()) == []


def test_reader_refuses_foreign_or_newer_folders(tmp_path, cases):
    _write_minimal_dataset(tmp_path, "h5", cases)
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        reader.open_dataset(tmp_path / "nowhere")
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    manifest["format_version"] = "2.0"
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 2.0"):
        reader.open_dataset(tmp_path)


def test_an_open_reader_left_for_interpreter_exit_closes_quietly(tmp_path, cases):
    """A reader kept in a module global is collected after the os module is torn down: no 'Exception ignored'."""
    _write_minimal_dataset(tmp_path, "zarr", cases)
    code = ("import sys\nfrom care_dataset.format import reader\n"
            "dataset = reader.open_dataset(sys.argv[1])\n"
            "arrays = [dataset._arrays(case_id)[0] for case_id in dataset.case_ids('train')]\n"
            "slices = [array[1] for array in arrays]\n"
            "assert all(array._fd is not None for array in arrays)\n"
            "reader.os = None  # as at interpreter exit, when module globals are cleared before late objects\n"
            "del dataset, arrays\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("storage", ["zarr", "h5"])
def test_an_image_of_only_the_fill_value_reads_back(tmp_path, cases, storage):
    """zarr leaves out a shard whose every chunk holds the fill value (an all-0 HU image); the reader gives
    the fill value for it, slice by slice and whole."""
    case_id = sorted(cases)[0]
    image, label = cases[case_id]
    ds = _write_minimal_dataset(tmp_path, storage, {case_id: (np.zeros_like(image), label)})
    if storage == "zarr":
        assert not layout.shard_path(layout.case_path(tmp_path, storage, case_id) / "image").exists()
    got_image, got_label = ds.read_case(case_id)
    assert got_image.shape == image.shape and got_image.dtype == np.int16 and not got_image.any()
    np.testing.assert_array_equal(got_label, label)
    assert not ds.read_slice(case_id, 1)[0].any() and ds.sample(None, 1)["image"].shape == image.shape[1:]
    assert ds.missing_cases([case_id]) == []
    if storage == "zarr":  # a lost shard of an image that is not all fill value is missing
        other = _write_minimal_dataset(tmp_path / "other", storage, {case_id: (image, label)})
        layout.shard_path(layout.case_path(tmp_path / "other", storage, case_id) / "image").unlink()
        assert other.missing_cases([case_id]) == [case_id]
