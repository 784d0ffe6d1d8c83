"""Console scripts: care-convert argument errors and exit codes, the thin wrappers' wiring."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pty
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch.distributed

from care_dataset import files
from care_dataset.cli import anonymize_main, convert_main, keygen_main, publish_main, synth_main, verify_main
from care_dataset.deid.pseudonyms import load_key, new_key
from care_dataset.files import creation_problem
from care_dataset.format import reader
from care_dataset.synth.phantom import phantom_volume
from care_dataset.synth.raw_export import write_raw_dataset
from usam.cli import main as usam_main


def write_volume_case(case_dir: Path, seed: int) -> None:
    """One .mha image + ITK-SNAP-style label case, 48 x 48 x 10 voxels over a 384 mm field of view."""
    hu, label = phantom_volume((10, 48, 48), (2.5, 8.0, 8.0), np.random.default_rng(seed), tumour=True)
    case_dir.mkdir(parents=True)
    for array, name in ((hu, "ct.mha"), (label, "ct_seg.mha")):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing((8.0, 8.0, 2.5))
        sitk.WriteImage(img, str(case_dir / name))


@pytest.fixture
def raw(tmp_path) -> Path:
    root = tmp_path / "raw"
    for i in range(2):
        write_volume_case(root / f"case{i}", i)
    return root


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "secret.key"
    path.write_bytes(b"cli-test-key-0123456789\n")
    path.chmod(0o600)  # as care-keygen leaves it: no warning
    return path


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv("CARE_DEID_KEY", raising=False)


def error_of(capsys) -> str:
    return capsys.readouterr().err


def test_help_exits_zero(capsys):
    assert convert_main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--profile", "--format", "--workers", "--seed", "--key-file", "--random-key", "--private-map"):
        assert option in out


@pytest.mark.parametrize("argv_tail, message", [
    ([], "the following arguments are required"),
    (["--format", "parquet"], "invalid choice"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "two"], "invalid int value"),
    (["--profile", "nosuchprofile"], "unknown profile 'nosuchprofile'; available: care, word"),
])
def test_argument_errors_exit_2(raw, tmp_path, key_file, capsys, argv_tail, message):
    argv = [str(raw), str(tmp_path / "out"), "--key-file", str(key_file)] if argv_tail else []
    assert convert_main(argv + argv_tail) == 2
    assert message in error_of(capsys)
    assert not (tmp_path / "out").exists()


def test_path_errors_exit_2(raw, tmp_path, key_file, capsys):
    key = ["--key-file", str(key_file)]
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "out"), *key]) == 2
    assert "does not exist" in error_of(capsys)
    assert convert_main([str(raw), str(raw / "out"), *key]) == 2
    assert "must not be inside the raw folder" in error_of(capsys)
    assert convert_main([str(raw), str(tmp_path / "out"), *key, "--private-map", str(tmp_path / "out" / "m.json")]) == 2
    assert "--private-map must not be inside the output folder" in error_of(capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a conversion")
    assert convert_main([str(raw), str(foreign), *key]) == 2
    assert "not empty" in error_of(capsys)
    bad_profile = tmp_path / "bad.toml"
    bad_profile.write_text("[classes]\nnames = ['rectum']\n")
    assert convert_main([str(raw), str(tmp_path / "out"), *key, "--profile", str(bad_profile)]) == 2
    assert "must start with 'background'" in error_of(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_key_is_refused(raw, tmp_path, capsys):
    assert convert_main([str(raw), str(tmp_path / "out")]) == 2
    assert "--random-key" in error_of(capsys)
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    assert convert_main([str(raw), str(tmp_path / "out"), "--key-file", str(empty)]) == 2
    assert "empty" in error_of(capsys)


def test_random_key_warns_and_marks_ids_unreproducible(raw, tmp_path, capsys):
    assert convert_main([str(raw), str(tmp_path / "a"), "--random-key", "--quiet"]) == 0
    assert "not be reproducible" in error_of(capsys)
    assert convert_main([str(raw), str(tmp_path / "b"), "--random-key", "--quiet"]) == 0
    a, b = reader.open_dataset(tmp_path / "a"), reader.open_dataset(tmp_path / "b")
    assert a.manifest["key_reproducible"] is False
    assert len(a.case_ids()) == 2 and not set(a.case_ids()) & set(b.case_ids())


def test_key_from_environment(raw, tmp_path, key_file, monkeypatch):
    assert convert_main([str(raw), str(tmp_path / "a"), "--key-file", str(key_file), "--quiet"]) == 0
    monkeypatch.setenv("CARE_DEID_KEY", "cli-test-key-0123456789")
    assert convert_main([str(raw), str(tmp_path / "b"), "--quiet"]) == 0
    a, b = reader.open_dataset(tmp_path / "a"), reader.open_dataset(tmp_path / "b")
    assert a.case_ids() == b.case_ids() and a.manifest["key_reproducible"] is True


# --- keys ---------------------------------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("secret", [b"#", b"fifteen-bytes!!\n", b"fifteen-bytes!!\r\n\r\n"])
@pytest.mark.parametrize("source", ["file", "environment"])
def test_a_key_under_16_bytes_is_refused_from_a_file_and_the_environment_alike(raw, tmp_path, monkeypatch, capsys,
                                                                              secret, source):
    """Trailing line ends do not count, as load_key drops them; the message says how to make a key."""
    argv = [str(raw), str(tmp_path / "out")]
    if source == "file":
        (tmp_path / "weak.key").write_bytes(secret)
        argv += ["--key-file", str(tmp_path / "weak.key")]
    else:
        monkeypatch.setenv("CARE_DEID_KEY", secret.decode())
    for main, args in ((convert_main, argv), (anonymize_main, argv)):
        assert main(args) == 2
        error = [line for line in error_of(capsys).splitlines() if "error" in line]
        assert len(error) == 1 and "at least 16 bytes" in error[0] and "`care-keygen site.key`" in error[0]
        assert ("weak.key" if source == "file" else "CARE_DEID_KEY") in error[0]
        assert secret.strip().decode() not in error[0]
    assert not (tmp_path / "out").exists()


def test_a_16_byte_key_is_accepted_from_either_source_and_gives_the_same_ids(raw, tmp_path, monkeypatch):
    (tmp_path / "k").write_bytes(b"sixteen-bytes-ok\n")
    (tmp_path / "k").chmod(0o600)
    assert convert_main([str(raw), str(tmp_path / "a"), "--key-file", str(tmp_path / "k"), "--quiet"]) == 0
    monkeypatch.setenv("CARE_DEID_KEY", "sixteen-bytes-ok")
    assert convert_main([str(raw), str(tmp_path / "b"), "--quiet"]) == 0
    assert reader.open_dataset(tmp_path / "a").case_ids() == reader.open_dataset(tmp_path / "b").case_ids()


def test_keygen_writes_an_owner_only_key_that_is_accepted_and_never_overwritten(raw, tmp_path, capsys):
    path = tmp_path / "keys" / "site.key"
    with umask(0):  # the mode does not depend on the umask
        assert keygen_main([str(path)]) == 0
    assert mode_of(path) == 0o600 and len(path.read_bytes()) == 32
    assert load_key(path) == (path.read_bytes(), True)  # every byte of the file is the key
    assert "32-byte key" in capsys.readouterr().out
    assert convert_main([str(raw), str(tmp_path / "out"), "--key-file", str(path), "--quiet"]) == 0
    assert error_of(capsys) == ""  # no warning
    before = path.read_bytes()
    assert keygen_main([str(path)]) == 2
    error = error_of(capsys).strip().splitlines()
    assert error == [f"care-keygen: error: {path} exists; a key file is never overwritten (the case IDs made with "
                     "it would be lost): choose another path"]
    assert path.read_bytes() == before
    (tmp_path / "link.key").symlink_to(tmp_path / "elsewhere.key")
    assert keygen_main([str(tmp_path / "link.key")]) == 2 and not (tmp_path / "elsewhere.key").exists()
    assert all(new_key()[-1:] not in (b"\r", b"\n") for _ in range(2000))


def test_a_key_file_open_to_others_gets_a_warning(raw, tmp_path, key_file, capsys):
    key_file.chmod(0o640)
    assert convert_main([str(raw), str(tmp_path / "a"), "--key-file", str(key_file), "--quiet"]) == 0
    (warning,) = error_of(capsys).strip().splitlines()
    assert warning == (f"warning: the key file {key_file} is open to group or others (mode 0640): whoever reads it "
                       f"can tell who is who from the case IDs; run `chmod 600 {key_file}`")
    key_file.chmod(0o600)
    assert convert_main([str(raw), str(tmp_path / "b"), "--key-file", str(key_file), "--quiet"]) == 0
    assert error_of(capsys) == ""


def test_the_private_map_is_created_owner_only(raw, tmp_path, key_file):
    mapping = tmp_path / "custodian" / "map.json"
    with umask(0):
        assert convert_main([str(raw), str(tmp_path / "out"), "--key-file", str(key_file), "--quiet",
                             "--private-map", str(mapping)]) == 0
        assert mode_of(mapping) == 0o600 and set(json.loads(mapping.read_text())) == {"case0", "case1"}
        mapping.chmod(0o644)  # an earlier, too open map is replaced by an owner-only one
        assert convert_main([str(raw), str(tmp_path / "out"), "--key-file", str(key_file), "--quiet",
                             "--private-map", str(mapping)]) == 0
    assert mode_of(mapping) == 0o600
    assert [p.name for p in mapping.parent.iterdir()] == ["map.json"]


def test_an_owner_only_atomic_file_has_its_mode_before_anything_is_written(tmp_path):
    target = tmp_path / "map.json"
    files.temporary_path(target).write_text("stale, too open")
    files.temporary_path(target).chmod(0o644)
    with umask(0), files.atomic_file(target, 0o600) as tmp:
        assert mode_of(tmp) == 0o600 and tmp.read_bytes() == b""
        tmp.write_text("{}")
    assert mode_of(target) == 0o600 and target.read_text() == "{}"


def key_forms(key: bytes) -> list[bytes]:
    """The key and the encodings it could be printed or written in."""
    forms = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
             base64.urlsafe_b64encode(key), base64.b64encode(key).rstrip(b"=")]
    return forms + [form.decode("latin-1").encode("utf-8") for form in forms]


def run_in_terminal(argv: list[str], env: dict[str, str]) -> bytes:
    """What `argv` shows on a terminal (a pseudo-terminal: progress bars and colours as a user sees them)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    shown = []
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: every process holding the terminal has ended
            break
        if not chunk:
            break
        shown.append(chunk)
    os.close(leader)
    process.wait(timeout=300)
    return b"".join(shown)


def test_the_key_reaches_no_file_report_or_terminal(tmp_path):
    """care-convert (2 workers, private map) and care-anonymize, with a care-keygen key file and with a text key
    in CARE_DEID_KEY, and a refused short key: no form of the key in any file written or on the terminal."""
    raw = tmp_path / "raw"
    write_raw_dataset(raw, cases=2, seed=3, size=64, slices=8, messy=False)
    (tmp_path / "raw" / "broken case").mkdir()  # a failing case: its reason reaches the terminal and report
    key_path = tmp_path / "site.key"
    assert keygen_main([str(key_path)]) == 0
    text_key = "custodian-secret-Ünïcode-0123456789"
    (tmp_path / "weak.key").write_text("short-secret\n")
    command = "import sys; from care_dataset.cli import {} as main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "CARE_DEID_KEY"}
    runs = [
        (key_path.read_bytes(), env, "convert_main", ["--key-file", str(key_path), "--workers", "2",
                                                      "--private-map", str(tmp_path / "map1.json")], "file"),
        (key_path.read_bytes(), env, "anonymize_main", ["--key-file", str(key_path)], "anon_file"),
        (text_key.encode(), {**env, "CARE_DEID_KEY": text_key}, "convert_main",
         ["--private-map", str(tmp_path / "map2.json")], "env"),
        (text_key.encode(), {**env, "CARE_DEID_KEY": text_key}, "anonymize_main", [], "anon_env"),
        (b"short-secret", env, "convert_main", ["--key-file", str(tmp_path / "weak.key")], "weak"),
    ]
    for key, run_env, main, options, out_name in runs:
        argv = [sys.executable, "-c", command.format(main), str(raw), str(tmp_path / out_name), *options]
        shown = run_in_terminal(argv, run_env)
        assert b"converted" in shown or b"anonymized" in shown or b"at least 16 bytes" in shown, shown[-2000:]
        written = [p for p in tmp_path.rglob("*") if p.is_file() and p not in (key_path, tmp_path / "weak.key")
                   and "raw" not in p.relative_to(tmp_path).parts]
        assert written or out_name == "weak"
        for form in key_forms(key):
            assert form not in shown, (out_name, form)
            for path in written:
                assert form not in path.read_bytes(), (out_name, path)
            assert form.decode("latin-1") not in " ".join(argv)  # nor on the command line, the process title
    assert not (tmp_path / "weak").exists()


def test_summary_table_and_exit_code_1_on_a_failed_case(raw, tmp_path, key_file, capsys):
    (raw / "case1" / "ct_seg.mha").unlink()
    assert convert_main([str(raw), str(tmp_path / "out"), "--key-file", str(key_file), "--format", "h5"]) == 1
    captured = capsys.readouterr()
    assert "1 converted, 1 failed" in captured.out
    for column in ("split", "cases", "slices", "normal rectum voxels", "tumor voxels"):
        assert column in captured.out
    failed_lines = [line for line in captured.err.splitlines() if "FAILED" in line]
    assert len(failed_lines) == 1 and "case1" in failed_lines[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(r["status"] for r in report) == ["converted", "failed"]
    assert reader.open_dataset(tmp_path / "out").storage == "h5"


def test_format_change_in_a_finished_folder_is_refused(raw, tmp_path, key_file, capsys):
    common = [str(raw), str(tmp_path / "out"), "--key-file", str(key_file), "--quiet"]
    assert convert_main(common) == 0
    assert convert_main([*common, "--format", "h5"]) == 2
    assert "--format zarr" in error_of(capsys)


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).with_name("care-convert")
    if not script.exists():
        pytest.skip("care-convert console script not installed in this environment")
    result = subprocess.run([str(script), str(tmp_path / "missing"), str(tmp_path / "out"), "--random-key"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "does not exist" in result.stderr


@pytest.mark.parametrize("entry, module", [(anonymize_main, "deid.anonymize"), (synth_main, "synth.raw_export"),
                                           (verify_main, "deid.verify"), (publish_main, "publish.job")])
def test_wrappers_parse_their_own_arguments(entry, module, capsys):
    if importlib.util.find_spec(f"care_dataset.{module}") is None:
        pytest.skip(f"care_dataset.{module} not available yet")
    assert entry(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out
    assert entry(["--no-such-option"]) == 2


def test_care_synth_writes_cases_and_refuses_a_foreign_folder(tmp_path, capsys):
    if importlib.util.find_spec("care_dataset.synth.raw_export") is None:
        pytest.skip("care_dataset.synth not available yet")
    out = tmp_path / "raw"
    assert synth_main([str(out), "--cases", "2", "--size", "64", "--slices", "8", "--no-messy"]) == 0
    assert len([p for p in out.iterdir() if p.is_dir()]) == 2
    (out / "unrelated.txt").write_text("x")
    assert synth_main([str(out), "--cases", "2", "--size", "64", "--slices", "8", "--no-messy"]) == 2
    assert "error:" in capsys.readouterr().err


def test_usam_fit_resume_without_a_run_names_the_run_folder(tmp_path, capsys):
    out = tmp_path / "no_run"
    assert usam_main(["fit", "--out", str(out), "--resume"]) == 2
    assert error_of(capsys).strip() == f"usam fit: error: --resume: {out} has no run to resume"
    assert not out.exists()


@pytest.mark.parametrize("rank, prints", [(None, True), ("0", True), ("1", False)])
def test_usam_fit_errors_are_printed_by_the_main_rank_only(tmp_path, capsys, monkeypatch, rank, prints):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert usam_main(["fit", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--flip-prob", "2"]) == 2
    err = error_of(capsys)
    assert err == ("usam fit: error: flip_prob must be in [0, 1], got 2.0\n" if prints else "")


def _places_no_file_can_be_made(tmp_path: Path) -> list[tuple[Path, str]]:
    """(output path, reason expected): under a regular file, and under /proc where the OS refuses new files."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    places = [(a_file / "sub" / "out", f"{a_file} is a file, not a folder")]
    if Path("/proc/self").is_dir() and creation_problem(Path("/proc")) is not None:
        places.append((Path("/proc/care-usam-test-out"), "cannot create files in /proc ("))
    return places


def test_every_command_refuses_an_output_where_no_file_can_be_made(raw, tmp_path, key_file, capsys):
    """One line naming the output and the reason, before any work, nothing written; each command asks the same
    care_dataset.files.creation_problem, which tries a file (os.access says yes to root on /proc)."""
    converted = tmp_path / "converted"
    assert convert_main([str(raw), str(converted), "--key-file", str(key_file), "--quiet"]) == 0
    commands = {
        "care-synth": lambda out: synth_main([str(out), "--cases", "1", "--size", "64", "--slices", "8"]),
        "care-convert": lambda out: convert_main([str(raw), str(out), "--key-file", str(key_file)]),
        "care-convert --private-map": lambda out: convert_main(
            [str(raw), str(tmp_path / "never"), "--key-file", str(key_file), "--private-map", str(out / "map.json")]),
        "care-anonymize": lambda out: anonymize_main([str(raw), str(out), "--key-file", str(key_file)]),
        "care-keygen": lambda out: keygen_main([str(out / "site.key")]),
        "care-publish": lambda out: publish_main([str(converted), str(out)]),
        "usam fit": lambda out: usam_main(["fit", "--data", str(converted), "--out", str(out), "--model",
                                           "usam_tiny", "--max-steps", "1", "--batch-size", "2"]),
    }
    capsys.readouterr()
    for out, reason in _places_no_file_can_be_made(tmp_path):
        for name, run in commands.items():
            before = sorted(tmp_path.rglob("*"))
            code = run(out)
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
                     and not line.startswith(" ")]
            assert code in (1, 2), (name, out, err)
            assert len(lines) == 1 and reason in lines[0] and str(out) in lines[0], (name, err)
            assert not out.exists() and sorted(tmp_path.rglob("*")) == before, name


def test_an_output_behind_a_dangling_link_is_one_line(tmp_path, capsys):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere" / "x")
    assert synth_main([str(link), "--cases", "1", "--size", "64", "--slices", "8"]) == 2
    assert "is a symbolic link to" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    out = link / "pred.nii.gz"
    assert usam_main(["predict", "--checkpoint", str(tmp_path / "none"), "--image", str(tmp_path / "none.nii.gz"),
                         "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{link} is a symbolic link to" in err


def test_an_output_inside_a_folder_one_may_not_search_is_one_line(raw, tmp_path, key_file, unprivileged):
    """Path.exists raises PermissionError there before Python 3.13; every check goes through os.path."""
    prefix = unprivileged
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(private, 65534, 65534)  # nobody's, and root without DAC override may not enter it
    else:
        private.chmod(0)
    out = private / "out"
    run = "import sys; from {} import {} as main; sys.exit(main(sys.argv[1:]))"
    commands = {
        "care-synth": (run.format("care_dataset.cli", "synth_main"), [str(out), "--cases", "1"]),
        "care-convert": (run.format("care_dataset.cli", "convert_main"),
                         [str(raw), str(out), "--key-file", str(key_file)]),
        "usam predict": (run.format("usam.cli", "main"), ["predict", "--checkpoint", str(tmp_path / "none"), "--image",
                                                          str(tmp_path / "none.nii"), "--out", str(out / "p.nii.gz")]),
    }
    try:
        for name, (code, argv) in commands.items():
            result = subprocess.run([*prefix, sys.executable, "-c", code, *argv], capture_output=True, text=True)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, (name, result.stderr[-1500:])
            assert f"cannot create files in {private} (Permission denied)" in lines[0], (name, lines[0])
    finally:
        private.chmod(0o700)
        if os.geteuid() == 0:
            os.chown(private, 0, 0)


def test_usam_fit_errors_after_the_process_group_is_joined_are_printed_by_their_rank(tmp_path, capsys,
                                                                                       monkeypatch):
    """Before the group is joined every rank fails alike (rank 0 reports); after it, an error may be one rank's."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert usam_main(["fit", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--flip-prob", "2"]) == 2
    assert error_of(capsys) == "usam fit (rank 1): error: flip_prob must be in [0, 1], got 2.0\n"
