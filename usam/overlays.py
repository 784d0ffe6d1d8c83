"""PNG overlays of label maps on CT slices (matplotlib, Agg backend, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from care_dataset.files import atomic_file

# Colour per foreground class 1, 2, ... (colour-blind safe).
CLASS_COLORS = ("#E69F00", "#D55E00", "#0072B2", "#009E73", "#CC79A7", "#56B4E9")
ZOOM_MIN_SIZE = 48  # pixels: smallest side of a zoomed view


def class_color(value: int) -> tuple[float, float, float]:
    return to_rgb(CLASS_COLORS[(value - 1) % len(CLASS_COLORS)])


def grayscale(hu: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """HU slice -> [0, 1] grey levels through the intensity window."""
    low, high = float(window[0]), float(window[1])
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def overlay_rgb(hu: np.ndarray, label: np.ndarray, window: Sequence[float], alpha: float = 0.45) -> np.ndarray:
    """H x W x 3 RGB: the windowed slice with each foreground class tinted in its colour."""
    gray = grayscale(hu, window)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for value in np.unique(label):
        if value == 0:
            continue
        mask = label == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(class_color(int(value)))
    return rgb


def zoom_box(*masks: np.ndarray, margin: int = 12) -> tuple[slice, slice]:
    """Square-ish crop around the union of the masks' foreground, at least ZOOM_MIN_SIZE wide."""
    union = np.zeros(masks[0].shape, dtype=bool)
    for mask in masks:
        union |= np.asarray(mask) > 0
    height, width = union.shape
    if not union.any():
        return slice(0, height), slice(0, width)
    rows, cols = np.nonzero(union)
    box = []
    for lo, hi, size in ((rows.min(), rows.max(), height), (cols.min(), cols.max(), width)):
        half = max((hi - lo + 1) / 2 + margin, ZOOM_MIN_SIZE / 2)
        centre = (lo + hi + 1) / 2
        start = int(max(0, min(size - 2 * half, centre - half)))
        box.append(slice(start, int(min(size, start + 2 * half))))
    return box[0], box[1]


def _legend(class_names: Sequence[str]) -> list[Patch]:
    return [Patch(color=class_color(c), label=name) for c, name in enumerate(class_names) if c > 0]


def save_png(figure: Figure, path: Path) -> None:
    """Render to PNG through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def save_case_grid(
    rows: Sequence[dict],
    class_names: Sequence[str],
    window: Sequence[float],
    path: Path,
) -> None:
    """One row per case: full slice with truth (solid) and prediction (dashed) contours, then a
    zoom on the truth and a zoom on the prediction.

    rows: dicts with 'title' str, 'image' (H, W) HU, 'truth' and 'pred' (H, W) labels.
    """
    figure = Figure(figsize=(10.5, 3.5 * max(len(rows), 1)))
    axes = figure.subplots(max(len(rows), 1), 3, squeeze=False)
    for row, ax in zip(rows, axes):
        image, truth, pred = row["image"], row["truth"], row["pred"]
        ax[0].imshow(grayscale(image, window), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for value in range(1, len(class_names)):
            color = class_color(value)
            if (truth == value).any():
                ax[0].contour(truth == value, levels=[0.5], colors=[color], linewidths=1.0)
            if (pred == value).any():
                ax[0].contour(pred == value, levels=[0.5], colors=[color], linewidths=1.0, linestyles="dashed")
        ax[0].set_title(row["title"], fontsize=9)
        box = zoom_box(truth, pred)
        ax[1].imshow(overlay_rgb(image[box], truth[box], window), interpolation="nearest")
        ax[1].set_title("truth", fontsize=9)
        ax[2].imshow(overlay_rgb(image[box], pred[box], window), interpolation="nearest")
        ax[2].set_title("prediction", fontsize=9)
        for a in ax:
            a.set_axis_off()
    for a in axes.flat[len(rows) * 3 :]:
        a.set_axis_off()
    figure.legend(handles=_legend(class_names), loc="lower center", ncol=len(class_names) - 1, fontsize=9)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    save_png(figure, path)


def save_slice_overlays(
    hu: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    window: Sequence[float],
    directory: Path,
    slice_names: Sequence[tuple[str, int]],
) -> list[Path]:
    """One PNG per slice holding any label, with the full slice and a zoom.

    hu, labels: (n, H, W) in the canonical orientation (row 0 anterior, column 0 patient right).
    slice_names[s]: (axis, index) of canonical slice s in the input image's own voxel indices,
    0-based (e.g. ('k', 12)); the file is slice_<axis><index:04d>.png, e.g. slice_k0012.png.
    """
    directory = Path(directory)
    written = []
    for index in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
        axis, number = slice_names[int(index)]
        figure = Figure(figsize=(8, 4))
        ax = figure.subplots(1, 2)
        ax[0].imshow(overlay_rgb(hu[index], labels[index], window), interpolation="nearest")
        box = zoom_box(labels[index])
        ax[1].imshow(overlay_rgb(hu[index][box], labels[index][box], window), interpolation="nearest")
        ax[0].set_title(f"{axis} = {number} (0-based voxel index; ITK-SNAP cursor: {number + 1})", fontsize=9)
        ax[1].set_title("zoom", fontsize=9)
        for a in ax:
            a.set_axis_off()
        figure.legend(handles=_legend(class_names), loc="lower center", ncol=len(class_names) - 1, fontsize=9)
        figure.tight_layout(rect=(0, 0.06, 1, 1))
        path = directory / f"slice_{axis}{int(number):04d}.png"
        save_png(figure, path)
        written.append(path)
    return written


def save_interaction_curve(interaction: dict, class_names: Sequence[str], path: Path) -> None:
    """PNG: mean per-volume Dice (left) and HD95 (right) per class against the mean total clicks per case
    (`usam.simulate`), with the unprompted and oracle-per-slice figures as dashed and dotted lines where given."""
    figure = Figure(figsize=(10, 4))
    clicks = [step["mean_total_clicks"] for step in interaction["curve"]]
    for ax, metric, axis_label in zip(figure.subplots(1, 2), ("dice", "hd95_mm"),
                                      ("per-volume Dice (mean)", "HD95 mm (mean over cases where defined)")):
        for c, name in enumerate(class_names[1:], start=1):
            values = [np.nan if step[metric][name] is None else step[metric][name] for step in interaction["curve"]]
            ax.plot(clicks, values, marker="o", color=class_color(c), label=name)
            for key, style in (("unprompted", "--"), ("oracle_per_slice", ":")):
                value = interaction.get(key, {}).get(metric, {}).get(name)
                if value is not None:
                    ax.axhline(value, linestyle=style, color=class_color(c), linewidth=1, label=f"{name}, {key}")
        ax.set_xlabel("total clicks per case (mean)")
        ax.set_ylabel(axis_label)
        if metric == "dice":
            ax.set_ylim(-0.02, 1.02)
        else:
            ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    figure.tight_layout()
    save_png(figure, Path(path))
