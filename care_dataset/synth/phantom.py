"""Synthetic pelvic CT phantom: a HU volume and its rectum/tumour label on one grid.

Array convention: numpy ``[z, y, x]``; z runs inferior -> superior, y anterior -> posterior,
x patient right -> left (LPS with identity direction in SimpleITK terms).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BACKGROUND, RECTUM, TUMOUR = 0, 1, 2
AIR_HU = -1000.0
HU_MIN, HU_MAX = -1024, 3071
EDGE_BLUR_PX = 0.6  # in-plane blur standing in for the scanner's point-spread function


class _Canvas:
    """A volume being painted, with millimetre coordinates centred on the field of view."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        nz, ny, nx = shape
        sz, sy, sx = spacing
        self.x = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(np.float32)  # right -> left, mm
        self.y = ((np.arange(ny) - (ny - 1) / 2) * sy).astype(np.float32)  # anterior -> posterior, mm
        self.t = (np.arange(nz) + 0.5) / nz  # inferior -> superior, 0..1 over the scan
        self.hu = np.full(shape, AIR_HU, np.float32)
        self.label = np.zeros(shape, np.uint8)

    def slab(self, t0: float, t1: float) -> slice | None:
        """Slices whose relative height t lies in [t0, t1], or None."""
        ks = np.flatnonzero((self.t >= t0) & (self.t <= t1))
        return slice(int(ks[0]), int(ks[-1]) + 1) if ks.size else None

    def ellipse(self, ks: slice, cx, cy, ax, ay, theta=0.0, pad: float = 1.0):
        """Normalised radius of a rotated ellipse (< 1 inside) on the slices ks, cropped to its box.

        cx, cy, ax, ay, theta: scalars or arrays over ks (mm, radians); pad widens the box (mm).
        Returns (ys, xs, r, dx, dy) with r, dx, dy of shape [k, y, x].
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

    def paint(self, ks: slice, ys: slice, xs: slice, mask: np.ndarray, value) -> None:
        view = self.hu[ks, ys, xs]
        view[mask] = value[mask] if isinstance(value, np.ndarray) else value

    def bone(self, ks: slice, cx, cy, ax, ay, theta, cortex_mm: float, hu_cortex: float, hu_marrow: float) -> None:
        ys, xs, r, _, _ = self.ellipse(ks, cx, cy, ax, ay, theta)
        inside = r < 1.0
        thin = np.minimum(np.asarray(ax, np.float32), np.asarray(ay, np.float32))
        rim = 1.0 - cortex_mm / np.broadcast_to(thin, (r.shape[0],))[:, None, None]
        self.paint(ks, ys, xs, inside, hu_marrow)
        self.paint(ks, ys, xs, inside & (r > rim), hu_cortex)


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


def phantom_volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    tumour: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A pelvic CT volume in HU with its label (0 background, 1 rectum wall + lumen, 2 tumour).

    shape: (nz, ny, nx) voxels; spacing: (sz, sy, sx) mm, in the same order as the array axes.
    tumour: force a tumour (True) or none (False); None draws one with probability 0.85.
    Returns (hu int16 [z, y, x], label uint8 [z, y, x]).
    """
    nz, ny, nx = shape
    sz, sy, sx = spacing
    cv = _Canvas(shape, spacing)
    fov = min(nx * sx, ny * sy)
    scale_z = float(np.clip(nz * sz, 200.0, 450.0))  # anatomical length the scan stands for, mm

    def dt(mm: float) -> float:
        return mm / scale_z

    u = rng.uniform
    has_tumour = bool(u() < 0.85) if tumour is None else bool(tumour)
    contrast = bool(u() < 0.5)
    hu_fat, hu_muscle = u(-115, -90), u(40, 60)
    hu_cortex, hu_marrow = u(700, 1200), u(200, 400)

    # Patient outline: a harmonically perturbed ellipse over the table.
    bx, by = u(-8, 8), u(-5, 20)
    a0 = min(u(150, 190), 0.46 * fov - abs(bx))
    b0 = min(u(95, 130), 0.40 * fov - abs(by))
    fat_mm = u(12, 32)
    harmonics = [(k, u(0, 0.025), u(0, 2 * np.pi)) for k in (2, 3, 4)]

    table_top = by + b0 * 1.03 + u(3, 10)
    xx = cv.x[None, :]
    yy = cv.y[:, None]
    top = table_top - 5e-4 * xx**2
    in_table = (np.abs(xx) < 0.45 * fov) & (yy >= top) & (yy < top + 45.0)
    shell = in_table & ((yy < top + 3.0) | (yy >= top + 42.0))
    cv.hu[:, in_table] = -900.0
    cv.hu[:, shell] = 150.0

    dx2, dy2 = cv.x[None, :] - bx, cv.y[:, None] - by
    shape_factor = np.ones((ny, nx), np.float32)
    phi = np.arctan2(dy2, dx2)
    for k, amp, phase in harmonics:
        shape_factor += amp * np.cos(k * phi + phase)
    a_t = a0 * (0.95 + 0.05 * np.sin(np.pi * cv.t))
    b_t = b0 * (0.97 + 0.04 * cv.t)
    px = (dx2**2 / shape_factor**2).astype(np.float32)
    py = (dy2**2 / shape_factor**2).astype(np.float32)
    for k in range(nz):  # per slice keeps the temporaries in cache
        outline = px * np.float32(1 / a_t[k] ** 2) + py * np.float32(1 / b_t[k] ** 2)
        np.copyto(cv.hu[k], np.float32(hu_fat), where=outline < 1.0)
        outline = px * np.float32(1 / (a_t[k] - fat_mm) ** 2) + py * np.float32(1 / (b_t[k] - 0.8 * fat_mm) ** 2)
        np.copyto(cv.hu[k], np.float32(hu_muscle), where=outline < 1.0)

    # Landmarks (mm relative to the FOV centre; t relative height).
    t_head = u(0.22, 0.32)
    x_head = u(0.5, 0.58) * a0
    y_head = by + u(-0.15, 0.0) * b0
    r_head = u(21, 25)
    t_sacrum = t_head + dt(u(10, 30))
    sacrum_top = 1.0

    def sacrum_geometry(t: np.ndarray):
        s = np.clip((t - t_sacrum) / max(sacrum_top - t_sacrum, 1e-3), 0, 1)
        grow = np.clip((t - t_sacrum) / 0.3, 0, 1)
        half_width = 20 + 30 * grow
        half_thick = 8 + 8 * grow
        yc = by + b0 * (0.5 + 0.12 * s)
        yc = np.minimum(yc, by + b0 - fat_mm - 18 - half_thick)
        return yc, half_width, half_thick

    # Pelvic cavity fat, wider above the pelvic floor.
    ks = cv.slab(0, 1)
    floor = np.clip(cv.t[ks] / 0.4, 0, 1)
    cavity_ax = (0.62 * x_head * (0.75 + 0.25 * floor)).astype(np.float32)
    ys, xs, r, _, _ = cv.ellipse(ks, bx, by + 0.08 * b0, cavity_ax, 0.45 * b0)
    cv.paint(ks, ys, xs, r < 1.0, hu_fat)

    # Rectum centreline and calibre (outer radius gives 0.3-1.1 % of the slice).
    r0 = max(0.05, t_head - dt(u(25, 45)))
    r1 = min(0.85, r0 + dt(u(110, 150)))
    radius0 = np.sqrt(u(0.0045, 0.0075) * (nx * sx) * (ny * sy) / np.pi)
    wall_mm = u(2.5, 5.0)
    x0, (a1, f1, p1), (a2, f2, p2) = u(-6, 6), (u(2, 6), u(0.5, 1.5), u(0, 6.3)), (u(1, 3), u(2, 4), u(0, 6.3))
    gap_mm = u(6, 12)
    ellipticity, theta0 = u(0.05, 0.2), u(0, np.pi)
    gas0, gas_f, gas_p = u(0.1, 0.6), u(1, 3), u(0, 6.3)
    sigmoid_len = dt(u(40, 80))
    canal_len = dt(u(20, 35))

    def colon_path(t: np.ndarray):
        """Centre (x, y), outer radius and rotation of the bowel tube at heights t."""
        frac = np.clip((t - r0) / (r1 - r0), 0, 1)
        radius = radius0 * (0.82 + 0.33 * np.sin(np.pi * frac) ** 0.8 + 0.04 * np.sin(9 * t))
        xc = bx + x0 + a1 * np.sin(2 * np.pi * f1 * t + p1) + a2 * np.sin(2 * np.pi * f2 * t + p2)
        yc_sacrum, _, thick = sacrum_geometry(np.maximum(t, t_sacrum))
        front = yc_sacrum - thick - 12.0 * np.clip((t_sacrum - t) / dt(40), 0, 1)
        yc = front - radius - gap_mm
        up = np.clip((t - r1) / sigmoid_len, 0, 1)
        xc = xc + 30 * up
        yc = yc - 45 * up
        down = np.clip((r0 - t) / canal_len, 0, 1)
        radius = np.where(t < r0, radius * (1 - 0.55 * down), radius)
        return xc, yc, radius, theta0 + 0.3 * np.sin(5 * t)

    # Bladder: anterior, ellipsoidal, kept clear of the rectum.
    t_bladder, hz_bladder = t_head + dt(u(10, 40)), dt(u(30, 50))
    ks = cv.slab(t_bladder - hz_bladder, t_bladder + hz_bladder)
    if ks is not None:
        tb = cv.t[ks]
        s = np.sqrt(np.clip(1 - ((tb - t_bladder) / hz_bladder) ** 2, 0.0, 1.0)) + 0.02
        _, yc_r, rad_r, _ = colon_path(tb)
        ay = u(22, 35)
        yc = by - b0 * u(0.25, 0.38)
        yc = min(yc, float((yc_r - rad_r).min()) - 14 - ay)
        ax_b, ay_b = (u(35, 55) * s).astype(np.float32), (ay * s).astype(np.float32)
        ys, xs, r, _, _ = cv.ellipse(ks, bx + u(-8, 8), yc, ax_b, ay_b)
        cv.paint(ks, ys, xs, r < 1.0, u(30, 45))
        cv.paint(ks, ys, xs, r < 1.0 - 2.5 / np.maximum(ay_b, 3)[:, None, None], u(3, 15))
        bladder_top = t_bladder + hz_bladder
    else:
        bladder_top = t_bladder

    # Small-bowel loops above the bladder, anterior.
    for _ in range(int(rng.integers(3, 8))):
        tc, hz = u(bladder_top, 1.0), dt(u(10, 30))
        ks = cv.slab(tc - hz, tc + hz)
        rad = u(9, 16)
        cx, cy = bx + u(-0.45, 0.45) * a0, by + u(-0.75, -0.2) * b0
        content = u(-950, -850) if u() < 0.4 else u(0, 30)
        if ks is None:
            continue
        ys, xs, r, _, _ = cv.ellipse(ks, cx, cy, rad, rad * u(0.7, 1.0), u(0, np.pi))
        cv.paint(ks, ys, xs, r < 1.0, u(35, 55))
        cv.paint(ks, ys, xs, r < 1.0 - 2.5 / rad, content)

    # Iliac vessels (contrast-enhanced in some scans).
    ks = cv.slab(t_head - dt(20), 1.0)
    if ks is not None:
        medial = np.clip((cv.t[ks] - t_head) / 0.5, 0, 1)
        for side in (-1, 1):
            for offset, rad, hu in ((0.0, 4.0, u(160, 260) if contrast else 42.0), (9.0, 6.0, u(120, 180) if contrast else 38.0)):
                cx = bx + side * (x_head * (0.72 - 0.25 * medial) - offset * 0.3)
                ys, xs, r, _, _ = cv.ellipse(ks, cx.astype(np.float32), y_head - 30 + offset * 0.5, rad, rad)
                cv.paint(ks, ys, xs, r < 1.0, hu)

    # Bones: acetabula, femoral heads and shafts, pubis, ischia, sacrum/coccyx, iliac wings.
    head_t = dt(r_head)
    for side in (-1, 1):
        xc = bx + side * x_head
        ks = cv.slab(t_head - 0.5 * head_t, t_head + 1.2 * head_t)
        if ks is not None:
            cup = np.sqrt(np.clip((r_head + 7) ** 2 - ((cv.t[ks] - t_head) * scale_z) ** 2, 1.0, None))
            cv.bone(ks, xc + side * 3, y_head, cup, cup, 0.0, 2.0, hu_cortex, hu_marrow)
            joint = np.maximum(cup - 5, 1.0)
            cv.bone(ks, xc, y_head, joint, joint, 0.0, 0.5, hu_muscle, hu_muscle)
        ks = cv.slab(t_head - head_t, t_head + head_t)
        if ks is not None:
            rad = np.sqrt(np.clip(r_head**2 - ((cv.t[ks] - t_head) * scale_z) ** 2, 1.0, None))
            cv.bone(ks, xc, y_head, rad, rad, 0.0, 2.0, hu_cortex, hu_marrow)
        ks = cv.slab(0.0, t_head - 0.6 * head_t)
        if ks is not None:
            lateral = np.clip((t_head - cv.t[ks]) / dt(45), 0, 1)
            shaft_x = xc + side * (8 + 22 * lateral)
            rad = 15 + 9 * np.clip(1 - np.abs(cv.t[ks] - (t_head - dt(30))) / dt(20), 0, 1)
            cv.bone(ks, shaft_x, y_head + 5, rad, rad * 0.9, 0.0, 4.0, hu_cortex, u(-40, 60))
        ks = cv.slab(t_head - dt(45), t_head - dt(5))
        if ks is not None:
            cv.bone(ks, bx + side * 0.55 * x_head, y_head + 35, 12, 18, side * 0.3, 2.0, hu_cortex, hu_marrow)
        ks = cv.slab(t_head - dt(25), t_head + dt(15))
        if ks is not None:
            y_pubis = by - (b0 - fat_mm - 22)
            cv.bone(ks, bx + side * 9, y_pubis, 7, 15, 0.0, 1.5, hu_cortex, hu_marrow)
            mx, my = bx + side * 0.5 * x_head, 0.5 * (y_pubis + y_head)
            length = 0.5 * np.hypot(x_head, y_head - y_pubis)
            angle = np.arctan2(y_head - y_pubis, side * x_head)
            cv.bone(ks, mx, my, length, 7, angle, 1.5, hu_cortex, hu_marrow)
    ks = cv.slab(t_sacrum - dt(25), 1.0)
    if ks is not None:
        yc, half_width, half_thick = sacrum_geometry(cv.t[ks])
        tip = np.clip((cv.t[ks] - (t_sacrum - dt(25))) / dt(25), 0.35, 1)
        cv.bone(ks, bx, yc, half_width * tip, half_thick * tip, 0.0, 2.0, hu_cortex, hu_marrow)
    ks = cv.slab(t_head + dt(35), 1.0)
    if ks is not None:
        up = np.clip((cv.t[ks] - (t_head + dt(35))) / 0.4, 0, 1)
        for side in (-1, 1):
            cx = bx + side * (0.62 * x_head + 0.3 * a0 * up)
            cy = by + b0 * (0.3 - 0.3 * up)
            cv.bone(ks, cx, cy, 25 + 40 * up, 6 + 3 * up, -side * (0.9 - 0.35 * up), 1.5, hu_cortex, hu_marrow)

    # Rectum with anal canal below and sigmoid above (only the rectum is labelled).
    ks = cv.slab(r0 - canal_len, r1 + sigmoid_len)
    if ks is not None:
        tk = cv.t[ks]
        xc, yc, radius, theta = colon_path(tk)
        ax, ay = radius * (1 + ellipticity), radius * (1 - ellipticity)
        ys, xs, r, _, _ = cv.ellipse(ks, xc, yc, ax + 12, ay + 12, theta)
        in_rectum = ((tk >= r0) & (tk <= r1))[:, None, None]
        cv.paint(ks, ys, xs, (r < 1.0) & in_rectum, hu_fat)  # mesorectal fat

        ys, xs, r, dx, dy = cv.ellipse(ks, xc, yc, ax, ay, theta, pad=12.0)
        rho = r * radius[:, None, None]  # mm from the centre, scaled so the outer wall sits at radius
        tube = r < 1.0
        inner = (radius - np.where(tk < r0, radius, wall_mm))[:, None, None]
        gas = np.clip(gas0 + 0.6 * np.sin(2 * np.pi * gas_f * tk + gas_p), 0.1, 1)
        level = (inner[:, 0, 0] * (2 * gas - 1))[:, None, None]
        lumen = rho < inner
        texture = _smooth_field(rng, r.shape, 1.5)
        stool = u(-20, 40) + 35 * texture
        stool = np.where(texture > 1.6, u(-800, -600), stool)
        wall_hu = u(35, 50)
        cv.paint(ks, ys, xs, tube, wall_hu)
        cv.paint(ks, ys, xs, lumen, stool)
        cv.paint(ks, ys, xs, lumen & (dy < level), u(-980, -880))

        labelled = tube & in_rectum
        if has_tumour:
            t_centre = u(r0 + 0.15 * (r1 - r0), r1 - 0.15 * (r1 - r0))
            # Locally advanced rectal cancer as CARE holds it: 3-7 cm long, the wall thickened to 1-2 cm over a
            # quarter to most of the circumference, enhancing more than the normal wall after contrast.
            hz, t_max = dt(u(15, 35)), u(9, 20)
            phi_c, half_angle = u(0, 2 * np.pi), u(0.8, 2.4)
            wiggles = [(u(0, 0.15), int(rng.integers(2, 6)), u(0, 6.3), u(-3, 3)) for _ in range(3)]
            dphi = (np.arctan2(dy, dx) - phi_c + np.pi) % (2 * np.pi) - np.pi
            dz = ((tk - t_centre) / hz)[:, None, None]
            taper = np.cos(0.5 * np.pi * np.clip(dphi / half_angle, -1, 1)) ** 2
            taper = taper * np.cos(0.5 * np.pi * np.clip(dz, -1, 1)) ** 2
            rough = np.ones_like(taper)
            for amp, k, phase, zf in wiggles:
                rough += amp * np.cos(k * dphi + phase + zf * dz)
            thick = t_max * taper * rough
            mass = (thick > 1.0) & (rho > inner - 0.85 * thick) & (rho < radius[:, None, None] + 0.35 * thick)
            mass &= in_rectum
            cv.paint(ks, ys, xs, mass, (u(75, 105) if contrast else u(45, 65)) + 12 * _smooth_field(rng, r.shape, 1.0))
            cv.label[ks, ys, xs][labelled] = RECTUM
            cv.label[ks, ys, xs][mass] = TUMOUR
        else:
            cv.label[ks, ys, xs][labelled] = RECTUM

    # Scanner blur and noise.
    sigma_hu = u(10, 20)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= sigma_hu / _blur_noise_factor(EDGE_BLUR_PX)
    hu = cv.hu
    hu += noise
    del noise
    for axis in (1, 2):
        ndimage.gaussian_filter1d(hu, EDGE_BLUR_PX, axis=axis, output=hu, mode="nearest")
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    np.rint(hu, out=hu)
    return hu.astype(np.int16), cv.label
