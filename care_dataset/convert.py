"""`care-convert`: raw case folders -> de-identified, slice-filtered, patient-split slice dataset.

Per raw case (``convert_case``, run in worker processes when ``workers > 1``): load image and label in the
canonical orientation, name the case by its keyed pseudonym, keep the axial slices holding any voxel of the
profile's ``keep_classes`` (plus margin), write the arrays atomically, then the case's record under
``out/.tmp/records/``. The JSON files at the top of the output are written last, from the records only, so
an interrupted run resumes by rerunning the same command and ends with the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import os
import shutil
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from care_dataset import __version__, store
from care_dataset.locking import LOCK_NAME, OutputLockedError, hold_output_lock
from care_dataset.profiles import Profile
from care_dataset.splits import CASE_SUFFIX_SEPARATOR, make_splits, patient_of
from care_dataset.files import creation_problem

RECORDS_DIR = "records"
CASE_SUFFIX_HEX = 6
FINAL_FILES = ("report.json", "cases.json", "splits.json", "dataset.json")  # dataset.json last: it marks completion
GEOMETRY_ATOL = 1e-4


class ConvertError(ValueError):
    """The conversion cannot start (bad paths, nothing to convert); one line for the user."""


class OutputBusyError(ConvertError):
    """Another process is writing the output folder (it holds the folder's lock)."""


class OutputNotWritableError(ConvertError):
    """No file can be created where the output (or the private map) goes: not a usage mistake."""


@dataclass(frozen=True)
class CaseJob:
    """Everything one worker needs to convert one raw case (picklable)."""

    raw: Any  # care_dataset.io.RawCase
    raw_dir: Path
    out_dir: Path
    profile: Profile
    key: bytes = field(repr=False)
    storage: str
    fingerprint: str
    settings: str


@dataclass
class CaseOutcome:
    """Result of one raw case. ``raw_name`` and ``detail`` are for the operator's terminal only."""

    raw_name: str
    case_id: str | None
    status: str  # "converted" | "failed"
    reason: str
    detail: str = ""
    record: dict | None = None


@dataclass
class ConvertSummary:
    out_dir: Path
    storage: str
    class_names: list[str]
    split_stats: dict[str, dict]
    converted: int
    failed: int
    report: list[dict]
    failures: list[tuple[str, str]]  # (raw folder, reason): terminal only, never written under out_dir
    warnings: list[str] = field(default_factory=list)  # terminal lines without identifying values

    @property
    def all_converted(self) -> bool:
        return self.failed == 0


# --- per case ---------------------------------------------------------------------------------------------


def case_suffix(patient_id: str, raw_name: str, key: bytes) -> str:
    """Stable per-raw-case suffix: keyed hash of the patient pseudonym and the raw case name."""
    message = f"case-suffix\0{patient_id}\0{raw_name}".encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:CASE_SUFFIX_HEX]


def case_id_for(patient_id: str, raw_name: str, key: bytes) -> str:
    """The case ID of one raw case folder: patient pseudonym, separator, per-raw-case suffix (care-convert and
    care-anonymize name cases alike)."""
    return f"{patient_id}{CASE_SUFFIX_SEPARATOR}{case_suffix(patient_id, raw_name, key)}"


def raw_fingerprint(raw: Any, raw_dir: Path, key: bytes) -> str:
    """Keyed hash of a raw case's inputs (relative paths, sizes, modification times): detects changed inputs
    on resume without storing anything identifying."""
    files: set[Path] = set()
    for path in (raw.root, raw.label_path, getattr(raw, "description_path", None)):
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file())
        elif path.exists():
            files.add(path)
    mac = hmac.new(key, f"raw-case\0{raw.key}\n".encode("utf-8", "surrogateescape"), hashlib.sha256)
    for path in sorted(files):
        stat = path.stat()
        try:
            relative = path.relative_to(raw_dir)
        except ValueError:
            relative = path
        mac.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return mac.hexdigest()


def header_check(header: Any, patient_id: str, key: bytes) -> dict[str, str]:
    """Keyed digests of the header's PatientName and PatientBirthDate, to compare the cases of one patient
    prefix without keeping the values; keyed with the prefix too, so they cannot link different patients.

    Names are compared without case and trailing empty components ("Doe^Jane" equals "DOE^JANE^^"). Empty
    values and volume files without a header give no digest.
    """
    if header is None:
        return {}
    values = {"name": str(header.get("PatientName", "") or "").strip().rstrip("^ ").casefold(),
              "birth_date": str(header.get("PatientBirthDate", "") or "").strip()}
    return {field_name: hmac.new(key, f"header-check\0{patient_id}\0{field_name}\0{value}".encode(
                "utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
            for field_name, value in values.items() if value}


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
    text = f"{profile.sha256}\0{storage}\0{store.FORMAT_VERSION}\0{__version__}"
    return hashlib.sha256(text.encode()).hexdigest()


def select_slices(label: np.ndarray, profile: Profile) -> tuple[np.ndarray, dict[str, int], dict[str, int]]:
    """Axial slices to keep and voxels per class before and after.

    label: (Z, Y, X) uint8 class indices. Returns kept slice indices (ascending int64), then voxel counts per
    class name over the whole volume and over the kept slices.
    """
    from care_dataset.io import CaseError, per_slice_counts

    found, counts = per_slice_counts(label)
    outside = found[(found < 0) | (found >= profile.num_classes)]
    if len(outside):
        bad = int(outside[0])
        raise CaseError(f"label value {bad} is not a class of profile {profile.name!r}")
    per_slice = np.zeros((label.shape[0], profile.num_classes), dtype=np.int64)  # (Z, C)
    per_slice[:, found] = counts
    selecting = per_slice[:, list(profile.keep_classes)].sum(1) > 0
    if not selecting.any():
        names = ", ".join(profile.class_names[c] for c in profile.keep_classes)
        raise CaseError(f"the annotation holds no voxel of the classes that select slices ({names})")
    if profile.margin > 0:
        window = np.ones(2 * profile.margin + 1)
        selecting = np.convolve(selecting.astype(float), window, mode="same") > 0
    kept = np.flatnonzero(selecting).astype(np.int64)
    before, after = per_slice.sum(0), per_slice[kept].sum(0)
    for c in profile.keep_classes:
        if before[c] != after[c]:  # cannot happen by construction; guards future edits
            raise AssertionError(f"slice filtering dropped voxels of class {profile.class_names[c]!r}")
    names = profile.class_names
    return kept, {n: int(before[i]) for i, n in enumerate(names)}, {n: int(after[i]) for i, n in enumerate(names)}


def image_geometry(image: sitk.Image) -> dict:
    """Size, spacing, origin and direction as JSON values (the canonical grid needs no orientation code)."""
    from care_dataset.io import geometry_of

    return {k: v for k, v in geometry_of(image).items() if k != "orientation"}


def _plain(value: Any) -> Any:
    """JSON-ready copy of a geometry value (numpy scalars/arrays and tuples to lists of Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _record_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / store.TMP_DIR / RECORDS_DIR / f"{case_id}.json"


def _discard_case(out_dir: Path, storage: str, case_id: str) -> None:
    """Remove every trace of a case: record, arrays and temporaries."""
    _record_path(out_dir, case_id).unlink(missing_ok=True)
    store.remove_case(out_dir, storage, case_id)
    for tmp in (out_dir / store.TMP_DIR).glob(f"{case_id}*"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def read_case(job: CaseJob) -> Any:
    """First half of :func:`convert_case`: the ``LoadedCase``, or the exception that stopped reading it."""
    from care_dataset import io

    try:
        return io.load_case(job.raw, job.profile)
    except Exception as err:  # noqa: BLE001 - reported by convert_case, with the other failures
        return err


def convert_case(job: CaseJob, loaded: Any = None) -> CaseOutcome:
    """Convert one raw case; any failure leaves nothing behind and returns a failed outcome.

    ``loaded`` is what :func:`read_case` returned for ``job`` when it was read ahead; None reads it here.
    """
    from care_dataset.io import CaseError
    from care_dataset.pseudonyms import make_case_id, patient_identity

    raw, profile = job.raw, job.profile
    stage, case_id = "reading", None
    try:
        loaded = read_case(job) if loaded is None else loaded
        if isinstance(loaded, Exception):
            raise loaded
        patient_id = make_case_id(patient_identity(loaded.header, raw.key), job.key)
        case_id = case_id_for(patient_id, raw.key, job.key)
        stage = "filtering"
        image = sitk.GetArrayViewFromImage(loaded.image)  # (Z, Y, X), no copy: `loaded` outlives the views
        label = sitk.GetArrayViewFromImage(loaded.label)
        if image.shape != label.shape:
            raise CaseError(f"label array {label.shape[::-1]} does not match image array {image.shape[::-1]}")
        kept, before, after = select_slices(label, profile)
        image, label = kept_slices_of(image, kept, np.int16), kept_slices_of(label, kept, np.uint8)
        stage = "writing"
        with ThreadPoolExecutor(1) as hasher:  # hashing overlaps compression (both release the GIL)
            checksum = hasher.submit(store.content_checksum, image, label)
            store.write_case(job.out_dir, job.storage, case_id, image, label)
        canonical = image_geometry(loaded.image)
        entry = {
            "num_slices": int(len(kept)),
            "kept_slices": kept.tolist(),
            "canonical": canonical,
            "spacing": canonical["spacing"],
            "original": _plain(dict(loaded.original)),
            "voxels_before": before,
            "voxels_after": after,
            "checksum": checksum.result(),
        }
        record = {"case_id": case_id, "entry": entry, "fingerprint": job.fingerprint, "settings": job.settings,
                  "header_check": header_check(loaded.header, patient_id, job.key)}
        store.write_json_atomic(_record_path(job.out_dir, case_id), record)
        reason = f"converted {len(kept)} of {canonical['size'][2]} axial slices"
        return CaseOutcome(raw.key, case_id, "converted", reason, record=record)
    except Exception as err:  # noqa: BLE001 - one case fails alone, whatever went wrong
        if case_id is not None:
            _discard_case(job.out_dir, job.storage, case_id)
        if isinstance(err, CaseError):
            return CaseOutcome(raw.key, case_id, "failed", str(err))
        detail = " ".join("".join(traceback.format_exception_only(type(err), err)).split())
        reason = f"unexpected error ({type(err).__name__}) while {stage} the case"
        return CaseOutcome(raw.key, case_id, "failed", reason, detail=detail)


def kept_slices_of(volume: np.ndarray, kept: np.ndarray, dtype: type) -> np.ndarray:
    """``volume[kept]`` as a C-contiguous ``dtype`` array; a view, not a copy, when ``kept`` is one run.

    volume: (Z, Y, X) C-contiguous; kept: ascending slice indices. Returns (len(kept), Y, X).
    """
    if len(kept) and kept[-1] - kept[0] + 1 == len(kept):
        volume = volume[kept[0]:kept[-1] + 1]
    else:
        volume = volume[kept]
    return np.ascontiguousarray(volume, dtype)


def _init_worker(threads: int, parent: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    store.set_encode_threads(threads)
    keep_freed_buffers()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """End this worker once the conversion's main process is gone (killed, say by the OOM killer): a pool
    worker waiting for its next case would otherwise live on, holding its memory. The next run removes what
    the worker left half-written."""
    while True:
        time.sleep(every_s)
        if os.getppid() != parent:
            os._exit(1)


def keep_freed_buffers() -> None:
    """Make glibc keep the large buffers this process frees instead of returning them to the system.

    Every case allocates and frees buffers of the same tens of megabytes (volumes, labels, shard pieces). By
    default glibc unmaps them or trims the heap after each case, so their pages are faulted in again for the
    next one: 0.8 million page faults and 4 s of system time for 24 cases of 512 x 512 x 100 with 2 workers
    (docs/benchmarks.md). Buffers up to 256 MiB now come from the heap, which keeps up to 512 MiB free. Called
    in worker processes and by the ``care-convert`` command, whose processes belong to the conversion, never
    by ``convert_dataset`` in a caller's process; nothing happens without glibc.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc = ctypes.CDLL(None)
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)


def _ready() -> bool:
    return True


def _crash_outcome(job: CaseJob, err: BaseException) -> CaseOutcome:
    _discard_leftovers_of_unknown_case(job)
    return CaseOutcome(job.raw.key, None, "failed",
                       f"unexpected error ({type(err).__name__}): the worker process converting the case died",
                       detail=str(err))


class CasePool:
    """Worker processes for ``convert_case``; in this process when ``workers == 1``, with up to two cases read
    ahead by threads (so up to three cases in memory).

    Workers are forked when the pool is created (before the caller starts any thread of its own), so they
    start at once without importing anything again. A worker that dies (crash, out of memory) breaks the
    pool; the cases it left unfinished are then retried one per fresh process, so only the culprit fails.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self._pool = self._new_pool(workers)
            self._pool.submit(_ready).result()  # fork every worker now

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        threads = max(1, (os.cpu_count() or 1) // workers)
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker, initargs=(threads, os.getpid()))

    @staticmethod
    def _run_here(jobs: list[tuple[int, CaseJob]]) -> Iterator[tuple[int, CaseOutcome]]:
        """One case after the other; reader threads (one per CPU, at most two) read the next cases meanwhile.

        Reading (SimpleITK), compressing (Blosc) and hashing release the GIL, so they overlap.
        """
        depth = max(1, min(2, os.cpu_count() or 1))
        with ThreadPoolExecutor(depth) as reader:
            ahead = deque(reader.submit(read_case, job) for _, job in jobs[:depth])
            for position, (index, job) in enumerate(jobs):
                loaded = ahead.popleft().result()
                if position + depth < len(jobs):
                    ahead.append(reader.submit(read_case, jobs[position + depth][1]))
                yield index, convert_case(job, loaded)
                del loaded

    def __enter__(self) -> CasePool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc_type is None, cancel_futures=True)

    def run(self, jobs: list[tuple[int, CaseJob]]) -> Iterator[tuple[int, CaseOutcome]]:
        """Yield (index, outcome) as cases finish; the order does not matter to the result."""
        if self._pool is None:
            yield from self._run_here(jobs)
            return
        unfinished = dict(jobs)
        futures = {self._pool.submit(convert_case, job): index for index, job in jobs}
        for future in as_completed(futures):
            index = futures[future]
            try:
                outcome = future.result()
            except BrokenProcessPool:
                continue
            unfinished.pop(index)
            yield index, outcome
        if unfinished:
            self._pool.shutdown(wait=True)
            for index, job in sorted(unfinished.items()):
                single = self._new_pool(1)
                try:
                    outcome = single.submit(convert_case, job).result()
                except BrokenProcessPool as err:
                    outcome = _crash_outcome(job, err)
                finally:
                    single.shutdown(wait=True)
                yield index, outcome
            self._pool = self._new_pool(self.workers)


def _discard_leftovers_of_unknown_case(job: CaseJob) -> None:
    """A worker died without telling us the case ID: drop any record written for this raw case's inputs."""
    for path in (job.out_dir / store.TMP_DIR / RECORDS_DIR).glob("*.json"):
        try:
            record = store.read_json(path)
        except ValueError:
            continue
        if record.get("fingerprint") == job.fingerprint:
            _discard_case(job.out_dir, job.storage, record["case_id"])


# --- whole dataset ----------------------------------------------------------------------------------------


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
            (out_dir / "dataset.json").exists() or (out_dir / store.TMP_DIR).is_dir()):
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


def drop_linked_cases(raws: list, raw_dir: Path, out_dir: Path) -> tuple[list, list[tuple[str, str]]]:
    """Raw cases reached through symbolic links that would convert the wrong thing, left out.

    Skipped: a case that leads into the output folder (or above it), one that leads to the raw folder itself or
    above it (a link loop), and one that leads to a folder another case already is (the same scan twice; the
    case that is not a link is kept). Returns the kept cases and (raw name, why) of each skipped one.
    """
    kept, skipped, seen = [], [], {}
    for raw in sorted(raws, key=lambda r: (Path(r.root).is_symlink(), r.key)):
        target = Path(raw.root).resolve()
        if target == out_dir or out_dir in target.parents or target in out_dir.parents:
            skipped.append((raw.key, "it leads to the output folder (a symbolic link)"))
        elif target == raw_dir or target in raw_dir.parents:
            skipped.append((raw.key, "it leads to the raw folder itself (a symbolic link loop)"))
        elif target in seen:
            skipped.append((raw.key, f"it is the same folder as case folder {seen[target]} (a symbolic link)"))
        else:
            seen[target] = raw.key
            kept.append(raw)
    return sorted(kept, key=lambda r: r.key), sorted(skipped)


def _prepare_output(out_dir: Path, storage: str) -> None:
    """Create the output, drop the completion marker and stale temporaries (records are kept for resume)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    other = [s for s in store.STORAGE_FORMATS if s != storage]
    for name in other:
        if (out_dir / "dataset.json").exists() and store.read_json(out_dir / "dataset.json").get("storage") == name:
            raise ConvertError(f"output folder holds a --format {name} conversion; use another folder or --format {name}")
    (out_dir / "dataset.json").unlink(missing_ok=True)
    tmp = out_dir / store.TMP_DIR
    if tmp.is_dir():
        for path in tmp.iterdir():
            if path.name == RECORDS_DIR and path.is_dir():
                for stale in path.glob(".*"):
                    stale.unlink()
            else:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in out_dir.glob(".*.json.tmp"):
        path.unlink()
    (tmp / RECORDS_DIR).mkdir(parents=True, exist_ok=True)


def _load_records(out_dir: Path) -> dict[str, dict]:
    """Existing records by raw-input fingerprint."""
    records = {}
    for path in sorted((out_dir / store.TMP_DIR / RECORDS_DIR).glob("*.json")):
        try:
            record = store.read_json(path)
            records[record["fingerprint"]] = record
        except (ValueError, KeyError, TypeError):
            path.unlink()
    return records


def _prune(out_dir: Path, storage: str, keep: set[str]) -> None:
    """Remove records and arrays of cases that are not part of this conversion."""
    for path in (out_dir / store.TMP_DIR / RECORDS_DIR).glob("*.json"):
        if path.stem not in keep:
            path.unlink()
    if storage == "zarr":
        entries = [p for p in (out_dir / store.ZARR_DIR).iterdir() if p.is_dir()]
        names = {p: p.name for p in entries}
    else:
        names = {p: p.stem for p in (out_dir / store.H5_DIR).glob("*.h5")}
    for path, case_id in names.items():
        if case_id not in keep:
            store.remove_case(out_dir, storage, case_id)
    for other in store.STORAGE_FORMATS:
        folder = out_dir / (store.ZARR_DIR if other == "zarr" else store.H5_DIR)
        if other != storage and folder.exists():
            shutil.rmtree(folder)


def _report_entry(outcome: CaseOutcome) -> dict:
    return {"case_id": outcome.case_id, "status": outcome.status, "reason": outcome.reason}


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


def build_outputs(records: list[dict], report: list[dict], profile: Profile, storage: str, seed: int,
                  key_reproducible: bool) -> dict[str, Any]:
    """The four top-level JSON objects, from the case records alone (deterministic)."""
    by_id = {r["case_id"]: r["entry"] for r in sorted(records, key=lambda r: r["case_id"])}
    splits = make_splits(list(by_id), profile.split_sizes, seed)
    split_of = {c: name for name in profile.split_sizes for c in splits[name]}
    cases = {c: {**entry, "split": split_of[c]} for c, entry in by_id.items()}
    checksums = {c: entry["checksum"] for c, entry in by_id.items()}
    overall = hashlib.sha256("".join(f"{c} {s}\n" for c, s in checksums.items()).encode()).hexdigest()
    manifest = {
        "format": store.FORMAT_NAME,
        "format_version": store.FORMAT_VERSION,
        "storage": storage,
        "classes": list(profile.class_names),
        "profile": profile.to_json(),
        "splits": split_statistics(cases, splits, list(profile.split_sizes), list(profile.class_names)),
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
    from care_dataset.io import discover_cases

    if storage not in store.STORAGE_FORMATS:
        raise ConvertError(f"unknown storage format {storage!r}; expected one of {', '.join(store.STORAGE_FORMATS)}")
    if not key:
        raise ConvertError("an empty de-identification key is not allowed")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConvertError(f"the split seed must be a non-negative integer, got {seed!r}")
    raw_dir, out_dir, private_map = check_paths(raw_dir, out_dir, private_map)
    raws, skipped = drop_linked_cases(discover_cases(raw_dir, profile), raw_dir, out_dir)
    if skipped:
        from care_dataset.progress import stderr_console

        for name, why in skipped:
            stderr_console().print(f"note: skipped case folder {name}: {why}", markup=False, highlight=False)
    if not raws:
        raise ConvertError(f"no cases found in {raw_dir} for profile {profile.name!r}")
    try:
        with hold_output_lock(out_dir, "care-convert"):
            outcomes, failures, warnings, outputs = _convert_locked(
                raws, raw_dir, out_dir, profile, key, key_reproducible, seed, storage, workers, private_map, progress)
    except OutputLockedError as err:
        raise OutputBusyError(str(err)) from None

    done = [o for o in outcomes if o.status == "converted"]
    manifest = outputs["dataset.json"]
    return ConvertSummary(out_dir=out_dir, storage=storage, class_names=list(profile.class_names),
                          split_stats=manifest["splits"], converted=len(done), failed=len(outcomes) - len(done),
                          report=outputs["report.json"], failures=failures, warnings=warnings)


def _convert_locked(raws: list, raw_dir: Path, out_dir: Path, profile: Profile, key: bytes,
                    key_reproducible: bool, seed: int, storage: str, workers: int, private_map: Path | None,
                    progress: bool) -> tuple[list[CaseOutcome], list[tuple[str, str]], list[str], dict[str, Any]]:
    """The conversion proper, run while this process holds the output folder's lock."""
    from care_dataset.progress import CaseProgress, stderr_console

    _prepare_output(out_dir, storage)
    existing = _load_records(out_dir)
    settings = settings_digest(profile, storage)

    outcomes: list[CaseOutcome | None] = [None] * len(raws)
    jobs: list[tuple[int, CaseJob]] = []
    for index, raw in enumerate(raws):
        fingerprint = raw_fingerprint(raw, raw_dir, key)
        record = existing.get(fingerprint)
        if (record is not None and record.get("settings") == settings
                and store.case_exists(out_dir, storage, record["case_id"])):
            entry = record["entry"]
            reason = f"converted {entry['num_slices']} of {entry['canonical']['size'][2]} axial slices"
            outcomes[index] = CaseOutcome(raw.key, record["case_id"], "converted", reason, record=record)
        else:
            jobs.append((index, CaseJob(raw, raw_dir, out_dir, profile, key, storage, fingerprint, settings)))

    failures: list[tuple[str, str]] = []
    with CasePool(workers if len(jobs) > 1 else 1) as pool:
        store.init_store(out_dir, storage)
        with CaseProgress(len(raws), "care-convert", enabled=progress) as bar:
            bar.advance(len(raws) - len(jobs))
            for index, outcome in pool.run(jobs):
                outcomes[index] = outcome
                if outcome.status == "failed":
                    failures.append((outcome.raw_name, outcome.reason))
                    line = f"FAILED {outcome.raw_name}: {outcome.reason}"
                    bar.print(line + (f" [{outcome.detail}]" if outcome.detail else ""))
                bar.advance()

    _fail_duplicate_ids(outcomes, out_dir, storage, failures)
    done = [o for o in outcomes if o is not None and o.status == "converted"]
    warnings = identity_conflicts([o.record for o in done])
    for line in warnings:
        stderr_console().print(line, style="yellow", markup=False, highlight=False)
    _prune(out_dir, storage, {o.case_id for o in done})
    outputs = build_outputs([o.record for o in done], [_report_entry(o) for o in outcomes], profile, storage,
                            seed, key_reproducible)
    if private_map is not None:  # before the completion marker: a run that cannot write it does not look done
        private_map.parent.mkdir(parents=True, exist_ok=True)
        store.write_json_atomic(private_map, {o.raw_name: o.case_id for o in outcomes})
    for name in FINAL_FILES:
        store.write_json_atomic(out_dir / name, outputs[name])
    return outcomes, failures, warnings, outputs


def _fail_duplicate_ids(outcomes: list[CaseOutcome], out_dir: Path, storage: str,
                        failures: list[tuple[str, str]]) -> None:
    """Two raw cases that ended with one case ID (a truncated-hash collision) both fail: their arrays collided."""
    seen: dict[str, list[int]] = {}
    for i, o in enumerate(outcomes):
        if o.status == "converted":
            seen.setdefault(o.case_id, []).append(i)
    for case_id, indices in seen.items():
        if len(indices) > 1:
            _discard_case(out_dir, storage, case_id)
            for i in indices:
                reason = "another raw case received the same case ID; convert it with another key"
                outcomes[i] = CaseOutcome(outcomes[i].raw_name, case_id, "failed", reason)
                failures.append((outcomes[i].raw_name, reason))


# --- back to the original grid ----------------------------------------------------------------------------


def to_original_grid(dataset: Any, case_id: str, slices: np.ndarray, fill_value: int | float = 0) -> sitk.Image:
    """Place a case's stored slices back on the original image grid, exactly (no resampling).

    dataset: a ``CareDataset`` or the path of a converted folder. slices: (n, H, W), one per stored slice
    (e.g. the stored image, label, or a predicted mask). Slices that were not kept hold ``fill_value``.
    Returns an image with the original size, spacing, origin and direction.
    """
    if not isinstance(dataset, store.CareDataset):
        dataset = store.open_dataset(dataset)
    geometry = dataset.cases[case_id]
    canonical, original = geometry["canonical"], geometry["original"]
    size_x, size_y, size_z = canonical["size"]
    slices = np.asarray(slices)
    if slices.shape != (geometry["num_slices"], size_y, size_x):
        raise ValueError(f"case {case_id}: expected slices of shape {(geometry['num_slices'], size_y, size_x)}, "
                         f"got {slices.shape}")
    volume = np.full((size_z, size_y, size_x), fill_value, dtype=slices.dtype)
    volume[np.asarray(geometry["kept_slices"], dtype=np.int64)] = slices
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(canonical["spacing"])
    image.SetOrigin(canonical["origin"])
    image.SetDirection(canonical["direction"])
    image = sitk.DICOMOrient(image, original["orientation"])
    if list(image.GetSize()) != [int(v) for v in original["size"]]:
        raise ValueError(f"case {case_id}: reoriented size {image.GetSize()} differs from the original "
                         f"{tuple(original['size'])}")
    for name, actual in (("spacing", image.GetSpacing()), ("origin", image.GetOrigin()),
                         ("direction", image.GetDirection())):
        if not np.allclose(actual, original[name], rtol=0, atol=GEOMETRY_ATOL):
            raise ValueError(f"case {case_id}: reoriented {name} {tuple(actual)} differs from the original "
                             f"{tuple(original[name])}")
    image.SetSpacing([float(v) for v in original["spacing"]])
    image.SetOrigin([float(v) for v in original["origin"]])
    image.SetDirection([float(v) for v in original["direction"]])
    return image
