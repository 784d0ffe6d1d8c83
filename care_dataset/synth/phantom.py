"""Synthetic pelvic CT phantom: a HU volume and its rectum/tumour label on one grid.

Array convention: numpy ``[z, y, x]``; z runs inferior -> superior, y anterior -> posterior,
x patient right -> left (LPS with identity direction in SimpleITK terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BACKGROUND, RECTUM, TUMOUR = 0, 1, 2
AIR_HU = -1000.0
HU_MIN, HU_MAX = -1024, 3071
EDGE_BLUR_PX = 0.6  # in-plane blur standing in for the scanner's point-spread function
SACRUM_TOP = 1.0  # relative height where the sacrum ends (the top of the scan)

FloatOrArray = float | np.ndarray  # a scalar, or one value per slice of a slab


class _Canvas:
    """A volume being painted, with millimetre coordinates centred on the field of view."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        nz, ny, nx = shape
        sz, sy, sx = spacing
        self.x = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(np.float32)  # right -> left, mm
        self.y = ((np.arange(ny) - (ny - 1) / 2) * sy).astype(np.float32)  # anterior -> posterior, mm
        self.t = (np.arange(nz) + 0.5) / nz  # inferior -> superior, 0..1 over the scan
        self.width_mm, self.depth_mm = nx * sx, ny * sy
        self.fov = min(self.width_mm, self.depth_mm)
        self.scale_z = float(np.clip(nz * sz, 200.0, 450.0))  # anatomical length the scan stands for, mm
        self.hu = np.full(shape, AIR_HU, np.float32)
        self.label = np.zeros(shape, np.uint8)

    def dt(self, mm: float) -> float:
        """A length along the body (mm) as relative height t."""
        return mm / self.scale_z

    def slab(self, t0: float, t1: float) -> slice | None:
        """Slices whose relative height t lies in [t0, t1], or None."""
        ks = np.flatnonzero((self.t >= t0) & (self.t <= t1))
        return slice(int(ks[0]), int(ks[-1]) + 1) if ks.size else None

    def ellipse(
        self, ks: slice, cx: FloatOrArray, cy: FloatOrArray, ax: FloatOrArray, ay: FloatOrArray,
        theta: FloatOrArray = 0.0, pad: float = 1.0,
    ) -> tuple[slice, slice, np.ndarray, np.ndarray, np.ndarray]:
        """Normalised radius of a rotated ellipse (< 1 inside) on the slices ks, cropped to its box.

        cx, cy, ax, ay, theta: scalars or arrays over ks (mm, radians); pad widens the box (mm).
        Returns (ys, xs, r, dx, dy): r [k, y, x], dx [k, 1, x], dy [k, y, 1].
        """
        k = ks.stop - ks.start
        cx, cy, ax, ay, theta = (np.broadcast_to(np.asarray(v, np.float32), (k,)) for v in (cx, cy, ax, ay, theta))
        reach = np.maximum(ax, ay) + pad
        xs = slice(*np.searchsorted(self.x, [float((cx - reach).min()), float((cx + reach).max())]))
        ys = slice(*np.searchsorted(self.y, [float((cy - reach).min()), float((cy + reach).max())]))
        dx = self.x[None, None, xs] - cx[:, None, None]
        dy = self.y[None, ys, None] - cy[:, None, None]
        cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        u = dx * cos + dy * sin
        v = dy * cos - dx * sin
        r = np.sqrt((u / ax[:, None, None]) ** 2 + (v / ay[:, None, None]) ** 2)
        return ys, xs, r, dx, dy

    def paint(self, ks: slice, ys: slice, xs: slice, mask: np.ndarray, value: float | np.ndarray) -> None:
        """Set hu[ks, ys, xs] to value (a scalar, or an array shaped like mask) where mask [k, y, x] holds."""
        view = self.hu[ks, ys, xs]
        view[mask] = value[mask] if isinstance(value, np.ndarray) else value

    def bone(
        self, ks: slice, cx: FloatOrArray, cy: FloatOrArray, ax: FloatOrArray, ay: FloatOrArray, theta: FloatOrArray,
        cortex_mm: float, hu_cortex: float, hu_marrow: float,
    ) -> None:
        """An elliptic bone cross-section on the slices ks: marrow inside a cortex cortex_mm thick."""
        ys, xs, r, _, _ = self.ellipse(ks, cx, cy, ax, ay, theta)
        inside = r < 1.0
        thin = np.minimum(np.asarray(ax, np.float32), np.asarray(ay, np.float32))
        rim = 1.0 - cortex_mm / np.broadcast_to(thin, (r.shape[0],))[:, None, None]
        self.paint(ks, ys, xs, inside, hu_marrow)
        self.paint(ks, ys, xs, inside & (r > rim), hu_cortex)


@dataclass(frozen=True)
class _Tissue:
    """HU of the soft tissues and bone of one scan, and whether it was taken after contrast."""

    contrast: bool
    fat: float
    muscle: float
    cortex: float
    marrow: float


@dataclass(frozen=True)
class _Pelvis:
    """Body outline and bony landmarks: mm from the FOV centre, t relative height (0..1) over the scan."""

    centre_x: float
    centre_y: float
    half_width: float  # of the body ellipse, mm
    half_depth: float  # anterior-posterior, mm
    fat_mm: float  # subcutaneous fat
    harmonics: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase) perturbing the outline
    table_top: float  # y of the table under the patient
    t_head: float  # femoral heads
    head_x: float  # lateral offset of each femoral head from centre_x
    head_y: float
    head_radius: float
    t_sacrum: float  # lower end of the sacrum proper (the coccyx lies below)


@dataclass(frozen=True)
class _Bowel:
    """The rectum's course: from t_low to t_high, with the anal canal below and the sigmoid above."""

    t_low: float
    t_high: float
    radius: float  # typical outer radius, mm
    wall_mm: float
    x_offset: float  # from the body centre
    sway: tuple[tuple[float, float, float], ...]  # (amplitude mm, cycles over the scan, phase) per harmonic
    gap_mm: float  # between the outer wall and the sacrum
    ellipticity: float
    rotation: float  # of the elliptic cross-section, radians
    gas: tuple[float, float, float]  # (mean fill, cycles over the scan, phase) of the gas level
    sigmoid_len: float  # relative height over which the sigmoid swings anterior and left
    canal_len: float  # relative height of the narrowing anal canal


@dataclass(frozen=True)
class _BowelSection:
    """The bowel tube on slices ks, cropped to the box (ys, xs). Arrays are [k, y, x] unless noted."""

    ks: slice
    ys: slice
    xs: slice
    t: np.ndarray  # [k] relative height
    radius: np.ndarray  # [k] outer radius, mm
    r: np.ndarray  # normalised radius, < 1 inside the outer wall
    dx: np.ndarray  # mm from the centre, [k, 1, x]
    dy: np.ndarray  # mm from the centre, [k, y, 1]
    rho: np.ndarray  # mm from the centre, scaled so the outer wall sits at radius
    inner: np.ndarray  # [k, 1, 1] lumen radius, mm
    in_rectum: np.ndarray  # [k, 1, 1] bool: the labelled part of the tube


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Unit-variance spatially smooth noise (stool and tumour texture)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px)
    return field / max(float(field.std()), 1e-6)


def _blur_noise_factor(sigma_px: float) -> float:
    """Standard deviation left of white noise after the in-plane Gaussian blur (scipy's kernel)."""
    radius = int(4.0 * sigma_px + 0.5)
    offsets = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (offsets / sigma_px) ** 2)
    w /= w.sum()
    return float((w**2).sum())


def _draw_tissue(rng: np.random.Generator) -> _Tissue:
    """Contrast phase and tissue HU of one scan."""
    contrast = bool(rng.uniform() < 0.5)
    hu_fat, hu_muscle = rng.uniform(-115, -90), rng.uniform(40, 60)
    hu_cortex, hu_marrow = rng.uniform(700, 1200), rng.uniform(200, 400)
    return _Tissue(contrast, hu_fat, hu_muscle, hu_cortex, hu_marrow)


def _draw_pelvis(rng: np.random.Generator, cv: _Canvas) -> _Pelvis:
    """Body outline, table and bony landmarks, sized to fit the field of view."""
    uniform = rng.uniform
    centre_x, centre_y = uniform(-8, 8), uniform(-5, 20)
    half_width = min(uniform(150, 190), 0.46 * cv.fov - abs(centre_x))
    half_depth = min(uniform(95, 130), 0.40 * cv.fov - abs(centre_y))
    fat_mm = uniform(12, 32)
    harmonics = tuple((k, uniform(0, 0.025), uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    table_top = centre_y + half_depth * 1.03 + uniform(3, 10)
    t_head = uniform(0.22, 0.32)
    head_x = uniform(0.5, 0.58) * half_width
    head_y = centre_y + uniform(-0.15, 0.0) * half_depth
    head_radius = uniform(21, 25)
    t_sacrum = t_head + cv.dt(uniform(10, 30))
    return _Pelvis(
        centre_x, centre_y, half_width, half_depth, fat_mm, harmonics, table_top,
        t_head, head_x, head_y, head_radius, t_sacrum,
    )


def _draw_bowel(rng: np.random.Generator, cv: _Canvas, pelvis: _Pelvis) -> _Bowel:
    """Rectum centreline and calibre (the outer radius gives 0.3-1.1 % of the slice)."""
    uniform = rng.uniform
    t_low = max(0.05, pelvis.t_head - cv.dt(uniform(25, 45)))
    t_high = min(0.85, t_low + cv.dt(uniform(110, 150)))
    radius = np.sqrt(uniform(0.0045, 0.0075) * cv.width_mm * cv.depth_mm / np.pi)
    wall_mm = uniform(2.5, 5.0)
    x_offset = uniform(-6, 6)
    sway = ((uniform(2, 6), uniform(0.5, 1.5), uniform(0, 6.3)), (uniform(1, 3), uniform(2, 4), uniform(0, 6.3)))
    gap_mm = uniform(6, 12)
    ellipticity, rotation = uniform(0.05, 0.2), uniform(0, np.pi)
    gas = (uniform(0.1, 0.6), uniform(1, 3), uniform(0, 6.3))
    sigmoid_len = cv.dt(uniform(40, 80))
    canal_len = cv.dt(uniform(20, 35))
    return _Bowel(
        t_low, t_high, radius, wall_mm, x_offset, sway, gap_mm, ellipticity, rotation, gas, sigmoid_len, canal_len
    )


def _sacrum_geometry(pelvis: _Pelvis, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre y, half width and half thickness (mm) of the sacrum at heights t; each shaped like t."""
    s = np.clip((t - pelvis.t_sacrum) / max(SACRUM_TOP - pelvis.t_sacrum, 1e-3), 0, 1)
    grow = np.clip((t - pelvis.t_sacrum) / 0.3, 0, 1)
    half_width = 20 + 30 * grow
    half_thick = 8 + 8 * grow
    yc = pelvis.centre_y + pelvis.half_depth * (0.5 + 0.12 * s)
    yc = np.minimum(yc, pelvis.centre_y + pelvis.half_depth - pelvis.fat_mm - 18 - half_thick)
    return yc, half_width, half_thick


def _colon_path(
    cv: _Canvas, pelvis: _Pelvis, bowel: _Bowel, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, y (mm), outer radius (mm) and rotation (radians) of the bowel tube at heights t [k]; each [k]."""
    t_low, t_high = bowel.t_low, bowel.t_high
    (a1, f1, p1), (a2, f2, p2) = bowel.sway
    frac = np.clip((t - t_low) / (t_high - t_low), 0, 1)
    radius = bowel.radius * (0.82 + 0.33 * np.sin(np.pi * frac) ** 0.8 + 0.04 * np.sin(9 * t))
    xc = (
        pelvis.centre_x + bowel.x_offset + a1 * np.sin(2 * np.pi * f1 * t + p1) + a2 * np.sin(2 * np.pi * f2 * t + p2)
    )
    yc_sacrum, _, thick = _sacrum_geometry(pelvis, np.maximum(t, pelvis.t_sacrum))
    front = yc_sacrum - thick - 12.0 * np.clip((pelvis.t_sacrum - t) / cv.dt(40), 0, 1)
    yc = front - radius - bowel.gap_mm
    up = np.clip((t - t_high) / bowel.sigmoid_len, 0, 1)
    xc = xc + 30 * up
    yc = yc - 45 * up
    down = np.clip((t_low - t) / bowel.canal_len, 0, 1)
    radius = np.where(t < t_low, radius * (1 - 0.55 * down), radius)
    return xc, yc, radius, bowel.rotation + 0.3 * np.sin(5 * t)


def _paint_table(cv: _Canvas, pelvis: _Pelvis) -> None:
    """A curved table top with a foam core under the patient, the same on every slice."""
    xx = cv.x[None, :]
    yy = cv.y[:, None]
    top = pelvis.table_top - 5e-4 * xx**2
    in_table = (np.abs(xx) < 0.45 * cv.fov) & (yy >= top) & (yy < top + 45.0)
    shell = in_table & ((yy < top + 3.0) | (yy >= top + 42.0))
    cv.hu[:, in_table] = -900.0
    cv.hu[:, shell] = 150.0


def _paint_body_outline(cv: _Canvas, pelvis: _Pelvis, tissue: _Tissue) -> None:
    """Subcutaneous fat and muscle: a harmonically perturbed ellipse, widest mid-scan."""
    nz, ny, nx = cv.hu.shape
    dx2, dy2 = cv.x[None, :] - pelvis.centre_x, cv.y[:, None] - pelvis.centre_y
    shape_factor = np.ones((ny, nx), np.float32)
    phi = np.arctan2(dy2, dx2)
    for k, amp, phase in pelvis.harmonics:
        shape_factor += amp * np.cos(k * phi + phase)
    a_t = pelvis.half_width * (0.95 + 0.05 * np.sin(np.pi * cv.t))
    b_t = pelvis.half_depth * (0.97 + 0.04 * cv.t)
    px = (dx2**2 / shape_factor**2).astype(np.float32)
    py = (dy2**2 / shape_factor**2).astype(np.float32)
    fat_mm = pelvis.fat_mm
    for k in range(nz):  # per slice keeps the temporaries in cache
        outline = px * np.float32(1 / a_t[k] ** 2) + py * np.float32(1 / b_t[k] ** 2)
        np.copyto(cv.hu[k], np.float32(tissue.fat), where=outline < 1.0)
        outline = px * np.float32(1 / (a_t[k] - fat_mm) ** 2) + py * np.float32(1 / (b_t[k] - 0.8 * fat_mm) ** 2)
        np.copyto(cv.hu[k], np.float32(tissue.muscle), where=outline < 1.0)


def _paint_pelvic_cavity(cv: _Canvas, pelvis: _Pelvis, tissue: _Tissue) -> None:
    """Fat filling the pelvic cavity, wider above the pelvic floor."""
    ks = cv.slab(0, 1)
    floor = np.clip(cv.t[ks] / 0.4, 0, 1)
    cavity_ax = (0.62 * pelvis.head_x * (0.75 + 0.25 * floor)).astype(np.float32)
    cy = pelvis.centre_y + 0.08 * pelvis.half_depth
    ys, xs, r, _, _ = cv.ellipse(ks, pelvis.centre_x, cy, cavity_ax, 0.45 * pelvis.half_depth)
    cv.paint(ks, ys, xs, r < 1.0, tissue.fat)


def _paint_bladder(cv: _Canvas, rng: np.random.Generator, pelvis: _Pelvis, bowel: _Bowel) -> float:
    """An anterior ellipsoidal bladder kept clear of the rectum; returns the relative height of its top."""
    uniform = rng.uniform
    t_bladder, hz_bladder = pelvis.t_head + cv.dt(uniform(10, 40)), cv.dt(uniform(30, 50))
    ks = cv.slab(t_bladder - hz_bladder, t_bladder + hz_bladder)
    if ks is None:
        return t_bladder
    tb = cv.t[ks]
    s = np.sqrt(np.clip(1 - ((tb - t_bladder) / hz_bladder) ** 2, 0.0, 1.0)) + 0.02
    _, yc_r, rad_r, _ = _colon_path(cv, pelvis, bowel, tb)
    ay = uniform(22, 35)
    yc = pelvis.centre_y - pelvis.half_depth * uniform(0.25, 0.38)
    yc = min(yc, float((yc_r - rad_r).min()) - 14 - ay)
    ax_b, ay_b = (uniform(35, 55) * s).astype(np.float32), (ay * s).astype(np.float32)
    ys, xs, r, _, _ = cv.ellipse(ks, pelvis.centre_x + uniform(-8, 8), yc, ax_b, ay_b)
    cv.paint(ks, ys, xs, r < 1.0, uniform(30, 45))
    cv.paint(ks, ys, xs, r < 1.0 - 2.5 / np.maximum(ay_b, 3)[:, None, None], uniform(3, 15))
    return t_bladder + hz_bladder


def _paint_small_bowel(cv: _Canvas, rng: np.random.Generator, pelvis: _Pelvis, bladder_top: float) -> None:
    """Three to seven small-bowel loops above the bladder, anterior."""
    for _ in range(int(rng.integers(3, 8))):
        _paint_bowel_loop(cv, rng, pelvis, bladder_top)


def _paint_bowel_loop(cv: _Canvas, rng: np.random.Generator, pelvis: _Pelvis, bladder_top: float) -> None:
    """One loop filled with gas or fluid; its place and content are drawn even when it falls outside the scan."""
    uniform = rng.uniform
    tc, hz = uniform(bladder_top, 1.0), cv.dt(uniform(10, 30))
    ks = cv.slab(tc - hz, tc + hz)
    rad = uniform(9, 16)
    cx = pelvis.centre_x + uniform(-0.45, 0.45) * pelvis.half_width
    cy = pelvis.centre_y + uniform(-0.75, -0.2) * pelvis.half_depth
    content = uniform(-950, -850) if uniform() < 0.4 else uniform(0, 30)
    if ks is None:
        return
    ys, xs, r, _, _ = cv.ellipse(ks, cx, cy, rad, rad * uniform(0.7, 1.0), uniform(0, np.pi))
    cv.paint(ks, ys, xs, r < 1.0, uniform(35, 55))
    cv.paint(ks, ys, xs, r < 1.0 - 2.5 / rad, content)


def _paint_iliac_vessels(cv: _Canvas, rng: np.random.Generator, pelvis: _Pelvis, contrast: bool) -> None:
    """Iliac artery and vein on each side, converging medially upwards; enhanced after contrast."""
    ks = cv.slab(pelvis.t_head - cv.dt(20), 1.0)
    if ks is None:
        return
    medial = np.clip((cv.t[ks] - pelvis.t_head) / 0.5, 0, 1)
    for side in (-1, 1):
        artery = (0.0, 4.0, rng.uniform(160, 260) if contrast else 42.0)
        vein = (9.0, 6.0, rng.uniform(120, 180) if contrast else 38.0)
        for offset, rad, hu in (artery, vein):
            cx = pelvis.centre_x + side * (pelvis.head_x * (0.72 - 0.25 * medial) - offset * 0.3)
            ys, xs, r, _, _ = cv.ellipse(ks, cx.astype(np.float32), pelvis.head_y - 30 + offset * 0.5, rad, rad)
            cv.paint(ks, ys, xs, r < 1.0, hu)


def _paint_hip_joint(cv: _Canvas, pelvis: _Pelvis, tissue: _Tissue, side: int) -> None:
    """Acetabulum with its joint space, then the femoral head; side -1 is the patient's right."""
    t_head, r_head = pelvis.t_head, pelvis.head_radius
    head_t = cv.dt(r_head)
    xc = pelvis.centre_x + side * pelvis.head_x
    ks = cv.slab(t_head - 0.5 * head_t, t_head + 1.2 * head_t)
    if ks is not None:
        cup = np.sqrt(np.clip((r_head + 7) ** 2 - ((cv.t[ks] - t_head) * cv.scale_z) ** 2, 1.0, None))
        cv.bone(ks, xc + side * 3, pelvis.head_y, cup, cup, 0.0, 2.0, tissue.cortex, tissue.marrow)
        joint = np.maximum(cup - 5, 1.0)
        cv.bone(ks, xc, pelvis.head_y, joint, joint, 0.0, 0.5, tissue.muscle, tissue.muscle)
    ks = cv.slab(t_head - head_t, t_head + head_t)
    if ks is not None:
        rad = np.sqrt(np.clip(r_head**2 - ((cv.t[ks] - t_head) * cv.scale_z) ** 2, 1.0, None))
        cv.bone(ks, xc, pelvis.head_y, rad, rad, 0.0, 2.0, tissue.cortex, tissue.marrow)


def _paint_femoral_shaft(cv: _Canvas, rng: np.random.Generator, pelvis: _Pelvis, tissue: _Tissue, side: int) -> None:
    """Femoral neck and shaft below the head, moving laterally downwards, with fatty marrow."""
    t_head = pelvis.t_head
    ks = cv.slab(0.0, t_head - 0.6 * cv.dt(pelvis.head_radius))
    if ks is None:
        return
    lateral = np.clip((t_head - cv.t[ks]) / cv.dt(45), 0, 1)
    shaft_x = pelvis.centre_x + side * pelvis.head_x + side * (8 + 22 * lateral)
    rad = 15 + 9 * np.clip(1 - np.abs(cv.t[ks] - (t_head - cv.dt(30))) / cv.dt(20), 0, 1)
    cv.bone(ks, shaft_x, pelvis.head_y + 5, rad, rad * 0.9, 0.0, 4.0, tissue.cortex, rng.uniform(-40, 60))


def _paint_ischium_and_pubis(cv: _Canvas, pelvis: _Pelvis, tissue: _Tissue, side: int) -> None:
    """Ischial tuberosity, pubic body and the ramus joining the pubis to the acetabulum."""
    t_head, x_head, y_head = pelvis.t_head, pelvis.head_x, pelvis.head_y
    bx = pelvis.centre_x
    ks = cv.slab(t_head - cv.dt(45), t_head - cv.dt(5))
    if ks is not None:
        cv.bone(ks, bx + side * 0.55 * x_head, y_head + 35, 12, 18, side * 0.3, 2.0, tissue.cortex, tissue.marrow)
    ks = cv.slab(t_head - cv.dt(25), t_head + cv.dt(15))
    if ks is None:
        return
    y_pubis = pelvis.centre_y - (pelvis.half_depth - pelvis.fat_mm - 22)
    cv.bone(ks, bx + side * 9, y_pubis, 7, 15, 0.0, 1.5, tissue.cortex, tissue.marrow)
    mx, my = bx + side * 0.5 * x_head, 0.5 * (y_pubis + y_head)
    length = 0.5 * np.hypot(x_head, y_head - y_pubis)
    angle = np.arctan2(y_head - y_pubis, side * x_head)
    cv.bone(ks, mx, my, length, 7, angle, 1.5, tissue.cortex, tissue.marrow)


def _paint_sacrum(cv: _Canvas, pelvis: _Pelvis, tissue: _Tissue) -> None:
    """Sacrum, tapering into the coccyx below t_sacrum."""
    ks = cv.slab(pelvis.t_sacrum - cv.dt(25), 1.0)
    if ks is None:
        return
    yc, half_width, half_thick = _sacrum_geometry(pelvis, cv.t[ks])
    tip = np.clip((cv.t[ks] - (pelvis.t_sacrum - cv.dt(25))) / cv.dt(25), 0.35, 1)
    cv.bone(ks, pelvis.centre_x, yc, half_width * tip, half_thick * tip, 0.0, 2.0, tissue.cortex, tissue.marrow)


def _paint_iliac_wings(cv: _Canvas, pelvis: _Pelvis, tissue: _Tissue) -> None:
    """Iliac wings, flaring laterally and backwards towards the top of the scan."""
    ks = cv.slab(pelvis.t_head + cv.dt(35), 1.0)
    if ks is None:
        return
    up = np.clip((cv.t[ks] - (pelvis.t_head + cv.dt(35))) / 0.4, 0, 1)
    for side in (-1, 1):
        cx = pelvis.centre_x + side * (0.62 * pelvis.head_x + 0.3 * pelvis.half_width * up)
        cy = pelvis.centre_y + pelvis.half_depth * (0.3 - 0.3 * up)
        angle = -side * (0.9 - 0.35 * up)
        cv.bone(ks, cx, cy, 25 + 40 * up, 6 + 3 * up, angle, 1.5, tissue.cortex, tissue.marrow)


def _paint_pelvic_bones(cv: _Canvas, rng: np.random.Generator, pelvis: _Pelvis, tissue: _Tissue) -> None:
    """Acetabula, femoral heads and shafts, ischia, pubis, sacrum/coccyx and iliac wings, in that order."""
    for side in (-1, 1):
        _paint_hip_joint(cv, pelvis, tissue, side)
        _paint_femoral_shaft(cv, rng, pelvis, tissue, side)
        _paint_ischium_and_pubis(cv, pelvis, tissue, side)
    _paint_sacrum(cv, pelvis, tissue)
    _paint_iliac_wings(cv, pelvis, tissue)


def _paint_bowel_contents(cv: _Canvas, rng: np.random.Generator, section: _BowelSection, bowel: _Bowel) -> None:
    """Wall, then stool with gas bubbles in the lumen, then gas above a level that varies with height."""
    uniform = rng.uniform
    gas_fill, gas_cycles, gas_phase = bowel.gas
    gas = np.clip(gas_fill + 0.6 * np.sin(2 * np.pi * gas_cycles * section.t + gas_phase), 0.1, 1)
    level = (section.inner[:, 0, 0] * (2 * gas - 1))[:, None, None]
    lumen = section.rho < section.inner
    texture = _smooth_field(rng, section.r.shape, 1.5)
    stool = uniform(-20, 40) + 35 * texture
    stool = np.where(texture > 1.6, uniform(-800, -600), stool)
    ks, ys, xs = section.ks, section.ys, section.xs
    cv.paint(ks, ys, xs, section.r < 1.0, uniform(35, 50))
    cv.paint(ks, ys, xs, lumen, stool)
    cv.paint(ks, ys, xs, lumen & (section.dy < level), uniform(-980, -880))


def _tumour_thickness(rng: np.random.Generator, cv: _Canvas, section: _BowelSection, bowel: _Bowel) -> np.ndarray:
    """Wall thickening (mm, [k, y, x]) of a tumour drawn inside the rectum's middle 70 %.

    Locally advanced rectal cancer as CARE holds it: 3-7 cm long, the wall thickened to 1-2 cm over a
    quarter to most of the circumference.
    """
    uniform = rng.uniform
    r0, r1 = bowel.t_low, bowel.t_high
    t_centre = uniform(r0 + 0.15 * (r1 - r0), r1 - 0.15 * (r1 - r0))
    hz, t_max = cv.dt(uniform(15, 35)), uniform(9, 20)
    phi_c, half_angle = uniform(0, 2 * np.pi), uniform(0.8, 2.4)
    wiggles = [(uniform(0, 0.15), int(rng.integers(2, 6)), uniform(0, 6.3), uniform(-3, 3)) for _ in range(3)]
    dphi = (np.arctan2(section.dy, section.dx) - phi_c + np.pi) % (2 * np.pi) - np.pi
    dz = ((section.t - t_centre) / hz)[:, None, None]
    taper = np.cos(0.5 * np.pi * np.clip(dphi / half_angle, -1, 1)) ** 2
    taper = taper * np.cos(0.5 * np.pi * np.clip(dz, -1, 1)) ** 2
    rough = np.ones_like(taper)
    for amp, k, phase, zf in wiggles:
        rough += amp * np.cos(k * dphi + phase + zf * dz)
    return t_max * taper * rough


def _paint_tumour(
    cv: _Canvas, rng: np.random.Generator, section: _BowelSection, bowel: _Bowel, contrast: bool
) -> np.ndarray:
    """Paint a tumour, enhancing more than the normal wall after contrast; returns its mask [k, y, x]."""
    thick = _tumour_thickness(rng, cv, section, bowel)
    outer = section.radius[:, None, None] + 0.35 * thick
    mass = (thick > 1.0) & (section.rho > section.inner - 0.85 * thick) & (section.rho < outer)
    mass &= section.in_rectum
    enhanced = rng.uniform(75, 105) if contrast else rng.uniform(45, 65)
    cv.paint(section.ks, section.ys, section.xs, mass, enhanced + 12 * _smooth_field(rng, section.r.shape, 1.0))
    return mass


def _paint_rectum(
    cv: _Canvas, rng: np.random.Generator, pelvis: _Pelvis, bowel: _Bowel, tissue: _Tissue, has_tumour: bool
) -> None:
    """Rectum with the anal canal below and the sigmoid above; only the rectum and tumour are labelled."""
    ks = cv.slab(bowel.t_low - bowel.canal_len, bowel.t_high + bowel.sigmoid_len)
    if ks is None:
        return
    tk = cv.t[ks]
    xc, yc, radius, theta = _colon_path(cv, pelvis, bowel, tk)
    ax, ay = radius * (1 + bowel.ellipticity), radius * (1 - bowel.ellipticity)
    in_rectum = ((tk >= bowel.t_low) & (tk <= bowel.t_high))[:, None, None]
    ys, xs, r, _, _ = cv.ellipse(ks, xc, yc, ax + 12, ay + 12, theta)
    cv.paint(ks, ys, xs, (r < 1.0) & in_rectum, tissue.fat)  # mesorectal fat

    ys, xs, r, dx, dy = cv.ellipse(ks, xc, yc, ax, ay, theta, pad=12.0)
    inner = (radius - np.where(tk < bowel.t_low, radius, bowel.wall_mm))[:, None, None]
    section = _BowelSection(ks, ys, xs, tk, radius, r, dx, dy, r * radius[:, None, None], inner, in_rectum)
    _paint_bowel_contents(cv, rng, section, bowel)
    label = cv.label[ks, ys, xs]
    label[(r < 1.0) & in_rectum] = RECTUM
    if has_tumour:
        label[_paint_tumour(cv, rng, section, bowel, tissue.contrast)] = TUMOUR

def _scanner_blur_and_noise(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add noise and the in-plane blur to hu [z, y, x] in place; returns it rounded and clipped, as int16."""
    sigma_hu = rng.uniform(10, 20)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise *= sigma_hu / _blur_noise_factor(EDGE_BLUR_PX)
    hu += noise
    del noise
    for axis in (1, 2):
        ndimage.gaussian_filter1d(hu, EDGE_BLUR_PX, axis=axis, output=hu, mode="nearest")
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    np.rint(hu, out=hu)
    return hu.astype(np.int16)


def phantom_volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    tumour: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A pelvic CT volume in HU with its label (0 background, 1 rectum wall + lumen, 2 tumour).

    shape: (nz, ny, nx) voxels; spacing: (sz, sy, sx) mm, in the same order as the array axes.
    tumour: force a tumour (True) or none (False); None draws one with probability 0.85.
    Returns (hu int16 [z, y, x], label uint8 [z, y, x]). The draws from rng follow the painting order
    below, so the same rng state gives the same volume.
    """
    cv = _Canvas(shape, spacing)
    has_tumour = bool(rng.uniform() < 0.85) if tumour is None else bool(tumour)
    tissue = _draw_tissue(rng)
    pelvis = _draw_pelvis(rng, cv)
    bowel = _draw_bowel(rng, cv, pelvis)
    _paint_table(cv, pelvis)
    _paint_body_outline(cv, pelvis, tissue)
    _paint_pelvic_cavity(cv, pelvis, tissue)
    bladder_top = _paint_bladder(cv, rng, pelvis, bowel)
    _paint_small_bowel(cv, rng, pelvis, bladder_top)
    _paint_iliac_vessels(cv, rng, pelvis, tissue.contrast)
    _paint_pelvic_bones(cv, rng, pelvis, tissue)
    _paint_rectum(cv, rng, pelvis, bowel, tissue, has_tumour)
    return _scanner_blur_and_noise(cv.hu, rng), cv.label
