"""Deterministic synthetic CT/MR phantoms for tests and the built-in demo.

Each phantom patient is an analytic anatomy model defined in *physical* LPS
millimetres (``+x`` patient left, ``+y`` posterior, ``+z`` superior). Sizes, positions,
body shape and a smooth low-frequency deformation are drawn from the seed. Every
modality then samples that model on its own grid, so a CT and an MR of the same
phantom show the same anatomy with no voxel correspondence (different spacing,
field of view, origin and, for some seeds, direction).

Sampling works by painting tissue classes in order of priority (later structures win)
and turning the tissue map into intensities with a per-modality lookup table,
texture, partial-volume smoothing and noise. Labels are painted together with the
tissues, so a label map is an inside-test of the model on that grid, never a resampled
copy of another grid's labels.

Abdominal labels follow the CHAOS MR convention (:data:`LIVER_LABELS`); the chest
phantom labels one central lung tumour (:data:`LUNG_LABELS`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from ..errors import ConfigError, InputError, listed
from .volume import Volume

LIVER_LABELS: dict[str, int] = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
LUNG_LABELS: dict[str, int] = {"tumour": 1}

_TISSUE_NAMES = (
    "air",
    "fat",  # subcutaneous fat
    "visceral_fat",  # intra-abdominal / mediastinal / perirenal fat
    "muscle",
    "bowel",
    "gas",  # bowel and stomach gas
    "stomach_wall",
    "stomach_content",
    "liver",
    "liver_vessel",
    "gallbladder",
    "spleen",
    "kidney_cortex",
    "kidney_medulla",
    "kidney_sinus",
    "pancreas",
    "aorta",
    "ivc",
    "vessel",  # other enhanced vessels (pulmonary arteries, SVC)
    "heart",
    "bone_cortical",
    "bone_cancellous",
    "disc",
    "csf",
    "rib",
    "cartilage",
    "lung",
    "lung_vessel",
    "airway",
    "tumour",
)
#: Tissue class codes used in :attr:`PhantomCase.ct_tissue` / :attr:`PhantomCase.mr_tissue`.
TISSUES: dict[str, int] = {name: code for code, name in enumerate(_TISSUE_NAMES)}
_T = TISSUES

# Field of view of the CT grid in millimetres: (left-right, anterior-posterior, cranio-caudal).
# It is fixed in physical units so a different ``ct_shape`` samples the same anatomy more or
# less finely instead of showing a different part of the body.
_CT_FOV_MM = (375.0, 375.0, 200.0)


@dataclass
class PhantomCase:
    """One synthetic patient: a CT, optionally an MR, and their label maps.

    Attributes:
        case_id: identifier such as ``"phantom-liver-000"``.
        ct: CT in Hounsfield units (float32).
        mr: T2-like MR in arbitrary units (float32), or ``None``.
        ct_label: uint8 labels on the CT grid.
        mr_label: uint8 labels on the MR grid, or ``None``.
        ct_tissue: uint8 tissue classes (:data:`TISSUES`) on the CT grid; ground truth for
            tests and demos, not something a real scan would have.
        mr_tissue: uint8 tissue classes on the MR grid, or ``None``.
    """

    case_id: str
    ct: Volume
    mr: Volume | None
    ct_label: Volume
    mr_label: Volume | None
    ct_tissue: Volume | None = None
    mr_tissue: Volume | None = None


# --------------------------------------------------------------------------- geometry helpers
def _rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation about z (yaw), then x (pitch), then y (roll), angles in degrees."""
    a, b, c = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(b), -math.sin(b)], [0.0, math.sin(b), math.cos(b)]])
    ry = np.array([[math.cos(c), 0.0, math.sin(c)], [0.0, 1.0, 0.0], [-math.sin(c), 0.0, math.cos(c)]])
    return rz @ rx @ ry


@dataclass(frozen=True, eq=False)
class _Ellipsoid:
    """An ellipsoid in the patient frame; ``level`` is its squared normalised radius."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    rot: np.ndarray | None = None

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates in the ellipsoid's own (rotated, centred, unscaled) frame."""
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        if self.rot is None:
            return dx, dy, dz
        r = self.rot.astype(np.float32)  # float64 scalars would silently promote the grids
        return (
            r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
            r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
            r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz,
        )

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        lx, ly, lz = self.local(x, y, z)
        return (lx / self.radii[0]) ** 2 + (ly / self.radii[1]) ** 2 + (lz / self.radii[2]) ** 2

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, grow: float = 0.0) -> np.ndarray:
        """Inside test; ``grow`` (mm) dilates the ellipsoid approximately."""
        scale = 1.0 + grow / min(self.radii)
        return self.level(x, y, z) < scale * scale

    def bounds(self, grow: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box (patient frame) containing the ellipsoid."""
        r = max(self.radii) + grow  # conservative whatever the rotation
        c = np.asarray(self.centre)
        return c - r, c + r


def _capsule_inside(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, a: np.ndarray, b: np.ndarray, r0: float, r1: float
) -> np.ndarray:
    """Inside a tapered tube from ``a`` (radius ``r0``) to ``b`` (radius ``r1``)."""
    d = b - a
    dd = float(d @ d) or 1e-6
    t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / dd, 0.0, 1.0)
    ex, ey, ez = x - (a[0] + t * d[0]), y - (a[1] + t * d[1]), z - (a[2] + t * d[2])
    r = r0 + (r1 - r0) * t
    return ex * ex + ey * ey + ez * ez < r * r


def _capsule_bounds(a: np.ndarray, b: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(a, b) - r, np.maximum(a, b) + r


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum, so unions of lobes have no creases."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1.0 - h) + a * h - k * h * (1.0 - h)


def _superellipse(u: np.ndarray, v: np.ndarray, a: float, b: float, p_post: float) -> np.ndarray:
    """Normalised body-outline level: an ellipse in front, flatter behind (patient lies supine)."""
    p = np.where(v > 0, np.float32(p_post), np.float32(2.0))
    return np.abs(u / a) ** p + np.abs(v / b) ** p


class _Waves:
    """A sum of random plane waves: a smooth, seeded scalar field over physical space."""

    def __init__(self, rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> None:
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        k = 2.0 * np.pi / rng.uniform(*wavelength, size=n)
        self.k = (dirs * k[:, None]).astype(np.float32)
        self.phase = rng.uniform(0.0, 2.0 * np.pi, size=n).astype(np.float32)
        self.norm = np.float32(math.sqrt(2.0 / n))  # unit variance for random phases

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.shape(x), dtype=np.float32)
        for (kx, ky, kz), ph in zip(self.k, self.phase):
            out += np.cos(kx * x + ky * y + kz * z + ph)
        return out * self.norm


class _Deformation:
    """Smooth low-frequency displacement of the anatomy (a few millimetres)."""

    def __init__(self, rng: np.random.Generator, amplitude: tuple[float, float] = (1.5, 4.0)) -> None:
        self.waves = []
        for _axis in range(3):
            amps = rng.uniform(*amplitude, size=2)
            self.waves.append((_Waves(rng, 2, (120.0, 260.0)), amps))
        self.max_amplitude = float(sum(a.sum() for _, a in self.waves))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        out = []
        for waves, amps in self.waves:
            d = np.zeros(np.shape(x), dtype=np.float32)
            for (kx, ky, kz), ph, amp in zip(waves.k, waves.phase, amps):
                d += np.float32(amp) * np.sin(kx * x + ky * y + kz * z + ph)
            out.append(d)
        return out


def _make_grid(shape_kji: tuple[int, int, int], spacing: tuple[float, float, float], centre: np.ndarray,
               direction: np.ndarray) -> Volume:
    """An empty volume whose centre voxel sits at ``centre`` (LPS mm)."""
    size_ijk = np.array(shape_kji[::-1], dtype=float)
    half = (size_ijk - 1.0) / 2.0 * np.asarray(spacing)
    origin = np.asarray(centre, dtype=float) - direction @ half
    return Volume(np.zeros(shape_kji, dtype=np.uint8), spacing, tuple(origin), direction)


def _physical_coordinates(grid: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS coordinates (float32, shape K,J,I) of every voxel centre, by broadcasting."""
    k_n, j_n, i_n = grid.shape
    i = np.arange(i_n, dtype=np.float64)[None, None, :]
    j = np.arange(j_n, dtype=np.float64)[None, :, None]
    k = np.arange(k_n, dtype=np.float64)[:, None, None]
    m = grid.direction * np.asarray(grid.spacing)[None, :]
    coords = []
    for axis in range(3):
        c = grid.origin[axis] + m[axis, 0] * i + m[axis, 1] * j + m[axis, 2] * k
        coords.append(np.broadcast_to(c, grid.shape).astype(np.float32))
    return coords[0], coords[1], coords[2]


Inside = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class _Canvas:
    """Tissue and label maps on one grid, painted structure by structure.

    Structures are given in the deformed patient frame (millimetres from the body
    centre). Each paint call only evaluates the sub-block of the grid that can contain
    the structure, which keeps a whole case well under a second.
    """

    def __init__(self, grid: Volume, centre: np.ndarray, deform: _Deformation) -> None:
        self.grid = grid
        self.centre = np.asarray(centre, dtype=float)
        px, py, pz = _physical_coordinates(grid)
        dx, dy, dz = deform(px, py, pz)
        c = self.centre.astype(np.float32)
        self.x = px - c[0] + dx
        self.y = py - c[1] + dy
        self.z = pz - c[2] + dz
        self.margin = deform.max_amplitude + 1.0
        self.tissue = np.zeros(grid.shape, dtype=np.uint8)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        self._size_ijk = np.array(grid.size_ijk)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices (k, j, i) of the grid covering a patient-frame box, or None."""
        lo = np.asarray(lo, dtype=float) + self.centre - self.margin
        hi = np.asarray(hi, dtype=float) + self.centre + self.margin
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        idx = self.grid.physical_to_index(corners)
        first = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, self._size_ijk)
        last = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 0, self._size_ijk)
        if np.any(last <= first):
            return None
        return (slice(first[2], last[2]), slice(first[1], last[1]), slice(first[0], last[0]))

    def mask(self, inside: Inside, lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> np.ndarray:
        """Full-grid boolean mask of a structure."""
        out = np.zeros(self.grid.shape, dtype=bool)
        sl = self.box(lo, hi) if lo is not None else (slice(None),) * 3
        if sl is not None:
            out[sl] = inside(self.x[sl], self.y[sl], self.z[sl])
        return out

    def paint(
        self,
        tissue: int,
        inside: Inside,
        lo: np.ndarray | None = None,
        hi: np.ndarray | None = None,
        *,
        label: int = 0,
        within: np.ndarray | None = None,
        onto: tuple[int, ...] | None = None,
    ) -> None:
        """Set tissue (and label) where ``inside`` holds, optionally only within a mask or onto given tissues."""
        sl = self.box(lo, hi) if lo is not None else (slice(None),) * 3
        if sl is None:
            return
        m = inside(self.x[sl], self.y[sl], self.z[sl])
        if within is not None:
            m &= within[sl]
        if onto is not None:
            m &= np.isin(self.tissue[sl], onto)
        self.tissue[sl][m] = tissue
        self.label[sl][m] = label


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _jit(rng: np.random.Generator, sd: float = 5.0, limit: float = 10.0) -> float:
    """Position jitter: normal, clipped so no seed produces absurd anatomy."""
    return float(np.clip(rng.normal(0.0, sd), -limit, limit))


# --------------------------------------------------------------------------- shared body parts
@dataclass
class _Trunk:
    """Body wall, spine and ribs shared by the abdominal and chest phantoms."""

    half_width: float
    half_depth: float
    p_post: float
    fat: float
    muscle: float
    vb_centre_v: float
    vb_radii: tuple[float, float]
    disc_pitch: float
    disc_phase: float
    rib_pitch: float
    rib_phase: float
    rib_drop: float

    @classmethod
    def sample(cls, rng: np.random.Generator, width: tuple[float, float], depth: tuple[float, float],
               fat: tuple[float, float], vb_frac: float) -> "_Trunk":
        w, d = _u(rng, *width), _u(rng, *depth)
        return cls(
            half_width=w,
            half_depth=d,
            p_post=_u(rng, 2.4, 3.0),
            fat=_u(rng, *fat),
            muscle=_u(rng, 8.0, 13.0),
            vb_centre_v=vb_frac * d + _jit(rng, 2.0, 4.0),
            vb_radii=(_u(rng, 19.0, 24.0), _u(rng, 16.0, 19.0)),
            disc_pitch=_u(rng, 30.0, 36.0),
            disc_phase=_u(rng, 0.0, 36.0),
            rib_pitch=_u(rng, 26.0, 32.0),
            rib_phase=_u(rng, 0.0, 32.0),
            rib_drop=_u(rng, 50.0, 70.0),
        )

    @property
    def cavity_axes(self) -> tuple[float, float]:
        wall = self.fat + self.muscle
        return self.half_width - wall, self.half_depth - wall

    def body(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return _superellipse(x, y, self.half_width, self.half_depth, self.p_post) < 1.0

    def inside_fat(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        f = self.fat
        return _superellipse(x, y, self.half_width - f, self.half_depth - f, self.p_post) < 1.0

    def cavity(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a, b = self.cavity_axes
        return _superellipse(x, y, a, b, self.p_post) < 1.0

    @property
    def canal_v(self) -> float:
        return self.vb_centre_v + self.vb_radii[1] + 11.0

    def paint_spine(self, cv: _Canvas, *, paraspinal: bool = True) -> None:
        """Vertebral bodies with discs, neural arch, spinal canal and back muscles."""
        big = 1e4
        vb = self.vb_centre_v
        rx, ry = self.vb_radii
        canal = self.canal_v
        if paraspinal:
            for side in (-1.0, 1.0):
                e = _Ellipsoid((side * 36.0, canal + 8.0, 0.0), (30.0, 22.0, big))
                lo, hi = (side * 36.0 - 30.0, canal - 14.0, -big), (side * 36.0 + 30.0, canal + 30.0, big)
                cv.paint(_T["muscle"], e.inside, lo, hi)
        body = _Ellipsoid((0.0, vb, 0.0), (rx, ry, big))
        lo, hi = (-rx - 2, vb - ry - 2, -big), (rx + 2, vb + ry + 2, big)
        cv.paint(_T["bone_cortical"], body.inside, lo, hi)
        inner = _Ellipsoid((0.0, vb, 0.0), (rx - 2.5, ry - 2.5, big))
        cv.paint(_T["bone_cancellous"], inner.inside, lo, hi)

        def disc(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            return body.inside(x, y, z) & (np.mod(z - self.disc_phase, self.disc_pitch) < 7.0)

        cv.paint(_T["disc"], disc, lo, hi)

        def arch(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            r2 = x * x + (y - canal) ** 2
            ring = (r2 < 15.0**2) & (y > canal - 6.0)
            pedicle = (np.abs(x) > 6.0) & (np.abs(x) < 12.0) & (y > vb) & (y < canal)
            spinous = (np.abs(x) < 4.5) & (y > canal) & (y < canal + 36.0)
            lamina = (np.abs(x) < 20.0) & (np.abs(y - canal - 12.0) < 3.5)
            return ring | pedicle | spinous | lamina

        cv.paint(_T["bone_cancellous"], arch, (-22.0, vb, -big), (22.0, canal + 38.0, big))

        def canal_inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            return x * x + (y - canal) ** 2 < 8.5**2

        cv.paint(_T["csf"], canal_inside, (-9.0, canal - 9.0, -big), (9.0, canal + 9.0, big))

    def paint_ribs(self, cv: _Canvas, *, lowest: Callable[[np.ndarray], np.ndarray] | None,
                   costal_from: float = 0.78, sternum_from: float = 0.93) -> None:
        """Ribs as slanted bands in the body wall, costal cartilage in front.

        A rib is a band whose height drops towards the front (``rib_drop`` mm from back
        to front), so an axial slice cuts each rib into a short arc, as on real CT.
        ``lowest(theta)`` gives the lowest z where ribs exist at angle ``theta``.
        """
        a, b = self.cavity_axes
        ring_in, ring_out = 1.0, (1.0 + 7.0 / min(a, b)) ** 2

        def ribs(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            lvl = _superellipse(x, y, a, b, self.p_post)
            ring = (lvl > ring_in) & (lvl < ring_out)
            out = np.zeros(x.shape, dtype=bool)
            theta = np.abs(np.arctan2(x[ring], y[ring])) / np.pi  # 0 at the back, 1 in front
            zr = z[ring]
            band = np.mod(zr + self.rib_drop * theta - self.rib_phase, self.rib_pitch) < 8.0
            # Ribs start lateral to the spine (costovertebral joints), never across the midline.
            keep = band & (theta > 0.14) & (theta < sternum_from)
            if lowest is not None:
                keep &= zr > lowest(theta)
            out[ring] = keep
            return out

        big = 1e4
        box = ((-self.half_width, -self.half_depth, -big), (self.half_width, self.half_depth, big))
        rib_mask = cv.mask(ribs, *box)
        theta_mask = cv.mask(
            lambda x, y, z: np.abs(np.arctan2(x, y)) / np.pi > costal_from, *box
        )
        cv.tissue[rib_mask & ~theta_mask] = _T["rib"]
        cv.tissue[rib_mask & theta_mask] = _T["cartilage"]
        cv.label[rib_mask] = 0


# --------------------------------------------------------------------------- abdomen model
class _AbdomenModel:
    """Seeded analytic abdomen in the patient frame (mm from the body centre)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.centre = np.array([_jit(rng, 4.0, 8.0), _u(rng, -5.0, 10.0), _jit(rng, 3.0, 6.0)])
        self.deform = _Deformation(rng)
        self.trunk = _Trunk.sample(rng, (140.0, 162.0), (100.0, 120.0), (10.0, 28.0), 0.40)
        t = self.trunk
        sx, sy = t.half_width / 152.0, t.half_depth / 110.0
        self.sx, self.sy = sx, sy

        # Diaphragm domes: everything abdominal lies below, lung and heart above.
        self.dome_r = _u(rng, 62.0, 74.0)
        self.dome_l = self.dome_r - _u(rng, 5.0, 15.0)
        self.dome_u = 60.0 * sx

        s = _u(rng, 0.87, 1.13)
        jx, jy, jz = _jit(rng), _jit(rng), _jit(rng, 4.0, 8.0)
        self.liver_lobes = [
            _Ellipsoid((-60.0 * sx + jx, -4.0 * sy + jy, -1.0 + jz), (56.0 * s, 64.0 * s, _u(rng, 76.0, 86.0) * s),
                       _rotation(_u(rng, -10, 10), _u(rng, -12, 0), _u(rng, -8, 8))),
            _Ellipsoid((10.0 * sx + jx, -44.0 * sy + jy, 30.0 + jz), (52.0 * s, 24.0 * s, 40.0 * s),
                       _rotation(_u(rng, -15, 10), 0, 0)),
            _Ellipsoid((-24.0 * sx + jx, -8.0 * sy + jy, 22.0 + jz), (34.0 * s, 42.0 * s, 48.0 * s)),
        ]
        ivc_x = -24.0 * sx + _jit(rng, 2.0, 4.0)
        ivc_y = t.vb_centre_v - t.vb_radii[1] - 10.0
        self.ivc = (ivc_x, ivc_y, _u(rng, 11.0, 14.0), _u(rng, 8.0, 10.0))
        self.aorta = (13.0 * sx + _jit(rng, 2.0, 4.0), t.vb_centre_v - t.vb_radii[1] - 12.0, _u(rng, 10.0, 13.0))

        # Intrahepatic vessels: hepatic veins fanning out from the IVC near the dome, and
        # portal branches from the hilum. Endpoints jittered per seed.
        lc = np.array(self.liver_lobes[0].centre)
        top = self.dome_r - 18.0
        hv_root = np.array([ivc_x, ivc_y + 4.0, top])
        pv_root = np.array([-28.0 * sx + jx, -6.0 * sy + jy, 2.0 + jz])
        self.liver_vessels: list[tuple[np.ndarray, np.ndarray, float, float]] = []
        for end in ([lc[0] - 40.0, lc[1] + 5.0, top - 12.0], [lc[0] + 5.0, lc[1] - 45.0, top - 6.0],
                    [25.0 * sx, -42.0 * sy, top - 8.0]):
            e = np.array(end) + rng.normal(0.0, 6.0, 3)
            self.liver_vessels.append((hv_root, e, _u(rng, 5.0, 7.0), 2.0))
        for end in ([lc[0] - 30.0, lc[1] + 10.0, lc[2] + 5.0], [0.0, -40.0 * sy, 22.0]):
            e = np.array(end) + rng.normal(0.0, 6.0, 3)
            self.liver_vessels.append((pv_root, e, _u(rng, 6.0, 8.0), 3.0))
            for _ in range(2):  # secondary branches
                mid = pv_root + (e - pv_root) * _u(rng, 0.4, 0.8)
                tip = mid + rng.normal(0.0, 22.0, 3)
                self.liver_vessels.append((mid, tip, 3.5, 1.8))

        self.gallbladder = _Ellipsoid(
            (-42.0 * sx + _jit(rng), -46.0 * sy + _jit(rng), -22.0 + _jit(rng)),
            (14.0 * _u(rng, 0.85, 1.15), 17.0 * _u(rng, 0.85, 1.15), 30.0 * _u(rng, 0.85, 1.15)),
            _rotation(_u(rng, 10, 30), _u(rng, 10, 30), 0),
        )
        s = _u(rng, 0.85, 1.15)
        self.spleen = _Ellipsoid(
            (80.0 * sx + _jit(rng), 36.0 * sy + _jit(rng), 34.0 + _jit(rng)),
            (23.0 * s, 50.0 * s, 46.0 * s),
            _rotation(_u(rng, 25.0, 40.0), _u(rng, -10, 10), 0),
        )
        s = _u(rng, 0.87, 1.13)
        self.stomach = _Ellipsoid(
            (42.0 * sx + _jit(rng), -30.0 * sy + _jit(rng), 32.0 + _jit(rng)),
            (36.0 * s, 28.0 * s, 40.0 * s),
            _rotation(_u(rng, 15, 40), 0, _u(rng, -10, 10)),
        )
        self.pancreas = (
            np.array([-26.0 * sx, 2.0 * sy, -4.0]) + rng.normal(0.0, 4.0, 3),
            np.array([68.0 * sx, 24.0 * sy, 10.0]) + rng.normal(0.0, 4.0, 3),
            _u(rng, 10.0, 13.0),
            _u(rng, 6.0, 9.0),
        )
        self.kidneys = []
        for side, label, z0 in ((-1.0, LIVER_LABELS["right_kidney"], -36.0), (1.0, LIVER_LABELS["left_kidney"], -28.0)):
            s = _u(rng, 0.87, 1.13)
            self.kidneys.append((
                _Ellipsoid(
                    (side * 66.0 * sx + _jit(rng, 4.0, 8.0), t.vb_centre_v + 2.0 + _jit(rng, 3.0, 6.0), z0 + _jit(rng)),
                    (25.0 * s, 22.0 * s, 50.0 * s),
                    _rotation(side * _u(rng, 15.0, 30.0), 0.0, side * _u(rng, 5.0, 15.0)),
                ),
                side,
                label,
            ))
        self.heart = _Ellipsoid((15.0 * sx, -35.0 * sy, self.dome_l + 40.0), (65.0 * sx, 50.0 * sy, 55.0),
                                _rotation(_u(rng, -20, -5), 0, 0))
        self.bowel = _Waves(rng, 14, (35.0, 70.0))
        self.bowel_threshold = _u(rng, 0.0, 0.35)
        self.gas = _Waves(rng, 8, (25.0, 50.0))

    def diaphragm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (z, mm) of the diaphragm above each (x, y): two domes, right one higher."""
        right = self.dome_r - 30.0 * ((x + self.dome_u) / 90.0) ** 2 - 20.0 * ((y - 5.0) / 90.0) ** 2
        left = self.dome_l - 30.0 * ((x - self.dome_u) / 90.0) ** 2 - 20.0 * ((y - 5.0) / 90.0) ** 2
        return np.maximum(right, left)

    def render(self, cv: _Canvas) -> None:
        """Paint the whole abdomen onto ``cv``."""
        t = self.trunk
        big = 1e4
        everywhere = (np.array([-big] * 3), np.array([big] * 3))
        body_box = (np.array([-t.half_width, -t.half_depth, -big]), np.array([t.half_width, t.half_depth, big]))

        cv.paint(_T["fat"], t.body, *body_box)
        cv.paint(_T["muscle"], t.inside_fat, *body_box)
        cavity = cv.mask(t.cavity, *body_box)
        below = cv.mask(lambda x, y, z: z < self.diaphragm(x, y) - 4.0, *everywhere) & cavity
        above = cavity & cv.mask(lambda x, y, z: z >= self.diaphragm(x, y), *everywhere)

        # Peritoneal contents: visceral fat with bowel loops (a thresholded smooth random
        # field) and a few gas pockets inside the loops.
        cv.tissue[below] = _T["visceral_fat"]
        xs, ys, zs = cv.x[below], cv.y[below], cv.z[below]
        field = self.bowel(xs, ys, zs)
        loops = field > self.bowel_threshold
        gas = loops & (self.gas(xs, ys, zs) > 1.6) & (field > self.bowel_threshold + 0.5)
        codes = np.where(loops, _T["bowel"], _T["visceral_fat"]).astype(np.uint8)
        codes[gas] = _T["gas"]
        cv.tissue[below] = codes

        # Above the diaphragm: lung bases, heart and a mediastinal strip.
        cv.tissue[above] = _T["lung"]
        # Epicardial fat gives the heart a dark rim, as on real CT, so it does not merge
        # with the liver dome across the thin diaphragm.
        cv.paint(_T["visceral_fat"], lambda x, y, z: self.heart.inside(x, y, z, grow=5.0), *self.heart.bounds(5.0),
                 within=above)
        cv.paint(_T["heart"], self.heart.inside, *self.heart.bounds(), within=above)
        cv.paint(_T["visceral_fat"], lambda x, y, z: (np.abs(x) < 26.0) & (y > -10.0), *everywhere, within=above)
        cv.paint(_T["muscle"], lambda x, y, z: (z >= self.diaphragm(x, y) - 4.0) & (z < self.diaphragm(x, y)),
                 *everywhere, within=cavity)

        # Solid organs, lowest priority first.
        lobes = self.liver_lobes

        def liver(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            lvl = np.sqrt(lobes[0].level(x, y, z))
            for lobe in lobes[1:]:
                lvl = _smooth_min(lvl, np.sqrt(lobe.level(x, y, z)), 0.25)
            return lvl < 1.0

        lo = np.min([lb.bounds()[0] for lb in lobes], axis=0)
        hi = np.max([lb.bounds()[1] for lb in lobes], axis=0)
        cv.paint(_T["liver"], liver, lo, hi, label=LIVER_LABELS["liver"], within=below)
        for a, b, r0, r1 in self.liver_vessels:
            cv.paint(_T["liver_vessel"], lambda x, y, z, a=a, b=b, r0=r0, r1=r1: _capsule_inside(x, y, z, a, b, r0, r1),
                     *_capsule_bounds(a, b, r0), label=LIVER_LABELS["liver"], onto=(_T["liver"],))
        cv.paint(_T["gallbladder"], self.gallbladder.inside, *self.gallbladder.bounds(), within=below)

        st = self.stomach
        cv.paint(_T["stomach_wall"], st.inside, *st.bounds(), within=below)
        cv.paint(_T["stomach_content"], lambda x, y, z: st.level(x, y, z) < 0.8, *st.bounds(), within=below)
        cv.paint(_T["gas"], lambda x, y, z: (st.level(x, y, z) < 0.8) & (st.local(x, y, z)[1] < -0.45 * st.radii[1]),
                 *st.bounds(), within=below)
        a, b, r0, r1 = self.pancreas
        cv.paint(_T["pancreas"], lambda x, y, z: _capsule_inside(x, y, z, a, b, r0, r1), *_capsule_bounds(a, b, r0),
                 within=below)

        # Psoas muscles thicken downwards; kidneys (with their fat capsule) lie lateral to them.
        vb = t.vb_centre_v

        def psoas(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            r = np.clip(6.0 + 0.2 * (20.0 - z), 0.0, 26.0)
            cx = t.vb_radii[0] + 10.0 + 0.5 * r
            return ((np.abs(x) - cx) ** 2 + ((y - vb - 2.0) / 0.9) ** 2 < r * r) & (z < 20.0)

        cv.paint(_T["muscle"], psoas, (-90.0, vb - 40.0, -big), (90.0, vb + 40.0, 20.0), within=cavity)
        for kid, side, label in self.kidneys:
            cv.paint(_T["visceral_fat"], lambda x, y, z, k=kid: k.inside(x, y, z, grow=6.0), *kid.bounds(6.0),
                     within=cavity)
        for kid, side, label in self.kidneys:
            cv.paint(_T["kidney_cortex"], kid.inside, *kid.bounds(), label=label, within=cavity)
            cv.paint(_T["kidney_medulla"], lambda x, y, z, k=kid: k.level(x, y, z) < 0.55, *kid.bounds(), label=label,
                     within=cavity)

            def sinus(
                x: np.ndarray, y: np.ndarray, z: np.ndarray, k: _Ellipsoid = kid, side: float = side
            ) -> np.ndarray:
                lx, _, lz = k.local(x, y, z)
                # The hilum opens medially (towards the spine).
                return (k.level(x, y, z) < 0.6) & (-side * lx > 0.1 * k.radii[0]) & (np.abs(lz) < 0.45 * k.radii[2])

            cv.paint(_T["kidney_sinus"], sinus, *kid.bounds(), label=label, within=cavity)

        # The spleen comes after the kidneys so an upper renal pole never punches a hole in it.
        cv.paint(_T["spleen"], self.spleen.inside, *self.spleen.bounds(), label=LIVER_LABELS["spleen"], within=below)
        ix, iy, irx, iry = self.ivc
        cv.paint(_T["ivc"], lambda x, y, z: ((x - ix) / irx) ** 2 + ((y - iy) / iry) ** 2 < 1.0,
                 (ix - irx, iy - iry, -big), (ix + irx, iy + iry, big), within=cavity)
        ax, ay, ar = self.aorta
        cv.paint(_T["aorta"], lambda x, y, z: (x - ax) ** 2 + (y - ay) ** 2 < ar * ar,
                 (ax - ar, ay - ar, -big), (ax + ar, ay + ar, big), within=cavity)

        t.paint_spine(cv)
        # Lower ribs only: floating ribs reach lowest at the back and sides, the costal
        # margin rises towards the front.
        t.paint_ribs(cv, lowest=lambda th: -25.0 + 90.0 * th**2)
        # Keep everything inside the skin (the spine and ribs know nothing about it).
        outside = ~cv.mask(t.body, *body_box)
        cv.tissue[outside] = _T["air"]
        cv.label[outside] = 0


# --------------------------------------------------------------------------- chest model
class _ChestModel:
    """Seeded analytic chest with one central lung tumour."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.centre = np.array([_jit(rng, 4.0, 8.0), _u(rng, -5.0, 8.0), _jit(rng, 3.0, 6.0)])
        self.deform = _Deformation(rng)
        self.trunk = _Trunk.sample(rng, (140.0, 165.0), (95.0, 115.0), (6.0, 20.0), 0.50)
        t = self.trunk
        sx, sy = t.half_width / 152.0, t.half_depth / 105.0
        self.sx, self.sy = sx, sy
        vb = t.vb_centre_v
        self.mediastinum = _Ellipsoid((4.0 * sx, -22.0 * sy, 0.0), (30.0 * sx, 62.0 * sy, 1e4))
        self.heart = _Ellipsoid((18.0 * sx + _jit(rng), -32.0 * sy + _jit(rng), -72.0 + _jit(rng)),
                                (68.0 * sx, 52.0 * sy, 62.0), _rotation(_u(rng, -25, -10), 0, 0))
        self.dome = _u(rng, -95.0, -80.0)
        self.desc_aorta = (20.0 * sx, vb - t.vb_radii[1] - 4.0, _u(rng, 10.0, 13.0))
        self.asc_aorta = (8.0 * sx, -30.0 * sy, _u(rng, 13.0, 16.0))
        self.svc = (-24.0 * sx, -28.0 * sy, _u(rng, 8.0, 11.0))
        self.pa = (-2.0 * sx, -36.0 * sy, _u(rng, 12.0, 14.0))
        self.esophagus = (4.0, vb - t.vb_radii[1] - 12.0, 7.0)
        self.carina = np.array([0.0, -8.0 * sy, _u(rng, 15.0, 30.0)])
        self.hila = [np.array([side * 44.0 * sx, -4.0 * sy, self.carina[2] - 22.0]) for side in (-1.0, 1.0)]

        # Pulmonary vessel tree: a few roots per hilum, each branching in two a few times.
        self.vessels: list[tuple[np.ndarray, np.ndarray, float, float]] = []
        for side, hilum in zip((-1.0, 1.0), self.hila):
            for _ in range(8):
                d = np.array([side * 1.0, rng.normal(0.0, 0.7), rng.normal(0.0, 1.0)])
                self._branch(rng, hilum, d / np.linalg.norm(d), 5.0, 40.0, 0)

        # Tumour: lobulated sphere near one hilum, placed where it sits inside lung.
        self.tumour_radius = _u(rng, 12.0, 28.0)  # central carcinomas: 2.5-6 cm across
        self.tumour_lobes = [(_u(rng, 0.06, 0.14), rng.normal(size=3), _u(rng, 1.5, 3.0)) for _ in range(3)]
        side = 1.0 if rng.random() < 0.5 else -1.0
        hilum = self.hila[0 if side < 0 else 1]
        probe = rng.normal(size=(200, 3))
        probe /= np.linalg.norm(probe, axis=1, keepdims=True)
        self.tumour_centre = None
        for attempt in range(40):
            lateral = self.tumour_radius + _u(rng, 10.0, 25.0) + 3.0 * attempt
            c = hilum + np.array([side * lateral, _u(rng, -20.0, 20.0), _u(rng, -30.0, 30.0)])
            pts = c + probe * self.tumour_radius * 1.2
            if self.lung(pts[:, 0], pts[:, 1], pts[:, 2]).mean() >= 0.97:
                self.tumour_centre = c
                break
        if self.tumour_centre is None:  # cannot happen for sane parameters; keep the last guess
            self.tumour_centre = c

    def _branch(self, rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, radius: float,
                length: float, gen: int) -> None:
        end = start + direction * length * _u(rng, 0.7, 1.2)
        r_end = max(radius * 0.75, 1.3)
        self.vessels.append((start, end, radius, r_end))
        if gen >= 4:
            return
        for _ in range(2):
            d = direction + rng.normal(0.0, 0.55, 3)
            self._branch(rng, end, d / np.linalg.norm(d), r_end, length * 0.75, gen + 1)

    def lung(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Inside either lung (before vessels/tumour), for any array of points."""
        t = self.trunk
        vb = t.vb_centre_v
        m = t.cavity(x, y, z)
        m &= ~self.mediastinum.inside(x, y, z)
        m &= ~self.heart.inside(x, y, z, grow=5.0)  # leaves a rim of epicardial fat
        m &= ~self.below_dome(x, y, z)
        # The spine (with a rim of paravertebral tissue) and the oesophagus/azygos strip in
        # front of it bulge into the back of the chest.
        rx, ry = t.vb_radii[0] + 8.0, t.vb_radii[1] + 8.0
        m &= ~((x / rx) ** 2 + ((y - vb) / ry) ** 2 < 1.0)
        m &= ~((np.abs(x) < 14.0) & (y > vb - t.vb_radii[1] - 24.0))
        ax, ay, ar = self.desc_aorta
        m &= (x - ax) ** 2 + (y - ay) ** 2 > (ar + 2.0) ** 2
        return m

    def below_dome(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Under the diaphragm (the left dome sits 10 mm lower than the right)."""
        dome = self.dome - 30.0 * ((np.abs(x) - 55.0 * self.sx) / 90.0) ** 2 - 25.0 * ((y - 10.0) / 90.0) ** 2
        return z <= dome - 10.0 * (x > 0)

    def tumour(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        c = self.tumour_centre
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
        r = np.full(np.shape(x), self.tumour_radius, dtype=np.float32)
        for amp, n, freq in self.tumour_lobes:
            cos_angle = (dx * n[0] + dy * n[1] + dz * n[2]) / (dist * np.linalg.norm(n))
            r = r * (1.0 + amp * np.cos(freq * np.pi * cos_angle))
        return dist < r

    def render(self, cv: _Canvas) -> None:
        """Paint the chest onto ``cv``."""
        t = self.trunk
        big = 1e4
        everywhere = (np.array([-big] * 3), np.array([big] * 3))
        body_box = (np.array([-t.half_width, -t.half_depth, -big]), np.array([t.half_width, t.half_depth, big]))
        cv.paint(_T["fat"], t.body, *body_box)
        cv.paint(_T["muscle"], t.inside_fat, *body_box)
        cavity = cv.mask(t.cavity, *body_box)
        cv.tissue[cavity] = _T["visceral_fat"]  # mediastinal fat unless something else claims it

        # Upper abdomen under the domes (liver on the right, stomach/spleen on the left).
        cv.paint(_T["liver"], self.below_dome, *everywhere, within=cavity)
        cv.paint(_T["lung"], self.lung, *everywhere, within=cavity)
        cv.paint(_T["heart"], self.heart.inside, *self.heart.bounds(), within=cavity)

        def tube(params: tuple[float, float, float], z_range: tuple[float, float] = (-big, big)) -> None:
            px, py, pr = params
            cv.paint(_T["vessel"], lambda x, y, z: ((x - px) ** 2 + (y - py) ** 2 < pr * pr) & (z > z_range[0])
                     & (z < z_range[1]), (px - pr, py - pr, -big), (px + pr, py + pr, big), within=cavity)

        tube(self.asc_aorta, (-40.0, 30.0))
        tube(self.pa, (-30.0, self.carina[2] - 10.0))
        tube(self.svc, (-30.0, big))
        ax, ay, ar = self.desc_aorta
        cv.paint(_T["aorta"], lambda x, y, z: (x - ax) ** 2 + (y - ay) ** 2 < ar * ar, (ax - ar, ay - ar, -big),
                 (ax + ar, ay + ar, big), within=cavity)
        ex, ey, er = self.esophagus
        cv.paint(_T["muscle"], lambda x, y, z: (x - ex) ** 2 + (y - ey) ** 2 < er * er, (ex - er, ey - er, -big),
                 (ex + er, ey + er, big), within=cavity)

        # Airways: trachea above the carina, main bronchi to the hila.
        ca = self.carina
        cv.paint(_T["airway"], lambda x, y, z: (x - ca[0]) ** 2 + (y - ca[1]) ** 2 < 9.0**2,
                 (ca[0] - 9, ca[1] - 9, ca[2]), (ca[0] + 9, ca[1] + 9, big), within=cavity)
        for hilum in self.hila:
            cv.paint(_T["airway"], lambda x, y, z, h=hilum: _capsule_inside(x, y, z, ca, h, 6.5, 5.0),
                     *_capsule_bounds(ca, hilum, 6.5), within=cavity)

        lung_tissues = (_T["lung"], _T["lung_vessel"])
        for a, b, r0, r1 in self.vessels:
            cv.paint(_T["lung_vessel"], lambda x, y, z, a=a, b=b, r0=r0, r1=r1: _capsule_inside(x, y, z, a, b, r0, r1),
                     *_capsule_bounds(a, b, r0), onto=(_T["lung"],))
        r = self.tumour_radius * 1.5
        c = self.tumour_centre
        cv.paint(_T["tumour"], self.tumour, c - r, c + r, label=LUNG_LABELS["tumour"], onto=lung_tissues)

        t.paint_spine(cv)
        t.paint_ribs(cv, lowest=None, costal_from=0.85, sternum_from=0.95)
        sv = -t.half_depth + t.fat + 7.0
        cv.paint(_T["bone_cancellous"], lambda x, y, z: (x / 14.0) ** 2 + ((y - sv) / 6.0) ** 2 < 1.0,
                 (-14.0, sv - 6.0, -big), (14.0, sv + 6.0, big))
        outside = ~cv.mask(t.body, *body_box)
        cv.tissue[outside] = _T["air"]
        cv.label[outside] = 0


# --------------------------------------------------------------------------- intensities
def _lut(values: dict[str, float], default: float) -> np.ndarray:
    lut = np.full(len(_TISSUE_NAMES), default, dtype=np.float32)
    for name, v in values.items():
        lut[_T[name]] = v
    return lut


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Correlated Gaussian noise with unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return n / np.float32(max(float(n.std()), 1e-6))


def _ct_lut(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed mean HU and texture amplitude for each tissue (portal venous phase)."""
    liver = _u(rng, 100.0, 122.0)
    mean = _lut({
        "air": -1000.0, "fat": _u(rng, -110.0, -90.0), "visceral_fat": _u(rng, -100.0, -80.0),
        "muscle": _u(rng, 45.0, 58.0), "bowel": _u(rng, 25.0, 45.0), "gas": _u(rng, -900.0, -800.0),
        "stomach_wall": _u(rng, 55.0, 75.0), "stomach_content": _u(rng, 5.0, 25.0), "liver": liver,
        "liver_vessel": _u(rng, 170.0, 200.0), "gallbladder": _u(rng, 0.0, 15.0),
        "spleen": float(np.clip(liver + rng.normal(0.0, 6.0), 108.0, 128.0)),
        "kidney_cortex": _u(rng, 155.0, 185.0), "kidney_medulla": _u(rng, 95.0, 120.0),
        "kidney_sinus": _u(rng, -60.0, -20.0), "pancreas": _u(rng, 80.0, 100.0), "aorta": _u(rng, 180.0, 220.0),
        "ivc": _u(rng, 130.0, 160.0), "vessel": _u(rng, 160.0, 200.0), "heart": _u(rng, 90.0, 140.0),
        "bone_cortical": _u(rng, 600.0, 750.0), "bone_cancellous": _u(rng, 300.0, 400.0), "disc": _u(rng, 70.0, 95.0),
        "csf": _u(rng, 5.0, 15.0), "rib": _u(rng, 400.0, 550.0), "cartilage": _u(rng, 120.0, 200.0),
        "lung": _u(rng, -880.0, -840.0), "lung_vessel": _u(rng, 40.0, 120.0), "airway": -990.0,
        "tumour": _u(rng, 20.0, 50.0),
    }, 0.0)
    texture = _lut({
        "fat": 8.0, "visceral_fat": 12.0, "muscle": 6.0, "bowel": 14.0, "stomach_content": 8.0, "liver": 6.0,
        "spleen": 5.0, "kidney_cortex": 8.0, "bone_cancellous": 60.0, "bone_cortical": 50.0, "lung": 20.0,
        "tumour": 8.0, "heart": 10.0, "pancreas": 10.0,
    }, 3.0)
    return mean, texture


def _mr_lut(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """T2-SPIR-like relative intensities (fat suppressed, fluid bright, flow voids dark)."""
    def j(v: float) -> float:
        return v * _u(rng, 0.9, 1.1)

    mean = _lut({
        "air": 0.0, "fat": j(0.20), "visceral_fat": j(0.19), "muscle": j(0.14), "bowel": j(0.45), "gas": 0.01,
        "stomach_wall": j(0.25), "stomach_content": j(0.85), "liver": j(0.30), "liver_vessel": j(0.08),
        "gallbladder": j(0.95), "spleen": j(0.55), "kidney_cortex": j(0.58), "kidney_medulla": j(0.70),
        "kidney_sinus": j(0.20), "pancreas": j(0.36), "aorta": j(0.05), "ivc": j(0.10), "vessel": j(0.08),
        "heart": j(0.12), "bone_cortical": j(0.04), "bone_cancellous": j(0.16), "disc": j(0.50), "csf": j(0.90),
        "rib": j(0.08), "cartilage": j(0.20), "lung": 0.03, "lung_vessel": 0.05, "airway": 0.0, "tumour": j(0.5),
    }, 0.0)
    texture = _lut({"bowel": 0.08, "visceral_fat": 0.03, "liver": 0.02, "spleen": 0.03, "bone_cancellous": 0.03,
                    "stomach_content": 0.05}, 0.01)
    return mean, texture


def _render_ct(tissue: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """HU image: lookup + texture, partial-volume blur, in-plane correlated noise."""
    mean, texture = _ct_lut(rng)
    img = mean[tissue] + texture[tissue] * _smooth_noise(rng, tissue.shape, (0.5, 1.0, 1.0))
    # Blur by a millimetre-scale PSF (partial volume at edges); the thick slice already
    # averages along z.
    sig_xy = 1.2 / spacing[0]
    img = ndimage.gaussian_filter(img, (0.3, sig_xy, sig_xy))
    noise_sd = _u(rng, 10.0, 15.0)
    img += np.float32(noise_sd) * _smooth_noise(rng, tissue.shape, (0.0, 0.6, 0.6))
    return np.clip(img, -1024.0, 3071.0).astype(np.float32)


def _render_mr(tissue: np.ndarray, grid: Volume, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """T2-like image: lookup + texture, blur, smooth multiplicative bias field, Rician noise."""
    mean, texture = _mr_lut(rng)
    img = mean[tissue] + texture[tissue] * _smooth_noise(rng, tissue.shape, (0.5, 1.0, 1.0))
    img = ndimage.gaussian_filter(img, (0.3, 0.7, 0.7))
    # Receive-coil bias: a smooth quadratic in physical space, so it is tied to the patient,
    # not to the voxel grid.
    px, py, pz = _physical_coordinates(grid)
    nx, ny, nz = (px - centre[0]) / 200.0, (py - centre[1]) / 200.0, (pz - centre[2]) / 200.0
    c = rng.uniform(-0.25, 0.25, size=6).astype(np.float32)
    bias = np.exp(c[0] * nx + c[1] * ny + c[2] * nz + c[3] * nx * nx + c[4] * ny * ny + c[5] * nx * ny)
    img = img * bias
    sd = np.float32(_u(rng, 0.02, 0.035))
    n1 = rng.standard_normal(tissue.shape, dtype=np.float32)
    n2 = rng.standard_normal(tissue.shape, dtype=np.float32)
    return np.sqrt((img + sd * n1) ** 2 + (sd * n2) ** 2).astype(np.float32)


# --------------------------------------------------------------------------- grids
def _check_shape(ct_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in ct_shape)
    except (TypeError, ValueError):
        raise ConfigError(f"ct_shape: found {ct_shape!r}, expected three integers (slices, rows, columns)") from None
    if len(shape) != 3 or min(shape) < 4:
        raise ConfigError(f"ct_shape: found {ct_shape!r}, expected three integers >= 4 (slices, rows, columns)")
    return shape  # type: ignore[return-value]


def _ct_grid(shape: tuple[int, int, int], rng: np.random.Generator) -> Volume:
    """Axial CT grid centred on the origin, identity direction, square in-plane pixels."""
    k, j, i = shape
    fov = _CT_FOV_MM[0] * _u(rng, 0.97, 1.04)
    sp = fov / max(i, j)
    spacing = (sp, sp, _CT_FOV_MM[2] / k)
    return _make_grid(shape, spacing, np.zeros(3), np.eye(3))


def _mr_grid(ct: Volume, rng: np.random.Generator) -> Volume:
    """MR grid: coarser, thicker slices, its own field of view, shift and (often) orientation."""
    ct_sp = np.asarray(ct.spacing)
    ct_fov = ct_sp * np.asarray(ct.size_ijk)
    sp_xy = ct_sp[0] * _u(rng, 1.35, 1.6)
    sp_z = ct_sp[2] * _u(rng, 1.2, 1.6)
    fov_lr = ct_fov[0] * _u(rng, 1.02, 1.12)
    fov_ap = fov_lr * _u(rng, 0.85, 0.95)  # rectangular FOV, as on real abdominal MR
    fov_z = ct_fov[2] * _u(rng, 1.1, 1.25)
    shape = (max(4, round(fov_z / sp_z)), max(4, round(fov_ap / sp_xy)), max(4, round(fov_lr / sp_xy)))
    # Centre shift of at least 15 mm left-right so the grids never line up by accident.
    shift_x = _u(rng, 15.0, 32.0) * (1.0 if rng.random() < 0.5 else -1.0)
    centre = np.array([shift_x, _u(rng, -12.0, 12.0), _u(rng, -12.0, 12.0)])
    choice = int(rng.integers(0, 4))
    if choice == 0:
        direction = np.eye(3)
    elif choice == 1:  # stored RAS-first, as NIfTI converters often leave it
        direction = np.diag([-1.0, -1.0, 1.0])
    elif choice == 2:  # in-plane rotation
        direction = _rotation(_u(rng, 4.0, 12.0) * (1 if rng.random() < 0.5 else -1))
    else:  # slightly oblique axial, stored with a flipped row axis
        direction = _rotation(0.0, _u(rng, 3.0, 8.0)) @ np.diag([1.0, -1.0, -1.0])
    return _make_grid(shape, (sp_xy, sp_xy, sp_z), centre, direction)


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent generators for anatomy, CT grid/appearance and MR grid/appearance.

    Separate streams keep the CT identical whether or not the MR is made, and keep the
    anatomy identical whatever ``ct_shape`` is.
    """
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3)]


def _volume(array: np.ndarray, grid: Volume, **metadata: object) -> Volume:
    return Volume(array, grid.spacing, grid.origin, grid.direction.copy(), dict(metadata))


# --------------------------------------------------------------------------- public API
def make_abdominal_case(
    seed: int,
    case_id: str | None = None,
    *,
    ct_shape: tuple[int, int, int] = (40, 128, 128),
    with_mr: bool = True,
) -> PhantomCase:
    """A synthetic contrast-enhanced abdominal CT (and T2-like MR) with organ labels.

    Args:
        seed: any integer; the same seed always gives bit-identical arrays.
        case_id: identifier stored on the case; defaults to ``"phantom-liver-s<seed>"``.
        ct_shape: CT grid ``(slices, rows, columns)``. The field of view is fixed in
            millimetres (~375 x 375 x 200), so the shape only sets the sampling density.
        with_mr: also sample the same anatomy on an independent MR grid.

    Returns:
        A :class:`PhantomCase` with :data:`LIVER_LABELS` label maps.
    """
    shape = _check_shape(ct_shape)
    case_id = case_id or f"phantom-liver-s{seed}"
    rng_anat, rng_ct, rng_mr = _streams(seed)
    model = _AbdomenModel(rng_anat)

    grid = _ct_grid(shape, rng_ct)
    cv = _Canvas(grid, model.centre, model.deform)
    model.render(cv)
    common = {"source": "phantom", "phantom": "abdomen", "case_id": case_id, "seed": int(seed), "spacing_known": True}
    ct = _volume(_render_ct(cv.tissue, grid.spacing, rng_ct), grid, modality="CT", units="HU", **common)
    ct_label = _volume(cv.label, grid, modality="CT", kind="label", labels=dict(LIVER_LABELS), **common)
    ct_tissue = _volume(cv.tissue, grid, modality="CT", kind="tissue", tissues=dict(TISSUES), **common)

    mr = mr_label = mr_tissue = None
    if with_mr:
        mgrid = _mr_grid(grid, rng_mr)
        mcv = _Canvas(mgrid, model.centre, model.deform)
        model.render(mcv)
        mr_img = _render_mr(mcv.tissue, mgrid, model.centre, rng_mr)
        mr = _volume(mr_img, mgrid, modality="MR", sequence="T2-SPIR-like", units="arbitrary", **common)
        mr_label = _volume(mcv.label, mgrid, modality="MR", kind="label", labels=dict(LIVER_LABELS), **common)
        mr_tissue = _volume(mcv.tissue, mgrid, modality="MR", kind="tissue", tissues=dict(TISSUES), **common)
    return PhantomCase(case_id, ct, mr, ct_label, mr_label, ct_tissue, mr_tissue)


def make_chest_case(
    seed: int,
    case_id: str | None = None,
    *,
    ct_shape: tuple[int, int, int] = (40, 128, 128),
) -> PhantomCase:
    """A synthetic contrast-enhanced chest CT with one central lung tumour (label 1).

    Args:
        seed: any integer; the same seed always gives bit-identical arrays.
        case_id: identifier stored on the case; defaults to ``"phantom-lung-s<seed>"``.
        ct_shape: CT grid ``(slices, rows, columns)`` over a fixed ~375 x 375 x 200 mm field of view.

    Returns:
        A :class:`PhantomCase` with ``mr`` and ``mr_label`` set to ``None`` and
        :data:`LUNG_LABELS` on the CT grid.
    """
    shape = _check_shape(ct_shape)
    case_id = case_id or f"phantom-lung-s{seed}"
    rng_anat, rng_ct, _ = _streams(seed)
    model = _ChestModel(rng_anat)
    grid = _ct_grid(shape, rng_ct)
    cv = _Canvas(grid, model.centre, model.deform)
    model.render(cv)
    common = {"source": "phantom", "phantom": "chest", "case_id": case_id, "seed": int(seed), "spacing_known": True}
    ct = _volume(_render_ct(cv.tissue, grid.spacing, rng_ct), grid, modality="CT", units="HU", **common)
    ct_label = _volume(cv.label, grid, modality="CT", kind="label", labels=dict(LUNG_LABELS), **common)
    ct_tissue = _volume(cv.tissue, grid, modality="CT", kind="tissue", tissues=dict(TISSUES), **common)
    return PhantomCase(case_id, ct, None, ct_label, None, ct_tissue, None)


_KINDS: dict[str, Callable[..., PhantomCase]] = {
    "phantom-liver": make_abdominal_case,
    "phantom-lung": make_chest_case,
}


def make_dataset(kind: str, n_cases: int, seed: int = 0, **kwargs: object) -> list[PhantomCase]:
    """A list of phantom cases with ids ``"<kind>-000"``, ``"<kind>-001"``, ...

    Case ``n`` is seeded from ``(seed, n)`` only, so growing ``n_cases`` keeps the earlier
    cases unchanged.

    Args:
        kind: ``"phantom-liver"`` (abdominal CT + MR) or ``"phantom-lung"`` (chest CT).
        n_cases: number of cases (>= 0).
        seed: dataset seed.
        **kwargs: passed to :func:`make_abdominal_case` / :func:`make_chest_case`
            (e.g. ``ct_shape``, ``with_mr``).
    """
    if kind not in _KINDS:
        raise ConfigError(f"phantom kind: found {kind!r}, expected one of {sorted(_KINDS)}")
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 0:
        raise ConfigError(f"n_cases: found {n_cases!r}, expected an integer >= 0")
    make = _KINDS[kind]
    cases = []
    for index in range(int(n_cases)):
        case_seed = int(np.random.SeedSequence([int(seed), index]).generate_state(1)[0])
        cases.append(make(case_seed, f"{kind}-{index:03d}", **kwargs))
    return cases


def write_datasets(out: str | Path, kind: str, n_cases: int, seed: int = 0) -> dict[str, Path]:
    """Write ``make_dataset(kind, n_cases, seed)`` as one dataset folder per modality,
    ``out/CT`` (and ``out/MR`` for the abdomen): ``image_<case>.nrrd`` with
    ``label_<case>.nrrd`` and a ``dataset.json`` (nnU-Net's keys) naming the modality and
    the labels, the layout :func:`~VQMedSegLib.data.datasets.discover_cases` reads as
    ``pairs``. Returns the folders by modality; each file is written whole or not at all.

    A folder this function wrote before (for the same ``kind``) is written again, its
    earlier cases removed; any other folder that is not empty is refused before anything
    is written."""
    from .. import __version__
    from ..files import atomic_write_json
    from .io import write_volume

    cases = make_dataset(kind, n_cases, seed=seed)
    labels = LIVER_LABELS if kind == "phantom-liver" else LUNG_LABELS
    sets = {"CT": [(c.case_id, c.ct, c.ct_label) for c in cases]}
    if all(c.mr is not None for c in cases):  # the chest phantom has no MR
        sets["MR"] = [(c.case_id, c.mr, c.mr_label) for c in cases]
    folders = {modality: Path(out) / modality for modality in sets}
    earlier = {modality: _earlier_phantom_files(folder, kind) for modality, folder in folders.items()}  # refuses first
    for modality, pairs in sets.items():
        folder = folders[modality]
        for stale in earlier[modality]:
            stale.unlink()
        for case_id, image, label in pairs:
            write_volume(image, folder / f"image_{case_id}.nrrd")
            write_volume(label, folder / f"label_{case_id}.nrrd")
        atomic_write_json(folder / "dataset.json", {
            "name": f"{kind} ({modality})",
            "description": f"synthetic {kind} phantoms, made by vqmedseg {__version__}",
            "channel_names": {"0": modality},
            "labels": {"background": 0, **labels},
            "numTraining": len(pairs),
            "file_ending": ".nrrd",
            PHANTOM_MARKER: {"kind": kind, "n": n_cases, "seed": seed},
        })
    return folders


# the key of a dataset.json that write_datasets wrote
PHANTOM_MARKER = "vqmedseg_phantom"


def _earlier_phantom_files(folder: Path, kind: str) -> list[Path]:
    """The case files of an earlier ``write_datasets`` of ``kind`` in ``folder``, to be
    replaced; an error for a folder that holds anything else."""
    from ..files import read_json

    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file; expected a folder for the {folder.name} dataset, or nothing there")
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return []
    try:
        marker = read_json(folder / "dataset.json").get(PHANTOM_MARKER)
    except (InputError, AttributeError):
        marker = None
    ours = re.compile(rf"(image|label)_{re.escape(marker['kind'])}-\d{{3}}\.nrrd") if isinstance(marker, dict) and \
        isinstance(marker.get("kind"), str) else None
    others = [p.name for p in entries if ours is None or not (p.name == "dataset.json" or ours.fullmatch(p.name))]
    if others:
        raise InputError(f"{folder}: holds {listed(others)}, which vqmedseg phantom did not write; expected a new or empty "
                         "folder")
    if marker["kind"] != kind:
        raise InputError(f"{folder}: holds a {marker['kind']} dataset; expected a new or empty folder, or one of {kind} "
                         "to write again; give another --out")
    return [p for p in entries if p.name != "dataset.json"]
