"""usam fit: run folder contents, exact resume, validation carved from train, input errors, DDP on gloo."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import usam.train as training
from care_dataset.deid.pseudonyms import patient_of
from care_dataset.format.reader import open_dataset
from care_dataset.publish.job import publish
from converted_folders import make_converted_folder
from usam.cli import build_parser, resolve_fit_config
from usam.cli import main as usam_main
from usam.config import build_config, read_toml, to_toml
from usam.inference import InputError, choose_device
from usam.metrics import confusion_matrix, dice_from_confusion
from usam.train import (
    LogWindow,
    Position,
    batch_to_device,
    build_model,
    due_after_step,
    epoch_batches,
    log,
    make_loaders,
    open_training_data,
    place_on_device,
    prepare_run_folder,
    restore_train_state,
    save,
    set_up,
    train,
    training_step,
    validate,
)

# mechanics tests run a tiny U-Net on a 64 x 64 model grid (the pipeline follows the model's img_size)
TINY = {"model": "unet", "model_args": {"base_channels": 8, "img_size": 64}, "batch_size": 4, "workers": 0, "device": "cpu",
        "log_every": 2, "val_fraction": 0.25}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_converted_folder(tmp_path_factory.mktemp("care") / "out", num_patients=6, size=64, depth=20)


def config_for(data_dir: Path, out: Path, **options):
    return build_config({**TINY, "data": str(data_dir), "out": str(out), **options})


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_fit_writes_run_folder(data_dir, tmp_path):
    out = tmp_path / "run"
    code = usam_main(["fit", "--data", str(data_dir), "--out", str(out), "--model", "unet", "--model-arg",
                      "base_channels=8", "--batch-size", "4", "--workers", "0", "--max-steps", "2",
                      "--val-every", "1", "--log-every", "1", "--val-fraction", "0.25", "--device", "cpu",
                      "--window", "-100", "200", "--points", "1"])
    assert code == 0
    for name in ("config.toml", "run.json", "log.jsonl", "curves.png", "last/model.safetensors",
                 "last/config.json", "last/train_state.pt", "best/model.safetensors", "best/config.json"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [1, 2]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records and all(0 <= r["data_wait_fraction"] <= 1 and r["images_per_s"] > 0 for r in train_records)
    # the exact resolved options, readable back
    saved = read_toml(out / "config.toml")
    assert saved["window"] == [-100.0, 200.0] and saved["points"] == 1 and saved["max_steps"] == 2
    checkpoint = json.loads((out / "last" / "config.json").read_text())
    assert checkpoint["classes"] == ["background", "rectum", "tumor"]
    assert checkpoint["window"] == [-100.0, 200.0] and checkpoint["points_per_class"] == 1
    assert checkpoint["input_size"] == 224 and checkpoint["model"]["name"] == "unet"
    training = checkpoint["training"]
    assert training["step"] == 2 and training["data_checksum"] == "f" * 64
    assert "torch" in training["versions"] and training["config"]["batch_size"] == 4
    run = json.loads((out / "run.json").read_text())
    assert run["manifest_sha256"] == training["manifest_sha256"] and run["total_steps"] == 2
    # best is the checkpoint of the best validation
    vals = [r for r in records if r["kind"] == "val"]
    best = max(vals, key=lambda r: r["mean_dice"])
    assert json.loads((out / "best" / "config.json").read_text())["training"]["step"] == best["step"]
    # a finished run is not overwritten by accident
    assert usam_main(["fit", "--data", str(data_dir), "--out", str(out), "--model", "unet"]) == 2


TIMING_FIELDS = ("images_per_s", "data_wait_fraction")


def log_records(out: Path, timing: bool = False) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return records if timing else [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.mark.parametrize("recipe, schedule, stop_after, train_lines", [
    ({}, dict(max_steps=5, val_every=0, log_every=1), 2, [1, 2, 3, 4, 5]),
    ({"class_balance": 0.5, "class_weights": [1.0, 1.0, 5.0]}, dict(max_steps=5, val_every=0, log_every=1), 2,
     [1, 2, 3, 4, 5]),
    # the checkpoint of step 3 falls inside the logging window of steps 3-4: the window closes there
    ({}, dict(max_steps=4, val_every=3, log_every=2), 3, [2, 3, 4]),
], ids=["paper", "rare-class", "checkpoint-inside-log-window"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path, recipe, schedule, stop_after,
                                                         train_lines):
    steps = dict(**schedule, **recipe)
    total = schedule["max_steps"]
    straight = train(config_for(data_dir, tmp_path / "straight", **steps))
    assert straight["step"] == total and straight["epoch"] == 0  # stops mid-epoch: the sampler position matters
    interrupted = tmp_path / "interrupted"
    first = train(config_for(data_dir, interrupted, **steps), stop_after=stop_after)
    assert first["step"] == stop_after
    partial = weights(interrupted / "last")
    assert any(not torch.equal(partial[k], v) for k, v in weights(tmp_path / "straight" / "last").items())
    resumed = train(config_for(data_dir, interrupted, resume=True, **steps))
    assert resumed["step"] == total
    a, b = weights(tmp_path / "straight" / "last"), weights(interrupted / "last")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a = torch.load(tmp_path / "straight" / "last" / "train_state.pt", weights_only=True)
    state_b = torch.load(interrupted / "last" / "train_state.pt", weights_only=True)
    for group_a, group_b in zip(state_a["optimizer"]["state"].values(), state_b["optimizer"]["state"].values()):
        assert torch.equal(group_a["exp_avg_sq"], group_b["exp_avg_sq"])
    assert state_a["scheduler"] == state_b["scheduler"]
    assert torch.equal(state_a["torch_rng"], state_b["torch_rng"])
    # the log holds each window once, the same windows and values as the uninterrupted run's
    straight_log = log_records(tmp_path / "straight")
    assert [r["step"] for r in straight_log if r["kind"] == "train"] == train_lines
    assert log_records(interrupted) == straight_log
    # run.json keeps the run's own record; the resume is added to it
    run_straight = json.loads((tmp_path / "straight" / "run.json").read_text())
    run_resumed = json.loads((interrupted / "run.json").read_text())
    assert run_straight["resumes"] == [] and run_straight["total_steps"] == total
    assert {k: v for k, v in run_resumed.items() if k != "resumes"} == \
        {k: v for k, v in run_straight.items() if k != "resumes"}
    assert [(r["step"], r["total_steps"]) for r in run_resumed["resumes"]] == [(stop_after, total)]
    # lr is the rate the line's step used: base_lr x (1 - (step - 1) / total) ^ 0.9, base_lr at step 1
    for record in (r for r in straight_log if r["kind"] == "train"):
        expected = 1e-3 * (1 - (record["step"] - 1) / total) ** 0.9
        assert record["lr"]["decoder"] == pytest.approx(expected, rel=1e-9), record["step"]


def test_resume_refuses_a_changed_recipe(data_dir, tmp_path):
    out = tmp_path / "run"
    train(config_for(data_dir, out, max_steps=1), stop_after=1)
    with pytest.raises(ValueError, match="lr_decoder"):
        train(config_for(data_dir, out, max_steps=1, resume=True, lr_decoder=0.5))
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        train(config_for(data_dir, tmp_path / "empty", resume=True))
    # a train state written before train states recorded the world size: run.json's world size counts
    state_path = out / "last" / "train_state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["world_size"] == 1
    del state["world_size"]
    torch.save(state, state_path)
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "world_size": 2}))
    with pytest.raises(ValueError, match="trained by 2 process"):
        train(config_for(data_dir, out, max_steps=2, resume=True))
    (out / "run.json").write_text(json.dumps(run))
    assert train(config_for(data_dir, out, max_steps=2, resume=True))["step"] == 2
    # the schedule's length stays the run's: run.json keeps it and records the longer resumed run
    run = json.loads((out / "run.json").read_text())
    assert run["total_steps"] == 1 and [(r["step"], r["total_steps"]) for r in run["resumes"]] == [(1, 2)]
    # deterministic may change on resume; amp and channels_last (CUDA arithmetic) may not
    for option in ("amp", "channels_last"):
        with pytest.raises(ValueError, match=option):
            train(config_for(data_dir, out, max_steps=3, resume=True, **{option: False}))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        assert train(config_for(data_dir, out, max_steps=3, resume=True, deterministic=True))["step"] == 3
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def test_resume_refuses_other_data_and_follows_the_run_folder(data_dir, tmp_path, monkeypatch):
    # started with relative paths from one directory, resumed from another: the saved paths are absolute
    monkeypatch.chdir(data_dir.parent)
    train(config_for(Path(data_dir.name), Path("../run_rel"), max_steps=3), stop_after=1)
    saved = read_toml(data_dir.parent.parent / "run_rel" / "config.toml")
    assert saved["data"] == str(data_dir.resolve())
    monkeypatch.chdir(tmp_path)
    resumed = train(config_for(data_dir, data_dir.parent.parent / "run_rel", max_steps=3, resume=True))
    assert resumed["step"] == 3
    # the same run folder resumed on other data (here: one class renamed) is refused
    run = tmp_path / "run"
    train(config_for(data_dir, run, max_steps=3), stop_after=1)
    other = tmp_path / "other_data"
    shutil.copytree(data_dir, other)
    manifest = json.loads((other / "dataset.json").read_text())
    manifest["classes"][1] = "normal rectum"
    (other / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not the data the run was trained on"):
        train(config_for(other, run, max_steps=3, resume=True))


def test_a_run_without_checkpoint_starts_afresh_and_a_half_swapped_one_recovers(data_dir, tmp_path, monkeypatch,
                                                                                capsys):
    out = tmp_path / "run"
    # a run killed at its first checkpoint: config.toml, run.json and log.jsonl, no last/
    real_save = training.save_checkpoint

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config_for(data_dir, out, max_steps=9, lr_decoder=0.5, val_every=0, log_every=1, epochs=1))
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert (out / "config.toml").is_file() and (out / "log.jsonl").is_file() and not (out / "last").exists()
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        train(config_for(data_dir, out, max_steps=2, resume=True))
    # a command that fails its checks removes nothing
    capsys.readouterr()
    assert fit_error(capsys, ["--data", str(data_dir), "--out", str(out), "--model", "unet", "--model-arg",
                              "no_such_option=1", "--device", "cpu"])
    assert read_toml(out / "config.toml")["lr_decoder"] == 0.5
    result = train(config_for(data_dir, out, max_steps=2, val_every=0, log_every=1))
    assert result["step"] == 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert read_toml(out / "config.toml")["lr_decoder"] != 0.5
    # killed between save_checkpoint's two renames: last/ (or best/) moved aside, the new one not yet in place
    for name in ("last", "best"):
        expected = weights(out / name)
        os.replace(out / name, out / f".{name}.previous")
        with pytest.raises(ValueError, match="already holds a run"):
            train(config_for(data_dir, out, max_steps=2))
        assert all(torch.equal(weights(out / name)[k], v) for k, v in expected.items())
        assert not (out / f".{name}.previous").exists()
    # the same on resume, where no later validation rewrites best/
    best_before = (out / "best" / "config.json").read_text()
    os.replace(out / "best", out / ".best.previous")
    assert train(config_for(data_dir, out, max_steps=2, resume=True))["step"] == 2
    assert (out / "best" / "config.json").read_text() == best_before and not (out / ".best.previous").exists()
    # killed after the renames, before the old folder was removed, and a staging folder of a killed save
    shutil.copytree(out / "last", out / ".last.previous")
    shutil.copytree(out / "best", out / ".best.previous")
    (out / ".last.staging-x1y2").mkdir()
    (out / ".best.staging-x1y2").mkdir()
    assert train(config_for(data_dir, out, max_steps=4, resume=True))["step"] == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    # the SAM checkpoint a run started from is not read again on resume: it may move
    assert train(config_for(data_dir, out, max_steps=5, resume=True,
                            sam_checkpoint=str(tmp_path / "moved.pth")))["step"] == 5


def test_a_folder_with_a_config_no_run_wrote_is_refused_and_kept(data_dir, tmp_path, capsys):
    out = tmp_path / "experiment"
    out.mkdir()
    (out / "config.toml").write_text('model = "unet"\n')
    (out / "best").mkdir()
    (out / "best" / "notes.txt").write_text("mine")
    message = fit_error(capsys, ["--config", str(out / "config.toml"), "--data", str(data_dir), "--out", str(out),
                                 "--model-arg", "base_channels=8", "--device", "cpu"])
    assert "no usam fit run wrote" in message
    assert (out / "config.toml").read_text() == 'model = "unet"\n' and (out / "best" / "notes.txt").is_file()


def test_missing_shards_fail_before_any_work(data_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    case = open_dataset(broken).case_ids("train")[1]
    shutil.rmtree(broken / "slices.zarr" / case)
    out = tmp_path / "run"
    message = fit_error(capsys, ["--data", str(broken), "--out", str(out), "--model", "unet", "--model-arg",
                                 "base_channels=8", "--device", "cpu", "--workers", "0"])
    assert "missing" in message and case in message
    assert not out.exists()
    shutil.copytree(data_dir / "slices.zarr" / case, broken / "slices.zarr" / case)
    (broken / "slices.zarr" / case / "image" / "c" / "0" / "0" / "0").unlink()  # only the shard lost
    message = fit_error(capsys, ["--data", str(broken), "--out", str(out), "--model", "unet", "--model-arg",
                                 "base_channels=8", "--device", "cpu", "--workers", "0"])
    assert "missing" in message and case in message
    assert not out.exists()


def test_validation_is_carved_from_train_patients_only(data_dir):
    dataset = open_dataset(data_dir)
    train_split, test_split = set(dataset.case_ids("train")), set(dataset.case_ids("test"))
    for seed in range(3):
        data = open_training_data(config_for(data_dir, Path("unused"), seed=seed, val_fraction=0.25))
        assert data.val_ids and set(data.val_ids) | set(data.train_ids) == train_split
        assert not set(data.val_ids) & set(data.train_ids)
        assert not (set(data.val_ids) | set(data.train_ids)) & test_split
        assert not {patient_of(c) for c in data.val_ids} & {patient_of(c) for c in data.train_ids}
    again = open_training_data(config_for(data_dir, Path("unused"), seed=1, val_fraction=0.25))
    assert again.val_ids == open_training_data(config_for(data_dir, Path("unused"), seed=1, val_fraction=0.25)).val_ids


def fit_error(capsys, argv: list[str]) -> str:
    assert usam_main(["fit", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_fails_early_with_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--out", str(out), "--model", "unet", "--model-arg", "base_channels=8", "--device", "cpu"]
    assert "not found" in fit_error(capsys, ["--data", str(tmp_path / "missing"), *base])
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "dataset.json").write_text("{not json")
    assert "malformed" in fit_error(capsys, ["--data", str(malformed), *base])
    not_care = tmp_path / "not_care"
    not_care.mkdir()
    assert "neither a converted CARE folder" in fit_error(capsys, ["--data", str(not_care), *base])
    message = fit_error(capsys, ["--data", str(data_dir), "--num-classes", "4", *base])
    assert "--num-classes 4" in message and "3 classes" in message
    # a checkpoint of another model: tensors of the wrong shape
    fake = tmp_path / "sam_vit_h.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 64, 64, 1280),
                "image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 16, 16)}, fake)
    message = fit_error(capsys, ["--data", str(data_dir), "--out", str(out), "--model", "usam_tiny",
                                 "--sam-checkpoint", str(fake), "--device", "cpu"])
    assert "--sam-checkpoint" in message and "usam_tiny" in message
    assert "window" in fit_error(capsys, ["--data", str(data_dir), *base, "--window", "5", "1"])
    message = fit_error(capsys, ["--data", str(data_dir), *base, "--class-weights", "1", "5"])
    assert "--class-weights needs 3 values" in message
    assert "class_balance" in fit_error(capsys, ["--data", str(data_dir), *base, "--class-balance", "2"])
    assert not out.exists()  # nothing written by any failed run


@pytest.mark.parametrize("option, value", [
    ("flip_prob", 2.0), ("flip_prob", -0.1), ("small_rotation_prob", -1.0), ("small_rotation_prob", float("nan")),
    ("max_rotation_deg", float("nan")), ("max_rotation_deg", float("inf")), ("max_rotation_deg", -5.0),
    ("weight_decay", -5.0), ("weight_decay", float("inf")), ("poly_power", -1.0), ("poly_power", float("nan")),
    ("lr_decoder", float("inf")), ("lr_encoder", float("nan")), ("ce_weight", float("inf")),
    ("dice_weight", float("nan")), ("seed", -1), ("seed", 2**63), ("workers", -2),
])
def test_validate_refuses_out_of_range_options(option, value):
    config = build_config({"data": "somewhere"})
    config.validate()
    with pytest.raises(ValueError, match=option if option not in ("lr_decoder", "lr_encoder") else "learning rates"):
        build_config({"data": "somewhere", option: value}).validate()


@pytest.mark.parametrize("option, value", [("flip_prob", 0.0), ("flip_prob", 1.0), ("max_rotation_deg", 0.0),
                                           ("small_rotation_prob", 1.0), ("weight_decay", 0.0), ("poly_power", 0.0),
                                           ("workers", -1), ("seed", 2**63 - 1)])
def test_validate_accepts_the_ends_of_each_range(option, value):
    build_config({"data": "somewhere", option: value}).validate()


@pytest.mark.parametrize("key, flag", [("points_per_class", "--points"), ("num_classes", "--num-classes"),
                                       ("name", "--model"), ("sam_checkpoint", "--sam-checkpoint")])
def test_model_args_the_trainer_sets_are_refused(data_dir, tmp_path, capsys, key, flag):
    out = tmp_path / "run"
    message = fit_error(capsys, ["--data", str(data_dir), "--out", str(out), "--model", "unet", "--model-arg",
                                 f"{key}=5", "--device", "cpu", "--workers", "0"])
    assert f"--model-arg {key}" in message and flag in message
    assert not out.exists()


def test_bad_numeric_options_write_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", str(data_dir), "--out", str(out), "--model", "unet", "--model-arg", "base_channels=8",
            "--device", "cpu", "--workers", "0", "--max-steps", "1"]
    for flag, value, name in (("--poly-power", "-1", "poly_power"), ("--weight-decay", "-5", "weight_decay"),
                              ("--max-rotation-deg", "nan", "max_rotation_deg"), ("--flip-prob", "2", "flip_prob")):
        assert name in fit_error(capsys, [*base, flag, value])
        assert not out.exists()


def test_paths_of_the_wrong_kind_fail_with_one_line(data_dir, tmp_path, capsys):
    a_file = tmp_path / "fit.toml"
    a_file.write_text('model = "unet"\n')
    base = ["--model", "unet", "--model-arg", "base_channels=8", "--device", "cpu", "--workers", "0"]
    out = tmp_path / "run"
    assert "is not a folder" in fit_error(capsys, ["--data", str(a_file), "--out", str(out), *base])
    message = fit_error(capsys, ["--config", str(data_dir), "--out", str(out), *base])
    assert str(data_dir) in message and "is a folder" in message
    for bad_out, reason in ((a_file, "exists and is not a folder"), (a_file / "run", "is a file, not a folder")):
        message = fit_error(capsys, ["--data", str(data_dir), "--out", str(bad_out), *base, "--max-steps", "1"])
        assert reason in message
    assert a_file.read_text() == 'model = "unet"\n' and not out.exists()


def test_config_file_and_command_line_precedence(data_dir, tmp_path):
    config_file = tmp_path / "fit.toml"
    config_file.write_text(f'data = "{data_dir}"\nbatch_size = 8\nepochs = 3\nwindow = [-100, 300]\n'
                           '[model_args]\nbase_channels = 16\n')
    args = build_parser().parse_args(["fit", "--config", str(config_file), "--epochs", "5", "--no-augment"])
    config = resolve_fit_config(args)
    assert (config.batch_size, config.epochs, config.augment) == (8, 5, False)
    assert config.window == [-100.0, 300.0] and config.model_args == {"base_channels": 16}
    assert config.lr_encoder == 1e-4 and config.lr_decoder == 1e-3 and config.ce_weight == 0.4
    written = tmp_path / "written.toml"
    written.write_text(to_toml(config))
    assert build_config(read_toml(written)) == config
    config_file.write_text("batch_sise = 8\n")
    with pytest.raises(ValueError, match="unknown options batch_sise"):
        resolve_fit_config(build_parser().parse_args(["fit", "--config", str(config_file)]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, data_dir: str, out: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    config = build_config({**TINY, "data": data_dir, "out": out, "max_steps": 3, "val_every": 3})
    result = train(config)
    torch.save({"state": result["model"].state_dict(), "validation": result["last_validation"]},
               Path(result_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_on_cpu_gloo_keeps_ranks_identical(data_dir, tmp_path):
    out, results = tmp_path / "ddp", tmp_path / "results"
    results.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(data_dir), str(out), str(results)), nprocs=2, join=True)
    rank0 = torch.load(results / "rank0.pt", weights_only=True)
    rank1 = torch.load(results / "rank1.pt", weights_only=True)
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key
    initial = build_config({**TINY, "data": str(data_dir), "out": str(tmp_path / "x")})

    torch.manual_seed(initial.seed)
    untrained = build_model(initial, 3).state_dict()
    assert any(not torch.equal(untrained[k], v) for k, v in rank0["state"].items())  # it did train
    assert rank0["validation"] == rank1["validation"]  # validation metrics reduced over both ranks
    assert rank0["validation"]["slices"] == json.loads((out / "run.json").read_text())["val_slices"]
    saved = weights(out / "last")
    for key, value in saved.items():
        assert torch.equal(value, rank0["state"][key]), key
    # a run of 2 processes does not continue in one: the per-rank data order and batch would change
    with pytest.raises(ValueError, match="trained by 2 process"):
        train(build_config({**TINY, "data": str(data_dir), "out": str(out), "max_steps": 4, "val_every": 3,
                            "resume": True}))


def test_a_rank_fails_its_checks_before_joining_the_process_group(data_dir, tmp_path):
    """Rank 1 of 2 with an --out it cannot use: it stops at once (no wait for rank 0 in init_process_group) and
    leaves the message to rank 0, which fails the same check."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    argv = ["fit", "--data", str(data_dir), "--out", str(a_file), "--model", "unet", "--model-arg",
            "base_channels=8", "--device", "cpu", "--batch-size", "4", "--max-steps", "1"]
    result = subprocess.run([sys.executable, "-c", "import sys; from usam.cli import main; sys.exit(main(sys.argv[1:]))",
                             *argv], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == "", result.stderr[-1500:]


def test_fit_reads_a_published_folder_like_the_converted_one(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    published = tmp_path / "care"
    publish(data_dir, published)
    # class_balance: both sources also give slices_with_class the same labels (read_labels)
    steps = dict(max_steps=2, val_every=0, log_every=1, augment=False, class_balance=0.5)
    from_shards = train(config_for(data_dir, tmp_path / "shards", **steps))
    from_parquet = train(config_for(published, tmp_path / "parquet", **steps))
    assert from_parquet["step"] == from_shards["step"] == 2
    # same manifest, same validation carve, same samples: the same weights after the same steps
    shards, parquet = weights(tmp_path / "shards" / "last"), weights(tmp_path / "parquet" / "last")
    assert shards.keys() == parquet.keys()
    for name in shards:
        torch.testing.assert_close(parquet[name], shards[name], rtol=0, atol=0, msg=name)


# ---- the steps of train(), one at a time


def test_set_up_checks_and_plans_before_writing_anything(data_dir, tmp_path):
    out = tmp_path / "run"
    run = set_up(config_for(data_dir, out, max_steps=3))
    plan = run.plan
    assert plan.rank_batch == 4 and plan.steps_per_epoch == plan.sampler.num_samples // 4 > 0
    assert plan.total_steps == min(100 * plan.steps_per_epoch, 3) == 3
    assert plan.input_size == 64 and len(plan.val_set) > 0 and run.resume_state is None
    assert (run.position.step, run.position.epoch, run.position.best_dice) == (0, 0, -1.0)
    assert [group["name"] for group in run.optimizer.param_groups] == ["decoder"]  # a U-Net has no encoder group
    assert not out.exists()
    with pytest.raises(ValueError, match="larger than the"):
        set_up(config_for(data_dir, out, batch_size=10_000))
    assert not out.exists()


def test_training_step_moves_weights_schedule_and_position(data_dir, tmp_path):
    run = set_up(config_for(data_dir, tmp_path / "run", max_steps=3))
    place_on_device(run)
    loader, _ = make_loaders(run)
    images, points, labels, target = batch_to_device(next(epoch_batches(run, loader)), run)
    assert images.shape == (4, 1, 64, 64) and points.shape == (4, 2 * 3, 2) and target.dtype == torch.int64
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    logits, (loss, ce, dice), used_lr = training_step(run, run.model, images, points, labels, target)
    assert logits.shape == (4, 3, 64, 64)
    assert loss.item() == pytest.approx(0.4 * ce.item() + 0.6 * dice.item())
    assert used_lr == {"decoder": 1e-3}  # the rate of this step; the schedule has moved on
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 1 / 3) ** 0.9)
    assert (run.position.step, run.position.step_in_epoch) == (1, 1)
    assert any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())


def test_log_window_pools_the_counts_of_its_steps_and_starts_afresh(data_dir, tmp_path):

    run = set_up(config_for(data_dir, tmp_path / "run", max_steps=3))
    window = LogWindow(3, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, 3, (2, 8, 8), generator=generator) for _ in range(2)]
    predictions = [torch.randint(0, 3, (2, 8, 8), generator=generator) for _ in range(2)]
    for target, pred, scale in zip(targets, predictions, (1.0, 3.0)):
        logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
        window.add(logits, target, (torch.tensor(scale), torch.tensor(scale / 2), torch.tensor(scale / 4)))
    record = window.close(run, {"decoder": 0.5})
    assert (record["loss"], record["ce"], record["dice_loss"]) == (2.0, 1.0, 0.5)
    pred, truth = torch.cat(predictions).flatten(), torch.cat(targets).flatten()
    expected = dice_from_confusion(np.array([[int(((pred == p) & (truth == t)).sum()) for t in range(3)]
                                             for p in range(3)]))
    assert list(record["dice"].values()) == pytest.approx(list(expected))
    assert record["mean_dice"] == pytest.approx(float(expected[1:].mean()))
    assert record["lr"] == {"decoder": 0.5} and record["step"] == 0 and record["images_per_s"] > 0
    assert window.steps == 0 and not window.confusion.any() and not window.losses.any()


def test_validate_pools_every_validation_slice(data_dir, tmp_path):

    run = set_up(config_for(data_dir, tmp_path / "run", max_steps=3))
    place_on_device(run)
    _, val_loader = make_loaders(run)
    run.model.train()
    metrics = validate(run, val_loader)
    assert run.model.training and metrics["slices"] == len(run.plan.val_set) > 0
    run.model.eval()
    confusion = np.zeros((3, 3), np.int64)
    with torch.no_grad():
        for batch in val_loader:
            logits = run.model(batch["image"], batch["points"], batch["point_labels"])
            confusion += confusion_matrix(logits.argmax(dim=1), batch["label"], 3)
    expected = dice_from_confusion(confusion)
    assert [np.nan if d is None else d for d in metrics["dice"].values()] == pytest.approx(list(expected),
                                                                                         nan_ok=True)


def test_a_saved_run_restores_its_position_and_drops_later_log_lines(data_dir, tmp_path):
    out = tmp_path / "run"
    run = set_up(config_for(data_dir, out, max_steps=4))
    prepare_run_folder(run)
    place_on_device(run)
    loader, _ = make_loaders(run)
    training_step(run, run.model, *batch_to_device(next(epoch_batches(run, loader)), run))
    run.position.best_dice = 0.25
    for step in (1, 2):
        log(run, {"kind": "train", "step": step})
    save(run, "last", None)
    resumed = set_up(config_for(data_dir, out, max_steps=4, resume=True))
    restore_train_state(resumed)
    assert resumed.position == run.position and resumed.position.step == 1
    assert resumed.scheduler.state_dict() == run.scheduler.state_dict()
    for key, value in run.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


def test_due_after_step_validates_at_epoch_ends_and_checkpoints_where_it_stops():
    def run_at(step, step_in_epoch, val_every=0, log_every=10):
        config = SimpleNamespace(val_every=val_every, log_every=log_every)
        return SimpleNamespace(config=config, position=Position(step, 0, step_in_epoch),
                               plan=SimpleNamespace(steps_per_epoch=5, total_steps=12))

    middle = due_after_step(run_at(3, 3), 3, None)
    assert not (middle.validate or middle.checkpoint or middle.log or middle.stopping or middle.end_of_epoch)
    epoch_end = due_after_step(run_at(5, 5), 5, None)
    assert epoch_end.end_of_epoch and epoch_end.validate and epoch_end.checkpoint and epoch_end.log
    interrupted = due_after_step(run_at(7, 2), 2, stop_after=2)
    assert interrupted.stopping and interrupted.checkpoint and interrupted.log and not interrupted.validate
    on_log_step = due_after_step(run_at(10, 4), 10, None)
    assert on_log_step.log and not (on_log_step.validate or on_log_step.checkpoint)
    every_third = due_after_step(run_at(9, 4, val_every=3), 9, None)
    assert every_third.validate and every_third.checkpoint and not every_third.end_of_epoch
    last = due_after_step(run_at(12, 2), 12, None)
    assert last.stopping and last.validate and last.checkpoint


def test_the_device_rule_names_what_it_refuses(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == choose_device("cpu") == torch.device("cpu")
    for name, reason in (("gpu", "not a device"), ("meta", "give auto, cpu, cuda or cuda:N"),
                         ("cpu:0", "give auto, cpu, cuda or cuda:N"), ("cuda", "CUDA is not available"),
                         ("cuda:1", "CUDA is not available")):
        with pytest.raises(InputError, match=reason):
            choose_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto") == choose_device("cuda") == torch.device("cuda", 0)
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    # under torchrun every rank takes its own GPU, whatever CUDA device was named
    assert choose_device("cuda:1", local_rank=3) == choose_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert choose_device("cpu", local_rank=3) == torch.device("cpu")
