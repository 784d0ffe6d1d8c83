"""The README's chain at a small size: care-synth -> care-convert -> care-publish -> usam fit -> usam eval.

Asserts that a short training of the tiny U-SAM raises held-out (test split) Dice far above the
same architecture untrained, both evaluated with 3 deterministic point prompts per class.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from care_dataset.cli import convert_main, publish_main, synth_main
from usam.cli import main as usam_main
from usam.demo import FROM_SCRATCH, RARE_CLASS_RECIPE
from usam.models.checkpoints import read_checkpoint_config, save_checkpoint
from usam.models.registry import create_model

TRAIN_STEPS = 160


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
                      "--max-steps", str(TRAIN_STEPS), *FROM_SCRATCH, *RARE_CLASS_RECIPE, "--workers", "0",
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
