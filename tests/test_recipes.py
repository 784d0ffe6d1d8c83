"""Recipes (usam fit/eval --recipe usam|paper|released) and the options that reproduce the paper and the released
code: presets and precedence, the run folder and eval report that record them, the loss, batch, CLAHE and resize
options (docs/reproduction.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from skimage.exposure import equalize_adapthist

import usam.train as training
from converted_folders import make_converted_folder
from usam.cli import build_parser, resolve_fit_config
from usam.cli import main as usam_main
from usam.config import TrainConfig, build_config, read_toml, recipe_options
from usam.data import (
    CLAHE_EVAL_CLIP,
    RESIZE_KERNELS,
    SliceDataset,
    clahe,
    resample_slice,
    window_normalize,
    zoom_slice,
)
from usam.inference import InferenceSettings, logits_to_labels
from usam.models.blocks import HEAD_BIASES
from usam.models.usam import DECODERS
from usam.predict import prompts_from_points
from usam.prompts import AXIS_ORDERS, PLACEMENTS, PROMPT_STYLES
from usam.train import Dist, plan_batches, soft_dice_loss

RECIPE_OPTIONS = ("prompt_style", "eval_points", "point_order", "decoder", "head_bias", "batch_scope", "sync_bn",
                  "weight_decay", "dice_denominator", "clahe", "resize", "selection_split", "lr_encoder",
                  "lr_decoder")
# a usam_tiny on the 64 x 64 slices of the test folder, two steps
TINY = ["--model", "usam_tiny", "--model-arg", "img_size=64", "--model-arg", "vit_window_size=4", "--batch-size", "4",
        "--workers", "0", "--device", "cpu", "--max-steps", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_converted_folder(tmp_path_factory.mktemp("care") / "out", num_patients=5, size=64, depth=12)


def fit_config(*argv: str) -> TrainConfig:
    return resolve_fit_config(build_parser().parse_args(["fit", *argv]))


def test_the_usam_recipe_is_the_defaults():
    """Today's behaviour is the usam recipe's: its preset changes no option."""
    assert build_config(recipe_options("usam")) == TrainConfig()
    assert fit_config("--data", "d") == fit_config("--data", "d", "--recipe", "usam") == TrainConfig(data="d")


def test_recipes_preset_every_difference_and_explicit_options_win(tmp_path):
    released, paper = fit_config("--recipe", "released"), fit_config("--recipe", "paper")
    assert {k: getattr(released, k) for k in RECIPE_OPTIONS} == {
        "prompt_style": "released", "eval_points": "raster", "point_order": "rowcol", "decoder": "released",
        "head_bias": "none", "batch_scope": "per_device", "sync_bn": False, "weight_decay": 1e-4,
        "dice_denominator": "squares", "clahe": True, "resize": "cubic", "selection_split": "test",
        "lr_encoder": 1e-4, "lr_decoder": 1e-3}
    assert (paper.lr_encoder, paper.lr_decoder, paper.weight_decay, paper.decoder) == (1e-3, 1e-4, 0.0,
                                                                                        "class_tokens")
    assert (paper.selection_split, paper.point_order, paper.prompt_style) == ("validation", "xy", "released")
    config_file = tmp_path / "fit.toml"
    config_file.write_text('recipe = "released"\nweight_decay = 0.5\n')
    mixed = fit_config("--config", str(config_file), "--selection-split", "validation", "--no-clahe")
    assert (mixed.recipe, mixed.weight_decay, mixed.selection_split, mixed.clahe) == ("released", 0.5,
                                                                                       "validation", False)
    assert mixed.decoder == "released"  # the rest of the preset stays
    assert fit_config("--batch-per-device").batch_scope == "per_device"
    assert fit_config("--recipe", "paper", "--config", str(config_file)).recipe == "paper"  # the command line wins


def test_every_choice_is_the_one_its_module_takes():
    fields = {f.name: f.metadata.get("choices") for f in dataclasses.fields(TrainConfig)}
    assert fields["prompt_style"] == PROMPT_STYLES and fields["eval_points"] == PLACEMENTS
    assert fields["point_order"] == AXIS_ORDERS and fields["resize"] == RESIZE_KERNELS
    assert fields["decoder"] == DECODERS and fields["head_bias"] == HEAD_BIASES
    for name in ("usam", "paper", "released"):
        assert set(recipe_options(name)) >= set(RECIPE_OPTIONS)


def test_bad_recipe_values_are_one_line(tmp_path, capsys):
    config_file = tmp_path / "fit.toml"
    config_file.write_text('recipe = "mine"\n')
    assert usam_main(["fit", "--config", str(config_file), "--data", "x"]) == 2
    assert "recipe 'mine': use one of usam, paper, released" in capsys.readouterr().err
    with pytest.raises(ValueError, match="1, 3 or 5 points per class"):
        build_config({"data": "x", "prompt_style": "released", "points": 2}).validate()
    with pytest.raises(ValueError, match="decoder must be one of class_tokens, released"):
        build_config({"data": "x", "decoder": "mine"}).validate()


def run_recipe(data_dir: Path, out: Path, recipe: str, capsys) -> tuple[dict, str]:
    assert usam_main(["fit", "--recipe", recipe, "--data", str(data_dir), "--out", str(out), *TINY]) == 0
    return read_toml(out / "config.toml"), capsys.readouterr().out


def test_released_recipe_trains_selects_on_test_and_says_so_everywhere(data_dir, tmp_path, capsys):
    out = tmp_path / "released"
    saved, printed = run_recipe(data_dir, out, "released", capsys)
    assert set(saved) == {f.name for f in dataclasses.fields(TrainConfig)}  # every option, resolved
    assert {k: saved[k] for k in ("recipe", "decoder", "prompt_style", "point_order", "selection_split")} == {
        "recipe": "released", "decoder": "released", "prompt_style": "released", "point_order": "rowcol",
        "selection_split": "test"}
    assert (out / "config.toml").read_text().startswith("# model selected on the TEST split")
    assert "warning: model selected on the TEST split" in printed and "best test mean" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["selection_split"] == "test" and "optimistic" in run["selection_warning"]
    assert run["val_cases"] == 2 and run["train_cases"] == 3 and run["batch_per_process"] == 4
    assert all(r["split"] == "test" for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
               if r["kind"] == "val")
    checkpoint = json.loads((out / "best" / "config.json").read_text())
    assert checkpoint["model"]["decoder"] == "released" and checkpoint["model"]["prompt_style"] == "released"
    assert (checkpoint["point_order"], checkpoint["clahe"], checkpoint["resize"]) == ("rowcol", True, "cubic")
    assert "optimistic" in checkpoint["selection_warning"]

    report = tmp_path / "eval"
    assert usam_main(["eval", "--data", str(data_dir), "--checkpoint", str(out / "best"), "--device", "cpu",
                      "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((report / "metrics.json").read_text())
    assert (metrics["prompt_style"], metrics["eval_points"], metrics["point_order"]) == ("released", "raster",
                                                                                          "rowcol")
    assert metrics["selection_split"] == "test" and metrics["recipe"] == "released"
    assert "optimistic" in metrics["selection_warning"] and "WARNING: model selected on the TEST split" in printed

    refused = ["eval", "--data", str(data_dir), "--checkpoint", str(out / "best"), "--device", "cpu",
               "--out", str(tmp_path / "eval2"), "--recipe", "usam"]
    assert usam_main(refused) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained with prompt style released" in err and "--allow-prompt" in err
    assert usam_main(refused + ["--allow-prompt-mismatch"]) == 0
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["prompt_style"] == "classwise"


def test_paper_recipe_trains_and_its_eval_records_the_protocol(data_dir, tmp_path, capsys):
    out = tmp_path / "paper"
    saved, printed = run_recipe(data_dir, out, "paper", capsys)
    assert (saved["recipe"], saved["selection_split"], saved["lr_encoder"]) == ("paper", "validation", 1e-3)
    assert "warning" not in printed and "TEST" not in (out / "config.toml").read_text()
    assert usam_main(["eval", "--data", str(data_dir), "--checkpoint", str(out / "best"), "--device", "cpu",
                      "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["prompt_style"], metrics["point_order"], metrics["selection_split"]) == ("released", "xy",
                                                                                             "validation")
    assert "selection_warning" not in metrics


def test_the_released_decoder_is_refused_for_models_without_it(data_dir, tmp_path, capsys):
    argv = ["fit", "--recipe", "released", "--model", "sam_tiny", "--data", str(data_dir), "--out",
            str(tmp_path / "run"), "--device", "cpu"]
    assert usam_main(argv) == 2
    assert "--decoder released: model sam_tiny has no such decoder" in capsys.readouterr().err


def test_batch_scope_sets_each_processs_batch(data_dir, tmp_path):
    model = torch.nn.Linear(1, 1)
    model.config = {"img_size": 64}
    for scope, expected in (("global", 2), ("per_device", 4)):
        config = build_config({"data": str(data_dir), "batch_size": 4, "batch_scope": scope})
        plan = plan_batches(config, training.open_training_data(config), model, Dist(rank=0, world_size=2))
        assert plan.rank_batch == expected


def test_sync_bn_under_several_cpu_processes_is_refused_before_any_work(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    config = build_config({"data": str(data_dir), "out": str(tmp_path / "run"), "device": "cpu", "sync_bn": True})
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        training.set_up(config)
    assert not (tmp_path / "run").exists()


def test_dice_denominator_sum_or_squares():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    p = logits.softmax(1)
    t = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    inter = (p * t).sum((0, 2, 3))
    for name, denominator in (("sum", p.sum((0, 2, 3)) + t.sum((0, 2, 3))),
                              ("squares", (p * p).sum((0, 2, 3)) + t.sum((0, 2, 3)))):
        expected = 1 - ((2 * inter + 1e-5) / (denominator + 1e-5)).mean()
        torch.testing.assert_close(soft_dice_loss(logits, target, denominator=name), expected)


def test_clahe_is_scikit_images_at_the_released_parameters():
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0.4, 0.1, (256, 256)), 0, 1).astype(np.float32)  # 32 x 32 tiles
    out = clahe(image, 4.0)
    reference = equalize_adapthist((image * 255).astype(np.uint8), clip_limit=4.0 / 256, nbins=256)
    assert out.dtype == np.float32 and np.array_equal(out, (np.round(reference * 255) / 255).astype(np.float32))
    assert np.allclose(out * 255, np.round(out * 255), atol=1e-4)  # 8-bit steps, as OpenCV's output
    assert not np.allclose(out, clahe(image, 1.0))


def test_clahe_and_cubic_resize_in_the_training_and_evaluation_pipeline():
    rng = np.random.default_rng(0)
    hu = rng.integers(-200, 300, (96, 96)).astype(np.int16)
    label = np.zeros((96, 96), np.uint8)
    label[30:60, 20:50] = 1
    image, label_t = resample_slice(hu, label, None, (-125.0, 275.0), 64, CLAHE_EVAL_CLIP, "cubic")
    windowed = window_normalize(hu, (-125.0, 275.0))
    expected, expected_label = zoom_slice(clahe(windowed, CLAHE_EVAL_CLIP), label, 64)
    assert np.allclose(image[0].numpy(), expected) and np.array_equal(label_t.numpy(), expected_label)
    assert label_t.dtype == torch.uint8 and image.shape == (1, 64, 64)

    class Source:  # one stored slice
        cases = {"c": {"num_slices": 1}}

        def read_slice(self, case_id, position):
            return hu, label

    dataset = SliceDataset(Source(), ["c"], num_classes=3, points_per_class=3, size=64, random_points=True,
                           clahe=True, kernel="cubic")
    first, again = dataset[(0, 0)], dataset[(0, 0)]
    assert torch.equal(first["image"], again["image"]) and not torch.equal(first["image"], dataset[(1, 0)]["image"])
    validation = SliceDataset(Source(), ["c"], num_classes=3, points_per_class=3, size=64, clahe=True, kernel="cubic")
    assert torch.allclose(validation[0]["image"], image)
    # logits back to the stored grid with the corners aligned, as the cubic zoom placed them
    logits = torch.randn(1, 3, 64, 64)
    aligned = F.interpolate(logits, size=(96, 96), mode="bilinear", align_corners=True).argmax(1)
    assert torch.equal(logits_to_labels(logits, 96, 96, corner_aligned=True), aligned.to(torch.uint8))
    assert not torch.equal(logits_to_labels(logits, 96, 96), aligned.to(torch.uint8))


def test_predict_builds_released_prompts_from_clicks():
    image = sitk.Image([64, 64, 4], sitk.sitkInt16)
    settings = InferenceSettings(("background", "rectum", "tumor"), (-125.0, 275.0), 64, 3,
                                 prompt_style="released", point_order="rowcol")
    spec = {"coordinates": "voxel", "points": [{"class": 1, "position": [10, 20, 2]}]}
    prompts = prompts_from_points(spec, image, settings)
    points, labels = prompts[2]
    assert labels.tolist() == [1] * 6 and points.tolist() == [[20.0, 10.0]] * 6
    classwise = prompts_from_points(spec, image, dataclasses.replace(settings, prompt_style="classwise",
                                                                     point_order="xy"))
    assert classwise[2][1].tolist() == [1, -1, -1, -1, -1, -1] and classwise[2][0][0].tolist() == [10.0, 20.0]


def test_fit_with_negative_points_trains_and_records_the_option(data_dir, tmp_path, capsys):
    out = tmp_path / "negatives"
    assert usam_main(["fit", "--data", str(data_dir), "--out", str(out), "--negative-points", "2", *TINY]) == 0
    assert read_toml(out / "config.toml")["negative_points"] == 2
    with pytest.raises(ValueError, match="negative_points must be >= 0"):
        build_config({"data": "x", "points": 0, "negative_points": 1}).validate()
