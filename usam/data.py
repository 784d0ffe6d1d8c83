"""Input pipeline: HU window + [0, 1] scaling, optional CLAHE, resize to the model size, augmentation, prompt
points.

The shared preprocessing (``window_normalize``, ``clahe``, ``resize_images``, ``resize_labels``,
``preprocess_slices``) is used by training, evaluation and prediction alike, so a checkpoint sees the
same intensities everywhere. Resize kernels: "bilinear" (ours: image bilinear and labels nearest on pixel
centres, ``align_corners=False``) or "cubic" (the released code's ``scipy.ndimage.zoom``: image cubic
spline, labels order 0, corner pixels aligned).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import DistributedSampler

from usam.prompts import DEFAULT_PROTOCOL, PADDING_LABEL, PromptProtocol, random_pixels, sample_points

DEFAULT_WINDOW: tuple[float, float] = (-125.0, 275.0)
MODEL_SIZE = 224
RESIZE_KERNELS = ("bilinear", "cubic")
# The released code applies albumentations' CLAHE(p=1): clip limit (OpenCV's units) uniform in [1, 4] for every
# image, 8 x 8 tiles, on the [0, 1] image times 255 truncated to 8 bits. Training draws the limit as it does;
# evaluation and prediction (where that code draws it too) use the middle of the range, so they are deterministic.
CLAHE_CLIP_RANGE = (1.0, 4.0)
CLAHE_EVAL_CLIP = 2.5


def window_normalize(hu: np.ndarray | torch.Tensor, window: tuple[float, float] = DEFAULT_WINDOW):
    """Clip Hounsfield units to ``window = (low, high)`` and scale to [0, 1]; float32, same array type."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"intensity window must satisfy low < high, got {window}")
    scale = 1.0 / (high - low)
    if isinstance(hu, torch.Tensor):
        return ((hu.float().clamp(low, high) - low) * scale).to(torch.float32)
    out = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    out -= low
    out *= scale
    return out


def clahe(image: np.ndarray, clip_limit: float) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of an (H, W) image in [0, 1] -> float32 (H, W) in [0, 1].

    As the released code: the image times 255 truncated to uint8, 8 x 8 tiles, 256 bins, output in 8-bit steps.
    scikit-image's ``equalize_adapthist`` does the work; its clip limit is a fraction of a tile's pixels, OpenCV's
    `clip_limit` a multiple of the mean bin count, so it gets `clip_limit` / 256.
    """
    from skimage.exposure import equalize_adapthist  # deferred: scikit-image loads only for runs with CLAHE

    image8 = (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    equalised = equalize_adapthist(image8, clip_limit=clip_limit / 256, nbins=256)
    return (np.round(equalised * 255) / 255).astype(np.float32)


def zoom_slice(image: np.ndarray, label: np.ndarray | None, size: int = MODEL_SIZE) -> tuple[np.ndarray, np.ndarray | None]:
    """The released code's resize: image (H, W) float -> (size, size) float32 by cubic spline (``scipy.ndimage.zoom``
    order 3, not clipped), label (H, W) -> (size, size) by order 0; corner pixels aligned."""
    height, width = np.shape(image)
    factors = (size / height, size / width)
    zoomed = ndimage.zoom(np.asarray(image, dtype=np.float32), factors, order=3)
    return zoomed, None if label is None else ndimage.zoom(np.asarray(label), factors, order=0)


def resize_images(x: torch.Tensor, size: int = MODEL_SIZE) -> torch.Tensor:
    """Bilinear resize: x (B, 1, H, W) float -> (B, 1, size, size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def resize_labels(y: torch.Tensor, size: int = MODEL_SIZE, kernel: str = "bilinear") -> torch.Tensor:
    """Nearest-neighbour resize of label maps: y (B, H, W) integer -> (B, size, size) int64.

    Pixel-centre nearest (``mode="nearest-exact"``): output pixel j takes input pixel
    floor((j + 0.5) * H / size), the same convention as the bilinear image resize. `kernel` "cubic":
    the released code's order-0 zoom instead (`zoom_slice`), matching its cubic image resize.
    """
    if y.shape[-2:] == (size, size):
        return y.long()
    if kernel == "cubic":
        array = y.cpu().numpy()
        return torch.from_numpy(np.stack([zoom_slice(a, a, size)[1] for a in array]).astype(np.int64)).to(y.device)
    resized = F.interpolate(y[:, None].float(), size=(size, size), mode="nearest-exact")
    return resized[:, 0].round().long()


def preprocess_slices(
    images_hu: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW, size: int = MODEL_SIZE,
    clahe_clip: float | None = None, kernel: str = "bilinear",
) -> torch.Tensor:
    """Model input from raw slices: images_hu (B, H, W) int16 HU -> (B, 1, size, size) float32 in [0, 1].

    Window, then CLAHE with OpenCV clip limit `clahe_clip` (None: none), then resize with `kernel`.
    """
    images = np.asarray(images_hu)
    if images.ndim == 2:
        images = images[None]
    normalised = window_normalize(images, window)
    if clahe_clip is not None:
        normalised = np.stack([clahe(image, clahe_clip) for image in normalised])
    if kernel == "cubic":
        return torch.from_numpy(np.stack([zoom_slice(image, None, size)[0] for image in normalised]))[:, None]
    x = torch.from_numpy(normalised)[:, None]
    return resize_images(x, size).contiguous()


# --------------------------------------------------------------------------------------------
# Augmentation: one affine map per sample that resizes, flips and rotates in a single resampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """Random flips and rotations, applied identically to image and label.

    Per sample: a left-right flip with probability ``flip_prob``; a rotation by ``k`` quarter
    turns, k uniform in {0, 1, 2, 3} (with the flip this covers all 8 symmetries of the square);
    with probability ``small_rotation_prob`` a further rotation by an angle uniform in
    [-max_rotation_deg, max_rotation_deg]. The original U-SAM code (TransUNet's generator)
    applies either a quarter-turn + flip or a +-20 degree rotation; we compose both, smaller.
    """

    flip_prob: float = 0.5
    max_rotation_deg: float = 15.0
    small_rotation_prob: float = 0.5

    def draw(self, rng: np.random.Generator) -> tuple[bool, int, float]:
        """(flip, quarter_turns, angle_deg); always consumes the same number of draws."""
        flip, turns, rotate, angle = rng.random(), rng.integers(4), rng.random(), rng.uniform(-1.0, 1.0)
        angle_deg = float(angle * self.max_rotation_deg) if rotate < self.small_rotation_prob else 0.0
        return bool(flip < self.flip_prob), int(turns), angle_deg


def sampling_matrix(flip: bool = False, quarter_turns: int = 0, angle_deg: float = 0.0) -> np.ndarray:
    """2 x 2 map from output to input normalised (x, y) coordinates, as ``F.affine_grid`` takes it.

    The output is the input flipped left-right (if ``flip``), then turned like
    ``np.rot90(., quarter_turns)``, then rotated by ``angle_deg``.
    """
    flip_map = np.array([[-1.0, 0.0], [0.0, 1.0]]) if flip else np.eye(2)
    quarter = np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), int(quarter_turns) % 4)
    theta = np.deg2rad(angle_deg)
    small = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return flip_map @ quarter @ small


def affine_grid(matrix: np.ndarray, size: int, offset: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """(1, size, size, 2) sampling grid, as ``F.affine_grid`` with ``align_corners=False`` builds it for
    ``matrix`` (2 x 2, no translation), plus ``offset`` in normalised units; two broadcast sums."""
    centres = (2 * np.arange(size, dtype=np.float64) + 1) / size - 1
    grid = np.empty((size, size, 2), dtype=np.float32)
    for axis in range(2):
        np.add((matrix[axis, 0] * centres + offset[axis])[None, :], (matrix[axis, 1] * centres)[:, None],
               out=grid[..., axis], casting="same_kind")
    return torch.from_numpy(grid)[None]


def resample_slice(
    image_hu: np.ndarray,
    label: np.ndarray | None,
    matrix: np.ndarray | None = None,
    window: tuple[float, float] = DEFAULT_WINDOW,
    size: int = MODEL_SIZE,
    clahe_clip: float | None = None,
    kernel: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Window, resize and transform one slice with one resampling on the ``size`` x ``size`` grid.

    image_hu (H, W) HU, label (H, W) integer or None -> image (1, size, size) float32 in [0, 1]
    (bilinear, edge values extended), label (size, size) uint8 (pixel-centre nearest, 0 outside
    the input). ``matrix`` (2 x 2, see ``sampling_matrix``) maps output to input normalised
    coordinates. With no matrix this is exactly ``preprocess_slices`` / ``resize_labels``.
    Windowing is clip, resample, then scale: the scaling is affine, so it commutes with bilinear
    interpolation and runs on the small output only.

    With CLAHE (`clahe_clip`, OpenCV's clip limit) the windowed image is equalised at its stored
    resolution first. `kernel` "cubic" (the released code's resize): `zoom_slice` to ``size`` first,
    then the transform on that grid (the released code transforms before it resizes).
    """
    if clahe_clip is None and kernel == "bilinear":
        image_t = _resample_hu(image_hu, matrix, window, size)
    else:
        image = window_normalize(image_hu, window)
        if clahe_clip is not None:
            image = clahe(image, clahe_clip)
        if kernel == "bilinear":  # the [0, 1] image through the same steps, its window (0, 1) changing nothing
            image_t = _resample_hu(image, matrix, (0.0, 1.0), size)
        else:
            image_t = torch.from_numpy(zoom_slice(image, None, size)[0])[None, None]
            if matrix is not None:
                image_t = F.grid_sample(image_t, affine_grid(np.asarray(matrix, dtype=np.float64), size),
                                        mode="bilinear", padding_mode="border", align_corners=False)
            image_t = image_t[0]
    return image_t, None if label is None else resample_label(label, matrix, size, kernel)


def resample_label(label: np.ndarray, matrix: np.ndarray | None = None, size: int = MODEL_SIZE,
                   kernel: str = "bilinear") -> torch.Tensor:
    """A label slice (H, W) through `resample_slice`'s steps: (size, size) uint8, nearest (pixel centres; or the
    order-0 zoom for kernel "cubic"), then through ``matrix`` (0 outside the input)."""
    if matrix is None or kernel == "cubic":
        label = resize_labels(torch.from_numpy(np.array(label))[None], size, kernel)[0].to(torch.uint8)
        if matrix is None:
            return label
    return _warp_label(label.numpy() if isinstance(label, torch.Tensor) else label, matrix, size)


def _warp_label(label: np.ndarray, matrix: np.ndarray, size: int) -> torch.Tensor:
    """Label (H, W) through ``matrix`` onto the ``size`` x ``size`` grid: (size, size) uint8, nearest, 0 outside."""
    height, width = np.shape(label)
    # grid_sample's nearest rounds half to even; a 1e-3 pixel nudge makes ties go up, as in resize_labels
    label_grid = affine_grid(np.asarray(matrix, dtype=np.float64), size, offset=(2e-3 / width, 2e-3 / height))
    label_t = torch.from_numpy(np.asarray(label).astype(np.float32))
    out_label = F.grid_sample(label_t[None, None], label_grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[0, 0]
    return out_label.to(torch.uint8)


def _resample_hu(image_hu: np.ndarray, matrix: np.ndarray | None, window: tuple[float, float], size: int
                 ) -> torch.Tensor:
    """`resample_slice`'s image without CLAHE, bilinear: clip to the window, one resampling, scale."""
    if matrix is None:
        return preprocess_slices(np.asarray(image_hu)[None], window, size)[0]
    low, high = float(window[0]), float(window[1])
    clipped = torch.from_numpy(np.asarray(image_hu).astype(np.float32)).clamp_(low, high)
    grid = affine_grid(np.asarray(matrix, dtype=np.float64), size)
    out_image = F.grid_sample(clipped[None, None], grid, mode="bilinear", padding_mode="border",
                              align_corners=False)[0]
    return out_image.sub_(low).mul_(1.0 / (high - low)).clamp_(0.0, 1.0)


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample: a function of (seed, epoch, index) only, so results do not
    depend on worker count, worker order or resuming."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


# --------------------------------------------------------------------------------------------
# Datasets over converted slices
# --------------------------------------------------------------------------------------------


class SliceDataset(torch.utils.data.Dataset):
    """Model-ready slices of some cases of a CARE source (training or validation).

    Item key: ``index`` or ``(epoch, index)`` (what ``EpochSampler`` yields). Item: dict with
    image (1, size, size) float32 in [0, 1], label (size, size) uint8, points (K, 2) float32 (x, y)
    in model pixels, point_labels (K,) int64, K = (num_classes - 1) * points_per_class. With
    ``augment`` or ``random_points`` set (training), points are drawn at random from the final label,
    anew for each (epoch, index); otherwise (validation) they are the deterministic evaluation points
    (``usam.prompts.sample_points`` with no rng); both as `protocol` builds them. ``clahe``: CLAHE with a
    clip limit drawn from ``CLAHE_CLIP_RANGE`` per training sample, ``CLAHE_EVAL_CLIP`` otherwise;
    ``kernel``: the resize kernel (module docstring).

    Training for propagation (`usam.interactive`; classwise prompts, random points only): with probability
    ``neighbour_prompts`` a class's points come from an adjacent stored slice of the case where that slice holds
    the class (as a propagated prompt does), the target staying this slice's truth, so a class absent here must
    be left out; then with probability ``prompt_dropout`` a prompted class loses its points and its pixels count
    as background, so the model segments only the classes it is prompted for.
    """

    def __init__(
        self,
        source,
        case_ids: list[str],
        *,
        num_classes: int,
        points_per_class: int = 3,
        window: tuple[float, float] = DEFAULT_WINDOW,
        size: int = MODEL_SIZE,
        augment: Augmentation | None = None,
        random_points: bool = False,
        seed: int = 0,
        protocol: PromptProtocol = DEFAULT_PROTOCOL,
        clahe: bool = False,
        kernel: str = "bilinear",
        negative_points: int = 0,
        neighbour_prompts: float = 0.0,
        prompt_dropout: float = 0.0,
    ) -> None:
        self.source = source
        self.case_ids = list(case_ids)
        self.slices = [(c, p) for c in self.case_ids for p in range(int(source.cases[c]["num_slices"]))]
        self.num_classes = num_classes
        self.points_per_class = points_per_class
        self.window = (float(window[0]), float(window[1]))
        self.size = size
        self.augment = augment
        self.random_points = random_points or augment is not None
        self.seed = seed
        self.protocol = protocol
        self.clahe = clahe
        self.kernel = kernel
        self.negative_points = negative_points
        self.neighbour_prompts = neighbour_prompts
        self.prompt_dropout = prompt_dropout
        self._case_labels: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        case_id, position = self.slices[index]
        image_hu, label = self.source.read_slice(case_id, position)
        neighbours = self._neighbour_labels(case_id, position) if self.neighbour_prompts else ()
        return self.transform(image_hu, label, epoch, index, neighbours)

    def _neighbour_labels(self, case_id: str, position: int) -> tuple[np.ndarray, ...]:
        """The labels of the stored slices before and after `position` in its case (one at either end)."""
        if case_id not in self._case_labels:
            self._case_labels[case_id] = self.source.read_labels(case_id)
        labels = self._case_labels[case_id]
        return tuple(labels[p] for p in (position - 1, position + 1) if 0 <= p < len(labels))

    def transform(self, image_hu: np.ndarray, label: np.ndarray, epoch: int, index: int,
                  neighbours: tuple[np.ndarray, ...] = ()) -> dict[str, torch.Tensor]:
        """Window, CLAHE, augment + resize, then sample points from the final label (and, training for
        propagation, from a neighbour's label: `neighbours`, the adjacent stored slices' labels)."""
        rng = sample_generator(self.seed, epoch, index) if self.random_points else None
        matrix = sampling_matrix(*self.augment.draw(rng)) if self.augment is not None else None
        clip = None
        if self.clahe:
            clip = float(rng.uniform(*CLAHE_CLIP_RANGE)) if rng is not None else CLAHE_EVAL_CLIP
        image, label_t = resample_slice(image_hu, label, matrix, self.window, self.size, clip, self.kernel)
        points, point_labels = sample_points(label_t.numpy(), self.num_classes, self.points_per_class, rng,
                                             self.protocol)
        if rng is not None and (self.neighbour_prompts or self.prompt_dropout):
            label_t = self._propagation_prompts(points, point_labels, label_t, neighbours, matrix, rng)
        if self.negative_points and rng is not None:
            extra, extra_labels = negative_points(label_t.numpy(), self.negative_points, rng, self.protocol.axis_order)
            points, point_labels = np.concatenate([points, extra]), np.concatenate([point_labels, extra_labels])
        return {
            "image": image,
            "label": label_t,
            "points": torch.from_numpy(points),
            "point_labels": torch.from_numpy(point_labels),
        }

    def _propagation_prompts(self, points: np.ndarray, point_labels: np.ndarray, label_t: torch.Tensor,
                             neighbours: tuple[np.ndarray, ...], matrix: np.ndarray | None,
                             rng: np.random.Generator) -> torch.Tensor:
        """Neighbour prompts and prompt dropout (class docstring), class by class; `points` and `point_labels`
        change in place. Returns the target, the dropped classes set to background."""
        k = self.points_per_class
        resampled: dict[int, np.ndarray] = {}  # each neighbour resampled once, for whichever classes draw it
        for c in range(1, self.num_classes):
            group = slice((c - 1) * k, c * k)
            if neighbours and rng.random() < self.neighbour_prompts:
                n = int(rng.integers(len(neighbours)))
                if n not in resampled:
                    resampled[n] = resample_label(neighbours[n], matrix, self.size, self.kernel).numpy()
                region = resampled[n] == c
                if region.any():
                    points[group], point_labels[group] = sample_points(region.astype(np.uint8), 2, k, rng,
                                                                       self.protocol)
            if (point_labels[group] != PADDING_LABEL).any() and rng.random() < self.prompt_dropout:
                points[group], point_labels[group] = 0.0, PADDING_LABEL
                label_t = torch.where(label_t == c, torch.zeros_like(label_t), label_t)
        return label_t


NEGATIVE_RING = 5  # pixels: how far outside the foreground negative training points are drawn


def negative_points(label: np.ndarray, count: int, rng: np.random.Generator, axis_order: str = "xy"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`count` negative points (label 0) of an S x S label slice: random pixels of the ring up to NEGATIVE_RING
    pixels outside its foreground, distinct unless the ring is smaller; padding (-1 at (0, 0)) where the slice
    has no foreground. Returns (count x 2 float32 in `axis_order`, count int64)."""
    foreground = label > 0
    ring = ndimage.binary_dilation(foreground, iterations=NEGATIVE_RING) & ~foreground
    points = np.zeros((count, 2), np.float32)
    labels = np.full(count, -1, np.int64)
    if ring.any():
        row_col = random_pixels(ring, count, rng)
        points[:] = row_col[:, ::-1] if axis_order == "xy" else row_col
        labels[:] = 0
    return points, labels


def slices_with_class(dataset: SliceDataset) -> list[np.ndarray]:
    """For each foreground class c = 1..N-1, the indices of the dataset's slices whose label holds c.

    Reads the labels only, one case at a time (``source.read_labels``); images are not read.
    """
    present = []  # per case: (n, num_classes - 1) bool, in the order of ``dataset.slices``
    for case_id in dataset.case_ids:
        labels = dataset.source.read_labels(case_id)  # (n, H, W)
        present.append(np.stack([(labels == c).any(axis=(1, 2)) for c in range(1, dataset.num_classes)], axis=1))
    table = np.concatenate(present) if present else np.zeros((0, dataset.num_classes - 1), bool)
    return [np.flatnonzero(table[:, c - 1]) for c in range(1, dataset.num_classes)]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(epoch, index)`` and can start mid-epoch (resume).

    The order of an epoch depends on (seed, epoch) only; ``start`` skips this rank's first
    ``start`` samples of the current epoch.

    Class-balanced sampling (``class_slices`` from ``slices_with_class``, ``balance`` > 0): each
    position of the epoch is, with probability ``balance``, replaced by a slice that holds a
    foreground class chosen uniformly (then a slice of that class, uniformly), so rare classes such
    as a small tumour are seen in more batches, like nnU-Net's foreground oversampling. The epoch
    keeps its length; ``balance = 0`` is plain shuffling (the paper's protocol).
    """

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, class_slices: list[np.ndarray] | None = None,
                 balance: float = 0.0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        if not 0.0 <= balance <= 1.0:
            raise ValueError(f"balance must be in [0, 1], got {balance}")
        self.class_slices = [np.asarray(s) for s in (class_slices or []) if len(s)]
        self.balance = float(balance) if self.class_slices else 0.0
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        if self.balance > 0:
            rng = np.random.default_rng([int(self.seed), int(self.epoch), int(self.rank), 1])
            replace = rng.random(len(indices)) < self.balance
            classes = rng.integers(len(self.class_slices), size=len(indices))
            picks = rng.random(len(indices))
            for position in np.flatnonzero(replace):
                candidates = self.class_slices[classes[position]]
                indices[position] = int(candidates[int(picks[position] * len(candidates))])
        return iter([(self.epoch, i) for i in indices[self.start:]])

    def __len__(self) -> int:
        return self.num_samples - self.start
