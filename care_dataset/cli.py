"""Console scripts: care-convert, care-anonymize, care-synth, care-verify, care-publish.

Each entry point returns the process exit code: 0 success, 1 when some case failed (or a leak was found),
2 for a usage error. Modules other than ``convert`` are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _exit_code(value: object) -> int:
    return int(value) if isinstance(value, int) else 0


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, run) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2)
        return _exit_code(stop.code)
    return _exit_code(run(args))


# --- care-convert -------------------------------------------------------------------------------------------


def build_convert_parser() -> argparse.ArgumentParser:
    from care_dataset.pseudonyms import add_key_arguments
    from care_dataset.profiles import available_profiles

    p = argparse.ArgumentParser(
        prog="care-convert",
        description="Convert raw CT case folders into a de-identified, slice-filtered, patient-split dataset.",
    )
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
    from care_dataset.convert import (ConvertError, OutputBusyError, OutputNotWritableError, check_paths,
                                      convert_dataset, keep_freed_buffers)
    from care_dataset.pseudonyms import KeyMissingError, load_key
    from care_dataset.profiles import ProfileError, load_profile
    from care_dataset.progress import print_summary, stderr_console

    def usage_error(message: str) -> int:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    if args.workers < 1:
        return usage_error(f"--workers must be at least 1, got {args.workers}")
    if args.seed < 0:
        return usage_error(f"--seed must be a non-negative integer, got {args.seed}")
    try:
        profile = load_profile(args.profile)
    except ProfileError as err:
        return usage_error(str(err))
    try:
        check_paths(args.raw, args.out, args.private_map)
        key, reproducible = load_key(args.key_file, random_key=args.random_key)
    except OutputNotWritableError as err:  # one line, no usage text
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except (ConvertError, KeyMissingError) as err:
        return usage_error(str(err))
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
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except ConvertError as err:
        return usage_error(str(err))
    except OSError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to finish the conversion", file=sys.stderr)
        return 130
    if not args.quiet:
        print_summary(summary)
    return 0 if summary.all_converted else 1


# --- thin wrappers ----------------------------------------------------------------------------------------


def anonymize_main(argv: list[str] | None = None) -> int:
    from care_dataset import deid

    parser = deid.build_anonymize_parser(argparse.ArgumentParser(prog="care-anonymize"))
    return _run(parser, argv, deid.run_anonymize)


def synth_main(argv: list[str] | None = None) -> int:
    from care_dataset import synth
    from care_dataset.progress import terminal_progress

    parser = argparse.ArgumentParser(prog="care-synth", description="Write a synthetic CARE-like raw dataset.")
    parser = synth.build_parser(parser) or parser

    def run(args: argparse.Namespace) -> int:
        bar = terminal_progress()
        try:
            if bar is None:
                written = synth.run_from_args(args)
            else:
                with bar:
                    written = synth.run_from_args(args, progress=bar)
        except ValueError as err:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # where the output goes, not how the command was typed: no usage text
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {len(written)} raw cases to {args.out_dir}")
        return 0

    return _run(parser, argv, run)


def verify_main(argv: list[str] | None = None) -> int:
    from care_dataset import verify

    parser = verify.build_verify_parser(argparse.ArgumentParser(prog="care-verify"))
    return _run(parser, argv, verify.run_verify)


def publish_main(argv: list[str] | None = None) -> int:
    from care_dataset import publish

    parser = argparse.ArgumentParser(prog="care-publish")
    publish.add_arguments(parser)
    return _run(parser, argv, publish.run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(convert_main())
