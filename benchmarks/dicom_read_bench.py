"""Reading one DICOM series to int16 HU: pydicom's decoder (what care-convert uses for uncompressed series)
against SimpleITK's series reader (GDCM), on the same scanned series, alternating, in one process.

Both start from ``care_dataset.raw.dicom.scan_dicom`` (the header scan care-convert does anyway) and return the
same voxels; the script checks that before timing. Prints CPU milliseconds per slice, best of --repeats rounds.

    python benchmarks/dicom_read_bench.py [--cases 4] [--slices 100] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from care_dataset.raw import dicom
from care_dataset.synth import raw_export as synth
from care_dataset.raw.discover import discover_cases
from care_dataset.raw.profiles import load_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="reuses care_raw/ there if present")
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core each, as in a conversion worker
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dicom-read-bench-"))
    raw = work / "care_raw"
    if not raw.exists():
        synth.write_raw_dataset(raw, cases=args.cases, seed=0, size=512, slices=args.slices, messy=False)
    cases = discover_cases(raw, load_profile("care"))[: args.cases]
    series = [dicom.scan_dicom(c.root, exclude={c.label_path, c.description_path}).series[0] for c in cases]
    for s in series:
        assert s.transfer_syntax in dicom.PYDICOM_DECODED
        np.testing.assert_array_equal(dicom._decode_with_pydicom(s),  # raises instead of falling back
                                      sitk.GetArrayFromImage(dicom._read_with_simpleitk(s)))
    readers = {"pydicom decoder (care-convert)": dicom.read_series_int16,
               "SimpleITK ImageSeriesReader (GDCM)": dicom._read_with_simpleitk}
    best = {name: float("inf") for name in readers}
    slices = sum(s.size[2] for s in series)
    for round_ in range(args.repeats):
        order = list(readers.items())[:: 1 if round_ % 2 == 0 else -1]
        for name, read in order:
            start = time.process_time()
            for s in series:
                read(s)
            best[name] = min(best[name], time.process_time() - start)
    base = best["SimpleITK ImageSeriesReader (GDCM)"]
    print(f"{len(series)} series, {slices} slices of 512 x 512, best of {args.repeats} rounds (CPU time):")
    for name, seconds in best.items():
        print(f"  {name:36s} {seconds / slices * 1e3:5.2f} ms/slice   {base / seconds:4.2f}x")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
