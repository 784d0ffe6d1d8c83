"""care-convert guards: one writer per output folder, checks before any work, placeholder patient IDs,
safe report reasons, profile validation and odd raw folders (symbolic links, nested cases)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from care_dataset import files
from care_dataset.cli import convert_main
from care_dataset.convert import pipeline
from care_dataset.convert.pipeline import ConvertError, convert_dataset
from care_dataset.deid.pseudonyms import (
    KEY_ENV_VAR,
    KeyMissingError,
    is_placeholder_id,
    load_key,
    patient_identity,
    patient_of,
)
from care_dataset.files import LOCK_NAME, hold_output_lock
from care_dataset.format import layout, reader
from care_dataset.raw.profiles import ProfileError, load_profile
from care_dataset.synth.phantom import phantom_volume
from dicom_cases import phantom, write_dicom_case

KEY = b"guard-test-key-0123456789"
SHAPE = (12, 32, 32)  # z, y, x
SPACING = (8.0, 8.0, 3.0)  # x, y, z mm


def write_volume_case(case_dir: Path, seed: int) -> None:
    """A small .mha image and label pair with rectum and tumour."""
    hu, label = phantom_volume(SHAPE, SPACING[::-1], np.random.default_rng(seed), tumour=True)
    case_dir.mkdir(parents=True)
    for array, name in ((hu, "ct.mha"), (label, "ct_seg.mha")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        sitk.WriteImage(image, str(case_dir / name))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    for i in range(3):
        write_volume_case(root / f"Patient_{i}", seed=i)
    return root


@pytest.fixture()
def key_file(tmp_path) -> Path:
    path = tmp_path / "key.txt"
    path.write_bytes(KEY + b"\n")
    path.chmod(0o600)  # as care-keygen leaves it: no warning
    return path


def run_convert(raw: Path, out: Path, key_file: Path, *extra: str) -> int:
    return convert_main([str(raw), str(out), "--key-file", str(key_file), "--quiet", *extra])


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


# --- finding: concurrent runs on one output folder ------------------------------------------------------------


def test_second_writer_is_refused_at_once_and_touches_nothing(raw, key_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_convert(raw, out, key_file) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    with hold_output_lock(out, "care-convert"):
        code = run_convert(raw, out, key_file)
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "being written by another care-convert" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the refused run removed no marker, record or array


def test_lock_held_by_another_process_refuses_then_frees(raw, key_file, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from care_dataset.files import hold_output_lock
            with hold_output_lock({str(out)!r}, "care-convert"):
                print("held", flush=True)
                sys.stdin.readline()
            """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_convert(raw, out, key_file) == 2
        assert f"(process {holder.pid})" in capsys.readouterr().err
        assert not (out / "dataset.json").exists() and not (out / layout.TMP_DIR).exists()
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert not out.exists()  # the holder created the folder and removed it again, empty
    assert run_convert(raw, out, key_file) == 0
    assert LOCK_NAME not in {p.name for p in out.iterdir()}  # nothing left that lists as output


def test_stale_lock_file_of_a_killed_run_does_not_block(raw, key_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999\n")  # kill -9 leaves the file; the kernel dropped the lock
    assert run_convert(raw, out, key_file) == 0
    assert len(reader.open_dataset(out).case_ids()) == 3
    assert not (out / LOCK_NAME).exists()


def test_workers_left_behind_by_a_killed_run_do_not_hold_the_lock(tmp_path):
    """The OOM killer may kill the main process only: its forked workers must not keep the folder locked."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, sys, time
        from care_dataset.files import hold_output_lock
        with hold_output_lock({str(out)!r}, "care-convert"):
            worker = os.fork()
            if worker == 0:  # a worker: lives on after its parent dies (and lets go of the output pipe)
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 1)
                os.dup2(null, 2)
                time.sleep(60)
                os._exit(0)
            print(worker, flush=True)
            os._exit(0)  # the main process dies without releasing anything, as under kill -9
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    worker = int(result.stdout.strip())
    try:
        with hold_output_lock(out, "care-convert"):  # the worker is alive, the lock is free
            assert Path(f"/proc/{worker}").exists() or sys.platform != "linux"
    finally:
        subprocess.run(["kill", "-9", str(worker)], check=False)


def test_a_file_system_that_cannot_lock_gives_a_warning_not_a_failure(raw, key_file, tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    out = tmp_path / "out"
    assert run_convert(raw, out, key_file) == 0
    assert "cannot lock files; make sure no other run writes this output folder" in capsys.readouterr().err
    assert len(reader.open_dataset(out).case_ids()) == 3 and not (out / LOCK_NAME).exists()


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie waiting to be reaped has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_conversion_workers_end_when_the_main_process_is_killed(tmp_path):
    script = textwrap.dedent("""
        import os
        from care_dataset.convert.pool import CasePool
        pool = CasePool(2)  # forks its workers now
        print(" ".join(str(pid) for pid in pool._pool._processes), flush=True)
        os._exit(0)  # the main process dies without shutting the pool down, as under kill -9
        """)
    printed = tmp_path / "workers.txt"  # a file, not a pipe: workers that live on would hold a pipe open
    with open(printed, "w") as stdout:
        subprocess.run([sys.executable, "-c", script], stdout=stdout, timeout=120, check=True)
    workers = [int(pid) for pid in printed.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if _running(pid)]
    for pid in left:
        subprocess.run(["kill", "-9", str(pid)], check=False)
    assert left == []


# --- finding: options checked before any work -------------------------------------------------------------------


def test_unwritable_private_map_is_a_usage_error_before_work(raw, key_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = tmp_path / "out"
    code = run_convert(raw, out, key_file, "--private-map", str(blocker / "sub" / "map.json"))
    assert code == 2 and "--private-map" in error_lines(capsys.readouterr().err)[0]
    assert not out.exists()


def test_private_map_is_written_before_the_completion_marker(raw, key_file, tmp_path, monkeypatch):
    written = []
    real = files.write_json_atomic
    monkeypatch.setattr(pipeline, "write_json_atomic", lambda path, obj, **kw: (written.append(Path(path).name),
                                                                             real(path, obj, **kw))[1])
    mapping = tmp_path / "custodian" / "map.json"
    convert_dataset(raw, tmp_path / "out", load_profile("care"), KEY, True, private_map=mapping, progress=False)
    assert written.index("map.json") < written.index("dataset.json")
    assert set(json.loads(mapping.read_text())) == {"Patient_0", "Patient_1", "Patient_2"}


@pytest.mark.parametrize("seed", ["-5", "-1"])
def test_negative_seed_is_a_usage_error_before_work(raw, key_file, tmp_path, capsys, seed):
    out = tmp_path / "out"
    assert run_convert(raw, out, key_file, "--seed", seed) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--seed" in line and seed in line
    assert not out.exists()

    with pytest.raises(ConvertError, match="seed"):
        convert_dataset(raw, out, load_profile("care"), KEY, True, seed=int(seed), progress=False)
    assert not out.exists()


# --- finding: raw header text in report.json -----------------------------------------------------------------


def test_only_dicom_defined_modality_terms_reach_the_report(key_file, tmp_path, capsys):
    raw = tmp_path / "raw"
    for folder, modality in (("typed_in", "SMITHJOHN"), ("mr_scan", "MR")):
        hu, label = phantom(1)
        write_dicom_case(raw / folder, hu, label, dict(PatientName="Smith^John", PatientID=f"ID-{folder}"),
                         modality=modality)
    out = tmp_path / "out"
    assert run_convert(raw, out, key_file) == 1
    terminal = capsys.readouterr().err
    reasons = sorted(r["reason"] for r in json.loads((out / "report.json").read_text()))
    assert reasons == ["modality MR is not CT", "the image series is not CT (non-standard modality code)"]
    assert "SMITHJOHN" not in terminal
    assert not [p for p in out.rglob("*") if p.is_file() and b"SMITHJOHN" in p.read_bytes()]


# --- finding: placeholder PatientIDs and one prefix for different people ------------------------------------------


@pytest.mark.parametrize("value", ["ANONYMOUS", "anonymized", "Unknown", "NONE", "N/A", "0", "000000", "", " ",
                                   "-", "?"])
def test_placeholder_patient_ids_fall_back_to_the_folder(value):
    assert is_placeholder_id(value)
    assert patient_identity({"PatientID": value, "IssuerOfPatientID": "HOSP"}, "case_folder") == "case_folder"


@pytest.mark.parametrize("value", ["PID778812", "1", "0001", "A0", "NONE-4711"])
def test_real_patient_ids_are_kept(value):
    assert not is_placeholder_id(value)
    assert patient_identity({"PatientID": value}, "case_folder") == value


def test_placeholder_ids_do_not_merge_patients_and_reused_ids_warn(key_file, tmp_path, capsys):
    raw = tmp_path / "raw"
    cases = {  # folder: (PatientName, PatientID, PatientBirthDate)
        "anon_a": ("Brennan^John", "ANONYMOUS", "19500101"),
        "anon_b": ("Schmidt^Ahmed", "ANONYMOUS", "19530228"),
        "keller_scan": ("Keller^Jonas", "PID4711", "19610203"),
        "novak_scan": ("Novak^Irena", "PID4711", "19610203"),
        "same_a": ("Roe^Richard", "PID5519", "19550417"),
        "same_b": ("ROE^RICHARD^^", "PID5519", "19550417"),
    }
    for seed, (folder, (name, pid, birth)) in enumerate(cases.items()):
        hu, label = phantom(seed)
        write_dicom_case(raw / folder, hu, label, dict(PatientName=name, PatientID=pid, PatientBirthDate=birth))
    mapping = tmp_path / "map.json"
    out = tmp_path / "out"
    for _ in range(2):  # the warning comes again when every case is resumed from its record
        assert run_convert(raw, out, key_file, "--private-map", str(mapping)) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
        ids = json.loads(mapping.read_text())
        assert patient_of(ids["anon_a"]) != patient_of(ids["anon_b"])
        assert patient_of(ids["keller_scan"]) == patient_of(ids["novak_scan"])
        assert patient_of(ids["same_a"]) == patient_of(ids["same_b"])
        (line,) = warnings
        assert patient_of(ids["keller_scan"]) in line and "patient name" in line and "birth date" not in line
        assert not [v for v in ("Keller", "Novak", "PID4711", "_scan", "19610203") if v.lower() in line.lower()]


# --- nits: profile validation, odd raw folders, key from the environment ------------------------------------------


@pytest.mark.parametrize("slices, patterns, wanted", [
    ("margin = -2", '["*seg*"]', "margin"),
    ("margin = 1.7", '["*seg*"]', "margin"),
    ("margin = true", '["*seg*"]', "margin"),
    ("margin = 1", "[]", "patterns"),
    ("margin = 1", '["*seg*", ""]', "patterns"),
])
def test_bad_margin_or_patterns_is_a_profile_error(tmp_path, raw, key_file, capsys, slices, patterns, wanted):
    path = tmp_path / "bad.toml"
    path.write_text(f'[classes]\nnames = ["background", "rectum", "tumor"]\n'
                    f"[labels]\npatterns = {patterns}\n[slices]\n{slices}\n")
    with pytest.raises(ProfileError, match=wanted):
        load_profile(path)
    assert run_convert(raw, tmp_path / "out", key_file, "--profile", str(path)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert wanted in line and not (tmp_path / "out").exists()


def test_dangling_link_is_not_an_annotation_and_nested_cases_get_a_hint(tmp_path, key_file, capsys):
    raw = tmp_path / "raw"
    write_volume_case(raw / "case_a", seed=0)
    (raw / "case_a" / "old_seg.nii.gz").symlink_to(tmp_path / "gone" / "x.nii.gz")
    write_volume_case(raw / "group" / "A", seed=1)
    write_volume_case(raw / "group" / "B", seed=2)
    out = tmp_path / "out"
    assert run_convert(raw, out, key_file) == 1
    report = json.loads((out / "report.json").read_text())
    assert sorted(r["status"] for r in report) == ["converted", "failed"]
    (failed,) = [r["reason"] for r in report if r["status"] == "failed"]
    assert failed.startswith("several annotation files (2)") and "directly under the raw folder" in failed


def test_links_to_the_output_to_raw_itself_or_to_another_case_are_skipped(raw, key_file, tmp_path, capsys):
    linked = tmp_path / "raw"
    linked.mkdir()
    for case in sorted(raw.iterdir()):
        (linked / case.name).symlink_to(case, target_is_directory=True)
    out = tmp_path / "out"
    assert run_convert(linked, out, key_file) == 0  # case folders that are links to real cases are fine
    reference = json.loads((out / "cases.json").read_text())
    (linked / "loop").symlink_to(linked, target_is_directory=True)
    (linked / "outlink").symlink_to(out, target_is_directory=True)
    (linked / "zz_again").symlink_to(linked / "Patient_0", target_is_directory=True)
    capsys.readouterr()
    assert run_convert(linked, out, key_file) == 0
    notes = sorted(line for line in capsys.readouterr().err.splitlines() if line.startswith("note: skipped"))
    assert [n.split(":")[1].split()[-1] for n in notes] == ["loop", "outlink", "zz_again"]
    assert json.loads((out / "cases.json").read_text()) == reference


def test_key_from_the_environment_loses_its_line_end_like_the_key_file(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_bytes(b"s3cret-0123456789\r\n")
    monkeypatch.setenv(KEY_ENV_VAR, "s3cret-0123456789\n")
    assert load_key(None) == load_key(key_file) == (b"s3cret-0123456789", True)
    monkeypatch.setenv(KEY_ENV_VAR, "\n")
    with pytest.raises(KeyMissingError, match=KEY_ENV_VAR):
        load_key(None)
    monkeypatch.setenv(KEY_ENV_VAR, "not-utf-8-\udcff-0123456789")  # bytes the system could not decode
    assert load_key(None) == (b"not-utf-8-\xff-0123456789", True)
