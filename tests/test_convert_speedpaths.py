"""The conversion's fast paths give exactly what the plain library calls give.

Arrays written by ``writer.write_case`` (metadata and shard) are byte-identical to zarr's own writes; per-slice label counts
match ``np.unique``; kept slices taken as a view equal fancy indexing.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import zarr
from zarr.codecs import BloscCodec

from care_dataset.convert.case import CaseError, kept_slices_of, per_slice_counts, select_slices, value_counts
from care_dataset.format import layout, reader, writer
from care_dataset.raw.profiles import load_profile


def _zarr_written(tmp_path, data: np.ndarray) -> tuple[bytes, bytes | None]:
    """zarr.json and the shard file zarr itself writes for ``data`` with the layout of docs/format.md
    (None: no shard file)."""
    n, h, w = data.shape
    array = zarr.create_array(str(tmp_path / "reference"), shape=data.shape, dtype=data.dtype, chunks=(1, h, w),
                              shards=(n, h, w), compressors=BloscCodec(**writer.SHARD_CODEC), fill_value=0,
                              zarr_format=3, overwrite=True)
    array[...] = data
    path = tmp_path / "reference" / "c" / "0" / "0" / "0"
    return (tmp_path / "reference" / "zarr.json").read_bytes(), path.read_bytes() if path.exists() else None


def _phantom_slices(rng: np.random.Generator, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    z, y, x = np.mgrid[0:n, 0:64, 0:48]
    image = (40 * np.sin(x / 5.0 + z) + 300 * ((y - 32) ** 2 + (x - 24) ** 2 < 200)).astype(np.int16)
    image += rng.integers(-20, 20, image.shape, dtype=np.int16) - 1000
    label = np.zeros(image.shape, np.uint8)
    label[1:4, 20:30, 10:20] = 1
    label[2, 24:27, 14:17] = 2  # slices 0, 4 and 5 hold background only: zarr stores no chunk for them
    return image, label


@pytest.mark.parametrize("threads", [1, 3])
def test_shards_are_the_bytes_zarr_writes(tmp_path, threads, monkeypatch):
    monkeypatch.setattr(writer, "_encode_threads", threads)
    image, label = _phantom_slices(np.random.default_rng(3))
    writer.init_store(tmp_path / "out", "zarr")
    writer.write_case(tmp_path / "out", "zarr", "care_000000000000-000000", image, label)
    case = tmp_path / "out" / layout.ZARR_DIR / "care_000000000000-000000"
    for name, data in (("image", image), ("label", label)):
        metadata, shard = _zarr_written(tmp_path, data)
        assert (case / name / "zarr.json").read_bytes() == metadata
        assert (case / name / "c" / "0" / "0" / "0").read_bytes() == shard
        np.testing.assert_array_equal(zarr.open_array(str(case / name), mode="r")[...], data)
    ds_image, ds_label = reader._open_zarr_slices(case / "image"), reader._open_zarr_slices(case / "label")
    for k in range(len(image)):
        np.testing.assert_array_equal(ds_image[k], image[k])
        np.testing.assert_array_equal(ds_label[k], label[k])


def test_an_all_background_array_has_no_shard_as_in_zarr(tmp_path):
    empty = np.zeros((3, 16, 16), np.uint8)
    assert writer.encode_shard(empty) == []
    assert _zarr_written(tmp_path, empty)[1] is None
    writer.init_store(tmp_path / "out", "zarr")
    writer.write_case(tmp_path / "out", "zarr", "care_000000000000-000000", empty.astype(np.int16), empty)
    np.testing.assert_array_equal(
        zarr.open_array(str(tmp_path / "out" / layout.ZARR_DIR / "care_000000000000-000000" / "label"))[...], empty)


def test_group_metadata_is_what_zarr_writes(tmp_path):
    writer.init_store(tmp_path / "ours", "zarr")
    attributes = {"format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION}
    zarr.open_group(str(tmp_path / "theirs"), mode="w", zarr_format=3, attributes=attributes)
    zarr.open_group(str(tmp_path / "theirs" / "case"), mode="w", zarr_format=3)
    assert (tmp_path / "ours" / layout.ZARR_DIR / "zarr.json").read_bytes() == \
        (tmp_path / "theirs" / "zarr.json").read_bytes()
    assert zarr.open_group(str(tmp_path / "ours" / layout.ZARR_DIR), mode="r").attrs.asdict() == attributes
    image, label = _phantom_slices(np.random.default_rng(4), n=3)
    writer.write_case(tmp_path / "ours", "zarr", "care_000000000000-000001", image, label)
    assert (tmp_path / "ours" / layout.ZARR_DIR / "care_000000000000-000001" / "zarr.json").read_bytes() == \
        (tmp_path / "theirs" / "case" / "zarr.json").read_bytes()


@pytest.mark.parametrize("dtype, low, high", [(np.uint8, 0, 4), (np.int16, -3, 3), (np.int32, 0, 70000),
                                              (np.uint16, 0, 2)])
def test_per_slice_counts_match_unique(dtype, low, high):
    rng = np.random.default_rng(5)
    values = rng.integers(low, high + 1, (7, 20, 30)).astype(dtype)
    values[rng.random(values.shape) < 0.8] = 0  # mostly background, as labels are
    values[3] = 0  # a background-only slice
    found, counts = per_slice_counts(values)
    expected_found = np.unique(values)
    np.testing.assert_array_equal(found, expected_found)
    for z in range(values.shape[0]):
        np.testing.assert_array_equal(counts[z], [(values[z] == v).sum() for v in expected_found])
    unique, total = np.unique(values, return_counts=True)
    assert value_counts(values) == {int(v): int(c) for v, c in zip(unique, total)}


def test_select_slices_counts_and_kept_views():
    profile = load_profile("care")
    label = np.zeros((12, 10, 10), np.uint8)
    label[3, 2:4, 2:4] = 1
    label[8, 5:8, 5:8] = 2
    label[9, 0, 0] = 1
    kept, before, after = select_slices(label, profile)
    expected = np.flatnonzero(np.isin(label, profile.keep_classes).any(axis=(1, 2)))
    if profile.margin:
        near = np.abs(np.arange(12)[:, None] - expected[None]).min(1) <= profile.margin
        expected = np.flatnonzero(near)
    np.testing.assert_array_equal(kept, expected)
    assert before[profile.class_names[1]] == 5 and before[profile.class_names[2]] == 9
    assert after == {n: int((label[kept] == c).sum()) for c, n in enumerate(profile.class_names)}
    volume = np.arange(12 * 10 * 10, dtype=np.int16).reshape(12, 10, 10)
    for picked in (np.array([2, 3, 4, 5]), np.array([1, 4, 9]), np.array([7])):
        taken = kept_slices_of(volume, picked, np.int16)
        assert taken.flags.c_contiguous and taken.dtype == np.int16
        np.testing.assert_array_equal(taken, volume[picked])


def test_select_slices_rejects_values_outside_the_profile():
    profile = load_profile("care")
    label = np.zeros((4, 6, 6), np.uint8)
    label[1, 2, 2] = 1
    label[2, 3, 3] = profile.num_classes
    with pytest.raises(CaseError, match=f"label value {profile.num_classes} "):
        select_slices(label, profile)


def test_converting_volume_files_never_imports_pydicom(tmp_path):
    """Only DICOM cases need pydicom (0.25 s to import): the command line and NRRD conversions run without it.

    (NIfTI files are checked with nibabel, whose NIfTI module imports pydicom: 0.5 s once per process.)"""

    raw = tmp_path / "raw"
    for folder in ("imagesTr", "labelsTr"):
        (raw / folder).mkdir(parents=True)
    for i in range(2):
        label = np.zeros((6, 32, 32), np.uint8)
        label[2:4, 10:20, 10:20] = 13  # rectum in the WORD profile
        image = sitk.GetImageFromArray((label.astype(np.int16) * 40) - 1000)
        sitk.WriteImage(image, str(raw / "imagesTr" / f"word_{i:04d}.nrrd"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(raw / "labelsTr" / f"word_{i:04d}.nrrd"))
    (tmp_path / "key").write_bytes(b"k" * 32)
    script = (
        "import sys; from care_dataset.cli import convert_main\n"
        f"code = convert_main([{str(raw)!r}, {str(tmp_path / 'out')!r}, '--profile', 'word', "
        f"'--key-file', {str(tmp_path / 'key')!r}, '--quiet'])\n"
        "print(code, 'pydicom' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["0", "False"], result.stderr
    assert (tmp_path / "out" / "dataset.json").exists()
