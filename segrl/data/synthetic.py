"""Synthetic road scenes: a zero-download, deterministic segmentation benchmark.

Each frame is a procedurally drawn street: sky, buildings with windows, a road in
perspective with lane marks, sidewalks, trees and verges, then depth-sorted objects
(cars, poles with signs, people, bicycles) and sometimes an ego-vehicle hood (void).
Class frequencies are long-tailed like real driving data: sky/building/road cover most
pixels, bicycles appear in a fifth of the frames and cover a few hundred pixels.

Two domains share the label space and the layout statistics but not the look:
``"source"`` is bright, saturated and clean; ``"target"`` is dusk (dark, blue cast,
orange sky, lit windows, car lights, sensor noise, blur, different textures), so a
model trained on source degrades on target.

Everything is a function of ``(seed, index, size, domain)``: a frame never depends on
how many frames are rendered or in which order. Pure numpy; about 1 ms per 128x160 frame.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from segrl.data.labels import IGNORE_INDEX

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "sky",
    "building",
    "road",
    "sidewalk",
    "vegetation",
    "car",
    "pole",
    "sign",
    "person",
    "bicycle",
)
SKY, BUILDING, ROAD, SIDEWALK, VEGETATION, CAR, POLE, SIGN, PERSON, BICYCLE = range(10)
DOMAINS: tuple[str, ...] = ("source", "target")
_DOMAIN_KEY = {"source": 0, "target": 1}
_THINGS = (CAR, PERSON, BICYCLE)  # objects whose outlines become ignore, as in real labels
_STUFF = (SKY, BUILDING, ROAD, SIDEWALK, VEGETATION)

# Each split owns a block of 2**32 scene indices, so splits never share a frame.
_SPLIT_BLOCK = {"train": 0, "val": 1, "test": 2}
_BLOCK = 1 << 32


def _c(*rgb: float) -> np.ndarray:
    return np.array(rgb, dtype=np.float32)


def _lut(values: dict[int, float]) -> np.ndarray:
    """A 256-entry float LUT indexed by label (ignore and unlisted -> 0)."""
    lut = np.zeros(256, dtype=np.float32)
    for k, v in values.items():
        lut[k] = v
    return lut


# Appearance of each domain. Colours are RGB in [0, 1]; "mid"/"fine" are per-class
# amplitudes of smooth (blotchy) and pixel noise textures; the rest is global grading.
_STYLES: dict[str, dict[str, Any]] = {
    "source": {
        "sky_top": _c(0.30, 0.55, 0.92),
        "sky_horizon": _c(0.74, 0.86, 0.98),
        "cloud": _c(0.35, 0.3, 0.2),
        "buildings": [
            _c(0.62, 0.47, 0.38),
            _c(0.72, 0.70, 0.64),
            _c(0.55, 0.36, 0.30),
            _c(0.80, 0.74, 0.58),
            _c(0.48, 0.50, 0.56),
        ],
        "window": _c(0.25, 0.32, 0.45),
        "window_lit": _c(0.25, 0.32, 0.45),
        "lit_p": 0.0,
        "road": _c(0.40, 0.40, 0.42),
        "lane": _c(0.92, 0.92, 0.88),
        "sidewalk": _c(0.76, 0.62, 0.58),
        "tiles": True,
        "vegetation": _c(0.22, 0.55, 0.16),
        "trunk": _c(0.40, 0.28, 0.18),
        "pole": _c(0.56, 0.57, 0.53),
        "hood": _c(0.15, 0.15, 0.17),
        "car_lights": False,
        "mid": _lut({SKY: 0.0, BUILDING: 0.06, ROAD: 0.05, SIDEWALK: 0.05, VEGETATION: 0.30}),
        "fine": _lut({BUILDING: 0.02, ROAD: 0.04, SIDEWALK: 0.03, VEGETATION: 0.09, CAR: 0.01}),
        "brightness": 1.0,
        "gain": _c(1.0, 1.0, 1.0),
        "hue": 0.0,
        "saturation": 1.15,
        "noise": 0.012,
        "blur": 0,
    },
    "target": {
        "sky_top": _c(0.16, 0.16, 0.38),
        "sky_horizon": _c(0.92, 0.56, 0.40),
        "cloud": _c(0.25, 0.05, 0.2),
        "buildings": [
            _c(0.36, 0.33, 0.38),
            _c(0.46, 0.40, 0.42),
            _c(0.30, 0.28, 0.34),
            _c(0.50, 0.45, 0.40),
            _c(0.30, 0.33, 0.42),
        ],
        "window": _c(0.08, 0.08, 0.14),
        "window_lit": _c(1.0, 0.82, 0.45),
        "lit_p": 0.35,
        "road": _c(0.26, 0.25, 0.30),
        "lane": _c(0.62, 0.60, 0.52),
        "sidewalk": _c(0.46, 0.42, 0.46),
        "tiles": False,
        "vegetation": _c(0.12, 0.26, 0.20),
        "trunk": _c(0.18, 0.14, 0.12),
        "pole": _c(0.32, 0.32, 0.34),
        "hood": _c(0.06, 0.06, 0.08),
        "car_lights": True,
        "mid": _lut({SKY: 0.05, BUILDING: 0.15, ROAD: 0.22, SIDEWALK: 0.18, VEGETATION: 0.12}),
        "fine": _lut({BUILDING: 0.04, ROAD: 0.02, SIDEWALK: 0.05, VEGETATION: 0.15, CAR: 0.03}),
        "brightness": 0.72,
        "gain": _c(0.95, 0.9, 1.08),
        "hue": 0.12,
        "saturation": 0.85,
        "noise": 0.035,
        "blur": 1,
    },
}
_CAR_COLORS = [
    _c(0.80, 0.10, 0.10),
    _c(0.12, 0.22, 0.72),
    _c(0.92, 0.92, 0.92),
    _c(0.08, 0.08, 0.10),
    _c(0.90, 0.72, 0.10),
    _c(0.55, 0.56, 0.60),
]
_SIGN_COLORS = [_c(0.88, 0.10, 0.10), _c(0.10, 0.30, 0.85), _c(0.95, 0.80, 0.10)]
_SKIN = [_c(0.87, 0.68, 0.55), _c(0.55, 0.38, 0.26), _c(0.95, 0.80, 0.70)]
_BIKE_COLORS = [_c(0.10, 0.10, 0.10), _c(0.70, 0.10, 0.10), _c(0.10, 0.30, 0.70)]
_GLASS = _c(0.12, 0.16, 0.24)
_TYRE = _c(0.05, 0.05, 0.05)
_WHITE = _c(0.95, 0.95, 0.95)
_LUMA = _c(0.299, 0.587, 0.114)


class _Canvas:
    """Label map (HxW uint8) and colour image (HxWx3 float32) drawn together."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.label = np.full((h, w), SKY, dtype=np.uint8)
        self.rgb = np.zeros((h, w, 3), dtype=np.float32)

    def window(
        self, y0: float, y1: float, x0: float, x1: float
    ) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
        """Clipped pixel box around [y0, y1) x [x0, x1) and its pixel-centre coordinates
        (ys: n x 1, xs: 1 x m), or None when the box is off-canvas."""
        iy0, iy1 = max(0, int(np.floor(y0))), min(self.h, int(np.ceil(y1)))
        ix0, ix1 = max(0, int(np.floor(x0))), min(self.w, int(np.ceil(x1)))
        if iy0 >= iy1 or ix0 >= ix1:
            return None
        ys = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5
        return slice(iy0, iy1), slice(ix0, ix1), ys, xs

    def put(self, sy: slice, sx: slice, mask: np.ndarray, cls: int, color: np.ndarray) -> None:
        """Paint ``cls`` and ``color`` (3,) where ``mask`` is set inside the box."""
        self.label[sy, sx][mask] = cls
        self.rgb[sy, sx][mask] = color


def _rect(c: _Canvas, y0: float, y1: float, x0: float, x1: float, cls: int, color) -> None:
    win = c.window(y0, y1, x0, x1)
    if win is not None:
        sy, sx, ys, xs = win
        c.put(sy, sx, (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1), cls, color)


def _ellipse(c: _Canvas, cy: float, cx: float, ry: float, rx: float, cls: int, color) -> None:
    ry, rx = max(ry, 0.6), max(rx, 0.6)  # at least one pixel centre inside
    win = c.window(cy - ry, cy + ry, cx - rx, cx + rx)
    if win is not None:
        sy, sx, ys, xs = win
        c.put(sy, sx, ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0, cls, color)


def _ring(c: _Canvas, cy: float, cx: float, r: float, width: float, cls: int, color) -> None:
    r, width = max(r, 1.0), max(width, 1.0)
    win = c.window(cy - r, cy + r, cx - r, cx + r)
    if win is not None:
        sy, sx, ys, xs = win
        d = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)
        c.put(sy, sx, (d <= r) & (d >= r - width), cls, color)


def _segment(c: _Canvas, p: tuple[float, float], q: tuple[float, float], width: float, cls, color):
    """Thick line from p=(y, x) to q=(y, x)."""
    half = max(width / 2, 0.6)
    win = c.window(
        min(p[0], q[0]) - half,
        max(p[0], q[0]) + half,
        min(p[1], q[1]) - half,
        max(p[1], q[1]) + half,
    )
    if win is None:
        return
    sy, sx, ys, xs = win
    dy, dx = q[0] - p[0], q[1] - p[1]
    t = np.clip(((ys - p[0]) * dy + (xs - p[1]) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
    dist2 = (ys - p[0] - t * dy) ** 2 + (xs - p[1] - t * dx) ** 2
    c.put(sy, sx, dist2 <= half * half, cls, color)


def _jitter(rng: np.random.Generator, color: np.ndarray, amount: float = 0.06) -> np.ndarray:
    """Per-instance colour variation."""
    return np.clip(color + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """HxW zero-mean noise, bilinearly interpolated from a grid with ``cell``-pixel spacing."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    fy = np.arange(h, dtype=np.float32) / cell
    fx = np.arange(w, dtype=np.float32) / cell
    y0, x0 = fy.astype(np.int64), fx.astype(np.int64)
    ty, tx = (fy - y0)[:, None], (fx - x0)[None, :]
    top = grid[y0][:, x0] * (1 - tx) + grid[y0][:, x0 + 1] * tx
    bottom = grid[y0 + 1][:, x0] * (1 - tx) + grid[y0 + 1][:, x0 + 1] * tx
    return top * (1 - ty) + bottom * ty


class _Layout:
    """Road geometry of one frame: horizon, vanishing point and road/sidewalk widths."""

    def __init__(self, rng: np.random.Generator, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.horizon = rng.uniform(0.36, 0.50) * h
        self.vp_x = rng.uniform(0.35, 0.65) * w
        self.road_half = rng.uniform(0.32, 0.50) * w  # road half-width at the bottom row
        self.walk = rng.uniform(0.30, 0.60)  # sidewalk width / road half-width
        self.verge = [rng.uniform(0.3, 0.8) if rng.random() < 0.45 else 0.0 for _ in range(2)]

    def depth(self, y: float | np.ndarray) -> float | np.ndarray:
        """0 at the horizon, 1 at the bottom row: the perspective scale of an object at y."""
        return np.clip((y - self.horizon) / (self.h - self.horizon), 0.0, 1.0)

    def half(self, y: float | np.ndarray) -> float | np.ndarray:
        """Road half-width in pixels at row y."""
        return self.road_half * self.depth(y)

    def ground_y(self, rng: np.random.Generator, low: float = 0.04) -> float:
        """A random ground row, biased towards the far (small) end like real scenes."""
        return self.horizon + (self.h - self.horizon) * (low + (1 - low) * rng.random() ** 1.3)

    def sidewalk_x(self, rng: np.random.Generator, y: float, lo: float, hi: float) -> float:
        """A random x on the left or right sidewalk at row y (lo/hi: fraction across it)."""
        side = 1 if rng.random() < 0.5 else -1
        return self.vp_x + side * self.half(y) * (1 + self.walk * rng.uniform(lo, hi))


def _paint_sky(c: _Canvas, lay: _Layout, style: dict, rng: np.random.Generator) -> None:
    t = np.clip(np.arange(c.h, dtype=np.float32) / lay.horizon, 0, 1)[:, None, None] ** 0.7
    c.rgb[:] = style["sky_top"] * (1 - t) + style["sky_horizon"] * t
    clouds = np.maximum(_smooth_noise(rng, c.h, c.w, max(c.w / 5, 2)) - 0.3, 0)
    c.rgb += clouds[..., None] * style["cloud"] * rng.uniform(0.2, 0.8)


def _paint_buildings(c: _Canvas, lay: _Layout, style: dict, rng: np.random.Generator) -> None:
    """Columns of facades (with window grids) from a random roofline down to the bottom."""
    x = 0.0
    while x < c.w:
        bw = rng.uniform(0.07, 0.22) * c.w
        if rng.random() < 0.18:  # gap: sky shows through down to the horizon
            x += bw
            continue
        top = rng.uniform(0.04, 0.92) * lay.horizon
        color = _jitter(rng, style["buildings"][rng.integers(len(style["buildings"]))])
        _rect(c, top, c.h, x, x + bw, BUILDING, color)
        _paint_windows(c, lay, style, rng, top, x, x + bw)
        x += bw


def _paint_windows(c, lay: _Layout, style: dict, rng, top: float, x0: float, x1: float) -> None:
    """A regular window grid on one facade; in the target domain some windows are lit."""
    win = c.window(top, lay.horizon + 0.1 * (c.h - lay.horizon), x0, x1)
    if win is None:
        return
    sy, sx, ys, xs = win
    py = max(3.0, rng.uniform(0.035, 0.07) * c.h)
    px = max(3.0, rng.uniform(0.035, 0.07) * c.w)
    ly, lx = ys - top, xs - x0
    mask = ((ly % py) > 0.45 * py) & ((lx % px) > 0.45 * px) & (ly > py)
    cells = rng.random((int(ly.max() / py) + 2, int(lx.max() / px) + 2)) < style["lit_p"]
    lit = cells[(ly // py).astype(np.int64), (lx // px).astype(np.int64)]
    color = np.where(lit[..., None], style["window_lit"], style["window"])
    region = c.rgb[sy, sx]
    region[mask] = color[mask]


def _paint_ground(c: _Canvas, lay: _Layout, style: dict, rng: np.random.Generator) -> None:
    """Road (with dashed centre line), sidewalks (tiled in source) and grass verges."""
    win = c.window(lay.horizon, c.h, 0, c.w)
    if win is None:
        return
    sy, sx, ys, xs = win
    half = lay.half(ys)
    rel = (xs - lay.vp_x) / np.maximum(half, 1e-3)  # position across the road, in half-widths
    dist = np.abs(rel)
    road = dist < 1.0
    walk = (dist >= 1.0) & (dist < 1.0 + lay.walk)
    right = rel > 0
    verge_w = np.where(right, lay.verge[1], lay.verge[0])
    verge = (dist >= 1.0 + lay.walk) & (dist < 1.0 + lay.walk + verge_w)
    c.put(sy, sx, verge, VEGETATION, _jitter(rng, style["vegetation"]))
    c.put(sy, sx, walk, SIDEWALK, _jitter(rng, style["sidewalk"], 0.04))
    c.put(sy, sx, road, ROAD, _jitter(rng, style["road"], 0.03))
    depth = np.maximum(lay.depth(ys), 1e-3)
    stripe = (1.0 / depth) % 1.0  # perspective-correct periodic coordinate along the road
    region = c.rgb[sy, sx]
    if rng.random() < 0.85:  # dashed centre line, labelled road
        dash = road & (dist < 0.035) & (stripe < 0.5)
        region[dash] = style["lane"]
    if style["tiles"]:  # paving grid: darker joints on the sidewalk
        joints = walk & (((stripe * 3) % 1.0 < 0.12) | (((dist - 1.0) * 8) % 1.0 < 0.1))
        region[joints] *= 0.8
    curb = walk & (dist < 1.04)
    region[curb] = region[curb] * 0.7 + 0.2


def _draw_tree(c: _Canvas, style: dict, y: float, x: float, size: float, color, blobs) -> None:
    trunk_h = 1.4 * size
    _rect(
        c,
        y - trunk_h,
        y,
        x - max(0.5, 0.08 * size),
        x + max(0.5, 0.08 * size),
        VEGETATION,
        style["trunk"],
    )
    for dy, dx, r in blobs:
        _ellipse(
            c, y - trunk_h - size * dy, x + size * dx, size * r, size * r * 1.1, VEGETATION, color
        )


def _draw_car(c: _Canvas, style: dict, y: float, x: float, width: float, color) -> None:
    h = width * 0.62
    _rect(c, y - 0.58 * h, y - 0.12 * h, x - width / 2, x + width / 2, CAR, color)
    _rect(c, y - h, y - 0.55 * h, x - 0.36 * width, x + 0.36 * width, CAR, color)
    _rect(c, y - 0.92 * h, y - 0.6 * h, x - 0.3 * width, x + 0.3 * width, CAR, _GLASS)
    for side in (-1, 1):
        _ellipse(c, y - 0.14 * h, x + side * 0.3 * width, 0.14 * h, 0.1 * width, CAR, _TYRE)
        if style["car_lights"]:  # dusk: lit head/tail lights
            light = _c(1.0, 0.95, 0.7) if side < 0 else _c(1.0, 0.15, 0.1)
            _ellipse(c, y - 0.42 * h, x + side * 0.42 * width, 0.06 * h, 0.05 * width, CAR, light)


def _draw_pole(c: _Canvas, style: dict, y: float, x: float, height: float, sign) -> None:
    """A pole of ``height`` px standing at (y, x); ``sign`` = (shape, size, color) or None."""
    half_w = max(0.5, 0.012 * height)
    _rect(c, y - height, y, x - half_w, x + half_w, POLE, style["pole"])
    if sign is None:
        return
    shape, size, color = sign
    cy = y - height + size
    if shape == "disk":
        _ellipse(c, cy, x, size, size, SIGN, color)
        _ellipse(c, cy, x, 0.55 * size, 0.55 * size, SIGN, _WHITE)
    else:
        _rect(c, cy - size, cy + size, x - size, x + size, SIGN, color)
        _rect(c, cy - 0.3 * size, cy + 0.3 * size, x - 0.6 * size, x + 0.6 * size, SIGN, _WHITE)


def _draw_person(c: _Canvas, y: float, x: float, height: float, colors) -> None:
    shirt, trousers, skin = colors
    leg_w = 0.07 * height
    for side in (-1, 1):
        _rect(
            c,
            y - 0.48 * height,
            y,
            x + side * 0.06 * height - leg_w / 2,
            x + side * 0.06 * height + leg_w / 2,
            PERSON,
            trousers,
        )
    _ellipse(c, y - 0.64 * height, x, 0.2 * height, 0.13 * height, PERSON, shirt)
    _ellipse(c, y - 0.9 * height, x, 0.08 * height, 0.065 * height, PERSON, skin)


def _draw_bicycle(c: _Canvas, y: float, x: float, r: float, color, rider) -> None:
    """Two wheels of radius r touching row y around x; an optional rider on top."""
    width = max(1.0, 0.18 * r)
    rear, front = (y - r, x - 1.25 * r), (y - r, x + 1.25 * r)
    seat, bar = (y - 2.1 * r, x - 0.5 * r), (y - 2.2 * r, x + 0.9 * r)
    crank = (y - 0.9 * r, x)
    if rider is not None:
        _draw_person(c, seat[0] + 0.55 * rider[0], seat[1], rider[0], rider[1])
    for wheel in (rear, front):
        _ring(c, wheel[0], wheel[1], r, 0.22 * r, BICYCLE, _TYRE)
    for p, q in (
        (rear, seat),
        (seat, crank),
        (crank, rear),
        (crank, bar),
        (bar, front),
        (seat, bar),
    ):
        _segment(c, p, q, width, BICYCLE, color)


Planned = list[tuple[float, Callable[[_Canvas], None]]]  # (foot row, draw(canvas))


def _plan_objects(lay: _Layout, style: dict, rng: np.random.Generator) -> Planned:
    """Sample every object of the frame; the caller draws them far (small y) to near."""
    planners = (_plan_trees, _plan_cars, _plan_poles, _plan_people, _plan_bicycle)
    return [obj for plan in planners for obj in plan(lay, style, rng)]


def _plan_trees(lay: _Layout, style: dict, rng: np.random.Generator) -> Planned:
    """Common: ~1.8 trees per frame just beyond the sidewalks."""
    out: Planned = []
    for _ in range(rng.poisson(1.8)):
        y = lay.ground_y(rng, 0.02)
        x = lay.sidewalk_x(rng, y, 1.0, 1.3)
        size = lay.depth(y) * lay.h * rng.uniform(0.12, 0.22)
        blobs = [
            (rng.uniform(0.3, 1.0), rng.uniform(-0.6, 0.6), rng.uniform(0.6, 1.0)) for _ in range(3)
        ]
        color = _jitter(rng, style["vegetation"], 0.08)
        draw = functools.partial(
            _draw_tree, style=style, y=y, x=x, size=size, color=color, blobs=blobs
        )
        out.append((y, draw))
    return out


def _plan_cars(lay: _Layout, style: dict, rng: np.random.Generator) -> Planned:
    """~1.7 cars per frame on the road, sized by perspective."""
    out: Planned = []
    for _ in range(min(rng.poisson(1.7), 6)):
        y = lay.ground_y(rng, 0.06)
        x = lay.vp_x + rng.uniform(-0.8, 0.8) * lay.half(y)
        width = lay.depth(y) * lay.road_half * rng.uniform(0.55, 0.8)
        color = _jitter(rng, _CAR_COLORS[rng.integers(len(_CAR_COLORS))], 0.05)
        out.append(
            (y, functools.partial(_draw_car, style=style, y=y, x=x, width=width, color=color))
        )
    return out


def _plan_poles(lay: _Layout, style: dict, rng: np.random.Generator) -> Planned:
    """Thin poles on the sidewalks; half of them carry a small sign (a rare class)."""
    out: Planned = []
    for _ in range(rng.poisson(1.1)):
        y = lay.ground_y(rng)
        x = lay.sidewalk_x(rng, y, 0.3, 0.9)
        height = lay.depth(y) * lay.h * rng.uniform(0.7, 1.1)
        sign = None
        if rng.random() < 0.5:
            shape = "disk" if rng.random() < 0.5 else "box"
            sign = (shape, max(1.0, 0.06 * height), _SIGN_COLORS[rng.integers(len(_SIGN_COLORS))])
        out.append(
            (y, functools.partial(_draw_pole, style=style, y=y, x=x, height=height, sign=sign))
        )
    return out


def _plan_people(lay: _Layout, style: dict, rng: np.random.Generator) -> Planned:
    """People in 40% of the frames, mostly on sidewalks, sometimes crossing."""
    out: Planned = []
    for _ in range(1 + rng.poisson(0.6) if rng.random() < 0.4 else 0):
        y = lay.ground_y(rng)
        if rng.random() < 0.15:  # crossing the road
            x = lay.vp_x + rng.uniform(-0.9, 0.9) * lay.half(y)
        else:
            x = lay.sidewalk_x(rng, y, 0.2, 0.8)
        height = lay.depth(y) * lay.h * rng.uniform(0.45, 0.6)
        colors = _person_colors(rng)
        out.append((y, functools.partial(_draw_person, y=y, x=x, height=height, colors=colors)))
    return out


def _plan_bicycle(lay: _Layout, style: dict, rng: np.random.Generator) -> Planned:
    """The rarest class: a bicycle (half of them ridden) in 20% of the frames."""
    if rng.random() >= 0.2:
        return []
    y = lay.ground_y(rng, 0.1)
    side = 1 if rng.random() < 0.5 else -1
    x = lay.vp_x + side * lay.half(y) * rng.uniform(0.6, 1.2)
    r = lay.depth(y) * lay.h * rng.uniform(0.06, 0.08)
    rider = (r * 3.2, _person_colors(rng)) if rng.random() < 0.5 else None
    color = _BIKE_COLORS[rng.integers(len(_BIKE_COLORS))]
    return [(y, functools.partial(_draw_bicycle, y=y, x=x, r=r, color=color, rider=rider))]


def _person_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shirt = rng.uniform(0.05, 0.9, 3).astype(np.float32)
    trousers = rng.uniform(0.05, 0.5, 3).astype(np.float32)
    return shirt, trousers, _SKIN[rng.integers(len(_SKIN))]


def _paint_hood(c: _Canvas, style: dict, rng: np.random.Generator) -> None:
    """Ego-vehicle bonnet at the bottom: void (ignore), as in real driving datasets."""
    depth = rng.uniform(0.06, 0.12) * c.h
    _ellipse(c, c.h + 2.0 * depth, c.w / 2, 3.0 * depth, 0.75 * c.w, IGNORE_INDEX, style["hood"])


def _ignore_outlines(label: np.ndarray) -> None:
    """Mark stuff pixels that touch a car/person/bicycle as ignore (in place).

    Real annotations are unsure at object outlines; only the background side is
    marked so thin objects (bicycle frames) keep their pixels.
    """
    thing = np.isin(label, _THINGS)
    near = np.zeros_like(thing)
    near[1:] |= thing[:-1]
    near[:-1] |= thing[1:]
    near[:, 1:] |= thing[:, :-1]
    near[:, :-1] |= thing[:, 1:]
    label[near & np.isin(label, _STUFF)] = IGNORE_INDEX


def _texture(c: _Canvas, style: dict, rng: np.random.Generator) -> None:
    """Class-dependent blotchy and pixel noise (the textures differ between domains)."""
    mid = _smooth_noise(rng, c.h, c.w, max(c.w / 40, 1.5))
    fine = rng.standard_normal((c.h, c.w), dtype=np.float32)
    c.rgb *= (1 + style["mid"][c.label] * mid)[..., None]
    c.rgb += (style["fine"][c.label] * fine)[..., None]


def _grade(rgb: np.ndarray, style: dict, rng: np.random.Generator) -> np.ndarray:
    """Global look: per-frame hue/saturation/brightness, lighting gradient, blur, noise."""
    h, w, _ = rgb.shape
    angle = style["hue"] + rng.normal(0, 0.1)  # hue rotation about the grey axis
    cos, sin = np.cos(angle), np.sin(angle) / np.sqrt(3)
    k = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=np.float32)
    hue = cos * np.eye(3) + (1 - cos) / 3 * np.ones((3, 3)) + sin * k
    s = style["saturation"] * rng.uniform(0.85, 1.15)
    sat = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), _LUMA)
    gain = style["gain"] * style["brightness"] * rng.uniform(0.85, 1.15)
    matrix = (gain[:, None] * sat @ hue).astype(np.float32)
    out = (rgb.reshape(-1, 3) @ matrix.T).reshape(h, w, 3)
    light = 1 + rng.uniform(-0.25, 0.25) * (np.arange(w, dtype=np.float32) / w - 0.5)
    out *= light[None, :, None]
    for _ in range(style["blur"]):
        out = _box_blur(out)
    out += style["noise"] * rng.standard_normal(out.shape, dtype=np.float32)
    return out


def _box_blur(img: np.ndarray) -> np.ndarray:
    """3x3 box blur of HxWx3 with edge replication (separable)."""
    p = np.pad(img, ((1, 1), (0, 0), (0, 0)), mode="edge")
    img = (p[:-2] + p[1:-1] + p[2:]) / 3
    p = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (p[:, :-2] + p[:, 1:-1] + p[:, 2:]) / 3


def _check_args(seed: int, index: int, size: Sequence[int], domain: str) -> tuple[int, int]:
    if domain not in _STYLES:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    h, w = (int(s) for s in size)
    if h < 8 or w < 8:
        raise ValueError(f"size (H, W) must be at least 8x8, got {tuple(size)}")
    return h, w


def render_scene(
    seed: int, index: int, size: tuple[int, int], domain: str = "source"
) -> tuple[np.ndarray, np.ndarray]:
    """Render frame ``index`` of the scene family ``seed``.

    Returns ``(image, label)``: image HxWx3 uint8 RGB, label HxW uint8 with values in
    ``0..len(SYNTHETIC_CLASSES)-1`` or 255 (ignore). The domain is part of the random
    stream, so source and target frames with the same (seed, index) are different
    scenes drawn from the same layout distribution (no accidental paired data).
    """
    h, w = _check_args(seed, index, size, domain)
    style = _STYLES[domain]
    rng = np.random.default_rng([seed, index, _DOMAIN_KEY[domain]])
    canvas = _Canvas(h, w)
    layout = _Layout(rng, h, w)
    _paint_sky(canvas, layout, style, rng)
    _paint_buildings(canvas, layout, style, rng)
    _paint_ground(canvas, layout, style, rng)
    for _, draw in sorted(_plan_objects(layout, style, rng), key=lambda o: o[0]):
        draw(canvas)
    if rng.random() < 0.25:
        _paint_hood(canvas, style, rng)
    _ignore_outlines(canvas.label)
    _texture(canvas, style, rng)
    rgb = _grade(canvas.rgb, style, rng)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), canvas.label


def split_offset(split: str) -> int:
    """First scene index of ``split``: each split name owns a disjoint block of 2**32."""
    block = _SPLIT_BLOCK.get(split)
    if block is None:  # any other split name: a stable hash past the reserved blocks
        block = len(_SPLIT_BLOCK) + zlib.crc32(split.encode())
    return block * _BLOCK


def synthetic_id(domain: str, seed: int, split: str, i: int) -> str:
    """Stable id (and file stem) of frame ``i`` of a split."""
    return f"syn-{domain}-s{seed}-{split}-{i:07d}"


class SyntheticScenes(Dataset):
    """``num_images`` synthetic frames rendered on the fly.

    Sample i is ``render_scene(seed, split_offset(split) + i, size, domain)``, so splits
    never overlap and a frame does not depend on ``num_images``. Yields final samples
    (image 3xHxW float normalized, mask HxW int64, id str) after ``transform``; with
    ``transform=None`` the frame is only converted to tensors and normalized.
    """

    classes: tuple[str, ...] = SYNTHETIC_CLASSES
    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        num_images: int,
        size: tuple[int, int] = (128, 160),
        domain: str = "source",
        seed: int = 0,
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        _check_args(seed, 0, size, domain)
        from segrl.data.transforms import eval_transform

        self.num_images, self.size = int(num_images), (int(size[0]), int(size[1]))
        self.domain, self.seed, self.split = domain, int(seed), split
        self.transform = transform if transform is not None else eval_transform()
        self._offset = split_offset(split)

    def __len__(self) -> int:
        return self.num_images

    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame i as numpy (image HxWx3 uint8, label HxW uint8)."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        return render_scene(self.seed, self._offset + i, self.size, self.domain)

    def sample_id(self, i: int) -> str:
        return synthetic_id(self.domain, self.seed, self.split, i)

    def raw(self, i: int) -> dict:
        """Frame i rendered, before the transform."""
        from segrl.data.transforms import to_raw_sample

        image, label = self.render(i)
        return to_raw_sample(image, label, self.sample_id(i))

    def __getitem__(self, i: int) -> dict:
        return self.transform(self.raw(i))


def write_synthetic_dataset(
    root: str,
    num_images: int,
    size: tuple[int, int] = (128, 160),
    domain: str = "source",
    seed: int = 0,
    split: str = "train",
) -> str:
    """Render a split to PNGs under a local ``root`` and write its manifest.

    Layout: ``root/<split>/images/<id>.png``, ``root/<split>/labels/<id>.png`` and the
    manifest ``root/<split>.parquet`` (relative URIs; columns id, image_uri, label_uri,
    domain, split, seed, index; the class names in its schema metadata). The frames are
    exactly those of ``SyntheticScenes(num_images, size, domain, seed, split)``.
    Returns the manifest path.
    """
    from PIL import Image

    from segrl.data.manifest import write_manifest

    scenes = SyntheticScenes(num_images, size, domain, seed, split)
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(root, split, sub), exist_ok=True)
    rows = []
    for i in range(num_images):
        image, label = scenes.render(i)
        sid = scenes.sample_id(i)
        image_rel, label_rel = f"{split}/images/{sid}.png", f"{split}/labels/{sid}.png"
        Image.fromarray(image).save(os.path.join(root, image_rel), compress_level=1)
        Image.fromarray(label).save(os.path.join(root, label_rel), compress_level=1)
        rows.append(
            {
                "id": sid,
                "image_uri": image_rel,
                "label_uri": label_rel,
                "domain": domain,
                "split": split,
                "seed": seed,
                "index": i,
            }
        )
    manifest = os.path.join(root, f"{split}.parquet")
    write_manifest(rows, manifest, classes=SYNTHETIC_CLASSES)
    return manifest
