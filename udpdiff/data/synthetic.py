"""Procedural synthetic clips with exact entity ids, exact depth and honest captions.

Each clip shows 2-5 shaded entities (sphere, disc, box, triangle, ring) moving in front of a
perspective ground plane under a sky, optionally with a camera pan/tilt. Everything is rendered
with one z-buffer per frame, so the RGB frames, the entity ids and the depth come from the same
visibility decision and agree exactly (no annotator noise): nearer entities occlude farther ones.

Geometry and depth scale
------------------------
* Pinhole camera with focal length ``FOCAL_FRAC * width`` pixels. Entities carry a metric depth
  ``z`` (their centre), a metric radius, an image-space velocity (pixels/frame) and optionally a
  depth velocity (they grow as they approach). Spheres and rings have depth relief (a spherical
  cap / a torus tube); discs, boxes and triangles are flat and face the camera.
* The ground is a plane seen from above: its disparity is exactly linear in the image row below
  the horizon (a "slanted ground-plane ramp"); the sky is at infinity (disparity 0).
* Depth is observable from the pixels, as in real footage: every entity has about the same metric
  size (:data:`ENTITY_RADIUS`, ±8 %), so its image size says how far it is, and the camera height is
  the same in every clip, so the ground's disparity follows from the horizon row. (Before, sizes and
  the ground's slope were drawn independently of depth: a model could only guess each entity's depth,
  and a diffusion model samples a guess; the ``small`` attempt-8 write-up measures this.)
* Depth is stored as normalised disparity ``(1/z - 1/Z_FAR) / (1/Z_NEAR - 1/Z_FAR)`` with the
  scene-wide constants :data:`Z_NEAR`, :data:`Z_FAR`: **not** normalised per clip, so one value
  means the same distance in every clip (1 = at ``Z_NEAR``, 0 = at or beyond ``Z_FAR``).
  Entities are placed nearer than any ground point, so they always stand out against it.
* Camera motion is a uniform image shift (a small pan/tilt rotation moves all content alike).

Captions are generated from the scene parameters: colour names are the nearest palette name of
the actual RGB colour, motion directions come from the velocity vector, "in front of / behind"
from pixels where one entity actually occluded another, and "closest to the camera" from depth.

``motion_score`` is the mean magnitude, over all pixels and frame transitions, of the exact
ground-truth translational flow (entity image velocity on entity pixels, camera motion on
background pixels), in pixels per frame. Rotation and looming are not included.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from udpdiff.io.dense import save_depth, save_ids
from udpdiff.io.manifest import MANIFEST_NAME, aesthetic_proxy, assign_splits, write_manifest
from udpdiff.io.video import write_video
from udpdiff.workers import map_clips

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# scene-wide constants (shared by every clip so depth values are comparable across clips)
# ----------------------------------------------------------------------------------------------

Z_NEAR = 1.0  #: metric depth mapped to disparity 1
Z_FAR = 20.0  #: metric depth mapped to disparity 0 (and the sky)
FOCAL_FRAC = 1.0  #: focal length in units of the frame width (about 53 degrees horizontal FOV)
ENTITY_Z_RANGE = (1.4, 4.0)  #: metric depth range of entity centres
#: Metric radius of every entity (jittered by ENTITY_SIZE_JITTER): like objects of one kind in a real
#: scene, their image size says how far they are (image radius ``FOCAL_FRAC * width * radius / z``).
ENTITY_RADIUS = 0.32
ENTITY_SIZE_JITTER = 0.08
#: Ground disparity gained per frame height below the horizon: one camera height in every clip, so the
#: ground's disparity follows from where its horizon is (0.064-0.10 at the bottom row, behind entities).
GROUND_DISPARITY_PER_HEIGHT = 0.13

SHAPES = ("sphere", "disc", "box", "triangle", "ring")

#: Named entity / ground colours (RGB). Jitter is small enough that the nearest name never changes.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "orange": (240, 130, 20),
    "yellow": (235, 210, 40),
    "green": (40, 160, 50),
    "teal": (20, 140, 140),
    "blue": (30, 70, 200),
    "purple": (120, 50, 170),
    "pink": (240, 120, 180),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "brown": (120, 75, 35),
}
COLOUR_JITTER = 15.0

#: Sky name -> (colour at the top of the frame, colour at the horizon).
SKIES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "pale blue": ((105, 155, 225), (205, 222, 245)),
    "gray": ((115, 120, 130), (190, 192, 198)),
    "orange sunset": ((80, 60, 130), (245, 165, 85)),
    "dark night": ((8, 12, 35), (45, 55, 95)),
}
GROUND_PATTERNS = ("checkered", "striped", "mottled", "plain")
#: the :data:`PALETTE` names a ground is drawn in (entities take the others)
GROUND_COLOURS = ("green", "teal", "brown", "gray", "yellow", "orange", "purple")

_VERBS = {
    "sphere": "rolls",
    "disc": "slides",
    "box": "slides",
    "triangle": "drifts",
    "ring": "floats",
}
_DIRECTIONS = (
    "right",
    "up and to the right",
    "upward",
    "up and to the left",
    "left",
    "down and to the left",
    "downward",
    "down and to the right",
)
_STILL = ("stays still", "rests in place", "hovers in place")


def disparity_from_z(z: np.ndarray | float) -> np.ndarray:
    """Metric depth -> normalised disparity in [0, 1] with the fixed scene-wide scale."""
    d = (1.0 / np.asarray(z, dtype=np.float64) - 1.0 / Z_FAR) / (1.0 / Z_NEAR - 1.0 / Z_FAR)
    return np.clip(d, 0.0, 1.0)


def exact_depth_range(source: str) -> tuple[float, float] | None:
    """The metric depth that normalised disparity 1 and 0 stand for in ``source``'s clips: exact and
    scene-wide for the synthetic clips (``(Z_NEAR, Z_FAR)``); ``None`` for annotated video, whose
    disparity is relative per clip. Depth-space scores (``depth_space_metrics``) need it."""
    return (Z_NEAR, Z_FAR) if source == "synthetic" else None


def z_from_disparity(d: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`disparity_from_z` (disparity 0 -> ``Z_FAR``)."""
    d = np.asarray(d, dtype=np.float64)
    return 1.0 / (d * (1.0 / Z_NEAR - 1.0 / Z_FAR) + 1.0 / Z_FAR)


def colour_name(rgb: tuple[float, float, float] | np.ndarray) -> str:
    """Nearest :data:`PALETTE` name of an RGB colour (used for honest captions)."""
    c = np.asarray(rgb, dtype=np.float64)
    names = list(PALETTE)
    dist = [float(np.sum((c - np.asarray(PALETTE[n])) ** 2)) for n in names]
    return names[int(np.argmin(dist))]


# ----------------------------------------------------------------------------------------------
# scene description
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntitySpec:
    """One entity. Positions are in pixels of the (uncropped) scene at frame 0; the camera shift
    is subtracted at render time. ``z0`` is the metric depth of the centre at frame 0 and ``vz``
    its change per frame; ``radius`` is metric, so the image radius is ``f * radius / z``."""

    id: int
    shape: str
    colour: tuple[float, float, float]
    colour_name: str
    texture: str  # "plain" | "striped"
    x0: float
    y0: float
    vx: float
    vy: float
    z0: float
    vz: float
    radius: float
    aspect: float  # box: half-height / half-width
    inner: float  # ring: inner radius / outer radius
    theta0: float
    omega: float  # radians per frame (boxes and triangles may spin)
    stripe_period: float  # in units of the image radius
    stripe_angle: float

    def z_at(self, t: int) -> float:
        return self.z0 + self.vz * t

    @property
    def relief(self) -> float:
        """Metric depth relief of the surface in front of the centre (0 for flat shapes)."""
        if self.shape == "sphere":
            return self.radius
        if self.shape == "ring":
            return self.radius * (1.0 - self.inner) / 2.0
        return 0.0

    def disparity_bounds(self, num_frames: int) -> tuple[float, float]:
        """Range of disparity values this entity's visible surface can take over the clip."""
        zs = [self.z_at(0), self.z_at(num_frames - 1)]
        z_far, z_near = max(zs), min(zs) - self.relief
        return float(disparity_from_z(z_far)), float(disparity_from_z(z_near))


@dataclass(frozen=True)
class BackgroundSpec:
    sky: str
    sky_top: tuple[float, float, float]
    sky_horizon: tuple[float, float, float]
    ground_colour: tuple[float, float, float]
    ground_name: str
    pattern: str
    tile: float  # metres
    horizon0: float  # horizon row at frame 0
    disparity_per_row: float  # ground disparity gained per row below the horizon
    noise: tuple[tuple[float, float, float], ...] = ()  # (fx, fz, phase) for "mottled"


@dataclass(frozen=True)
class Scene:
    entities: tuple[EntitySpec, ...]
    background: BackgroundSpec
    pan: tuple[float, float]  # camera motion in pixels/frame (x right, y down)
    light: tuple[float, float, float]  # unit vector from the surface toward the light
    num_frames: int
    height: int
    width: int

    def camera(self, t: int) -> tuple[float, float]:
        return self.pan[0] * t, self.pan[1] * t


@dataclass
class SyntheticClip:
    """A rendered clip. Arrays follow CONVENTIONS.md; ``scene`` is the exact generating scene."""

    clip_id: str
    frames: np.ndarray  # uint8 (T, H, W, 3)
    ids: np.ndarray  # int32 (T, H, W)
    depth: np.ndarray  # float32 (T, H, W), normalised disparity
    caption_long: str
    caption_short: str
    num_entities: int
    motion_score: float
    scene: Scene = field(repr=False)


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


def _jittered(rng: np.random.Generator, name: str) -> tuple[float, float, float]:
    base = np.asarray(PALETTE[name], dtype=np.float64)
    c = np.clip(base + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


def _sample_background(rng: np.random.Generator, h: int) -> BackgroundSpec:
    sky = str(rng.choice(list(SKIES)))
    top, hor = SKIES[sky]
    ground_name = str(rng.choice(list(GROUND_COLOURS)))
    pattern = str(rng.choice(GROUND_PATTERNS, p=[0.35, 0.25, 0.25, 0.15]))
    horizon0 = float(rng.uniform(0.22, 0.5) * h)
    noise = tuple(
        (
            float(rng.uniform(0.3, 1.2)),
            float(rng.uniform(0.3, 1.2)),
            float(rng.uniform(0, 2 * np.pi)),
        )
        for _ in range(3)
    )
    return BackgroundSpec(
        sky=sky,
        sky_top=tuple(float(v) for v in top),  # type: ignore[arg-type]
        sky_horizon=tuple(float(v) for v in hor),  # type: ignore[arg-type]
        ground_colour=_jittered(rng, ground_name),
        ground_name=ground_name,
        pattern=pattern,
        tile=float(rng.uniform(0.8, 1.6)),
        horizon0=horizon0,
        disparity_per_row=GROUND_DISPARITY_PER_HEIGHT / h,
        noise=noise,
    )


def _sample_scene(rng: np.random.Generator, num_frames: int, h: int, w: int) -> Scene:
    t_last = max(num_frames - 1, 1)
    scale = w / 64.0
    bg = _sample_background(rng, h)

    pan_x = pan_y = 0.0
    if rng.random() < 0.45:
        speed = min(rng.uniform(0.4, 1.5) * scale, 0.25 * w / t_last)
        pan_x = float(speed * rng.choice([-1.0, 1.0]))
    if rng.random() < 0.12:
        speed = min(rng.uniform(0.2, 0.6) * (h / 64.0), 0.12 * h / t_last)
        pan_y = float(speed * rng.choice([-1.0, 1.0]))

    # light from the upper half, in front of the scene (negative z points at the camera)
    light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.9, -0.2), -1.0])
    light /= np.linalg.norm(light)

    n = int(rng.integers(2, 6))
    names = [c for c in PALETTE if c != bg.ground_name]
    colours = rng.choice(names, size=n, replace=False)
    t_mid = (num_frames - 1) / 2.0
    entities = []
    for k in range(n):
        shape = str(rng.choice(SHAPES))
        z0 = float(np.exp(rng.uniform(np.log(ENTITY_Z_RANGE[0]), np.log(ENTITY_Z_RANGE[1]))))
        vz = 0.0
        if rng.random() < 0.25 and num_frames > 1:
            z1 = float(np.clip(z0 * rng.choice([0.65, 1.5]), *ENTITY_Z_RANGE))
            if abs(z1 - z0) > 0.25 * z0:
                vz = (z1 - z0) / (num_frames - 1)
        radius = ENTITY_RADIUS * float(rng.uniform(1.0 - ENTITY_SIZE_JITTER, 1.0 + ENTITY_SIZE_JITTER))

        if rng.random() < 0.15:
            vx = vy = 0.0
        else:
            speed = min(rng.uniform(0.5, 2.2) * scale, 0.4 * w / t_last)
            angle = rng.integers(0, 8) * (np.pi / 4) + rng.uniform(-0.2, 0.2)
            vx, vy = float(speed * np.cos(angle)), float(-speed * np.sin(angle))  # y points down

        # Centre the image-space trajectory in the frame so the entity stays visible throughout.
        mx, my = rng.uniform(0.22, 0.78) * w, rng.uniform(0.22, 0.78) * h
        ux, uy = vx - pan_x, vy - pan_y
        spin = shape in ("box", "triangle") and rng.random() < 0.35
        entities.append(
            EntitySpec(
                id=k + 1,
                shape=shape,
                colour=_jittered(rng, str(colours[k])),
                colour_name="",  # filled below from the actual colour
                texture="striped"
                if shape in ("disc", "box", "triangle") and rng.random() < 0.3
                else "plain",
                x0=float(mx - ux * t_mid),
                y0=float(my - uy * t_mid),
                vx=vx,
                vy=vy,
                z0=z0,
                vz=float(vz),
                radius=float(radius),
                aspect=float(rng.uniform(0.55, 1.0)),
                inner=float(rng.uniform(0.45, 0.62)),
                theta0=float(rng.uniform(0, 2 * np.pi)),
                omega=float(rng.uniform(0.05, 0.18) * rng.choice([-1, 1])) if spin else 0.0,
                stripe_period=float(rng.uniform(0.35, 0.6)),
                stripe_angle=float(rng.uniform(0, np.pi)),
            )
        )
    entities = [
        EntitySpec(**{**e.__dict__, "colour_name": colour_name(e.colour)}) for e in entities
    ]
    return Scene(
        entities=tuple(entities),
        background=bg,
        pan=(pan_x, pan_y),
        light=(float(light[0]), float(light[1]), float(light[2])),
        num_frames=num_frames,
        height=h,
        width=w,
    )


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def background_layer(scene: Scene, t: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB ``float (H, W, 3)`` and disparity ``float64 (H, W)`` of sky + ground at frame ``t``."""
    bg = scene.background
    h, w = scene.height, scene.width
    cam_x, cam_y = scene.camera(t)
    ys = np.arange(h, dtype=np.float64)[:, None]
    xs = np.arange(w, dtype=np.float64)[None, :]
    horizon = bg.horizon0 - cam_y
    rows_below = ys - horizon  # (H, 1)
    disparity = np.broadcast_to(np.clip(rows_below * bg.disparity_per_row, 0.0, 1.0), (h, w))

    top, hor = np.asarray(bg.sky_top), np.asarray(bg.sky_horizon)
    wsky = np.clip(ys / max(horizon, 1.0), 0.0, 1.0)[..., None]  # (H, 1, 1)
    sky = np.broadcast_to(top * (1 - wsky) + hor * wsky, (h, w, 3))

    # Ground texture in metric ground-plane coordinates (X across, Z away): a perspective pattern
    # that recedes toward the horizon, itself a depth cue.
    d = np.maximum(disparity, 1e-4)
    zg = z_from_disparity(d)
    focal = FOCAL_FRAC * w
    gx = (xs + cam_x - w / 2.0) * zg / focal
    s = bg.tile
    base = np.asarray(bg.ground_colour)
    if bg.pattern == "checkered":
        mod = np.where((np.floor(gx / s) + np.floor(zg / s)) % 2 == 0, 1.18, 0.82)
    elif bg.pattern == "striped":
        mod = np.where(np.floor(gx / s) % 2 == 0, 1.2, 0.8)
    elif bg.pattern == "mottled":
        noise = sum(np.sin(fx * gx * 2 + fz * zg * 2 + ph) for fx, fz, ph in bg.noise)
        mod = 1.0 + 0.1 * noise
    else:
        mod = np.ones_like(gx)
    ground = np.clip(base * mod[..., None], 0, 255)
    # Haze toward the horizon colour where the ground is far: hides aliasing of the pattern.
    d_max = bg.disparity_per_row * (scene.height - 1 - bg.horizon0)
    vis = np.clip(disparity / (0.45 * d_max), 0.0, 1.0)[..., None]
    ground = hor * (1 - vis) + ground * vis
    rgb = np.where((rows_below > 0)[..., None], ground, sky)
    return rgb, np.array(disparity)


def _entity_state(e: EntitySpec, scene: Scene, t: int) -> tuple[float, float, float, float, float]:
    cam_x, cam_y = scene.camera(t)
    z = e.z_at(t)
    r = FOCAL_FRAC * scene.width * e.radius / z
    return e.x0 + e.vx * t - cam_x, e.y0 + e.vy * t - cam_y, z, r, e.theta0 + e.omega * t


def _entity_patch(
    e: EntitySpec, scene: Scene, t: int
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
    """Mask, metric depth and colour of entity ``e`` inside its bounding box at frame ``t``."""
    h, w = scene.height, scene.width
    cx, cy, zc, r, theta = _entity_state(e, scene, t)
    ext = r * (1.45 if e.shape == "box" else 1.02) + 1.0
    x0, x1 = max(0, int(np.floor(cx - ext))), min(w, int(np.ceil(cx + ext)) + 1)
    y0, y1 = max(0, int(np.floor(cy - ext))), min(h, int(np.ceil(cy + ext)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
    dx, dy = np.broadcast_arrays(dx, dy)
    ct, st = np.cos(theta), np.sin(theta)
    u, v = ct * dx + st * dy, -st * dx + ct * dy
    rho2 = (dx**2 + dy**2) / (r * r)
    base = np.asarray(e.colour)
    light = np.asarray(scene.light)
    half = light + np.array([0.0, 0.0, -1.0])
    half /= np.linalg.norm(half)

    z = np.full(rho2.shape, zc)
    if e.shape in ("sphere", "disc"):
        mask = rho2 <= 1.0
        if e.shape == "sphere":
            nz = -np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))
            z = zc - e.radius * (-nz)
            normal = np.stack([dx / r, dy / r, nz], axis=-1)
            diffuse = np.clip(normal @ light, 0.0, 1.0)
            spec = np.clip(normal @ half, 0.0, 1.0) ** 32
            col = base * (0.28 + 0.72 * diffuse)[..., None] + 110.0 * spec[..., None]
        else:
            col = base * (0.8 + 0.2 * (1.0 - rho2))[..., None]
    elif e.shape == "ring":
        rho = np.sqrt(rho2)
        mask = (rho <= 1.0) & (rho >= e.inner)
        half_w = (1.0 - e.inner) / 2.0
        tube = np.clip((rho - (e.inner + half_w)) / half_w, -1.0, 1.0)
        nz = -np.sqrt(1.0 - tube**2)
        z = zc - e.relief * (-nz)
        safe = np.maximum(rho, 1e-9)
        normal = np.stack([tube * dx / (r * safe), tube * dy / (r * safe), nz], axis=-1)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        diffuse = np.clip(normal @ light, 0.0, 1.0)
        col = base * (0.3 + 0.7 * diffuse)[..., None]
    elif e.shape == "box":
        a, b = r, r * e.aspect
        mask = (np.abs(u) <= a) & (np.abs(v) <= b)
        # bevelled block: a darker rim and a top-to-bottom gradient
        rim = (np.abs(u) > 0.84 * a) | (np.abs(v) > b - 0.16 * a)
        grad = 1.0 - 0.25 * (v / b + 1.0) / 2.0
        col = base * (grad * np.where(rim, 0.72, 1.0))[..., None]
    else:  # triangle (equilateral, circumradius r)
        mask = np.ones(rho2.shape, dtype=bool)
        for ang in (np.pi / 2, 7 * np.pi / 6, 11 * np.pi / 6):
            mask &= (u * np.cos(ang) + v * np.sin(ang)) <= r / 2.0
        col = base * (1.0 - 0.25 * (v / r + 1.0) / 2.0)[..., None]
    if e.texture == "striped":
        phase = (u * np.cos(e.stripe_angle) + v * np.sin(e.stripe_angle)) / (e.stripe_period * r)
        col = col * np.where(np.sin(2 * np.pi * phase) > 0, 1.0, 0.55)[..., None]
    return (slice(y0, y1), slice(x0, x1)), mask, z, col


def entity_layer(e: EntitySpec, scene: Scene, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-frame ``(mask bool (H, W), metric z (H, W))`` of one entity, ignoring occlusion;
    ``z`` is ``inf`` outside the mask. Exposed for tests and debugging."""
    mask = np.zeros((scene.height, scene.width), dtype=bool)
    z = np.full((scene.height, scene.width), np.inf)
    patch = _entity_patch(e, scene, t)
    if patch is not None:
        sl, m, zz, _ = patch
        mask[sl] = m
        z[sl] = np.where(m, zz, np.inf)
    return mask, z


def _render(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[tuple[int, int], int]]:
    t_n, h, w = scene.num_frames, scene.height, scene.width
    frames = np.empty((t_n, h, w, 3), dtype=np.uint8)
    ids = np.zeros((t_n, h, w), dtype=np.int32)
    depth = np.empty((t_n, h, w), dtype=np.float32)
    occlusions: dict[tuple[int, int], int] = defaultdict(int)  # (front, back) -> pixel count
    for t in range(t_n):
        rgb, disp = background_layer(scene, t)
        rgb = np.array(rgb, dtype=np.float64)
        zbuf = z_from_disparity(disp)
        idbuf = ids[t]
        for e in scene.entities:
            patch = _entity_patch(e, scene, t)
            if patch is None:
                continue
            sl, mask, z, col = patch
            zb, ib, cb = zbuf[sl], idbuf[sl], rgb[sl]
            nearer = mask & (z < zb)  # strict: ties keep the earlier (lower id) entity
            overlap = mask & (ib > 0)
            if overlap.any():
                for other in np.unique(ib[overlap]).tolist():
                    m = overlap & (ib == other)
                    occlusions[(e.id, other)] += int(np.count_nonzero(m & nearer))
                    occlusions[(other, e.id)] += int(np.count_nonzero(m & ~nearer))
            zb[nearer] = z[nearer]
            ib[nearer] = e.id
            cb[nearer] = col[nearer]
        frames[t] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        depth[t] = disparity_from_z(zbuf).astype(np.float32)
    return frames, ids, depth, dict(occlusions)


def _motion_score(scene: Scene, ids: np.ndarray) -> float:
    if scene.num_frames < 2:
        return 0.0
    pan_speed = math.hypot(*scene.pan)
    speeds = np.zeros(len(scene.entities) + 1)
    speeds[0] = pan_speed  # background moves with the camera
    for e in scene.entities:
        speeds[e.id] = math.hypot(e.vx - scene.pan[0], e.vy - scene.pan[1])
    # flow from frame t to t+1 is defined on frame t's pixels
    return float(speeds[ids[:-1]].mean())


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(e: EntitySpec, with_texture: bool = True) -> str:
    words = ([e.texture] if with_texture and e.texture != "plain" else []) + [
        e.colour_name,
        e.shape,
    ]
    return " ".join(words)


def _indef(e: EntitySpec, with_texture: bool = True) -> str:
    noun = _noun(e, with_texture)
    return f"{_article(noun)} {noun}"


def _motion_phrase(e: EntitySpec, scene: Scene, rng: np.random.Generator) -> str:
    scale = scene.width / 64.0
    speed = math.hypot(e.vx, e.vy)
    parts: list[str] = []
    if speed > 1e-9:
        angle = math.atan2(-e.vy, e.vx)  # image y points down
        direction = _DIRECTIONS[int(round(angle / (math.pi / 4))) % 8]
        adverb = "slowly " if speed < 0.8 * scale else "quickly " if speed > 1.8 * scale else ""
        parts.append(f"{_VERBS[e.shape]} {adverb}{direction}")
    if e.vz < 0:
        parts.append("toward the camera" if parts else "moves toward the camera")
    elif e.vz > 0:
        parts.append("away from the camera" if parts else "moves away from the camera")
    if not parts:
        parts.append(str(rng.choice(_STILL)))
    phrase = " ".join(parts)
    if e.omega != 0.0:
        phrase += ", spinning"
    return phrase


def _join_and(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _captions(
    scene: Scene, occlusions: dict[tuple[int, int], int], rng: np.random.Generator
) -> tuple[str, str]:
    ents = list(scene.entities)
    by_id = {e.id: e for e in ents}
    short = _join_and([_indef(e, with_texture=False) for e in ents])

    # Occlusion relations that really happened: on average at least 0.4% of the frame hidden per
    # frame (a graze of a few pixels is not worth a sentence), and not (much) both ways.
    min_px = max(3, int(0.004 * scene.height * scene.width * scene.num_frames))
    relations = []
    for (front, back), n in sorted(occlusions.items()):
        if n >= min_px and occlusions.get((back, front), 0) < n / 4:
            relations.append((n, front, back))
    relations.sort(reverse=True)

    motion = {e.id: _motion_phrase(e, scene, rng) for e in ents}
    first = ents[0]
    clause = f"{_indef(first)} {motion[first.id]}"
    partner = None
    for _, front, back in relations:
        if first.id in (front, back):
            partner = back if front == first.id else front
            if "," in motion[first.id]:  # keep "spinning" from swallowing the relation
                clause = clause.replace(", spinning", " while spinning")
            verb = "in front of" if front == first.id else "behind"
            clause += f" {verb} {_indef(by_id[partner])}"
            break
    others = []
    for e in ents[1:]:
        subject = f"the {_noun(e)}" if e.id == partner else _indef(e)
        others.append(f"{subject} {motion[e.id]}")
    text = clause[0].upper() + clause[1:]
    if others:
        text += ", while " + _join_and(others)
    bg = scene.background
    pattern = "" if bg.pattern == "plain" else bg.pattern + " "
    text += f", over {_article(pattern or bg.ground_name)} {pattern}{bg.ground_name} ground"
    text += f" under {_article(bg.sky)} {bg.sky} sky"
    cam = []
    if scene.pan[0]:
        cam.append("pans " + ("right" if scene.pan[0] > 0 else "left"))
    if scene.pan[1]:
        cam.append("tilts " + ("down" if scene.pan[1] > 0 else "up"))
    text += "; the camera " + (" and ".join(cam) if cam else "is static") + "."

    extra = []
    for _, front, back in relations:
        if first.id in (front, back):
            continue
        moving = any(by_id[i].vx or by_id[i].vy or by_id[i].vz for i in (front, back))
        verb = "passes in front of" if moving else "is in front of"
        extra.append(f"The {_noun(by_id[front])} {verb} the {_noun(by_id[back])}.")
        if len(extra) == 2:
            break
    if len(ents) >= 2:
        mean_z = sorted(((e.z0 + e.z_at(scene.num_frames - 1)) / 2, e.id) for e in ents)
        if mean_z[1][0] - mean_z[0][0] > 0.1 * mean_z[0][0]:
            extra.append(f"The {_noun(by_id[mean_z[0][1]])} is closest to the camera.")
    return " ".join([text, *extra]), short


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def render_clip(
    seed: int, num_frames: int, height: int, width: int, clip_id: str | None = None
) -> SyntheticClip:
    """Render one deterministic clip (same arguments -> identical arrays and captions).

    Scenes in which some entity would be hidden in most frames are re-sampled (from a seed derived
    deterministically from ``seed``) so captions only mention entities that are actually visible.
    """
    if num_frames < 1 or height < 8 or width < 8:
        raise ValueError(f"clip too small: {num_frames} frames of {height}x{width}")
    min_px = max(4, int(0.002 * height * width))
    need_frames = math.ceil(0.6 * num_frames)
    for attempt in range(8):
        rng = np.random.default_rng([seed, attempt])
        scene = _sample_scene(rng, num_frames, height, width)
        frames, ids, depth, occlusions = _render(scene)
        visible = [
            int(np.count_nonzero((ids == e.id).reshape(num_frames, -1).sum(1) >= min_px))
            for e in scene.entities
        ]
        if min(visible) >= need_frames:
            break
    else:
        # Still occluded after several attempts: keep the visible entities, renumbered 1..n.
        keep = [e for e, v in zip(scene.entities, visible, strict=True) if v >= need_frames] or [
            scene.entities[int(np.argmax(visible))]
        ]
        logger.warning(
            "seed %d: dropping %d hidden entities", seed, len(scene.entities) - len(keep)
        )
        renumbered = tuple(EntitySpec(**{**e.__dict__, "id": i + 1}) for i, e in enumerate(keep))
        scene = Scene(**{**scene.__dict__, "entities": renumbered})
        frames, ids, depth, occlusions = _render(scene)
    caption_long, caption_short = _captions(scene, occlusions, rng)
    return SyntheticClip(
        clip_id=clip_id if clip_id is not None else f"synth-{seed}",
        frames=frames,
        ids=ids,
        depth=depth,
        caption_long=caption_long,
        caption_short=caption_short,
        num_entities=len(scene.entities),
        motion_score=_motion_score(scene, ids),
        scene=scene,
    )


def synthetic_clip_id(dataset_seed: int, index: int) -> str:
    """Clip ``index``'s id: the same clip at any ``num_clips`` (its seed is :func:`clip_seed`)."""
    return f"synth-{dataset_seed}-{index:05d}"


def train_clips_held_out_when_grown(dataset_seed: int, num_clips: int, grown: int, val_fraction: float) -> list[str]:
    """The clips of a ``num_clips`` set's training split that a ``grown``-clip set of the same seed
    holds out (``assign_splits`` ranks by hash, so growing the set can move a clip to validation):
    what a model trained on the smaller set would have seen of the larger one's validation clips."""
    ids = [synthetic_clip_id(dataset_seed, i) for i in range(grown)]
    before = assign_splits(ids[:num_clips], val_fraction, dataset_seed)
    after = assign_splits(ids, val_fraction, dataset_seed)[:num_clips]
    return [c for c, b, a in zip(ids[:num_clips], before, after, strict=True) if b == "train" and a == "val"]


def clip_seed(dataset_seed: int, index: int) -> int:
    """Seed of clip ``index`` of a dataset (independent streams per clip)."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class _ClipJob:
    out: Path
    index: int
    seed: int
    num_frames: int
    height: int
    width: int
    fps: float
    qp: int


def _render_and_write(job: _ClipJob) -> dict:
    """Render clip ``job.index`` of the dataset, write its files and return its manifest row (a
    worker process's unit of work: the result depends on the job alone)."""
    cid = synthetic_clip_id(job.seed, job.index)
    clip = render_clip(clip_seed(job.seed, job.index), job.num_frames, job.height, job.width, clip_id=cid)
    video_rel, seg_rel, depth_rel = f"videos/{cid}.mp4", f"seg/{cid}.npz", f"depth/{cid}.npz"
    write_video(job.out / video_rel, clip.frames, job.fps, qp=job.qp)
    save_ids(job.out / seg_rel, clip.ids)
    save_depth(job.out / depth_rel, clip.depth)
    return {
        "clip_id": cid,
        "video_path": video_rel,
        "num_frames": job.num_frames,
        "fps": float(job.fps),
        "height": job.height,
        "width": job.width,
        "caption_long": clip.caption_long,
        "caption_short": clip.caption_short,
        "seg_path": seg_rel,
        "depth_path": depth_rel,
        "num_entities": clip.num_entities,
        "motion_score": clip.motion_score,
        "aesthetic_score": aesthetic_proxy(clip.frames),
        "source": "synthetic",
        "split": "train",
    }


def synthesize_dataset(
    out_dir: str | os.PathLike,
    num_clips: int,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    seed: int,
    val_fraction: float = 0.1,
    qp: int = 10,
) -> Path:
    """Render ``num_clips`` clips into ``out_dir`` in the on-disk format of CONVENTIONS.md.

    Writes ``videos/<id>.mp4``, ``seg/<id>.npz``, ``depth/<id>.npz`` per clip (on several cores for
    a large set: :func:`udpdiff.workers.map_clips`) and finally
    ``manifest.parquet`` (so a present manifest means a complete dataset). Returns the manifest
    path. Deterministic: the same arguments give the same arrays, captions, split and MP4 bytes (for
    one x264 build).
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {height}x{width}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    out = Path(out_dir)
    for sub in ("videos", "seg", "depth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [_ClipJob(out, i, seed, num_frames, height, width, fps, qp) for i in range(num_clips)]
    rows = map_clips(_render_and_write, jobs, desc="synthesizing clips")
    df = pd.DataFrame(rows)
    df["split"] = assign_splits(df["clip_id"].tolist(), val_fraction, seed)
    manifest = write_manifest(df, out / MANIFEST_NAME)
    logger.info(
        "synthesized %d clips (%d val) of %dx%dx%d in %.2f s -> %s",
        num_clips,
        int((df["split"] == "val").sum()),
        num_frames,
        height,
        width,
        time.perf_counter() - start,
        manifest,
    )
    return manifest
