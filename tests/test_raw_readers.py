"""Reading raw cases: DICOM series selection, label grids, canonical orientation, label mapping, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import RLELossless, generate_uid

from care_dataset.convert.case import CaseError, load_case
from care_dataset.raw.discover import RawCase, discover_cases
from care_dataset.raw.image import canonical_geometry, geometry_of, to_canonical
from care_dataset.raw.profiles import load_profile, parse_profile
from care_dataset.raw.volume import parse_label_description
from care_dataset.synth import raw_export
from ct_instances import new_ct_instance

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PHI_FOLDER = "DOE^JOHN 1961-04-02"
CARE = load_profile("care")


def write_series(
    folder: Path,
    hu: np.ndarray,
    spacing=(0.8, 0.8, 2.5),
    origin=(-12.0, -10.0, -40.0),
    row=(1.0, 0.0, 0.0),
    col=(0.0, 1.0, 0.0),
    modality="CT",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    slope=1.0,
    intercept=-1024.0,
    prefix="IM",
) -> str:
    """Write ``hu`` (slices along row x col, ordered along the normal) as a DICOM series; returns its UID.

    File names run against the slice order so that only geometry can sort them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    normal = np.cross(row, col)
    stored = np.rint((hu.astype(np.float64) - intercept) / slope).astype(np.int16)
    for k, pixels in enumerate(stored):
        ds = new_ct_instance()
        ds.PatientName, ds.PatientID, ds.Modality = "DOE^JOHN", "PID-4711", modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, 2
        ds.ImageType = list(image_type)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.ImageOrientationPatient = [*map(float, row), *map(float, col)]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.save_as(folder / f"{prefix}{len(stored) - k:03d}", enforce_file_format=True)
    return series_uid


def phantom(shape=(8, 24, 32), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=shape).astype(np.int16)


def label_like(image: sitk.Image, box=(slice(2, 5), slice(5, 12), slice(8, 20)), value=1) -> sitk.Image:
    values = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    values[box] = value
    label = sitk.GetImageFromArray(values)
    label.CopyInformation(image)
    return label


def series_image(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def only_case(raw: Path, profile=CARE) -> RawCase:
    cases = discover_cases(raw, profile)
    assert len(cases) == 1
    return cases[0]


def assert_private(message: str) -> None:
    for secret in ("DOE", "JOHN", "PID-4711", "1961", "IM0", "1.2.826"):
        assert secret not in message, message


# ---------------------------------------------------------------- DICOM series selection


def test_chooses_series_matching_label_among_two_series_and_localizer(tmp_path):
    case = tmp_path / "raw" / PHI_FOLDER
    fine, coarse = phantom((8, 24, 32), seed=1), phantom((4, 24, 32), seed=2)
    fine_uid = write_series(case / "study" / "a" / "fine", fine, spacing=(0.8, 0.8, 2.5), prefix="F")
    coarse_uid = write_series(case / "study" / "b", coarse, spacing=(0.8, 0.8, 5.0), prefix="C")
    write_series(case / "study" / "a", phantom((2, 24, 24), seed=3), spacing=(2.0, 2.0, 50.0),
                 row=(0.0, 1.0, 0.0), col=(0.0, 0.0, -1.0), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                 prefix="L")
    write_series(case / "study", phantom((1, 24, 32), seed=4), prefix="S")  # single image
    (case / "DICOMDIR").write_bytes(b"not parsed")
    (case / "notes.json").write_text("{}")

    for hu, uid, spacing in ((coarse, coarse_uid, 5.0), (fine, fine_uid, 2.5)):
        grid = sitk.GetImageFromArray(hu)
        grid.SetSpacing((0.8, 0.8, spacing))
        grid.SetOrigin((-12.0, -10.0, -40.0))
        sitk.WriteImage(label_like(grid, box=(slice(1, 3), slice(4, 9), slice(3, 7))), str(case / "rectum_seg.nii.gz"))
        loaded = load_case(only_case(tmp_path / "raw"), CARE)
        assert loaded.header.SeriesInstanceUID == uid
        np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.image), hu)
        assert loaded.image.GetPixelID() == sitk.sitkInt16
        assert loaded.label.GetPixelID() == sitk.sitkUInt8
        assert loaded.original["size"] == [32, 24, hu.shape[0]]
        assert loaded.original["orientation"] == "LPS"


def test_no_matching_series_lists_candidate_grids(tmp_path):
    case = tmp_path / "raw" / PHI_FOLDER
    write_series(case / "one", phantom((8, 24, 32)), spacing=(0.8, 0.8, 2.5), prefix="A")
    write_series(case / "two", phantom((4, 24, 32)), spacing=(0.8, 0.8, 5.0), prefix="B")
    grid = sitk.Image(32, 24, 6, sitk.sitkUInt8)
    grid.SetSpacing((0.8, 0.8, 3.0))
    sitk.WriteImage(label_like(grid), str(case / "label.nrrd"))
    with pytest.raises(CaseError) as err:
        load_case(only_case(tmp_path / "raw"), CARE)
    message = str(err.value)
    assert "no series matches the annotation grid 32x24x6 at 0.80x0.80x3.00 mm" in message
    assert "32x24x8 at 0.80x0.80x2.50 mm" in message and "32x24x4 at 0.80x0.80x5.00 mm" in message
    assert_private(message)


# ---------------------------------------------------------------- grid check


def _volume_case(tmp_path: Path, image: sitk.Image, label: sitk.Image, label_name="seg.nii.gz") -> RawCase:
    case = tmp_path / "raw" / PHI_FOLDER
    case.mkdir(parents=True)
    sitk.WriteImage(image, str(case / "ct.nii.gz"))
    sitk.WriteImage(label, str(case / label_name))
    return only_case(tmp_path / "raw")


def _oblique_free_image(shape=(8, 24, 32)) -> sitk.Image:
    image = sitk.GetImageFromArray(phantom(shape))
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((100.0, -50.0, 20.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS, as NIfTI writers store CT
    return image


def test_label_with_permuted_and_flipped_axes_is_accepted(tmp_path):
    image = _oblique_free_image()
    values = np.zeros((8, 24, 32), np.uint8)
    values[1:4, 2:6, 3:11] = 1
    values[5, 20, 30] = 2
    label = sitk.GetImageFromArray(values)
    label.CopyInformation(image)
    rewritten = sitk.Flip(sitk.PermuteAxes(label, [2, 0, 1]), [True, False, True])
    assert rewritten.GetSize() == (8, 32, 24)
    loaded = load_case(_volume_case(tmp_path, image, rewritten, "label.mha"), CARE)
    expected = sitk.GetArrayFromImage(to_canonical(label))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.label), expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.image), sitk.GetArrayFromImage(to_canonical(image)))
    assert geometry_of(loaded.label) == geometry_of(loaded.image)


def test_label_shifted_by_two_voxels_fails_with_both_geometries(tmp_path):
    image = _oblique_free_image()
    label = label_like(image)
    origin = np.array(label.GetOrigin())
    label.SetOrigin(tuple(origin + np.array(label.GetDirection()).reshape(3, 3) @ np.array([2 * 0.7, 0, 0])))
    with pytest.raises(CaseError) as err:
        load_case(_volume_case(tmp_path, image, label), CARE)
    message = str(err.value)
    assert "annotation grid does not match the image grid (origin differs" in message
    canonical = geometry_of(to_canonical(image))
    assert message.count("32x24x8 at 0.70x0.90x3.00 mm") == 2
    x0 = canonical["origin"][0]
    assert f"image 32x24x8 at 0.70x0.90x3.00 mm origin ({x0:.2f}," in message
    assert f"annotation 32x24x8 at 0.70x0.90x3.00 mm origin ({x0 - 1.4:.2f}," in message  # index x runs to -x
    assert_private(message)


def test_label_with_other_spacing_fails(tmp_path):
    image = _oblique_free_image()
    label = label_like(image)
    label.SetSpacing((0.7, 0.9, 2.5))
    with pytest.raises(CaseError, match=r"spacing differs.*0\.70x0\.90x3\.00 mm.*0\.70x0\.90x2\.50 mm"):
        load_case(_volume_case(tmp_path, image, label), CARE)


def test_canonical_geometry_matches_dicomorient():
    rng = np.random.default_rng(7)
    for _ in range(12):
        perm = rng.permutation(3)
        signs = rng.choice([-1.0, 1.0], size=3)
        angle = rng.uniform(-0.2, 0.2)
        tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
        direction = tilt @ (np.eye(3)[:, perm] * signs)
        image = sitk.Image([int(v) for v in rng.integers(2, 7, size=3)], sitk.sitkUInt8)
        image.SetSpacing([float(v) for v in rng.uniform(0.5, 3, size=3)])
        image.SetOrigin([float(v) for v in rng.uniform(-200, 200, size=3)])
        image.SetDirection([float(v) for v in direction.ravel()])
        geometry = geometry_of(image)
        predicted = canonical_geometry(geometry)
        actual = geometry_of(sitk.DICOMOrient(image, "LPS"))
        assert predicted["size"] == actual["size"]
        np.testing.assert_allclose(predicted["spacing"], actual["spacing"])
        np.testing.assert_allclose(predicted["origin"], actual["origin"], atol=1e-9)
        np.testing.assert_allclose(predicted["direction"], actual["direction"], atol=1e-12)


# ---------------------------------------------------------------- canonical orientation


def test_feet_first_series_is_stored_anterior_up_patient_right_left(tmp_path):
    """Row cosine toward patient right, slices stacked head to feet: canonical puts right-anterior at [0, 0]."""
    hu = np.full((6, 20, 30), -1000, np.int16)
    # stored column index grows toward patient right (row cosine -x), row index toward posterior;
    # stored slice index grows toward the feet (normal = row x col = -z)
    hu[0, 0:2, 28:30] = 1000  # most superior slice, anterior, patient right
    hu[0, 0:2, 0:2] = 500  # same slice, anterior, patient left
    case = tmp_path / "raw" / PHI_FOLDER
    write_series(case / "ct", hu, row=(-1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0), origin=(50.0, -30.0, 0.0))
    image = series_image(case / "ct")
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == "RPI"
    label = label_like(image, box=(slice(0, 1), slice(0, 2), slice(28, 30)))
    sitk.WriteImage(label, str(case / "Segmentation.nii.gz"))
    loaded = load_case(only_case(tmp_path / "raw"), CARE)
    values = sitk.GetArrayFromImage(loaded.image)
    k, r, c = np.unravel_index(np.argmax(values), values.shape)
    assert (k, r < 2, c < 2) == (5, True, True)  # superior slice last; anterior top; patient right left
    assert values[5, 0, 29] == 500  # patient left on the image's right
    assert loaded.original["orientation"] == "RPI"
    assert sitk.GetArrayFromImage(loaded.label)[5, :2, :2].all()
    assert np.allclose(loaded.image.GetDirection(), np.eye(3).ravel())


def test_ras_volume_file_is_stored_in_radiological_convention(tmp_path):
    image = _oblique_free_image((4, 10, 12))  # RAS: index x grows toward patient right, y toward anterior
    values = sitk.GetArrayFromImage(image)
    values[:] = -1000
    values[0, 9, 11] = 900  # last x, last y: right-anterior corner; z = 0 is the inferior slice
    marked = sitk.GetImageFromArray(values)
    marked.CopyInformation(image)
    label = label_like(marked, box=(slice(0, 1), slice(9, 10), slice(11, 12)))
    loaded = load_case(_volume_case(tmp_path, marked, label), CARE)
    out = sitk.GetArrayFromImage(loaded.image)
    assert np.unravel_index(np.argmax(out), out.shape) == (0, 0, 0)


# ---------------------------------------------------------------- label values


def test_unknown_label_values_fail(tmp_path):
    image = _oblique_free_image()
    label = label_like(image)
    values = sitk.GetArrayFromImage(label)
    values[0, 0, :2], values[1, 1, 1] = 7, 9
    bad = sitk.GetImageFromArray(values)
    bad.CopyInformation(image)
    with pytest.raises(CaseError, match=r"^label values \[7, 9\] are not in profile care$"):
        load_case(_volume_case(tmp_path, image, bad), CARE)


def test_empty_annotation_fails(tmp_path):
    image = _oblique_free_image()
    with pytest.raises(CaseError, match="^annotation is empty$"):
        load_case(_volume_case(tmp_path, image, label_like(image, value=0)), CARE)


def test_non_integer_label_fails(tmp_path):
    image = _oblique_free_image()
    label = sitk.Cast(label_like(image), sitk.sitkFloat32) * 0.5
    with pytest.raises(CaseError, match="non-integer"):
        load_case(_volume_case(tmp_path, image, label), CARE)


def test_label_names_from_itksnap_description_map_to_classes(tmp_path):
    profile = parse_profile({
        "name": "by-name",
        "classes": {"names": ["background", "normal rectum", "tumor"]},
        "labels": {"values": {"0": 0}, "names": {"rectum": 1, "tumor": 2}},
    })
    image = _oblique_free_image()
    values = np.zeros((8, 24, 32), np.int16)
    values[2, 3:5, 3:5] = 4
    values[3, 6, 6] = 11
    label = sitk.GetImageFromArray(values)
    label.CopyInformation(image)
    case = _volume_case(tmp_path, image, label)
    (case.root / "label_descriptions.txt").write_text(
        "################################################\n"
        "# ITK-SNAP Label Description File\n"
        "# Columns = IDX -R- -G- -B- -A-- VIS MSH LABEL\n"
        "################################################\n"
        '    0     0    0    0        0  0  0    "Clear Label"\n'
        '    4   255    0    0        1  1  1    "Rectum (Doe)"\n'
        '   11     0  255    0      0.5  1  1    "Tumor"\n'
    )
    case = only_case(tmp_path / "raw", profile)
    assert case.description_path is not None and case.description_path.name == "label_descriptions.txt"
    loaded = load_case(case, profile)
    assert loaded.description_names == {0: "Clear Label", 4: "Rectum (Doe)", 11: "Tumor"}
    classes = sitk.GetArrayFromImage(loaded.label)
    canonical_raw = sitk.GetArrayFromImage(to_canonical(label))
    np.testing.assert_array_equal(classes, np.select([canonical_raw == 4, canonical_raw == 11], [1, 2], 0))


def test_label_description_rejects_other_formats(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("patient was nervous\n")
    with pytest.raises(ValueError):
        parse_label_description(path)


# ---------------------------------------------------------------- pixel data and headers


def test_rescale_wraparound_is_clipped_and_fractional_slope_rounded(tmp_path):
    hu = phantom((3, 16, 16))
    hu[0, 0, 0] = -32000  # stored -30976 with intercept -1024: in range
    case = tmp_path / "raw" / PHI_FOLDER
    write_series(case / "ct", hu, intercept=-1024.0)
    folder = case / "ct"
    extreme = pydicom.dcmread(sorted(folder.iterdir())[-1])  # slice 0 (names run backwards)
    pixels = extreme.pixel_array.copy()
    pixels[0, 1] = -32768  # stored minimum: HU -33792 does not fit int16
    extreme.PixelData = pixels.tobytes()
    extreme.save_as(sorted(folder.iterdir())[-1])
    sitk.WriteImage(label_like(series_image(folder), box=(slice(0, 1), slice(0, 2), slice(0, 2))),
                    str(case / "seg.nrrd"))
    values = sitk.GetArrayFromImage(load_case(only_case(tmp_path / "raw"), CARE).image)
    assert values[0, 0, 0] == -32000 and values[0, 0, 1] == -32768
    np.testing.assert_array_equal(values[1:], hu[1:])

    shutil.rmtree(folder)
    hu[0, 0, 0] = -1000
    write_series(folder, hu, slope=0.5, intercept=-1024.25)
    values = sitk.GetArrayFromImage(load_case(only_case(tmp_path / "raw"), CARE).image)
    stored = np.rint((hu.astype(np.float64) + 1024.25) / 0.5)
    np.testing.assert_array_equal(values, np.clip(np.rint(stored * 0.5 - 1024.25), -32768, 32767))


def test_rle_compressed_series_reads_like_uncompressed(tmp_path):
    hu = phantom((4, 16, 20))
    case = tmp_path / "raw" / PHI_FOLDER
    write_series(case / "ct", hu)
    for path in (case / "ct").iterdir():
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert pydicom.dcmread(next((case / "ct").iterdir())).file_meta.TransferSyntaxUID == RLELossless
    sitk.WriteImage(label_like(series_image(case / "ct"), box=(slice(1, 2), slice(2, 4), slice(2, 4))),
                    str(case / "seg.nii.gz"))
    loaded = load_case(only_case(tmp_path / "raw"), CARE)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.image), hu)


def test_undecodable_compression_fails_with_syntax_name(tmp_path):
    hu = phantom((3, 16, 16))
    case = tmp_path / "raw" / PHI_FOLDER
    write_series(case / "ct", hu)
    sitk.WriteImage(label_like(series_image(case / "ct"), box=(slice(1, 2), slice(2, 4), slice(2, 4))),
                    str(case / "seg.nii.gz"))
    for path in (case / "ct").iterdir():
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC: no decoder in SimpleITK
        ds.save_as(path)
    with pytest.raises(CaseError, match=r"^unreadable compression: MPEG-4 AVC/H\.264 High Profile"):
        load_case(only_case(tmp_path / "raw"), CARE)


def test_truncated_dicom_fails_without_naming_the_file(tmp_path):
    hu = phantom((4, 16, 16))
    case = tmp_path / "raw" / PHI_FOLDER
    write_series(case / "ct", hu)
    sitk.WriteImage(label_like(series_image(case / "ct"), box=(slice(1, 2), slice(2, 4), slice(2, 4))),
                    str(case / "seg.nii.gz"))
    victim = sorted((case / "ct").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-200])
    with pytest.raises(CaseError, match="corrupt or truncated") as err:
        load_case(only_case(tmp_path / "raw"), CARE)
    assert_private(str(err.value))


def test_mr_series_is_refused(tmp_path):
    case = tmp_path / "raw" / PHI_FOLDER
    write_series(case / "mr", phantom((4, 16, 16)), modality="MR")
    sitk.WriteImage(label_like(series_image(case / "mr"), box=(slice(1, 2), slice(2, 4), slice(2, 4))),
                    str(case / "seg.nii.gz"))
    with pytest.raises(CaseError, match="^modality MR is not CT$"):
        load_case(only_case(tmp_path / "raw"), CARE)


def test_corrupt_label_file_fails_without_naming_it(tmp_path):
    image = _oblique_free_image()
    case = _volume_case(tmp_path, image, label_like(image))
    case.label_path.write_bytes(case.label_path.read_bytes()[:100])
    with pytest.raises(CaseError, match="annotation file: truncated NIfTI") as err:
        load_case(case, CARE)
    assert "seg" not in str(err.value)


# ---------------------------------------------------------------- discovery


def test_discover_case_folders(tmp_path):
    raw = tmp_path / "raw"
    (raw / "b-case" / "deep").mkdir(parents=True)
    (raw / "b-case" / "deep" / "CT_Label.nii.gz").write_bytes(b"x")
    (raw / "a-case").mkdir()
    (raw / "a-case" / "seg1.nrrd").write_bytes(b"x")
    (raw / "a-case" / "Seg2.mha").write_bytes(b"x")
    (raw / "c-case").mkdir()
    (raw / "c-case" / "image.nii.gz").write_bytes(b"x")
    (raw / ".hidden").mkdir()
    (raw / "loose-file.nii.gz").write_bytes(b"x")
    cases = discover_cases(raw, CARE)
    assert [c.key for c in cases] == ["a-case", "b-case", "c-case"]
    assert cases[0].label_path is None and cases[0].problem.startswith("several annotation files")
    assert cases[1].label_path == raw / "b-case" / "deep" / "CT_Label.nii.gz" and cases[1].problem is None
    assert cases[2].problem == "no annotation file matching *seg*, *label*"
    for case in (cases[0], cases[2]):
        with pytest.raises(CaseError, match="annotation file"):
            load_case(case, CARE)


def test_discover_paired_folders_with_nnunet_names(tmp_path):
    word = load_profile("word")
    raw = tmp_path / "raw"
    for d in ("imagesTr", "labelsTr", "imagesVal", "labelsVal"):
        (raw / d).mkdir(parents=True)
    for name in ("word_0002.nii.gz", "word_0001.nii.gz"):
        (raw / "imagesTr" / name).write_bytes(b"x")
        (raw / "labelsTr" / name).write_bytes(b"x")
    (raw / "imagesVal" / "case7_0000.nii.gz").write_bytes(b"x")
    (raw / "labelsVal" / "case7.nii.gz").write_bytes(b"x")
    (raw / "imagesVal" / "lonely.nii.gz").write_bytes(b"x")
    cases = discover_cases(raw, word)
    assert [c.key for c in cases] == ["case7_0000", "lonely", "word_0001", "word_0002"]
    assert cases[0].label_path == raw / "labelsVal" / "case7.nii.gz"
    assert cases[1].label_path is None and "no annotation" in cases[1].problem
    assert cases[2].root == raw / "imagesTr" / "word_0001.nii.gz"


# ---------------------------------------------------------------- real data


def test_real_dicom_series_with_nrrd_label(tmp_path):
    source = DATA / "dcmqi_ct3slice"
    if not source.is_dir():
        pytest.skip("real data ../shared/data/dcmqi_ct3slice is missing")
    case = tmp_path / "raw" / "ct case"
    shutil.copytree(source / "ct-3slice", case / "series")
    shutil.copy(source / "liver_spine_seg.nrrd", case)
    profile = parse_profile({
        "name": "liver-spine",
        "classes": {"names": ["background", "liver", "spine"]},
        "labels": {"values": {"0": 0, "1": 1, "2": 2}},
    })
    loaded = load_case(only_case(tmp_path / "raw", profile), profile)
    assert loaded.header.Modality == "CT"
    assert loaded.image.GetSize() == (512, 512, 3) and loaded.label.GetSize() == (512, 512, 3)
    assert geometry_of(loaded.image) == geometry_of(loaded.label)
    raw_label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "liver_spine_seg.nrrd")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.label), raw_label)
    image = sitk.GetArrayFromImage(loaded.image)
    labels = sitk.GetArrayFromImage(loaded.label)
    assert 0 < np.median(image[labels == 1]) < 200  # soft tissue HU
    assert np.median(image[labels == 2]) > 150  # bone
    assert image.min() >= -3024


def test_real_nifti_pair_mapped_by_value(tmp_path):
    source = DATA / "totalseg_example_ct_sm"
    if not source.is_dir():
        pytest.skip("real data ../shared/data/totalseg_example_ct_sm is missing")
    profile = parse_profile({
        "name": "abdomen",
        "classes": {"names": ["background", "liver", "colon"]},
        "labels": {"values": {"5": 1, "20": 2}, "unmapped": "background"},
        "layout": {"kind": "paired_folders", "images": ["imagesTr"], "labels": ["labelsTr"]},
    })
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    shutil.copy(source / "example_ct_sm.nii.gz", raw / "imagesTr" / "ex.nii.gz")
    shutil.copy(source / "example_seg.nii.gz", raw / "labelsTr" / "ex.nii.gz")
    loaded = load_case(only_case(raw, profile), profile)
    assert loaded.header is None and loaded.original["orientation"] == "RAS"
    assert geometry_of(loaded.image) == geometry_of(loaded.label)
    raw_label = sitk.GetArrayFromImage(to_canonical(sitk.ReadImage(str(source / "example_seg.nii.gz"))))
    classes = sitk.GetArrayFromImage(loaded.label)
    np.testing.assert_array_equal(classes, np.select([raw_label == 5, raw_label == 20], [1, 2], 0))
    hu = sitk.GetArrayFromImage(loaded.image)
    assert 20 < np.median(hu[classes == 1]) < 150  # liver parenchyma


# ---------------------------------------------------------------- synthetic raw exports (care_dataset.synth)


def test_messy_synthetic_export_loads_exactly_its_ground_truth(tmp_path):
    synth = raw_export
    plans = {plan.folder: plan for plan in synth.plan_dataset(10, seed=3, size=64, slices=12)}
    assert set().union(*(plan.features for plan in plans.values())) == set(synth.MESSY_FEATURES)
    synth.write_raw_dataset(tmp_path, 10, seed=3, size=64, slices=12)
    cases = discover_cases(tmp_path, CARE)
    assert sorted(c.key for c in cases) == sorted(plans)
    for case in cases:
        hu, classes = synth.case_volume(plans[case.key])  # canonical [z, y, x] truth
        loaded = load_case(case, CARE)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.image), hu, err_msg=str(plans[case.key].features))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.label), classes)
        np.testing.assert_allclose(loaded.image.GetOrigin(), plans[case.key].origin, atol=1e-3)


def test_corrupted_synthetic_cases_fail_with_their_reason(tmp_path):
    synth = raw_export
    expected = {
        "truncated_dicom": "corrupt or truncated",
        "no_label": "no annotation file matching *seg*, *label*",
        "mismatched_grid": "annotation grid does not match the image grid (size differs)",
        "empty_label": "annotation is empty",
        "unknown_label_value": "label values [7] are not in profile care",
        "non_ct_modality": "modality MR is not CT",
    }
    plans = synth.plan_dataset(len(synth.CORRUPTIONS), seed=5, size=64, slices=12, messy=False)
    folders = synth.write_raw_dataset(tmp_path, len(plans), seed=5, size=64, slices=12, messy=False)
    for folder, kind in zip(folders, synth.CORRUPTIONS):
        synth.corrupt_case(folder, kind)
    by_key = {case.key: case for case in discover_cases(tmp_path, CARE)}
    for plan, folder, kind in zip(plans, folders, synth.CORRUPTIONS):
        with pytest.raises(CaseError) as err:
            load_case(by_key[folder.name], CARE)
        message = str(err.value)
        assert expected[kind] in message, (kind, message)
        for secret in (plan.folder, plan.patient.family, plan.patient.patient_id, plan.patient.study_date):
            assert secret not in message
