"""Training configuration: one dataclass, a TOML file that may set any field, command-line overrides.

Precedence, lowest first: the defaults below, the recipe's preset (``usam/recipes/<recipe>.toml``), the
saved config of the run (``--resume``), the ``--config`` TOML file, options given on the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from usam.data import RESIZE_KERNELS
from usam.prompts import AXIS_ORDERS, PLACEMENTS, PROMPT_STYLES, PromptProtocol

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def option(default: Any, help_text: str, **cli: Any) -> Any:
    """A TrainConfig field: its default, its ``usam fit --help`` text and any argparse hints (``nargs``,
    ``metavar``), kept as the field's metadata."""
    metadata = {"help": help_text, **cli}  # "choices": the strings a string option takes
    if isinstance(default, (list, dict)):
        return field(default_factory=partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every option of ``usam fit``; field names are the TOML keys and (with - for _) the CLI flags."""

    recipe: str = option("usam", "Preset of the options below: usam (ours: the defaults), paper (the paper's text), "
                                  "released (the authors' released code); --config and explicit options override "
                                  "it (docs/reproduction.md).", choices=("usam", "paper", "released"))
    # data and model
    data: str = option("", "converted CARE folder or published Hugging Face dataset folder")  # zarr/HDF5 shards
    model: str = option("usam_b", "Registered model name (``usam models`` lists them).")
    # a TOML table in a config file
    model_args: dict = option({}, "extra create_model argument, e.g. base_channels=32 (repeatable)")
    sam_checkpoint: str = option("", "Official SAM weights (sam_vit_b_01ec64.pth; sam_vit_h_4b8939.pth for samed_h) to "
                                     "initialise the SAM parts; empty = from scratch.")
    pretrained: str = option("", "Official ImageNet weights of a baseline's encoder: R50+ViT-B_16.npz (transunet) or "
                                 "swin_tiny_patch4_window7_224.pth (swin_unet); empty = from scratch.")
    num_classes: int = option(0, "Classes including background; 0 takes the data's count, any other value must "
                                 "match it.")
    out: str = option("runs/usam", "Run folder: config, logs, curves, checkpoints ``last/`` and ``best/``.")
    decoder: str = option("class_tokens", "U-SAM's mask decoder: class_tokens (one mask token per class, the "
                                          "paper's text) or released (D/8 = 32 tokens, conv head; the released "
                                          "code). usam_* models only.", choices=("class_tokens", "released"))
    head_bias: str = option("prior", "Bias of the final 1x1 convolution (usam_*, unet): prior (log class "
                                     "priors; ours), default (PyTorch's init), none (no bias; the released "
                                     "code).", choices=("prior", "default", "none"))

    # input pipeline
    # clipped and scaled to [0, 1]; stored in the checkpoint; the CLI takes exactly two numbers
    window: list = option([-125.0, 275.0], "HU window LOW HIGH (default -125 275)", nargs=2, metavar=("LOW", "HIGH"))
    points: int = option(3, "point prompts per present class, sampled after augmentation (the paper uses 0, 1, 3 "
                            "or 5)")
    negative_points: int = option(0, "Negative point prompts (SAM's background label 0) per training slice, after "
                                     "the class slots: random pixels of the ring up to 5 px outside the "
                                     "foreground, where false positives are likely; padded (-1) where there is "
                                     "none. 0: none (validation never has any).")
    neighbour_prompts: float = option(0.0, "Probability that a class's training points come from an adjacent "
                                           "stored slice holding it, as propagated prompts do "
                                           "(usam.interactive); the target stays this slice's, so a class "
                                           "absent here is learnt to be left out. Classwise prompts only.")
    prompt_dropout: float = option(0.0, "Probability that a class prompted on a training slice loses its points "
                                        "and counts as background there, so the model segments only what it is "
                                        "prompted for (clicks decide which classes a slice holds). Classwise "
                                        "prompts only.")
    prompt_style: str = option("classwise", "How prompts are built: classwise (ours: an absent class's slots "
                                            "padded, a class embedding on points) or released (every slot a "
                                            "point, absent classes filled from a present one, no class "
                                            "identity).", choices=PROMPT_STYLES)
    eval_points: str = option("interior", "Placement of validation/evaluation points: interior (deepest inside "
                                          "the region; ours) or raster (pixels 0, 4 step, 8 step in raster "
                                          "order; the released code).", choices=PLACEMENTS)
    point_order: str = option("xy", "Point coordinates as the model gets them: xy (SAM's convention) or rowcol "
                                    "(the released code's).", choices=AXIS_ORDERS)
    clahe: bool = option(False, "CLAHE on the windowed slice before resizing, as the released code "
                                "(clip limit 1-4 per training sample, 2.5 in evaluation; 8 x 8 tiles).")
    resize: str = option("bilinear", "Resize to the model size: bilinear (ours; labels nearest) or cubic (the "
                                     "released code's scipy zoom; labels order 0).", choices=RESIZE_KERNELS)
    augment: bool = option(True, "Online augmentation: flips, quarter turns and small rotations (see "
                                 "usam.data.Augmentation).")
    flip_prob: float = option(0.5, "Probability of a left-right flip per training sample.")
    max_rotation_deg: float = option(15.0, "Largest small-angle rotation, degrees (uniform in [-max, max]), on top "
                                           "of quarter turns.")
    small_rotation_prob: float = option(0.5, "Probability of the small-angle rotation per training sample.")
    # rare-class oversampling, see usam.data.EpochSampler
    class_balance: float = option(0.0, "Fraction of training samples drawn from slices holding a uniformly chosen "
                                       "foreground class; 0 = the paper.")
    val_fraction: float = option(0.1, "Fraction of the training patients held out for model selection (the test "
                                      "split is read only with selection_split test).")
    selection_split: str = option("validation", "Split best/ is chosen on: validation (carved from train) or test "
                                                "(the released code; OPTIMISTIC, flagged in every output; "
                                                "val_fraction is then unused).", choices=("validation", "test"))

    # optimisation
    epochs: int = option(100, "Passes over the training slices.")
    max_steps: int = option(0, "Stop after this many optimiser steps (0 = no bound); the LR schedule spans "
                               "min(epochs x steps/epoch, max_steps).")
    batch_size: int = option(24, "Batch size, 24 as in the paper: global (split evenly over DDP ranks) or per "
                                 "process (batch_scope).")
    batch_scope: str = option("global", "global or per_device (each DDP process takes batch_size samples, as "
                                        "the released code; --batch-per-device).", choices=("global", "per_device"))
    lr_encoder: float = option(1e-4, "LR of the pretrained ViT and the CNN down path. Authors' code: 1e-4; the "
                                     "paper's text says 1e-3.")
    lr_decoder: float = option(1e-3, "LR of everything else (prompt/mask decoder, U-Net up path). Authors' code: "
                                     "1e-3; paper's text: 1e-4.")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay (PyTorch's default; released code 1e-4).")
    poly_power: float = option(0.9, "Polynomial decay: lr = base_lr * (1 - step / total_steps) ** poly_power "
                                    "(0 = constant lr).")
    ce_weight: float = option(0.4, "Loss = ce_weight * cross-entropy + dice_weight * soft Dice loss (authors' "
                                   "code: 0.4 / 0.6).")
    dice_weight: float = option(0.6, "Weight of the soft Dice loss (see ce_weight).")
    dice_denominator: str = option("sum", "Soft Dice denominator: sum (sum p + sum t; ours) or squares (sum p^2 + "
                                          "sum t^2; the released code's TransUNet loss).", choices=("sum", "squares"))
    class_weights: list = option([], "Cross-entropy weight per class, background first (empty = unweighted, as in "
                                     "the authors' code).")
    seed: int = option(0, "Seeds initialisation, the validation carve, sample order, augmentation and points.")

    # schedule of evaluation, logging, checkpoints
    val_every: int = option(0, "Validate every this many steps (0 = at the end of each epoch); always at the end "
                               "of training.")
    log_every: int = option(10, "Steps per JSONL log line and progress update.")

    # execution
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N.")
    workers: int = option(-1, "DataLoader worker processes (-1 = min(8, CPU cores per rank)); results do not "
                              "depend on it.")
    amp: bool = option(True, "bf16 autocast on CUDA (CPU always runs fp32).")
    sync_bn: bool = option(False, "SyncBatchNorm across DDP processes (CUDA, more than one process).")
    channels_last: bool = option(True, "channels_last memory format on CUDA.")
    compile: bool = option(False, "torch.compile the model.")
    deterministic: bool = option(False, "torch.use_deterministic_algorithms(True) (CPU runs are bit-reproducible "
                                        "regardless).")
    resume: bool = option(False, "Continue the run in ``out`` from ``out/last`` exactly (model, optimizer, "
                                 "schedule, data order, RNG).")

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        def finite(*values: float) -> bool:
            return all(math.isfinite(float(v)) for v in values)

        checks = [
            (len(self.window) == 2 and float(self.window[0]) < float(self.window[1]),
             f"window must be two numbers low < high, got {self.window}"),
            (self.points >= 0, f"points must be >= 0, got {self.points}"),
            (self.negative_points >= 0 and (self.points > 0 or not self.negative_points),
             f"negative_points must be >= 0, and 0 for an unprompted model (points 0), got {self.negative_points}"),
            *[(0.0 <= value <= 1.0 and (not value or (self.points > 0 and self.prompt_style == "classwise")),
               f"{name} must be in [0, 1], and 0 unless points > 0 and prompt_style classwise, got {value}")
              for name, value in (("neighbour_prompts", self.neighbour_prompts),
                                  ("prompt_dropout", self.prompt_dropout))],
            (0.0 <= self.flip_prob <= 1.0, f"flip_prob must be in [0, 1], got {self.flip_prob}"),
            (finite(self.max_rotation_deg) and self.max_rotation_deg >= 0,
             f"max_rotation_deg must be finite and >= 0, got {self.max_rotation_deg}"),
            (0.0 <= self.small_rotation_prob <= 1.0,
             f"small_rotation_prob must be in [0, 1], got {self.small_rotation_prob}"),
            (0.0 <= self.class_balance <= 1.0, f"class_balance must be in [0, 1], got {self.class_balance}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (finite(self.lr_encoder, self.lr_decoder) and self.lr_encoder >= 0 and self.lr_decoder >= 0,
             f"learning rates must be finite and >= 0, got lr_encoder {self.lr_encoder}, "
             f"lr_decoder {self.lr_decoder}"),
            (finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be finite and >= 0, got {self.weight_decay}"),
            (finite(self.poly_power) and self.poly_power >= 0,
             f"poly_power must be finite and >= 0, got {self.poly_power}"),
            (finite(self.ce_weight, self.dice_weight) and self.ce_weight >= 0 and self.dice_weight >= 0
             and self.ce_weight + self.dice_weight > 0,
             "ce_weight and dice_weight must be finite, >= 0 and not both 0"),
            (0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.val_every >= 0, f"val_every must be >= 0, got {self.val_every}"),
            (self.workers >= -1, f"workers must be >= 0, or -1 for automatic, got {self.workers}"),
            (self.num_classes == 0 or self.num_classes >= 2, f"num_classes must be 0 or >= 2, got {self.num_classes}"),
            (finite(*self.window), "window must be finite"),
            (finite(*self.class_weights) and all(float(w) >= 0 for w in self.class_weights),
             f"class_weights must be finite and >= 0, got {self.class_weights}"),
        ]
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                value = getattr(self, f.name)
                checks.append((value in f.metadata["choices"],
                               f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.prompt_protocol().check(self.points)
        reserved = sorted(set(self.model_args) & set(TRAINER_MODEL_ARGS))
        if reserved:
            key = reserved[0]
            raise ValueError(f"--model-arg {key}: the trainer sets it; use {TRAINER_MODEL_ARGS[key]}")
        if not self.data:
            raise ValueError("no data folder given (--data)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def prompt_protocol(self) -> PromptProtocol:
        """How prompts are built from labels (`usam.prompts.PromptProtocol`)."""
        return PromptProtocol(self.prompt_style, self.eval_points, self.point_order)

    def with_absolute_paths(self) -> TrainConfig:
        """The same options with ``data``, ``out``, ``sam_checkpoint`` and ``pretrained`` made absolute, so that a saved
        run resumes from any working directory."""
        paths = {k: str(Path(getattr(self, k)).resolve()) for k in ("data", "out", "sam_checkpoint", "pretrained")
                 if getattr(self, k)}
        return dataclasses.replace(self, **paths)


# create_model arguments the trainer passes itself, and the option that sets each
TRAINER_MODEL_ARGS = {"name": "--model", "num_classes": "--num-classes", "points_per_class": "--points",
                      "sam_checkpoint": "--sam-checkpoint", "pretrained": "--pretrained",
                      "prompt_style": "--prompt-style", "decoder": "--decoder", "head_bias": "--head-bias"}
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
SELECTION_WARNING = ("model selected on the TEST split (selection_split = test, as the released code): its "
                     "test figures are optimistic")

# options that may differ between a run and its resumption without changing its results on CPU
# (the weights come from last/ on resume, so a moved SAM checkpoint file does not matter; deterministic only
# picks CUDA kernels, while amp and channels_last change the arithmetic of every CUDA step and stay fixed)
RESUMABLE_CHANGES = frozenset({"resume", "workers", "device", "compile", "deterministic", "log_every", "epochs",
                               "max_steps", "data", "out", "sam_checkpoint",
                               "pretrained"})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def coerce(name: str, value: Any) -> Any:
    """Check and convert a TOML or CLI value to the type of field ``name``."""
    default = TrainConfig().to_dict()[name]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"option {name}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"option {name}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"option {name}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"option {name}: expected a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in value):
            raise ValueError(f"option {name}: expected a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ValueError(f"option {name}: expected a table, got {value!r}")
        return dict(value)
    raise TypeError(name)  # pragma: no cover


def read_toml(path: str | Path) -> dict[str, Any]:
    """Options from a TOML file; unknown keys and wrong types are errors."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {path}: not found") from None
    except IsADirectoryError:
        raise ValueError(f"config file {path}: is a folder, not a file") from None
    except OSError as error:
        raise ValueError(f"config file {path}: unreadable ({error.strerror or error})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path}: not valid TOML ({error})") from None
    known = set(field_names())
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown options {', '.join(unknown)}")
    try:
        return {k: coerce(k, v) for k, v in raw.items()}
    except ValueError as error:
        raise ValueError(f"config file {path}: {error}") from None


def recipe_options(name: str) -> dict[str, Any]:
    """The options recipe `name` presets (usam/recipes/<name>.toml), with ``recipe`` itself."""
    choices = TrainConfig.__dataclass_fields__["recipe"].metadata["choices"]
    if name not in choices:
        raise ValueError(f"recipe {name!r}: use one of {', '.join(choices)}")
    return {**read_toml(RECIPES_DIR / f"{name}.toml"), "recipe": name}


def build_config(*layers: dict[str, Any]) -> TrainConfig:
    """Defaults updated by each layer of options in turn."""
    values = TrainConfig().to_dict()
    for layer in layers:
        for key, value in layer.items():
            values[key] = coerce(key, value)
    return TrainConfig(**values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(config: TrainConfig) -> str:
    """The config as TOML that ``read_toml`` reads back to an equal config (every option, resolved); selection
    on the test split is flagged in a comment at the top."""
    values = config.to_dict()
    lines = [f"# {SELECTION_WARNING}"] if config.selection_split == "test" else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
    for key, table in values.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in sorted(table.items())]
    return "\n".join(lines) + "\n"
