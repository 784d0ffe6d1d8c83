"""The README's chain at a small size: care-synth -> care-convert -> care-publish -> usam fit -> usam eval ->
usam predict.

Asserts that a short training of the tiny U-SAM (the demo's options) raises held-out (test split) Dice far above
the same architecture untrained, both evaluated with 3 deterministic point prompts per class; then that clicks on
one slice of a new synthetic patient segment the rectum through its whole scan by propagation, and that a negative
click removes the region it lands on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from care_dataset.cli import convert_main, publish_main, synth_main
from usam.cli import main as usam_main
from usam.demo import (FROM_SCRATCH, PROPAGATION_TRAINING, RARE_CLASS_RECIPE, dice_table, find_label_file,
                       write_clicks, write_end_corrections)
from usam.models.checkpoints import read_checkpoint_config, save_checkpoint
from usam.models.registry import create_model

TRAIN_STEPS = 160
# Per-volume Dice of the rectum against the new patient's raw label file after TRAIN_STEPS steps, clicks on its
# largest cross-section only (3 points): propagated (measured 0.72 here), and with a negative click past each end
# where the prediction ran past it (0.81). The full demo reaches 0.82 and 0.96.
ONE_SLICE_RECTUM_DICE_FLOOR = 0.6
CORRECTED_RECTUM_DICE_FLOOR = 0.7


def eval_mean_dice(data: Path, checkpoint: Path, out: Path) -> dict:
    assert usam_main(["eval", "--data", str(data), "--checkpoint", str(checkpoint), "--split", "test",
                      "--device", "cpu", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(autouse=True)
def offline_hf(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("CARE_DEID_KEY", raising=False)


def test_training_raises_held_out_dice_far_above_untrained(tmp_path):
    raw, out, care, run = tmp_path / "raw", tmp_path / "out", tmp_path / "care", tmp_path / "run"
    key = tmp_path / "site.key"
    key.write_bytes(b"end-to-end-test-key\n")
    assert synth_main([str(raw), "--cases", "6", "--seed", "0", "--size", "128", "--slices", "24"]) == 0
    assert convert_main([str(raw), str(out), "--key-file", str(key), "--workers", "1"]) == 0
    assert publish_main([str(out), str(care)]) == 0
    splits = json.loads((out / "splits.json").read_text())
    assert splits, "conversion wrote no splits"

    # the demo's options: from scratch, one learning rate for every group (no pretrained encoder to protect),
    # rare-class oversampling and a 5x tumour weight in the cross-entropy
    assert usam_main(["fit", "--data", str(care), "--model", "usam_tiny", "--out", str(run),
                      "--max-steps", str(TRAIN_STEPS), *FROM_SCRATCH, *RARE_CLASS_RECIPE, *PROPAGATION_TRAINING,
                      "--workers", "0",
                      "--device", "cpu", "--val-fraction", "0"]) == 0
    trained_dir = run / "best"
    trained_config = read_checkpoint_config(trained_dir)
    assert trained_config["training"]["step"] == TRAIN_STEPS

    # the same architecture and checkpoint metadata, untrained (seeded initialisation)
    torch.manual_seed(0)
    untrained = create_model(**trained_config["model"])
    extra = {k: v for k, v in trained_config.items() if k not in ("format", "format_version", "model")}
    save_checkpoint(untrained, tmp_path / "untrained", extra)

    trained = eval_mean_dice(out, trained_dir, tmp_path / "eval_trained")
    baseline = eval_mean_dice(out, tmp_path / "untrained", tmp_path / "eval_untrained")
    assert trained["prompted"] and trained["points_per_class"] == 3 and trained["num_cases"] >= 1
    trained_dice = trained["clinical_protocol"]["mean_dice"]["mean"]
    untrained_dice = baseline["clinical_protocol"]["mean_dice"]["mean"]
    print(f"held-out per-volume mean foreground Dice: untrained {untrained_dice:.3f}, "
          f"trained {trained_dice:.3f} ({TRAIN_STEPS} steps)")
    assert trained_dice > (untrained_dice or 0.0) + 0.3
    one_clicked_slice_segments_a_new_patient(tmp_path, trained_dir)


def one_clicked_slice_segments_a_new_patient(tmp_path: Path, checkpoint: Path) -> None:
    new = tmp_path / "new_patient"
    assert synth_main([str(new), "--cases", "1", "--seed", "2024", "--size", "128", "--slices", "24",
                       "--no-messy"]) == 0
    case_dir = next(p for p in new.iterdir() if p.is_dir())
    label_path = find_label_file(case_dir)
    clicks = tmp_path / "clicks.json"
    write_clicks(label_path, clicks, per_class=3, clicked_slices=1)
    prediction = tmp_path / "prediction.nii.gz"
    predict = ["predict", "--checkpoint", str(checkpoint), "--image", str(case_dir), "--device", "cpu"]
    assert usam_main([*predict, "--points", str(clicks), "--out", str(prediction)]) == 0
    rectum_slices = {int(p["position"][2]) for p in json.loads(clicks.read_text())["points"] if p["class"] == 1}
    assert len(rectum_slices) == 1
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
    holding = np.flatnonzero((truth == 1).any(axis=(1, 2)))
    reached = np.flatnonzero((labels[holding] == 1).any(axis=(1, 2)))
    assert len(reached) >= 0.8 * len(holding), f"rectum on {len(reached)} of {len(holding)} slices holding it"
    scores = dice_table(prediction, label_path)
    print(f"one clicked slice per class, new patient: Dice {scores}")
    assert scores["normal rectum"] >= ONE_SLICE_RECTUM_DICE_FLOOR

    # where the rectum ran past its ends (into the unlabelled sigmoid or anal canal), a negative click on the first
    # slice past each end: the region there becomes background and propagation stops
    corrected_clicks = tmp_path / "corrected.json"
    added = write_end_corrections(prediction, label_path, clicks, corrected_clicks)
    corrected = tmp_path / "corrected.nii.gz"
    assert usam_main([*predict, "--points", str(corrected_clicks), "--out", str(corrected)]) == 0
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(corrected)))
    negatives = [p for p in json.loads(corrected_clicks.read_text())["points"] if p.get("label") == "negative"]
    assert len(negatives) == added
    for point in negatives:
        i, j, k = point["position"]
        assert labels[k, j, i] == 1 and not (after[k] == 1).any()
    corrected_scores = dice_table(corrected, label_path)
    print(f"... plus {added} negative click(s) past the rectum's ends: Dice {corrected_scores}")
    assert corrected_scores["normal rectum"] >= max(scores["normal rectum"], CORRECTED_RECTUM_DICE_FLOOR)
