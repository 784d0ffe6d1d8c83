"""The baselines written in usam/models: shapes, sizes, gradients, and `usam fit` / `usam eval` with checkpoints
that reload exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from converted_folders import make_converted_folder
from usam.cli import main as usam_main
from usam.models.checkpoints import load_checkpoint, save_checkpoint
from usam.models.registry import create_model, list_models
from usam.models.summary import parameter_counts

# small widths for CPU tests (the architectures are unchanged; the defaults are the papers')
SMALL = {"uctransnet": 8, "multiresunet": 8, "resunetpp": 16, "missformer": 8, "r2unet": 8, "focalunet": 8}
# parameters at the defaults and N = 3, as docs/models.md states them (benchmarks/model_counts_own.py)
DEFAULT_PARAMETERS = {
    "uctransnet": 66_429_635,
    "multiresunet": 7_244_632,
    "resunetpp": 4_063_229,
    "missformer": 35_446_083,
    "r2unet": 39_091_395,
    "focalunet": 44_222_575,
}
NAMES = sorted(SMALL)


def small(name: str, **options) -> torch.nn.Module:
    return create_model(name, base_channels=SMALL[name], **options)


def test_the_baselines_are_registered_at_the_documented_sizes():
    assert set(NAMES) <= set(list_models())
    for name in NAMES:
        counts = parameter_counts(name)
        assert counts["total"] == counts["trainable"] == counts["decoder"] == DEFAULT_PARAMETERS[name], name
        assert counts["encoder"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_a_224_batch_maps_to_class_logits(name):
    torch.manual_seed(0)
    model = small(name).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 1, 224, 224))
    assert logits.shape == (2, 3, 224, 224) and torch.isfinite(logits).all()
    assert logits[0].std() > 0 and not torch.equal(logits[0], logits[1])  # depends on the image
    with pytest.raises(ValueError, match="B x 1 x 224 x 224"):
        model(torch.rand(1, 1, 64, 64))


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_takes_part(name):
    """No module is built and left unused: the loss reaches every parameter (a gradient may still be zero, e.g.
    behind a ReLU that is off for these images)."""
    torch.manual_seed(0)
    model = small(name, img_size=64, num_classes=2).train()
    images, labels = torch.rand(2, 1, 64, 64), (torch.rand(2, 64, 64) > 0.5).long()
    F.cross_entropy(model(images), labels).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert len(model.parameter_groups()["decoder"]) == len(list(model.parameters()))


def test_points_are_ignored():
    model = small("resunetpp", img_size=32).eval()
    images = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), model(images, torch.full((1, 6, 2), 9.0), torch.ones(1, 6, dtype=torch.long)))


@pytest.mark.parametrize("name, img_size", [("uctransnet", 40), ("missformer", 48), ("focalunet", 80),
                                            ("resunetpp", 60), ("multiresunet", 24), ("r2unet", 0)])
def test_sizes_the_architecture_cannot_take_are_refused(name, img_size):
    with pytest.raises(ValueError, match="img_size must be a positive multiple"):
        small(name, img_size=img_size)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_converted_folder(tmp_path_factory.mktemp("care") / "out", num_patients=4, size=64, depth=16)


@pytest.mark.parametrize("name", NAMES)
def test_fit_eval_and_an_exact_checkpoint_round_trip(name, data_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "eval"
    assert usam_main(["fit", "--data", str(data_dir), "--out", str(run), "--model", name,
                      "--model-arg", f"base_channels={SMALL[name]}", "--model-arg", "img_size=64",
                      "--batch-size", "4", "--workers", "0", "--max-steps", "2", "--val-fraction", "0",
                      "--device", "cpu", "--points", "0"]) == 0
    saved = json.loads((run / "last" / "config.json").read_text())
    assert saved["training"]["step"] == 2 and saved["model"]["name"] == name
    assert usam_main(["eval", "--data", str(data_dir), "--checkpoint", str(run / "last"), "--split", "test",
                      "--device", "cpu", "--batch-size", "8", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_cases"] == 2 and not metrics["prompted"]

    model, config = load_checkpoint(run / "last")
    stored = load_file(run / "last" / "model.safetensors")
    state = model.state_dict()
    assert state.keys() == stored.keys() and all(torch.equal(state[k], stored[k]) for k in state)
    extra = {k: v for k, v in config.items() if k not in ("format", "format_version", "model")}
    again, _ = load_checkpoint(save_checkpoint(model, tmp_path / "again", extra))
    assert again.config == model.config
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
