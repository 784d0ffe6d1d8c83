"""The ``usam`` command: ``usam fit | eval | predict | models``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from usam.config import TrainConfig, build_config, coerce, read_toml, tomllib

_FLAG_HELP = {
    "data": "converted CARE folder or published Hugging Face dataset folder",
    "window": "HU window LOW HIGH (default -125 275)",
    "points": "point prompts per present class, sampled after augmentation (the paper uses 0, 1, 3 or 5)",
    "model_args": "",
}


def _field_help(name: str) -> str:
    """The attribute docstring of a TrainConfig field (read from the source), for --help."""
    if name in _FLAG_HELP and _FLAG_HELP[name]:
        return _FLAG_HELP[name]
    import inspect

    lines = inspect.getsource(TrainConfig).splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{name}:") and i + 1 < len(lines) and lines[i + 1].strip().startswith('"""'):
            return lines[i + 1].strip().strip('"')
    return ""


def _model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; only flags given on the command line override the config."""
    parser.add_argument("--config", metavar="TOML", help="TOML file with any of the options below "
                        "(command-line flags override it)")
    defaults = TrainConfig().to_dict()
    for field in dataclasses.fields(TrainConfig):
        name, default = field.name, defaults[field.name]
        flag = "--" + name.replace("_", "-")
        help_text = _field_help(name)
        if name == "model_args":
            parser.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg,
                                metavar="KEY=VALUE", default=argparse.SUPPRESS,
                                help="extra create_model argument, e.g. base_channels=32 (repeatable)")
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_text} (default {default})")
        elif isinstance(default, list):  # a fixed count of numbers where the field's metadata says so
            parser.add_argument(flag, dest=name, nargs=field.metadata.get("nargs", "+"), type=float,
                                metavar=field.metadata.get("metavar", "W"), default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=type(default), default=argparse.SUPPRESS,
                                help=f"{help_text} (default {default!r})")


def resolve_fit_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < saved run config (--resume) < --config file < command line."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    if "model_args" in given:
        given["model_args"] = dict(given["model_args"])
    layers: list[dict[str, Any]] = []
    file_options = read_toml(args.config) if args.config else {}
    resume = given.get("resume", file_options.get("resume", False))
    out = given.get("out", file_options.get("out", TrainConfig().out))
    saved = Path(out) / "config.toml"
    if resume:
        if not saved.is_file():
            raise ValueError(f"--resume: {out} has no run to resume")
        layers.append(read_toml(saved))
    layers += [file_options, {k: coerce(k, v) for k, v in given.items()}]
    return build_config(*layers)


def run_fit(args: argparse.Namespace) -> int:
    from usam.train import train

    config = resolve_fit_config(args)
    result = train(config)
    if not _is_main_rank():  # under torchrun the main process reports
        return 0
    best = result["best_mean_dice"]
    print(f"trained {result['step']} steps; best validation mean foreground Dice "
          f"{'n/a' if best is None else f'{best:.4f}'}; run folder {result['out']}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from usam.models.registry import list_models

    for name in list_models():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usam", description="U-SAM for rectal-cancer CT: train, evaluate, "
                                     "predict.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{fit,eval,predict,models}")
    fit = commands.add_parser("fit", help="train a model on CARE slices",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_fit_arguments(fit)
    fit.set_defaults(run=run_fit)
    eval_parser = commands.add_parser("eval", help="evaluate a checkpoint on a split")
    predict = commands.add_parser("predict", help="segment a CT volume with a checkpoint")
    try:
        from usam.evaluate import add_eval_arguments, run_eval

        add_eval_arguments(eval_parser)
        eval_parser.set_defaults(run=run_eval)
    except ImportError as error:  # pragma: no cover
        eval_parser.set_defaults(run=lambda _a, e=error: _unavailable("eval", e))
    try:
        from usam.predict import add_predict_arguments, run_predict

        add_predict_arguments(predict)
        predict.set_defaults(run=run_predict)
    except ImportError as error:  # pragma: no cover
        predict.set_defaults(run=lambda _a, e=error: _unavailable("predict", e))
    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(run=run_models)
    return parser


def _unavailable(command: str, error: Exception) -> int:
    print(f"usam {command}: unavailable ({error})", file=sys.stderr)
    return 2


def _is_main_rank() -> bool:
    """True outside torchrun and in its rank 0."""
    return os.environ.get("RANK", "0") == "0"


def _in_process_group() -> bool:
    """True once `usam fit` has joined torchrun's process group, which it does after all its checks."""
    distributed = sys.modules.get("torch.distributed")
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reports = _is_main_rank()
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if reports:
            print(f"usam {args.command}: error: {message}", file=sys.stderr)
        elif _in_process_group():  # past the checks every rank fails alike on, an error may be this rank's own
            print(f"usam {args.command} (rank {os.environ['RANK']}): error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if reports:
            print(f"usam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
