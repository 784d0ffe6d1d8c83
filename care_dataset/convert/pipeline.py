"""`care-convert`: raw case folders -> de-identified, slice-filtered, patient-split slice dataset.

Per raw case (``care_dataset.convert.job.convert_case``, run in worker processes when ``workers > 1``): load
image and label in the canonical orientation, name the case by its keyed pseudonym, keep the axial slices
holding any voxel of the profile's ``keep_classes`` (plus margin), write the arrays atomically, then the case's
record under ``out/.tmp/records/``. The JSON files at the top of the output are written last, from the records
only, so an interrupted run resumes by rerunning the same command and ends with the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from care_dataset.convert.job import RECORDS_DIR, CaseJob, CaseOutcome, discard_case
from care_dataset.convert.pool import CasePool
from care_dataset.convert.progress import CaseProgress, stderr_console
from care_dataset.convert.summary import ConvertSummary
from care_dataset.deid.pseudonyms import key_problem, patient_of
from care_dataset.files import (LOCK_NAME, OutputLockedError, creation_problem, hold_output_lock, temporary_path,
                                write_json_atomic)
from care_dataset.format import writer
from care_dataset.format.layout import (FORMAT_NAME, FORMAT_VERSION, H5_DIR, STORAGE_FORMATS, TMP_DIR, ZARR_DIR,
                                        read_json)
from care_dataset.format.splits import given_splits, make_splits, patients_in_several_splits, split_names
from care_dataset.raw.discover import RawCase, discover_cases, drop_linked_cases, raw_fingerprint
from care_dataset.raw.profiles import Profile
from care_dataset.raw.split_lists import SplitAssignment, SplitListError, assign_splits
from care_dataset.version import __version__

PRIVATE_MAP_MODE = 0o600  # raw folder names are patient names: for the data custodian's eyes only
FINAL_FILES = ("report.json", "cases.json", "splits.json", "dataset.json")  # dataset.json last: it marks completion


class ConvertError(ValueError):
    """The conversion cannot start (bad paths, nothing to convert); one line for the user."""


class OutputBusyError(ConvertError):
    """Another process is writing the output folder (it holds the folder's lock)."""


class OutputNotWritableError(ConvertError):
    """No file can be created where the output (or the private map) goes: not a usage mistake."""


def identity_conflicts(records: list[dict]) -> list[str]:
    """One warning per patient prefix whose cases' headers disagree on patient name or birth date."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(patient_of(record["case_id"]), []).append(record.get("header_check") or {})
    described = {"name": "patient name", "birth_date": "birth date"}
    warnings = []
    for prefix, checks in sorted(groups.items()):
        differing = [text for name, text in described.items() if len({c[name] for c in checks if name in c}) > 1]
        if differing:
            warnings.append(f"warning: the {len(checks)} cases of patient {prefix} share a PatientID but their "
                            f"headers differ in {' and '.join(differing)} (a reused PatientID?); "
                            "they stay in one split")
    return warnings


def settings_digest(profile: Profile, storage: str) -> str:
    """What besides the inputs decides a case's output: profile text, storage, format and tool versions."""
    text = f"{profile.sha256}\0{storage}\0{FORMAT_VERSION}\0{__version__}"
    return hashlib.sha256(text.encode()).hexdigest()


def check_paths(raw_dir: Path, out_dir: Path, private_map: Path | None) -> tuple[Path, Path, Path | None]:
    """Resolve and validate the folders; raises ConvertError with one clear line."""
    raw_dir, out_dir = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if not os.path.isdir(raw_dir):
        raise ConvertError(f"raw folder {raw_dir} does not exist or is not a folder")
    if out_dir == raw_dir or raw_dir in out_dir.parents:
        raise ConvertError("the output folder must not be inside the raw folder")
    if out_dir in raw_dir.parents:
        raise ConvertError("the raw folder must not be inside the output folder")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ConvertError(f"output path {out_dir} exists and is not a folder")
    if problem := creation_problem(out_dir):
        raise OutputNotWritableError(f"output folder {out_dir}: {problem}")
    if out_dir.is_dir() and any(p.name != LOCK_NAME for p in out_dir.iterdir()) and not (
            (out_dir / "dataset.json").exists() or (out_dir / TMP_DIR).is_dir()):
        raise ConvertError(f"output folder {out_dir} is not empty and holds no care-convert output")
    if private_map is not None:
        private_map = Path(private_map).resolve()
        if private_map == out_dir or out_dir in private_map.parents:
            raise ConvertError("--private-map must not be inside the output folder (it names raw folders)")
        if raw_dir in private_map.parents:
            raise ConvertError("--private-map must not be inside the raw folder")
        if os.path.isdir(private_map):
            raise ConvertError(f"--private-map {private_map} is a folder, expected a file path")
        if problem := creation_problem(private_map.parent):
            raise OutputNotWritableError(f"--private-map {private_map}: {problem}")
    return raw_dir, out_dir, private_map


def _prepare_output(out_dir: Path, storage: str) -> None:
    """Create the output, drop the completion marker and stale temporaries (records are kept for resume)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    other = [s for s in STORAGE_FORMATS if s != storage]
    for name in other:
        if (out_dir / "dataset.json").exists() and read_json(out_dir / "dataset.json").get("storage") == name:
            raise ConvertError(f"output folder holds a --format {name} conversion; use another folder or --format {name}")
    (out_dir / "dataset.json").unlink(missing_ok=True)
    tmp = out_dir / TMP_DIR
    if tmp.is_dir():
        for path in tmp.iterdir():
            if path.name == RECORDS_DIR and path.is_dir():
                for stale in path.glob(".*"):
                    stale.unlink()
            else:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in out_dir.glob(temporary_path(out_dir / "*.json").name):
        path.unlink()
    (tmp / RECORDS_DIR).mkdir(parents=True, exist_ok=True)


def _load_records(out_dir: Path) -> dict[str, dict]:
    """Existing records by raw-input fingerprint."""
    records = {}
    for path in sorted((out_dir / TMP_DIR / RECORDS_DIR).glob("*.json")):
        try:
            record = read_json(path)
            records[record["fingerprint"]] = record
        except (ValueError, KeyError, TypeError):
            path.unlink()
    return records


def _prune(out_dir: Path, storage: str, keep: set[str]) -> None:
    """Remove records and arrays of cases that are not part of this conversion."""
    for path in (out_dir / TMP_DIR / RECORDS_DIR).glob("*.json"):
        if path.stem not in keep:
            path.unlink()
    if storage == "zarr":
        entries = [p for p in (out_dir / ZARR_DIR).iterdir() if p.is_dir()]
        names = {p: p.name for p in entries}
    else:
        names = {p: p.stem for p in (out_dir / H5_DIR).glob("*.h5")}
    for path, case_id in names.items():
        if case_id not in keep:
            writer.remove_case(out_dir, storage, case_id)
    for other in STORAGE_FORMATS:
        folder = out_dir / (ZARR_DIR if other == "zarr" else H5_DIR)
        if other != storage and folder.exists():
            shutil.rmtree(folder)


def _report_entry(outcome: CaseOutcome) -> dict:
    entry = {"case_id": outcome.case_id, "status": outcome.status, "reason": outcome.reason}
    if outcome.notes:
        entry["notes"] = list(outcome.notes)
    return entry


def _report_order(entry: dict) -> tuple:
    return (entry["status"] != "converted", entry["case_id"] is None, entry["case_id"] or "", entry["reason"])


def split_statistics(cases: dict[str, dict], splits: dict, split_names: list[str], class_names: list[str]) -> dict:
    stats = {}
    for name in split_names:
        ids = splits[name]
        stats[name] = {
            "cases": len(ids),
            "slices": sum(cases[c]["num_slices"] for c in ids),
            "voxels": {n: sum(cases[c]["voxels_after"][n] for c in ids) for n in class_names},
        }
    return stats


def split_warnings(splits: dict) -> list[str]:
    """One warning per patient prefix whose cases the source put in different splits."""
    source = "the image folders" if splits.get("strategy") == "folders" else "the split file"
    return [f"warning: the cases of patient {patient} lie in splits {' and '.join(held)}, as {source} put them; "
            "one patient's scans in training and in testing inflate the scores"
            for patient, held in patients_in_several_splits(splits).items()]


def build_outputs(records: list[dict], report: list[dict], profile: Profile, storage: str, seed: int,
                  key_reproducible: bool, splits: dict | None = None) -> dict[str, Any]:
    """The four top-level JSON objects, from the case records alone (deterministic); ``splits``: the
    splits.json object of splits the source gave (None: the seeded patient split of the profile's sizes)."""
    by_id = {r["case_id"]: r["entry"] for r in sorted(records, key=lambda r: r["case_id"])}
    if splits is None:
        splits = make_splits(list(by_id), profile.split_sizes, seed)
    split_of = {c: name for name in split_names(splits) for c in splits[name]}
    selection = "all" if profile.all_slices else "labelled"
    cases = {c: {**entry, "split": split_of[c], "slice_selection": selection} for c, entry in by_id.items()}
    checksums = {c: entry["checksum"] for c, entry in by_id.items()}
    overall = hashlib.sha256("".join(f"{c} {s}\n" for c, s in checksums.items()).encode()).hexdigest()
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "storage": storage,
        "classes": list(profile.class_names),
        "profile": profile.to_json(),
        "splits": split_statistics(cases, splits, split_names(splits), list(profile.class_names)),
        "checksums": {"cases": checksums, "all": overall},
        "tool": "care-usam",
        "tool_version": __version__,
        "key_reproducible": bool(key_reproducible),
    }
    return {"report.json": sorted(report, key=_report_order), "cases.json": cases, "splits.json": splits,
            "dataset.json": manifest}


def convert_dataset(raw_dir: Path, out_dir: Path, profile: Profile, key: bytes, key_reproducible: bool,
                    seed: int = 0, storage: str = "zarr", workers: int = 1, private_map: Path | None = None,
                    progress: bool = True) -> ConvertSummary:
    """Convert every raw case under ``raw_dir`` into ``out_dir``; resumes from an interrupted run.

    Failing cases are reported (terminal line naming the raw folder; report.json without it) and leave no
    output. Raises ConvertError when the conversion cannot start.
    """
    if storage not in STORAGE_FORMATS:
        raise ConvertError(f"unknown storage format {storage!r}; expected one of {', '.join(STORAGE_FORMATS)}")
    if problem := key_problem(key, "the de-identification key"):
        raise ConvertError(problem)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConvertError(f"the split seed must be a non-negative integer, got {seed!r}")
    raw_dir, out_dir, private_map = check_paths(raw_dir, out_dir, private_map)
    discovered = discover_cases(raw_dir, profile)
    try:
        assignment = assign_splits(discovered, profile)
    except SplitListError as err:
        raise ConvertError(str(err)) from None
    raws, skipped = drop_linked_cases(discovered, raw_dir, out_dir)
    if assignment is not None:
        skipped += [(r.key, f"it is in no split of the split file {profile.split_file}") for r in raws
                    if r.key not in assignment.of_raw]
        raws = [r for r in raws if r.key in assignment.of_raw]
    for name, why in skipped:
        stderr_console().print(f"note: skipped case folder {name}: {why}", markup=False, highlight=False)
    if not raws:
        raise ConvertError(f"no cases found in {raw_dir} for profile {profile.name!r}")
    try:
        with hold_output_lock(out_dir, "care-convert"):
            outcomes, failures, warnings, outputs = _convert_locked(
                raws, raw_dir, out_dir, profile, key, key_reproducible, seed, storage, workers, private_map, progress,
                assignment)
    except OutputLockedError as err:
        raise OutputBusyError(str(err)) from None

    done = [o for o in outcomes if o.status == "converted"]
    manifest = outputs["dataset.json"]
    return ConvertSummary(out_dir=out_dir, storage=storage, class_names=list(profile.class_names),
                          split_stats=manifest["splits"], converted=len(done), failed=len(outcomes) - len(done),
                          report=outputs["report.json"], failures=failures, warnings=warnings)


def _convert_locked(raws: list[RawCase], raw_dir: Path, out_dir: Path, profile: Profile, key: bytes,
                    key_reproducible: bool, seed: int, storage: str, workers: int, private_map: Path | None,
                    progress: bool, assignment: SplitAssignment | None = None,
                    ) -> tuple[list[CaseOutcome], list[tuple[str, str]], list[str], dict[str, Any]]:
    """The conversion proper, run while this process holds the output folder's lock."""
    _prepare_output(out_dir, storage)
    outcomes, jobs = _resumed_and_pending(raws, raw_dir, out_dir, profile, key, storage)
    failures = _run_jobs(jobs, outcomes, out_dir, storage, workers, progress)
    _fail_duplicate_ids(outcomes, out_dir, storage, failures)
    done = [o for o in outcomes if o is not None and o.status == "converted"]
    _prune(out_dir, storage, {o.case_id for o in done})
    splits = None
    if assignment is not None:
        splits = given_splits(assignment.of_case({o.raw_name: o.case_id for o in done}), assignment.names,
                              assignment.strategy, seed)
    outputs = build_outputs([o.record for o in done], [_report_entry(o) for o in outcomes], profile, storage,
                            seed, key_reproducible, splits)
    warnings = identity_conflicts([o.record for o in done]) + split_warnings(outputs["splits.json"])
    for line in warnings:
        stderr_console().print(line, style="yellow", markup=False, highlight=False)
    if private_map is not None:  # before the completion marker: a run that cannot write it does not look done
        private_map.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(private_map, {o.raw_name: o.case_id for o in outcomes}, mode=PRIVATE_MAP_MODE)
    for name in FINAL_FILES:
        write_json_atomic(out_dir / name, outputs[name])
    return outcomes, failures, warnings, outputs


def _resumed_and_pending(raws: list[RawCase], raw_dir: Path, out_dir: Path, profile: Profile, key: bytes,
                         storage: str) -> tuple[list[CaseOutcome | None], list[tuple[int, CaseJob]]]:
    """Per raw case, the outcome of an earlier run whose record still holds (same inputs and settings, arrays
    present), else None and a job to convert it; jobs come with the case's index in `raws`."""
    existing = _load_records(out_dir)
    settings = settings_digest(profile, storage)
    outcomes: list[CaseOutcome | None] = [None] * len(raws)
    jobs: list[tuple[int, CaseJob]] = []
    for index, raw in enumerate(raws):
        fingerprint = raw_fingerprint(raw, raw_dir, key)
        record = existing.get(fingerprint)
        if (record is not None and record.get("settings") == settings
                and writer.case_exists(out_dir, storage, record["case_id"])):
            entry = record["entry"]
            reason = f"converted {entry['num_slices']} of {entry['canonical']['size'][2]} axial slices"
            outcomes[index] = CaseOutcome(raw.key, record["case_id"], "converted", reason, record=record,
                                          notes=record.get("notes", []))
        else:
            jobs.append((index, CaseJob(raw, raw_dir, out_dir, profile, key, storage, fingerprint, settings)))
    return outcomes, jobs


def _run_jobs(jobs: list[tuple[int, CaseJob]], outcomes: list[CaseOutcome | None], out_dir: Path, storage: str,
              workers: int, progress: bool) -> list[tuple[str, str]]:
    """Convert the pending cases into `outcomes`, showing progress and failures; returns (raw folder, reason)
    of each failed case."""
    failures: list[tuple[str, str]] = []
    with CasePool(workers if len(jobs) > 1 else 1) as pool:
        writer.init_store(out_dir, storage)
        with CaseProgress(len(outcomes), "care-convert", enabled=progress) as bar:
            bar.advance(len(outcomes) - len(jobs))
            for index, outcome in pool.run(jobs):
                outcomes[index] = outcome
                if outcome.status == "failed":
                    failures.append((outcome.raw_name, outcome.reason))
                    line = f"FAILED {outcome.raw_name}: {outcome.reason}"
                    bar.print(line + (f" [{outcome.detail}]" if outcome.detail else ""))
                for note in outcome.notes:
                    bar.print(f"note {outcome.raw_name}: {note}")
                bar.advance()
    return failures


def _fail_duplicate_ids(outcomes: list[CaseOutcome], out_dir: Path, storage: str,
                        failures: list[tuple[str, str]]) -> None:
    """Two raw cases that ended with one case ID (a truncated-hash collision) both fail: their arrays collided."""
    seen: dict[str, list[int]] = {}
    for i, o in enumerate(outcomes):
        if o.status == "converted":
            seen.setdefault(o.case_id, []).append(i)
    for case_id, indices in seen.items():
        if len(indices) > 1:
            discard_case(out_dir, storage, case_id)
            for i in indices:
                reason = "another raw case received the same case ID; convert it with another key"
                outcomes[i] = CaseOutcome(outcomes[i].raw_name, case_id, "failed", reason)
                failures.append((outcomes[i].raw_name, reason))
