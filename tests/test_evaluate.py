"""`usam eval` end to end on a tiny converted folder: an oracle model, an untrained model, the CLI."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from rich.console import Console
from torch import nn

from care_dataset import files
from care_dataset.format import layout, reader, writer
from care_dataset.publish.job import publish
from usam.cli import add_eval_arguments
from usam.data import resize_labels
from usam.evaluate import (cases_csv, default_out_name, evaluate_split, print_tables, report, run_eval,
                            summary_csv)
from usam.inference import InputError, inference_settings
from usam.metrics import dice_from_confusion
from usam.models.checkpoints import save_checkpoint
from usam.models.registry import create_model

CLASSES = ["background", "normal rectum", "tumor"]
SPACING = [0.75, 0.8, 2.5]  # x, y, z mm


def _case(rng, n, h, w, with_tumor=True):
    """A body-like ellipse of soft tissue, a rectum ring-ish blob and a tumour inside its wall."""
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.full((n, h, w), -1000, np.int16)
    body = ((rows - h / 2) / (0.45 * h)) ** 2 + ((cols - w / 2) / (0.45 * w)) ** 2 <= 1
    image[:, body] = 40
    label = np.zeros((n, h, w), np.uint8)
    for z in range(n):
        r0, c0 = h * 0.55 + z, w * 0.5 - z
        rectum = ((rows - r0) / (0.12 * h)) ** 2 + ((cols - c0) / (0.1 * w)) ** 2 <= 1
        label[z][rectum] = 1
        if with_tumor and z > 0:
            tumor = ((rows - r0) / (0.06 * h)) ** 2 + ((cols - c0 - 0.05 * w) / (0.05 * w)) ** 2 <= 1
            label[z][tumor & rectum] = 2
    image[label > 0] = 90
    image += rng.integers(-20, 20, image.shape).astype(np.int16)
    return image, label


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Three test cases of different in-plane sizes (one exactly 224 x 224, one with a gap in its
    kept slices, one without tumour) and one training case, in the format of docs/format.md."""
    root = tmp_path_factory.mktemp("converted")
    rng = np.random.default_rng(11)
    cases = {
        "care_000000000001": (_case(rng, 3, 224, 224), [10, 11, 12]),
        "care_000000000002": (_case(rng, 4, 180, 150), [3, 4, 6, 7]),
        "care_000000000003": (_case(rng, 2, 120, 136, with_tumor=False), [0, 1]),
        "care_000000000004": (_case(rng, 2, 100, 100), [5, 6]),
    }
    writer.init_store(root, "zarr")
    geometry = {}
    for case_id, ((image, label), kept) in cases.items():
        writer.write_case(root, "zarr", case_id, image, label)
        n, h, w = image.shape
        canonical = {"size": [w, h, max(kept) + 1], "spacing": SPACING, "origin": [0.0, 0.0, 0.0],
                     "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
        geometry[case_id] = {"split": "train" if case_id.endswith("4") else "test", "num_slices": n,
                             "kept_slices": kept, "canonical": canonical, "spacing": SPACING,
                             "original": {**canonical, "orientation": "LPS"}}
    files.write_json_atomic(root / "dataset.json", {"format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION,
                                                    "storage": "zarr", "classes": CLASSES})
    files.write_json_atomic(root / "cases.json", geometry)
    files.write_json_atomic(root / "splits.json", {"seed": 0, "strategy": "patient", "train": ["care_000000000004"],
                                                   "test": ["care_000000000001", "care_000000000002",
                                                            "care_000000000003"]})
    return root


class OracleModel(nn.Module):
    """Replays logits equal to the nearest-resized truth of each batch, in evaluation order; records
    the prompts it was given."""

    def __init__(self, dataset, split, batch_size, size=224, miss=None):
        """miss: optional {case_id: class} whose class is never predicted in that case."""
        super().__init__()
        self.queue, self.truths, self.calls = [], [], []
        for case_id in dataset.case_ids(split):
            _, label = dataset.read_case(case_id)
            for start in range(0, len(label), batch_size):
                truth = resize_labels(torch.from_numpy(label[start:start + batch_size]), size)
                self.truths.append(truth)
                logits = torch.nn.functional.one_hot(truth, 3).permute(0, 3, 1, 2).float() * 10
                if miss and case_id in miss:
                    logits[:, miss[case_id]] = -10.0
                self.queue.append(logits)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, images, points=None, point_labels=None):
        assert images.shape[1:] == (1, 224, 224) and 0 <= float(images.min()) and float(images.max()) <= 1
        self.calls.append((points, point_labels))
        return self.queue[len(self.calls) - 1]


SETTINGS = inference_settings({"model": {"num_classes": 3, "img_size": 224, "points_per_class": 3},
                               "class_names": CLASSES, "window": [-125.0, 275.0]})


@pytest.mark.parametrize("points", [0, 3])
def test_oracle_gives_perfect_pooled_dice_and_near_perfect_original_resolution(converted, points):
    dataset = reader.open_dataset(converted)
    oracle = OracleModel(dataset, "test", batch_size=2)
    evaluation = evaluate_split(oracle, SETTINGS, dataset, "test", points, batch_size=2)
    assert len(oracle.calls) == len(oracle.queue)  # every slice ran exactly once
    assert evaluation.num_slices == 9
    pooled = dice_from_confusion(evaluation.pooled_confusion)
    assert pooled[1] == 1.0 and pooled[2] == 1.0
    by_id = {case.case_id: case for case in evaluation.cases}
    exact = by_id["care_000000000001"]  # stored at 224 x 224: resizing is the identity
    assert exact.dice[1] == 1.0 and exact.dice[2] == 1.0 and exact.hd95[1] == 0.0
    resized = by_id["care_000000000002"]  # nearest down to 224 then bilinear back: boundary pixels move
    assert 0.9 < resized.dice[1] <= 1.0 and 0.85 < resized.dice[2] <= 1.0
    assert 0.0 <= resized.hd95[1] <= 2 * max(SPACING[:2])  # at most about a pixel off in-plane
    no_tumor = by_id["care_000000000003"]
    assert math.isnan(no_tumor.dice[2]) and math.isnan(no_tumor.iou[2]) and math.isnan(no_tumor.hd95[2])
    summary = report(evaluation, "oracle")
    clinical = summary["clinical_protocol"]
    assert clinical["cases_class_absent_in_truth_and_prediction"]["tumor"] == 1
    assert clinical["dice"]["tumor"]["n"] == 2 and clinical["dice"]["tumor"]["n_undefined"] == 1
    if points:
        for (p, labels), truth in zip(oracle.calls, oracle.truths):
            for b in range(len(truth)):
                for slot in range(6):
                    cls = 1 + slot // 3
                    if labels[b, slot] == 1:  # a real point lies on its class in the model-size truth
                        x, y = p[b, slot].round().long().tolist()
                        assert truth[b, y, x] == cls
                    else:
                        assert not (truth[b] == cls).any()
    else:
        assert all(p is None for p, _ in oracle.calls)


def test_missed_tumour_is_excluded_from_hd95_but_penalised_in_hd95_penalised(converted):
    dataset = reader.open_dataset(converted)
    missed = "care_000000000002"
    oracle = OracleModel(dataset, "test", batch_size=4, miss={missed: 2})
    evaluation = evaluate_split(oracle, SETTINGS, dataset, "test", 0, batch_size=4)
    by_id = {case.case_id: case for case in evaluation.cases}
    # the evaluated volume of the missed case: kept slices 3..7 (5 z positions) of 180 x 150 pixels
    diagonal = math.sqrt((5 * SPACING[2]) ** 2 + (180 * SPACING[1]) ** 2 + (150 * SPACING[0]) ** 2)
    assert by_id[missed].dice[2] == 0.0 and math.isnan(by_id[missed].hd95[2])
    assert by_id[missed].hd95_penalised[2] == pytest.approx(diagonal)
    found = by_id["care_000000000001"]  # tumour found: both definitions agree
    assert found.hd95_penalised[2] == found.hd95[2] == 0.0
    summary = report(evaluation, "oracle")
    clinical = summary["clinical_protocol"]
    plain, penalised = clinical["hd95_mm"]["tumor"], clinical["hd95_mm_penalised"]["tumor"]
    assert plain["mean"] == 0.0 and plain["n"] == 1 and plain["n_undefined"] == 2  # the miss looks perfect
    assert penalised["n"] == 2 and penalised["n_undefined"] == 1  # only the tumour-free case is excluded
    assert penalised["mean"] == pytest.approx(diagonal / 2)
    assert clinical["cases_class_in_truth_but_not_predicted"]["tumor"] == 1
    assert summary["cases"][1]["hd95_mm_penalised"]["tumor"] == pytest.approx(diagonal)
    rows = {r["case_id"]: r for r in csv.DictReader(io.StringIO(cases_csv(evaluation)))}
    assert rows[missed]["hd95_mm_tumor"] == "NaN"
    assert float(rows[missed]["hd95_mm_penalised_tumor"]) == pytest.approx(diagonal)
    long = {(r["metric"], r["class"]): r for r in csv.DictReader(io.StringIO(summary_csv(summary)))}
    assert float(long["hd95_mm_penalised", "tumor"]["mean"]) == pytest.approx(diagonal / 2)
    assert long["hd95_mm", "tumor"]["n_undefined"] == "2"
    console = Console(record=True, width=250)
    print_tables(summary, console)
    text = console.export_text()
    assert "HD95 mm" in text and "penalised" in text and "missed" in text
    assert f"{diagonal / 2:.2f}" in text
    assert "misses and false positives are excluded" in text and "field of view" in text


def test_fewer_points_than_slots_pads_the_rest(converted):
    dataset = reader.open_dataset(converted)
    oracle = OracleModel(dataset, "test", batch_size=8)
    evaluate_split(oracle, SETTINGS, dataset, "test", 1, batch_size=8)
    for (_, labels), truth in zip(oracle.calls, oracle.truths):
        for b in range(len(truth)):
            for cls in (1, 2):
                slots = labels[b, (cls - 1) * 3:cls * 3].tolist()
                assert slots == ([1, -1, -1] if (truth[b] == cls).any() else [-1, -1, -1])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("usam_tiny", num_classes=3, img_size=64, vit_window_size=4, points_per_class=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("run") / "best",
                           {"classes": CLASSES, "window": [-125.0, 275.0], "points_per_class": 3, "input_size": 64})


def _eval_args(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_with_untrained_model_writes_reports(converted, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_eval(_eval_args("--data", str(converted), "--checkpoint", str(tiny_checkpoint),
                               "--batch-size", "4", "--device", "cpu", "--out", str(out))) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cases.csv", "cases_grid.png", "metrics.json", "summary.csv"]
    assert (out / "cases_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # staged, renamed in, readable as any folder
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["points_per_class"] == 3 and summary["num_cases"] == 3 and summary["num_slices"] == 9
    assert summary["volume_protocol"] == summary["clinical_protocol"]["volume"] == "labelled"
    for protocol in ("paper_protocol", "clinical_protocol"):
        for metric in ("dice", "iou"):
            for value in summary[protocol][metric].values():
                value = value["mean"] if isinstance(value, dict) else value
                assert value is None or 0.0 <= value <= 1.0
    for case in summary["cases"]:
        for name in ("normal rectum", "tumor"):
            dice, hd = case["dice"][name], case["hd95_mm"][name]
            if case["true_voxels"][name] == 0 and case["predicted_voxels"][name] == 0:
                assert dice is None and hd is None
            elif case["true_voxels"][name] == 0 or case["predicted_voxels"][name] == 0:
                assert dice == 0.0 and hd is None
            else:
                assert 0.0 <= dice <= 1.0 and hd >= 0.0
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [r["case_id"] for r in rows] == [c["case_id"] for c in summary["cases"]]
    text = capsys.readouterr().out
    assert "PAPER protocol" in text and "CLINICAL protocol" in text
    # determinism: a second run gives the same numbers
    again = tmp_path / "again"
    run_eval(_eval_args("--data", str(converted), "--checkpoint", str(tiny_checkpoint), "--batch-size", "4",
                        "--device", "cpu", "--out", str(again), "--points", "3"))
    assert json.loads((again / "metrics.json").read_text()) == summary


def test_cli_rejects_bad_input_with_one_line(converted, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (("--data", str(tmp_path / "missing"), "--checkpoint", str(tiny_checkpoint)), "missing: no such folder"),
        (("--data", str(tmp_path), "--checkpoint", str(tiny_checkpoint)), "neither a converted CARE folder"),
        (("--data", str(converted), "--checkpoint", str(tiny_checkpoint), "--device", "gpu"), "not a device"),
        (("--data", str(converted), "--checkpoint", str(tmp_path / "missing")), "missing: no such folder"),
        (("--data", str(converted), "--checkpoint", str(tiny_checkpoint), "--split", "val"), "no split"),
        (("--data", str(converted), "--checkpoint", str(tmp_path)), "needs config.json"),
        (("--data", str(converted), "--checkpoint", str(tiny_checkpoint), "--points", "5"), "prompt slot"),
    ]
    for argv, reason in cases:
        assert run_eval(_eval_args(*argv, "--out", str(out))) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("usam eval: ") and reason in err and "\n" not in err
    assert not out.exists()


def test_a_bad_out_folder_is_refused_before_any_work(converted, tiny_checkpoint, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (a_file, "exists and is not a folder"),
        (a_file / "sub", "is a file, not a folder"),
        (converted / "eval", "inside the --data folder"),
        (tiny_checkpoint, "inside the --checkpoint folder"),
    ]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    checkpoint_files = sorted(tiny_checkpoint.iterdir())
    for out, reason in cases:
        args = _eval_args("--data", str(converted), "--checkpoint", str(tiny_checkpoint), "--out", str(out))
        assert run_eval(args) == 2
        captured = capsys.readouterr()
        assert reason in captured.err and "\n" not in captured.err.strip()
        assert "Dice" not in captured.out  # refused before the evaluation ran
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (converted / "eval").exists() and sorted(tiny_checkpoint.iterdir()) == checkpoint_files


def test_eval_on_a_published_folder_equals_eval_on_the_converted_one(converted, tiny_checkpoint, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    published = tmp_path / "care"
    publish(converted, published)
    outputs = {}
    for name, data in (("converted", converted), ("published", published)):
        outputs[name] = tmp_path / name
        assert run_eval(_eval_args("--data", str(data), "--checkpoint", str(tiny_checkpoint), "--batch-size", "4",
                                   "--device", "cpu", "--out", str(outputs[name]))) == 0
    for file in ("metrics.json", "cases.csv", "summary.csv", "cases_grid.png"):
        assert (outputs["published"] / file).read_bytes() == (outputs["converted"] / file).read_bytes(), file
    summary = json.loads((outputs["published"] / "metrics.json").read_text())
    assert summary["num_cases"] == 3 and summary["num_slices"] == 9
    corrupt = tmp_path / "corrupt"
    shutil.copytree(published, corrupt)
    shard = sorted((corrupt / "volumes").glob("test-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:300])  # a truncated download
    capsys.readouterr()
    for data, split, reason in ((published, "val", "no split 'val'"), (corrupt, "test", "Parquet")):
        assert run_eval(_eval_args("--data", str(data), "--checkpoint", str(tiny_checkpoint), "--split", split,
                                   "--out", str(tmp_path / "never"))) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("usam eval: ") and reason in err
    assert not (tmp_path / "never").exists()


def test_grid_titles_stay_inside_the_image(converted, tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert run_eval(_eval_args("--data", str(converted), "--checkpoint", str(tiny_checkpoint), "--batch-size", "4",
                               "--device", "cpu", "--out", str(out))) == 0
    pixels = imread(out / "cases_grid.png")[..., :3]
    rows = len(json.loads((out / "metrics.json").read_text())["cases"])
    assert pixels.shape[0] > 300 * min(rows, 3)  # one row of panels per best / median / worst case
    # the figure is white around its panels: only clipped text would touch the left or right edge
    edges = np.concatenate([pixels[:, :2], pixels[:, -2:]], axis=1)
    assert (edges > 0.99).all()


def test_an_out_folder_whose_parent_is_not_writable_is_refused_before_any_work(converted, tiny_checkpoint,
                                                                                 tmp_path, unprivileged):
    """The files are staged beside --out and moved in, so its parent must take new files too."""
    prefix = unprivileged
    parent = tmp_path / "shared"
    out = parent / "mine"
    out.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(parent, 65534, 65534)  # nobody's (mode 755): root without DAC override may enter, not write
    else:
        parent.chmod(0o555)
    code = "import sys; from usam.cli import main; sys.exit(main(sys.argv[1:]))"
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", code, "eval", "--data", str(converted),
                                 "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--device", "cpu"],
                                capture_output=True, text=True)
    finally:
        parent.chmod(0o755)
        if os.geteuid() == 0:
            os.chown(parent, 0, 0)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-1500:]
    assert f"cannot create files in {parent} (Permission denied)" in lines[0]
    assert "Dice" not in result.stdout and list(out.iterdir()) == []


# ---------------------------------------------------------------- --volume labelled | full


@pytest.fixture(scope="module")
def whole_scans(tmp_path_factory):
    """Two test cases stored whole (as [slices] margin = "all" keeps them): 6 slices of 224 x 224, the rectum
    labelled on slices 2-3 and bright there; slice 5 holds an equally bright, unlabelled blob."""
    root = tmp_path_factory.mktemp("whole")
    writer.init_store(root, "zarr")
    rows, cols = np.mgrid[0:224, 0:224]
    geometry = {}
    for i, case_id in enumerate(("care_00000000000a-000001", "care_00000000000b-000001")):
        image = np.full((6, 224, 224), -1000, np.int16)
        image[:, 30:194, 30:194] = 40
        label = np.zeros((6, 224, 224), np.uint8)
        blob = (rows - 100 - 5 * i) ** 2 + (cols - 110) ** 2 < 20 ** 2
        label[2:4, blob] = 1
        image[2:4, blob] = 90
        image[5, blob] = 90  # looks like rectum, is not: a false positive outside the labelled range
        writer.write_case(root, "zarr", case_id, image, label)
        canonical = {"size": [224, 224, 6], "spacing": SPACING, "origin": [0.0, 0.0, 0.0],
                     "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
        geometry[case_id] = {"split": "test", "num_slices": 6, "kept_slices": list(range(6)), "canonical": canonical,
                             "spacing": SPACING, "original": {**canonical, "orientation": "LPS"},
                             "slice_selection": "all"}
    files.write_json_atomic(root / "dataset.json", {"format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION,
                                                    "storage": "zarr", "classes": CLASSES})
    files.write_json_atomic(root / "cases.json", geometry)
    files.write_json_atomic(root / "splits.json", {"seed": 0, "strategy": "patient", "test": sorted(geometry)})
    return root


class BrightModel(nn.Module):
    """Predicts rectum wherever the windowed input is brighter than soft tissue; counts the slices it sees."""

    def __init__(self):
        super().__init__()
        self.slices_seen = 0
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, images, points=None, point_labels=None):
        self.slices_seen += len(images)
        bright = (images[:, 0] > 0.475).float()  # HU 90 -> 0.54, HU 40 -> 0.41 in the window [-125, 275]
        return torch.stack([1 - bright, bright, torch.full_like(bright, -1.0)], dim=1) * 10


def test_labelled_scores_the_labelled_slices_and_full_the_whole_scan(whole_scans):
    dataset = reader.open_dataset(whole_scans)
    runs = {}
    for volume in ("labelled", "full"):
        model, done = BrightModel(), []
        runs[volume] = evaluate_split(model, SETTINGS, dataset, "test", 0, batch_size=4, volume=volume,
                                      progress=done.append)
        assert sum(done) == 12  # every stored slice counted by the progress, run or not
        assert model.slices_seen == (4 if volume == "labelled" else 12)
    labelled, full = runs["labelled"], runs["full"]
    assert [c.num_slices for c in labelled.cases] == [2, 2] and [c.num_slices for c in full.cases] == [6, 6]
    for case in labelled.cases:
        assert case.dice[1] == 1.0 and case.hd95_penalised[1] == 0.0
    for case in full.cases:  # slice 5's blob, as large as each labelled one: Dice 2 * 2 / (2 + 3)
        assert case.dice[1] == pytest.approx(0.8) and case.hd95[1] == pytest.approx(2 * SPACING[2])  # slice 3 to 5
    np.testing.assert_array_equal(full.pooled_confusion, labelled.pooled_confusion)  # the paper pools labelled
    assert full.num_slices == labelled.num_slices == 4
    for evaluation in (labelled, full):
        summary = report(evaluation, "bright")
        assert summary["volume_protocol"] == summary["clinical_protocol"]["volume"] == evaluation.volume
        assert summary["clinical_protocol"]["num_slices"] == sum(c.num_slices for c in evaluation.cases)
        assert f"clinical_per_volume_{evaluation.volume}" in summary_csv(summary)
    assert "holding a label" in report(labelled, "m")["clinical_protocol"]["description"]
    assert "every slice of the scan" in report(full, "m")["clinical_protocol"]["description"]


def test_full_is_refused_where_the_conversion_kept_only_labelled_slices(converted, tiny_checkpoint, tmp_path, capsys):
    dataset = reader.open_dataset(converted)
    with pytest.raises(InputError, match="case care_000000000001 stores 3 of 13 axial slices"):
        evaluate_split(BrightModel(), SETTINGS, dataset, "test", 0, volume="full")
    out = tmp_path / "never"
    assert run_eval(_eval_args("--data", str(converted), "--checkpoint", str(tiny_checkpoint), "--volume", "full",
                               "--out", str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("usam eval: --volume full: case care_000000000001 stores 3 of 13") and "\n" not in err
    assert 'margin = "all"' in err and "--volume labelled" in err and not out.exists()


def test_cli_full_on_whole_scans_records_the_protocol(whole_scans, tiny_checkpoint, tmp_path):
    out = tmp_path / "full"
    assert run_eval(_eval_args("--data", str(whole_scans), "--checkpoint", str(tiny_checkpoint), "--volume", "full",
                               "--batch-size", "6", "--device", "cpu", "--out", str(out))) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["volume_protocol"] == "full" and [c["num_slices"] for c in summary["cases"]] == [6, 6]
    assert summary["num_slices"] == 4  # pooled: the slices holding a label
    assert default_out_name("test", 3, "full") == "eval_test_points3_full"
    assert default_out_name("test", 3, "labelled") == "eval_test_points3"


def test_interaction_sparse_records_curve_noc_and_references(converted, tiny_checkpoint, tmp_path, capsys):
    from usam.cli import main

    out = tmp_path / "interactive"
    assert main(["eval", "--data", str(converted), "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                 "--out", str(out), "--interaction", "sparse", "--clicked-slices", "2", "--clicks", "2",
                 "--corrections", "2", "--min-area", "1"]) == 0
    assert (out / "interaction_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = json.loads((out / "metrics.json").read_text())["interaction"]
    assert section["protocol"]["clicked_slices"] == 2 and section["protocol"]["corrections"] == 2
    assert [step["corrections"] for step in section["curve"]] == [0, 1, 2]
    assert set(section["noc"]) == {"0.80", "0.90"}
    assert set(section["unprompted"]["dice"]) == set(section["oracle_per_slice"]["dice"]) == set(CLASSES[1:])
    assert set(section["cases"]) == {"care_000000000001", "care_000000000002", "care_000000000003"}
    for steps in section["cases"].values():
        assert len(steps) == 3 and steps[0]["total_clicks"] <= steps[-1]["total_clicks"] <= steps[0]["total_clicks"] + 2
    assert "interaction normal rectum: Dice" in capsys.readouterr().out
    assert main(["eval", "--data", str(converted), "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                 "--out", str(tmp_path / "bad"), "--interaction", "sparse", "--clicks", "4"]) == 2
    assert "--clicks 4: this model has 3 prompt slot(s) per class" in capsys.readouterr().err
