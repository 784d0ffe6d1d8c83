"""The ``usam`` command: ``usam fit | eval | predict | table | models``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from usam.config import SELECTION_WARNING, TrainConfig, build_config, coerce, read_toml, recipe_options, tomllib
from usam.outputs import LABEL_VOLUME_EXTENSIONS, OUT_FORMATS, OVERLAY_MARKER


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
        help_text = field.metadata["help"]
        if name == "model_args":
            parser.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg,
                                metavar="KEY=VALUE", default=argparse.SUPPRESS, help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_text} (default {default})")
        elif isinstance(default, list):  # a fixed count of numbers where the field's metadata says so
            parser.add_argument(flag, dest=name, nargs=field.metadata.get("nargs", "+"), type=float,
                                metavar=field.metadata.get("metavar", "W"), default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=type(default), default=argparse.SUPPRESS,
                                choices=field.metadata.get("choices"), help=f"{help_text} (default {default!r})")
        if name == "batch_scope":
            parser.add_argument("--batch-per-device", dest=name, action="store_const", const="per_device",
                                default=argparse.SUPPRESS, help="the same as --batch-scope per_device")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="converted CARE folder (dataset.json, shards) or a published one (care-publish)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/x/best")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--points", type=int, default=None,
                        help="points per class sampled from the truth (0 = unprompted; default: the checkpoint's)")
    parser.add_argument("--volume", choices=("labelled", "full"), default="labelled",
                        help="per-volume metrics over the stored slices holding a label (labelled, default) or "
                             "over every slice of the scan (full: a conversion with [slices] margin = \"all\")")
    parser.add_argument("--recipe", choices=TrainConfig.__dataclass_fields__["recipe"].metadata["choices"],
                        default=None, help="take --prompt-style, --eval-points and --point-order from this recipe "
                        "(docs/reproduction.md; default: the checkpoint's own)")
    for flag, name in (("--prompt-style", "prompt_style"), ("--eval-points", "eval_points"),
                       ("--point-order", "point_order")):
        field = TrainConfig.__dataclass_fields__[name]
        parser.add_argument(flag, dest=name, choices=field.metadata["choices"], default=None,
                            help=f"{field.metadata['help']} Default: the checkpoint's.")
    parser.add_argument("--allow-prompt-mismatch", action="store_true",
                        help="evaluate with a prompt style or point order other than the checkpoint was trained with")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (default 32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <checkpoint>/../eval_<split>_points<k>, _full added "
                             "for --volume full)")
    parser.add_argument("--interaction", choices=("sparse",), default=None,
                        help="also run a simulated user (docs/evaluation.md, Simulated user): a few clicked slices "
                             "per class propagated through each volume, then corrective clicks")
    parser.add_argument("--clicked-slices", type=int, default=1, help="--interaction: slices clicked per class")
    parser.add_argument("--clicks", type=int, default=1, help="--interaction: points per clicked slice")
    parser.add_argument("--corrections", type=int, default=0, help="--interaction: corrective clicks per case")
    parser.add_argument("--min-area", type=int, default=20,
                        help="--interaction: model-input pixels below which propagation stops (default 20)")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + model.safetensors)")
    parser.add_argument("--image", required=True, help="CT: a DICOM folder or a volume file (NIfTI, NRRD, MHA, ...)")
    parser.add_argument("--points", default=None, help="clicks JSON (docs/evaluation.md); without it: unprompted")
    parser.add_argument(
        "--out",
        required=True,
        help=f"output file. nifti: a label volume, e.g. pred.nii.gz (one of {', '.join(LABEL_VOLUME_EXTENSIONS)}), "
        "with <name>_labels.txt (ITK-SNAP label descriptions) beside it; seg, rtstruct: one DICOM file, e.g. "
        "pred_seg.dcm",
    )
    parser.add_argument(
        "--out-format",
        choices=OUT_FORMATS,
        default="nifti",
        help="nifti (default): a label volume on the input's grid; seg: a DICOM Segmentation, rtstruct: a DICOM "
        "RT Structure Set, both referencing the input DICOM series (a DICOM folder only) and carrying its patient "
        "and study identity, as the series does",
    )
    parser.add_argument(
        "--overlays",
        default=None,
        help="folder for PNG overlays, one per axial slice holding labels, named slice_k0012.png by the "
        "input's own 0-based voxel index along its axial axis (k for axial scans; slice_i/slice_j for a "
        "volume stored in another plane; ITK-SNAP's cursor shows it + 1). The folder is replaced as a whole "
        "on each run (built as a hidden .<name>.tmp-* folder beside it, then swapped in); it must be new, "
        f"empty, or written by usam predict (it keeps a {OVERLAY_MARKER} list of its files), so no other file "
        "is ever deleted",
    )
    parser.add_argument(
        "--propagate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --points (on by default then): segment the whole volume by carrying each class's clicks slice "
        "by slice up and down from the clicked slices (docs/evaluation.md, Propagation); --no-propagate: only "
        "the clicked slices",
    )
    parser.add_argument("--min-area", type=int, default=20,
                        help="propagation stops where a class covers fewer model-input pixels (default 20)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def _system_model_arg(text: str) -> tuple[str, str, Any]:
    system, sep, rest = text.partition(".")
    if not sep or not system:
        raise argparse.ArgumentTypeError(f"expected SYSTEM.KEY=VALUE, got {text!r}")
    return (system, *_model_arg(rest))


def _system_path(text: str) -> tuple[str, str]:
    system, sep, path = text.partition("=")
    if not sep or not system or not path:
        raise argparse.ArgumentTypeError(f"expected SYSTEM=PATH, got {text!r}")
    return system, path


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="converted or published CARE folder, as for usam fit")
    parser.add_argument("--systems", default="table2",
                        help="table2 or table3 (the systems of the seed paper's Table 2 or 3), all (every registered "
                        "model), or comma-separated names from `usam models` (default table2)")
    parser.add_argument("--recipe", default="usam", choices=TrainConfig.__dataclass_fields__["recipe"].metadata["choices"],
                        help="usam fit's --recipe, the same for every system (docs/reproduction.md; default usam)")
    parser.add_argument("--out", default="results",
                        help="results folder: table.md, table.csv, table.png and runs/<system>/seed<k> "
                        "(default results)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per system (default 3)")
    parser.add_argument("--config", metavar="TOML", default=None,
                        help="usam fit options for every run (the table's own options override it)")
    parser.add_argument("--max-steps", type=int, default=None, help="passed to usam fit (e.g. for a smoke test)")
    parser.add_argument("--batch-size", type=int, default=None, help="passed to usam fit")
    parser.add_argument("--model-arg", dest="model_args", action="append", type=_system_model_arg, default=[],
                        metavar="SYSTEM.KEY=VALUE", help="a create_model option of one system, e.g. "
                        "transunet.vit_depth=6 (repeatable)")
    parser.add_argument("--sam-checkpoint", dest="sam_checkpoints", action="append", type=_system_path, default=[],
                        metavar="SYSTEM=PATH", help="official SAM weights for one system, e.g. "
                        "usam_b=sam_vit_b_01ec64.pth or samed_h=sam_vit_h_4b8939.pth (repeatable)")
    parser.add_argument("--pretrained", dest="pretrained", action="append", type=_system_path, default=[],
                        metavar="SYSTEM=PATH", help="official ImageNet weights for one system, e.g. "
                        "transunet=R50+ViT-B_16.npz or swin_unet=swin_tiny_patch4_window7_224.pth (repeatable)")
    parser.add_argument("--device", default=None, help="for usam fit and usam eval (default: auto)")
    parser.add_argument("--eval-batch-size", type=int, default=32, help="slices per forward pass in evaluation")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="with --dry-run: print torchrun commands for this many processes per run")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the usam fit (or torchrun) command of each system and seed, train nothing")


def resolve_fit_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < the recipe's preset < saved run config (--resume) < --config file < command line.

    The recipe is the one named on the command line, else in the --config file, else in the saved run, else usam.
    """
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    if "model_args" in given:
        given["model_args"] = dict(given["model_args"])
    file_options = read_toml(args.config) if args.config else {}
    resume = given.get("resume", file_options.get("resume", False))
    out = given.get("out", file_options.get("out", TrainConfig().out))
    saved_path = Path(out) / "config.toml"
    saved: dict[str, Any] = {}
    if resume:
        if not saved_path.is_file():
            raise ValueError(f"--resume: {out} has no run to resume")
        saved = read_toml(saved_path)
    recipe = given.get("recipe", file_options.get("recipe", saved.get("recipe", TrainConfig().recipe)))
    layers = [recipe_options(recipe), saved, file_options, {k: coerce(k, v) for k, v in given.items()}]
    return build_config(*layers)


def run_fit(args: argparse.Namespace) -> int:
    from usam.train import train  # deferred: the model zoo and its libraries load only for the command that runs

    config = resolve_fit_config(args)
    result = train(config)
    if not _is_main_rank():  # under torchrun the main process reports
        return 0
    best = result["best_mean_dice"]
    print(f"trained {result['step']} steps; best {config.selection_split} mean foreground Dice "
          f"{'n/a' if best is None else f'{best:.4f}'}; run folder {result['out']}")
    if config.selection_split == "test":
        print(f"warning: {SELECTION_WARNING}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from usam import evaluate  # deferred: the model zoo and its libraries load only for the command that runs

    interaction = None
    if args.interaction:
        from usam import simulate  # deferred: the simulated user loads only for --interaction

        interaction = simulate.InteractionProtocol(args.clicked_slices, args.clicks, args.corrections,
                                                   args.min_area)
    return evaluate.run_eval(args, interaction)


def run_predict(args: argparse.Namespace) -> int:
    from usam import predict  # deferred: the model zoo and its libraries load only for the command that runs

    return predict.run_predict(args)


def run_table(args: argparse.Namespace) -> int:
    from usam.table import run_table  # deferred: the model zoo and its libraries load only for the command that runs

    eval_parser = argparse.ArgumentParser(prog="usam eval")
    add_eval_arguments(eval_parser)
    return run_table(args, parse_eval_args=eval_parser.parse_args)


def run_models(args: argparse.Namespace) -> int:
    from usam.models.registry import list_models  # deferred: segment-anything loads only when it is needed

    for name in list_models():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usam", description="U-SAM for rectal-cancer CT: train, evaluate, "
                                     "predict.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{fit,eval,predict,table,models}")
    fit = commands.add_parser("fit", help="train a model on CARE slices",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_fit_arguments(fit)
    fit.set_defaults(run=run_fit)
    eval_parser = commands.add_parser("eval", help="evaluate a checkpoint on a split")
    add_eval_arguments(eval_parser)
    eval_parser.set_defaults(run=run_eval)
    predict = commands.add_parser("predict", help="segment a CT volume with a checkpoint")
    add_predict_arguments(predict)
    predict.set_defaults(run=run_predict)
    table = commands.add_parser("table", help="train and evaluate systems alike; the seed paper's comparison table")
    add_table_arguments(table)
    table.set_defaults(run=run_table)
    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(run=run_models)
    return parser


def _is_main_rank() -> bool:
    """True outside torchrun and in its rank 0."""
    return os.environ.get("RANK", "0") == "0"


def _in_process_group() -> bool:
    """True once `usam fit` has joined torchrun's process group, which it does after all its checks."""
    return dist.is_available() and dist.is_initialized()


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
