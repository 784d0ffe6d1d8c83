"""Console scripts: care-convert, care-anonymize, care-synth, care-verify, care-publish, care-keygen,
care-export.

Each entry point returns the process exit code: 0 success, 1 when some case failed (or a leak was found),
2 for a usage error. Every command's parser is built here with ``_parser``; the modules a command other than
care-convert runs are imported when it runs (they import pydicom, datasets or pyarrow, slow to import).
"""

from __future__ import annotations

import argparse
import warnings
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from care_dataset.convert.pipeline import (ConvertError, OutputBusyError, OutputNotWritableError, check_paths,
                                           convert_dataset)
from care_dataset.convert.pool import keep_freed_buffers
from care_dataset.convert.progress import stderr_console, terminal_progress
from care_dataset.convert.summary import print_summary
from care_dataset.deid.notes import quiet_library_loggers
from care_dataset.deid.pseudonyms import (KEY_ENV_VAR, MIN_KEY_BYTES, NEW_KEY_BYTES, KeyMissingError,
                                          key_file_exposure, load_key, new_key)
from care_dataset.export.datalist import export_datalist
from care_dataset.export.errors import ExportError
from care_dataset.export.folds import DEFAULT_FOLDS
from care_dataset.export.nnunet import export_nnunet, option_problem
from care_dataset.files import create_private_file, creation_problem
from care_dataset.format.reader import open_dataset
from care_dataset.publish.errors import PublishError
from care_dataset.raw.discover import loose_files_problem
from care_dataset.raw.profiles import ProfileError, available_profiles, load_profile


def _exit_code(value: object) -> int:
    return int(value) if isinstance(value, int) else 0


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, run) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2)
        return _exit_code(stop.code)
    return _exit_code(run(args))


def _parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description)


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    """The usage text and ``<prog>: error: <message>`` on stderr; exit code 2."""
    parser.print_usage(sys.stderr)
    return _error(parser, message)


def _error(parser: argparse.ArgumentParser, message: str) -> int:
    """``<prog>: error: <message>`` on stderr, without usage text (not a mistake in the command line); 2."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def add_key_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", type=Path, default=None,
                   help=f"file holding the secret pseudonym key, at least {MIN_KEY_BYTES} bytes (make one with "
                        f"care-keygen; else the {KEY_ENV_VAR} environment variable)")
    p.add_argument("--random-key", action="store_true",
                   help="use a random key: case IDs will differ on every run")


def load_command_key(args: argparse.Namespace) -> tuple[bytes, bool]:
    """`load_key` for the options of `add_key_arguments`; warns on stderr of a key file others may read."""
    key, reproducible = load_key(args.key_file, random_key=args.random_key)
    if args.key_file is not None and (exposure := key_file_exposure(args.key_file)):
        print(f"warning: {exposure}", file=sys.stderr)
    return key, reproducible


# --- care-convert -------------------------------------------------------------------------------------------


def build_convert_parser() -> argparse.ArgumentParser:
    p = _parser("care-convert",
                "Convert raw CT case folders into a de-identified, slice-filtered, patient-split dataset.")
    p.add_argument("raw", type=Path, help="folder with one sub-folder per case (or the profile's paired layout)")
    p.add_argument("out", type=Path, help="output folder (created; an interrupted conversion here is resumed)")
    p.add_argument("--profile", default="care",
                   help=f"conversion profile: a name ({', '.join(available_profiles())}) or a TOML file path")
    p.add_argument("--format", dest="storage", choices=("zarr", "h5"), default="zarr",
                   help="storage: zarr v3 with sharding (default) or HDF5")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split (default 0)")
    add_key_arguments(p)
    p.add_argument("--private-map", type=Path, default=None,
                   help="write raw folder -> case ID to this JSON file for the data custodian "
                        "(never inside the output folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    return p


def convert_main(argv: list[str] | None = None) -> int:
    parser = build_convert_parser()
    return _run(parser, argv, lambda args: run_convert(parser, args, own_process=argv is None))


def run_convert(parser: argparse.ArgumentParser, args: argparse.Namespace, own_process: bool = False) -> int:
    if args.workers < 1:
        return _usage_error(parser, f"--workers must be at least 1, got {args.workers}")
    if args.seed < 0:
        return _usage_error(parser, f"--seed must be a non-negative integer, got {args.seed}")
    try:
        profile = load_profile(args.profile)
    except ProfileError as err:
        return _usage_error(parser, str(err))
    try:
        check_paths(args.raw, args.out, args.private_map)
        if problem := loose_files_problem(args.raw):
            raise ConvertError(problem)
        key, reproducible = load_command_key(args)
    except OutputNotWritableError as err:  # one line, no usage text
        return _error(parser, str(err))
    except (ConvertError, KeyMissingError) as err:
        return _usage_error(parser, str(err))
    if not reproducible:
        stderr_console().print("warning: --random-key: case IDs will not be reproducible; "
                               "a later run cannot give the same patients the same IDs", style="yellow")
    if own_process:  # started as the care-convert command, not called from someone's Python process
        keep_freed_buffers()
    try:
        summary = convert_dataset(args.raw, args.out, profile, key, reproducible, seed=args.seed,
                                  storage=args.storage, workers=args.workers, private_map=args.private_map,
                                  progress=not args.quiet)
    except (OutputBusyError, OutputNotWritableError) as err:  # not a usage mistake: one line, no usage text
        return _error(parser, str(err))
    except ConvertError as err:
        return _usage_error(parser, str(err))
    except OSError as err:
        return _error(parser, str(err))
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to finish the conversion", file=sys.stderr)
        return 130
    if not args.quiet:
        print_summary(summary)
    return 0 if summary.all_converted else 1


# --- care-anonymize -----------------------------------------------------------------------------------------


def build_anonymize_parser() -> argparse.ArgumentParser:
    p = _parser("care-anonymize",
                "Write de-identified DICOM copies (PS3.15 Annex E Basic Profile, modified dates). Instances that "
                "may carry burned-in text (BurnedInAnnotation YES, screen captures, dose and patient information "
                "screens, colour images) are left out and counted per case.")
    p.add_argument("raw", type=Path, help="folder with one sub-folder per case")
    p.add_argument("out", type=Path, help="output folder: out/<case_id>/<series>/<instance>.dcm")
    add_key_arguments(p)
    p.add_argument("--allow-burned-in", action="store_true",
                   help="also copy the instances that may carry burned-in text (flagged BurnedInAnnotation = YES, "
                        "screen captures, screens and reports, colour images): look at them first")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of each failed case and pydicom's own warnings on the terminal "
                        "(stderr; they may quote header values: never into the output)")
    return p


def anonymize_main(argv: list[str] | None = None) -> int:
    return _run(build_anonymize_parser(), argv, run_anonymize)


def run_anonymize(args: argparse.Namespace) -> int:
    """Exit code 0 when no case failed, 1 otherwise, 2 for a usage error."""
    from care_dataset.deid.anonymize import anonymize_tree, describe_left_out  # deferred: pydicom, 0.25 s

    if problem := loose_files_problem(args.raw):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        key, reproducible = load_command_key(args)
    except KeyMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not reproducible:
        print("warning: random key: case IDs, UIDs and date offsets will not be reproducible", file=sys.stderr)
    try:
        results = anonymize_tree(args.raw, args.out, key, allow_burned_in=args.allow_burned_in,
                                 debug=getattr(args, "debug", False))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    left_out = 0
    for r in results:  # raw folder and file names on the terminal only, never under the output folder
        if r["status"] == "failed":
            where = f" (file {r['raw_file']})" if r.get("raw_file") else ""
            print(f"FAILED {r['raw_folder']}: {r['reason']}{where}", file=sys.stderr)
        elif r["status"] == "skipped":
            print(f"skipped {r['raw_folder']}: {r['reason']}", file=sys.stderr)
        if r.get("left_out") and r["status"] != "skipped":
            n = sum(entry["count"] for entry in r["left_out"])
            print(f"left out of {r['raw_folder']}: {n} instance(s) that may carry burned-in text: "
                  f"{describe_left_out(r['left_out'])}", file=sys.stderr)
        left_out += sum(entry["count"] for entry in r.get("left_out", ()))
        for note in r.get("notes", ()):
            print(f"note {r['raw_folder']}: {note}", file=sys.stderr)
    done = sum(r["status"] == "anonymized" for r in results)
    failed = sum(r["status"] == "failed" for r in results)
    tail = f"; {left_out} instance(s) that may carry burned-in text left out" if left_out else ""
    print(f"{done} anonymized, {failed} failed, {len(results) - done - failed} skipped{tail}")
    return 1 if failed else 0


# --- care-synth ---------------------------------------------------------------------------------------------


def build_synth_parser() -> argparse.ArgumentParser:
    p = _parser("care-synth", "Write a synthetic CARE-like raw dataset.")
    p.add_argument("out_dir", type=Path, help="folder to write the raw cases into")
    p.add_argument("--cases", type=int, default=8, help="number of cases (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    p.add_argument("--size", type=int, default=512, help="in-plane pixels per side (default 512)")
    p.add_argument("--slices", type=int, default=None, help="slices per case (default: 60-120, varied)")
    p.add_argument("--no-messy", dest="messy", action="store_false",
                   help="no localizers, extra series, compression or odd layouts")
    return p


def synth_main(argv: list[str] | None = None) -> int:
    parser = build_synth_parser()
    return _run(parser, argv, lambda args: run_synth(parser, args))


def run_synth(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from care_dataset.synth.raw_export import write_raw_dataset  # deferred: pydicom takes 0.25 s to import

    def write(progress: Progress | None = None) -> list[Path]:
        return write_raw_dataset(args.out_dir, args.cases, args.seed, size=args.size, slices=args.slices,
                                 messy=args.messy, progress=progress)

    bar = terminal_progress()
    try:
        if bar is None:
            written = write()
        else:
            with bar:
                written = write(bar)
    except ValueError as err:
        return _usage_error(parser, str(err))
    except OSError as err:  # where the output goes, not how the command was typed: no usage text
        return _error(parser, str(err))
    print(f"wrote {len(written)} raw cases to {args.out_dir}")
    return 0


# --- care-keygen -------------------------------------------------------------------------------------------


def build_keygen_parser() -> argparse.ArgumentParser:
    p = _parser("care-keygen", f"Write a new secret pseudonym key: {NEW_KEY_BYTES} random bytes in a file only "
                               "its owner may read (mode 0600).")
    p.add_argument("path", type=Path, help="key file to create; an existing file is never overwritten")
    return p


def keygen_main(argv: list[str] | None = None) -> int:
    parser = build_keygen_parser()
    return _run(parser, argv, lambda args: run_keygen(parser, args))


def run_keygen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if problem := creation_problem(args.path.parent):
        return _error(parser, f"{args.path}: {problem}")
    try:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        create_private_file(args.path, new_key())
    except FileExistsError:
        return _error(parser, f"{args.path} exists; a key file is never overwritten (the case IDs made with it "
                              "would be lost): choose another path")
    except OSError as err:
        return _error(parser, f"cannot create {args.path}: {err.strerror or err}")
    print(f"wrote a new {NEW_KEY_BYTES}-byte key to {args.path} (mode 0600); keep it and a backup where only the "
          "data custodian can read them: the same key gives the same case IDs")
    return 0


# --- care-verify --------------------------------------------------------------------------------------------


def build_verify_parser() -> argparse.ArgumentParser:
    p = _parser("care-verify", "Scan an output tree for identifying values from the raw tree; exit 1 on any leak.")
    p.add_argument("out", type=Path, help="output folder to scan (every file and path name)")
    p.add_argument("--raw", type=Path, required=True, help="raw folder the output was made from")
    return p


def verify_main(argv: list[str] | None = None) -> int:
    return _run(build_verify_parser(), argv, run_verify)


def run_verify(args: argparse.Namespace) -> int:
    """Exit code 0 when clean, 1 on a leak, 2 for a usage error. Values are printed masked."""
    from care_dataset.deid.verify import collect_identifying_values, scan_for_leaks  # deferred: pydicom, 0.25 s

    out_dir, raw_dir = Path(args.out), Path(args.raw)
    for folder in (out_dir, raw_dir):
        if not folder.is_dir():
            print(f"error: folder not found: {folder}", file=sys.stderr)
            return 2
    with warnings.catch_warnings(record=True) as caught, quiet_library_loggers():
        warnings.simplefilter("always")
        values = collect_identifying_values(raw_dir)
    if caught:
        print(f"{len(caught)} library warning(s) while reading {raw_dir}; their text is left out (it may quote "
              "header values)", file=sys.stderr)
    leaks = scan_for_leaks(out_dir, values)
    for leak in leaks:
        print(leak.line())
    n_files = len({leak.path for leak in leaks})
    if leaks:
        print(f"{len(leaks)} leak(s) in {n_files} path(s) under {out_dir} "
              f"({len(values)} identifying values searched)", file=sys.stderr)
        return 1
    print(f"no leak: {len(values)} identifying values searched under {out_dir}")
    return 0


# --- care-publish -------------------------------------------------------------------------------------------


def build_publish_parser() -> argparse.ArgumentParser:
    from care_dataset.publish.job import DEFAULT_MAX_SHARD_MB  # deferred: datasets takes 1 s to import

    p = _parser("care-publish")
    p.add_argument("source", type=Path, help="converted CARE folder (written by care-convert)")
    p.add_argument("output", type=Path, help="Hugging Face dataset folder to write")
    p.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_MB,
                   help="approximate upper size of one Parquet shard in MiB (default %(default)s)")
    p.add_argument("--card", type=Path, default=None, help="dataset card template (default: DATASET_CARD.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--push", metavar="REPO_ID", default=None,
                   help="upload to this Hugging Face dataset repository, created private unless --public; needs "
                        "--raw (or --no-verify) and a token (`hf auth login`)")
    p.add_argument("--public", action="store_true",
                   help="with --push: a public repository (refused while the card's licence is unknown)")
    p.add_argument("--raw", type=Path, default=None,
                   help="with --push: the raw folder SOURCE was converted from; the output is scanned for its "
                        "identifying values (as care-verify) before upload")
    p.add_argument("--no-verify", action="store_true",
                   help="with --push: upload without the leak scan (the dataset card says so)")
    return p


def publish_main(argv: list[str] | None = None) -> int:
    parser = build_publish_parser()
    return _run(parser, argv, lambda args: run_publish(parser, args))


def run_publish(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from care_dataset.publish.job import publish, push  # deferred: datasets takes 1 s to import

    if (refused := _refuse_push(parser, args)) is not None:
        return refused
    if args.no_verify:
        print("warning: --no-verify: the files are uploaded without the leak scan; a patient name, ID or date of "
              "the raw data left in them would be published (the dataset card says the scan was skipped)",
              file=sys.stderr)
    leak_scan = ("skipped" if args.no_verify else "scanned") if args.push else None
    console = Console(stderr=True)
    try:
        dataset = open_dataset(args.source)
        total = 2 * sum(len(dataset.case_ids(s)) for s in dataset.splits)
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("publishing cases", total=total)
            stats = publish(args.source, args.output, args.max_shard_mb, args.card, args.overwrite,
                            progress=lambda: bar.advance(task), leak_scan=leak_scan)
        pushed = push(args.output, args.push, args.public, args.raw) if args.push else None
    except (PublishError, OSError, KeyError, ValueError, TypeError) as err:
        print(f"care-publish: {err}", file=sys.stderr)  # not through rich: it would wrap the line
        return 1
    Console().print(_published_table(args.output.name, stats))
    if pushed:
        url, private = pushed
        Console().print(f"pushed to {url} ({'private' if private else 'public'} repository)", markup=False,
                        soft_wrap=True)
    return 0


def _refuse_push(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int | None:
    """Exit code 2 and one line when the --push options cannot be honoured, checked before any work or network
    access; None when they can."""
    from care_dataset.publish.card import default_card_path, public_licence_problem  # deferred: datasets, 1 s

    if problem := push_option_problem(args):
        return _usage_error(parser, problem)
    if not args.public:
        return None
    try:
        problem = public_licence_problem(args.card or default_card_path())
    except PublishError as err:
        problem = str(err)
    except OSError as err:
        problem = f"dataset card {args.card}: {err.strerror or err}"
    return _error(parser, problem) if problem else None


def push_option_problem(args: argparse.Namespace) -> str | None:
    """Why care-publish's --push options cannot be honoured (checked before any work or network access), or
    None."""
    given = [name for name, on in (("--public", args.public), ("--raw", args.raw is not None),
                                   ("--no-verify", args.no_verify)) if on]
    if not args.push:
        return f"{given[0]} applies to --push only" if given else None
    if args.raw is None and not args.no_verify:
        return ("--push needs --raw RAW, the raw folder SOURCE was converted from: the output is scanned for its "
                "identifying values before upload (--no-verify uploads unscanned)")
    if args.raw is not None and args.no_verify:
        return "pass either --raw or --no-verify, not both"
    if args.raw is not None and not args.raw.is_dir():
        return f"--raw {args.raw}: folder not found"
    return None


def _published_table(name: str, stats: dict) -> Table:
    """Rows, files and bytes per configuration and split of a published folder."""
    from care_dataset.publish.card import human_bytes  # deferred: datasets takes 1 s to import

    table = Table(title=f"published {name}")
    for column in ("config", "split", "rows", "files", "bytes"):
        table.add_column(column, justify="left" if column in ("config", "split") else "right")
    for config, by_split in stats.items():
        for split, s in by_split.items():
            table.add_row(config, split, str(s.num_examples), str(len(s.files)),
                          human_bytes(sum(f.num_bytes for f in s.files)))
    return table


# --- care-export --------------------------------------------------------------------------------------------


def build_export_parser() -> argparse.ArgumentParser:
    p = _parser("care-export", "Write a converted folder as nnU-Net v2 raw data or a MONAI datalist: one NIfTI "
                               "volume per case, the same splits, cross-validation folds by patient.")
    targets = p.add_subparsers(dest="target", required=True, metavar="{nnunet,monai}")
    nnunet = targets.add_parser("nnunet", help="nnU-Net v2 raw dataset DatasetNNN_NAME")
    nnunet.add_argument("source", type=Path, help="converted CARE folder (written by care-convert)")
    nnunet.add_argument("raw_root", type=Path, help="nnUNet_raw folder; DatasetNNN_NAME is written in it")
    nnunet.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset ID, 1 to 999")
    nnunet.add_argument("--name", default="CARE", help="dataset name after the ID (default %(default)s)")
    monai = targets.add_parser("monai", help="MONAI datalist (Decathlon style) and its NIfTI volumes")
    monai.add_argument("source", type=Path, help="converted CARE folder (written by care-convert)")
    monai.add_argument("datalist", type=Path, help="datalist .json to write; the volumes go in the folder of its "
                                                   "name beside it")
    for target in (nnunet, monai):
        target.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                            help="cross-validation folds of the train split (default %(default)s)")
        target.add_argument("--overwrite", action="store_true", help="replace an existing export")
    return p


def export_main(argv: list[str] | None = None) -> int:
    parser = build_export_parser()
    return _run(parser, argv, lambda args: run_export(parser, args))


def run_export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Exit 0, 2 for a usage error or an input or output place that cannot be used, 1 when writing fails."""
    if args.target == "nnunet" and (problem := option_problem(args.dataset_id, args.name, args.folds)):
        return _usage_error(parser, problem)
    try:
        print(_export_nnunet(args) if args.target == "nnunet" else _export_datalist(args))
    except ExportError as err:
        return _error(parser, str(err))
    except OSError as err:
        print(f"care-export: error: {err}", file=sys.stderr)
        return 1
    return 0


def _export_nnunet(args: argparse.Namespace) -> str:
    """Run `care-export nnunet`; the line saying what was written and where splits_final.json goes."""
    done = export_nnunet(args.source, args.raw_root, args.dataset_id, args.name, args.overwrite, args.folds)
    return (f"wrote {done.folder}: {done.num_training} training and {done.num_test} test cases, {done.num_folds} "
            f"folds; copy splits_final.json into nnUNet_preprocessed/{done.folder.name}/ after "
            "nnUNetv2_plan_and_preprocess")


def _export_datalist(args: argparse.Namespace) -> str:
    """Run `care-export monai`; the line saying what was written."""
    done = export_datalist(args.source, args.datalist, args.overwrite, args.folds)
    counts = ", ".join(f"{key} {n}" for key, n in done.entries.items())
    return f"wrote {done.datalist} ({counts}) and its volumes in {done.folder}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(convert_main())
