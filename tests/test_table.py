"""usam table: every system trained and evaluated alike, the table beside the paper's figures, resuming."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

import usam.table as table
from converted_folders import make_converted_folder
from usam.cli import build_parser
from usam.cli import main as usam_main
from usam.models import list_models
from usam.train import train

FIT_OPTIONS = 'batch_size = 2\nworkers = 0\nval_fraction = 0.5\ndevice = "cpu"\n'
# CPU-sized systems: 'all' resolves through the registry's list, patched to these (the full zoo's ViT-B and ViT-H
# systems cannot train in a test); attention_unet has a Table 2 row, samed_tiny none.
SYSTEMS = ["attention_unet", "samed_tiny"]
SMALL = ["--model-arg", "attention_unet.img_size=32", "--model-arg", "attention_unet.base_channels=8",
         "--model-arg", "samed_tiny.img_size=32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_converted_folder(tmp_path_factory.mktemp("care") / "out", num_patients=4, size=64, depth=12)


def table_argv(data_dir: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return ["table", "--data", str(data_dir), "--out", str(out), "--config", str(config), "--seeds", "2",
            "--max-steps", "2", *SMALL, *extra]


def test_all_systems_train_evaluate_tabulate_and_a_rerun_trains_nothing(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(table, "list_models", lambda: SYSTEMS)
    config, out = tmp_path / "fit.toml", tmp_path / "results"
    config.write_text(FIT_OPTIONS)
    argv = table_argv(data_dir, out, config, "--systems", "all")
    # an interrupted run: one of the two steps of attention_unet seed 1, as a killed usam fit leaves it
    args = build_parser().parse_args(argv)
    options = table.fit_options(args, "attention_unet", 1, {"attention_unet": False})
    train(table.fit_config(args, options), stop_after=1)
    capsys.readouterr()

    assert usam_main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "attention_unet seed 0: trained to step 2" in printed
    assert "attention_unet seed 1: resumed, trained to step 2" in printed
    assert "samed_tiny seed 1: trained to step 2" in printed
    markdown = (out / "table.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | system | points | rectum Dice | (paper) | rectum IoU |")
    atten = next(r for r in rows if r.startswith("| AttenUnet | `attention_unet` | 0 |"))
    assert "| 63.05 |" in atten and "| 46.04 |" in atten and "| 67.22 |" in atten and " ± " in atten
    samed = next(r for r in rows if r.startswith("| samed_tiny |"))
    assert "| — |" in samed  # no paper figures for a system the paper lacks
    lines = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    dice = next(r for r in lines if r["system"] == "attention_unet" and r["metric"] == "mean_dice")
    assert dice["paper"] == "67.22" and dice["seeds"] == "2" and float(dice["std"]) >= 0
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for system in SYSTEMS:
        for seed in (0, 1):
            assert (out / "runs" / system / f"seed{seed}" / "eval_test_points0" / "metrics.json").is_file()

    logs = {p: p.read_bytes() for p in out.glob("runs/*/seed*/log.jsonl")}
    weights = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/last/model.safetensors")}
    assert usam_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, not trained") == 4 and "trained to step" not in printed
    assert printed.count("evaluated earlier") == 4
    assert {p: p.read_bytes() for p in logs} == logs
    assert {p: p.stat().st_mtime_ns for p in weights} == weights


def test_table2_dry_run_prints_one_command_per_system_and_seed(data_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert usam_main(["table", "--data", str(data_dir), "--out", str(out), "--systems", "table2", "--seeds", "2",
                      "--dry-run", "--nproc-per-node", "4", "--sam-checkpoint", "usam_b=sam_vit_b_01ec64.pth"]) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = table.paper_tables()["table2"]["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    for system in systems:
        commands = [line for line in printed if f" --model {system} " in line]
        if system in list_models():
            torchrun = "torchrun --nproc_per_node 4 -m usam.cli fit "
            assert len(commands) == 2 and all(c.startswith(torchrun) for c in commands)
        else:
            assert not commands and any(line.endswith(f"({system}): not available in this build") for line in printed)
    usam_b = [line for line in printed if " --model usam_b " in line]
    assert all("--sam-checkpoint" in line and "--points" not in line for line in usam_b)  # prompted: fit's points
    assert all("--points 0" in line for line in printed if " --model vnet " in line)
    assert not out.exists()  # nothing trained, nothing written


@pytest.mark.parametrize("argv_tail, message", [
    (["--systems", "vnet,nonet"], "--systems: unknown system nonet"),
    (["--seeds", "0"], "--seeds must be >= 1"),
])
def test_bad_options_fail_with_one_line(data_dir, tmp_path, capsys, argv_tail, message):
    assert usam_main(["table", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--dry-run", *argv_tail]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_every_system_trains_with_the_recipe_given(data_dir, tmp_path, capsys):
    assert usam_main(["table", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--systems", "vnet,unet",
                      "--recipe", "paper", "--dry-run"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "usam" in line and " fit " in line]
    assert len(commands) == 2 * 3 and all("--recipe paper" in line for line in commands)  # 3 seeds by default
