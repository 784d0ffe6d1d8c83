"""Worker processes that run conversion jobs (``convert_case``), or threads reading ahead in this process."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import platform
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import SimpleITK as sitk

from care_dataset.convert.job import RECORDS_DIR, CaseJob, CaseOutcome, convert_case, discard_case, read_case
from care_dataset.format import writer
from care_dataset.format.layout import TMP_DIR, read_json


def _init_worker(threads: int, parent: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    writer.set_encode_threads(threads)
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
    for path in (job.out_dir / TMP_DIR / RECORDS_DIR).glob("*.json"):
        try:
            record = read_json(path)
        except ValueError:
            continue
        if record.get("fingerprint") == job.fingerprint:
            discard_case(job.out_dir, job.storage, record["case_id"])
