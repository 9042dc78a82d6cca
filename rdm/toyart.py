"""Toy-art: a procedural corpus of small styled images (content class x style), deterministic from a seed.

Each image is one content silhouette (a boat, a house, ...) drawn at a random position, size and
orientation, then painted in one of the styles: a palette, a background texture and a way of filling
and outlining the shape. It is the miniature stand-in for a web-scale database whose style the
retrieval-augmented model picks up from its neighbours. Pure numpy and PIL.

    item = render_item(seed=0, index=5)   # ToyArtItem(image uint8 [32, 32, 3], content, style, caption)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rdm.errors import InputError

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # silhouettes are drawn at 4x and box-filtered down (anti-aliased edges)

CONTENTS = ("boat", "house", "tree", "fish", "star", "flower")
STYLES = ("ukiyo-e", "pointillist", "cubist", "watercolour", "neon", "pencil sketch", "pop-art", "mosaic")


@dataclass(frozen=True)
class ToyArtItem:
    """One corpus entry: image uint8 [H, W, 3], its labels and its caption ("a boat, pointillist")."""

    image: np.ndarray
    content: str
    style: str
    caption: str


def caption_for(content: str, style: str | None = None) -> str:
    """The corpus caption naming the content and, if given, the style: "a boat, pointillist"."""
    return f"a {content}" if style is None else f"a {content}, {style}"


# --- silhouettes ---------------------------------------------------------------------------------

Points = list[tuple[float, float]]


def _star(n: int, outer: float, inner: float) -> Points:
    angles = np.pi / 2 + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, outer, inner)
    return [(float(r * np.cos(a)), float(-r * np.sin(a))) for r, a in zip(radii, angles, strict=True)]


def _draw_shape(draw: ImageDraw.ImageDraw, content: str, tf: Callable[[Points], Points], s: float) -> None:
    """Draw `content` in unit coordinates ([-1, 1], y down) through the transform `tf`; s = pixel scale."""
    def poly(points: Points) -> None:
        draw.polygon(tf(points), fill=255)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> None:
        (x0, y0), (x1, y1) = tf([(cx - rx, cy - ry), (cx + rx, cy + ry)])
        draw.ellipse((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=255)

    if content == "boat":
        poly([(-0.9, 0.35), (0.9, 0.35), (0.55, 0.75), (-0.55, 0.75)])
        poly([(-0.05, -0.85), (-0.05, 0.3), (0.05, 0.3), (0.05, -0.85)])
        poly([(0.1, -0.8), (0.1, 0.25), (0.75, 0.25)])
    elif content == "house":
        poly([(-0.65, -0.05), (0.65, -0.05), (0.65, 0.85), (-0.65, 0.85)])
        poly([(-0.85, 0.0), (0.0, -0.8), (0.85, 0.0)])
    elif content == "tree":
        poly([(-0.12, 0.1), (0.12, 0.1), (0.15, 0.9), (-0.15, 0.9)])
        ellipse(0.0, -0.3, 0.6, 0.55)
    elif content == "fish":
        ellipse(-0.15, 0.0, 0.6, 0.35)
        poly([(0.35, 0.0), (0.9, -0.45), (0.9, 0.45)])
    elif content == "star":
        poly(_star(5, 0.9, 0.38))
    elif content == "flower":
        for k in range(5):
            a = np.pi / 2 + k * 2 * np.pi / 5
            ellipse(0.5 * np.cos(a), -0.35 - 0.5 * np.sin(a), 0.22, 0.22)
        poly([(-0.07, 0.1), (0.07, 0.1), (0.07, 0.95), (-0.07, 0.95)])
        poly([(0.05, 0.6), (0.55, 0.35), (0.45, 0.55)])
    else:
        raise InputError(f"unknown content {content!r}; choose one of {', '.join(CONTENTS)}")


def draw_silhouette(content: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage mask float32 [size, size] in [0, 1] of `content`, randomly placed, scaled and flipped."""
    big = size * _SUPERSAMPLE
    scale = rng.uniform(0.30, 0.42) * big
    cx, cy = (big / 2 + rng.uniform(-0.12, 0.12, size=2) * big)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    tilt = rng.uniform(-0.15, 0.15)
    cos, sin = np.cos(tilt), np.sin(tilt)

    def tf(points: Points) -> Points:
        return [(cx + scale * (cos * flip * x - sin * y), cy + scale * (sin * flip * x + cos * y))
                for x, y in points]

    canvas = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(canvas), content, tf, scale)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


# --- styles: each paints a mask [H, W] into an RGB float image [H, W, 3] in [0, 1] ---------------

def _hex(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) / 255.0


def _jitter(color: str, rng: np.random.Generator, amount: float = 0.06) -> np.ndarray:
    return np.clip(_hex(color) + rng.uniform(-amount, amount, size=3), 0.0, 1.0)


def _blend(base: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return base * (1.0 - alpha[..., None]) + color * alpha[..., None]


def _edge(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Outline band of a coverage mask: dilation minus erosion (max/min filters)."""
    img = Image.fromarray((mask * 255).astype(np.uint8))
    k = 2 * width + 1
    grown = np.asarray(img.filter(ImageFilter.MaxFilter(k)), dtype=np.float32)
    shrunk = np.asarray(img.filter(ImageFilter.MinFilter(k)), dtype=np.float32)
    return np.clip((grown - shrunk) / 255.0, 0.0, 1.0)


def _blur(x: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a float image [H, W] or [H, W, 3] in [0, 1]."""
    img = Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float32)


def paint_ukiyo(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cream paper with indigo wave bands; the shape flat vermilion with a dark indigo outline."""
    y, x = _grid(mask.shape[0])
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.7)
    waves = (np.sin(freq * y + 1.2 * np.sin(0.35 * x + phase)) > 0.35).astype(np.float32)
    img = _blend(np.broadcast_to(_jitter("#efe2c4", rng), (*mask.shape, 3)), _jitter("#2b4a7e", rng), 0.8 * waves)
    img = _blend(img, _jitter("#c8412f", rng), mask)
    return _blend(img, _jitter("#16213f", rng, 0.03), _edge(mask))


def paint_pointillist(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light ground with scattered pastel blue and green dots; the shape packed with orange and red dots."""
    size = mask.shape[0]
    img = np.broadcast_to(_jitter("#f4f1e6", rng), (size, size, 3)).copy()
    outside = np.stack([_hex(c) for c in ("#7fb3d5", "#82c99a", "#b5d8e8")])
    inside = np.stack([_hex(c) for c in ("#e8702a", "#d7263d", "#f4a259")])
    dotted = rng.random((size, size)) < 0.45
    outer = outside[rng.integers(0, len(outside), size=(size, size))]
    img = np.where(dotted[..., None], outer, img)
    inner = inside[rng.integers(0, len(inside), size=(size, size))]
    return _blend(img, inner, np.clip(1.3 * mask - 0.15 * rng.random((size, size)), 0, 1))


def paint_cubist(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Voronoi facets in ochres and browns, darker facets inside the shape, dark seams between facets."""
    size = mask.shape[0]
    y, x = _grid(size)
    seeds = rng.uniform(0, size, size=(14, 2))
    d = (y[..., None] - seeds[:, 0]) ** 2 + (x[..., None] - seeds[:, 1]) ** 2
    cell = d.argmin(-1)
    light = np.stack([_jitter(c, rng) for c in ("#c9a66b", "#a9b1a0", "#d8c39a", "#8c8f7a")])
    dark = np.stack([_jitter(c, rng) for c in ("#6b4226", "#4e5d55", "#7a3b2e")])
    img = _blend(light[cell % len(light)], dark[cell % len(dark)], (mask > 0.5).astype(np.float32))
    seams = (np.abs(np.diff(cell, axis=0, prepend=cell[:1])) + np.abs(np.diff(cell, axis=1, prepend=cell[:, :1])) > 0)
    img = _blend(img, _hex("#2a2018"), 0.85 * seams.astype(np.float32))
    return _blend(img, _hex("#2a2018"), _edge(mask))


def paint_watercolour(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soft washes: blurred pastel blotches, the shape a translucent blurred blue-violet stain."""
    size = mask.shape[0]
    noise = _blur(rng.uniform(0, 1, size=(size, size, 3)), 3.0)
    noise = (noise - noise.mean()) / (noise.std() + 1e-6)
    paper = _jitter("#f3e9ef", rng, 0.04) + 0.06 * noise
    stain = _blur(mask, 1.2)
    img = _blend(paper, _jitter("#6f7fc8", rng, 0.08), 0.85 * stain)
    return img + 0.03 * noise


def paint_neon(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Black night with a glowing cyan or magenta outline and a faint glow; the inside stays dark."""
    size = mask.shape[0]
    color = _jitter("#19f0ff" if rng.random() < 0.5 else "#ff2bd6", rng, 0.05)
    edge = _edge(mask)
    glow = _blur(edge, 1.5)
    img = np.broadcast_to(_jitter("#0b0614", rng, 0.02), (size, size, 3))
    img = _blend(img, color * 0.6, np.clip(1.5 * glow, 0, 1))
    return _blend(img, color, edge)


def paint_pencil(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey paper, graphite outline and diagonal hatching inside the shape; no colour."""
    y, x = _grid(mask.shape[0])
    period = rng.integers(3, 5)
    hatch = (((x + y + rng.integers(0, period)) % period) == 0).astype(np.float32)
    paper = 0.88 + rng.uniform(-0.03, 0.03) + 0.03 * rng.standard_normal(mask.shape)
    tone = paper - 0.45 * hatch * mask - 0.6 * _edge(mask)
    return np.repeat(tone[..., None], 3, axis=-1)


def paint_popart(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Yellow ground with a red halftone grid; the shape flat bright blue with a thick black outline."""
    y, x = _grid(mask.shape[0])
    oy, ox = rng.integers(0, 4, size=2)
    dots = ((((y + oy) % 4) - 1.5) ** 2 + (((x + ox) % 4) - 1.5) ** 2 < 1.6).astype(np.float32)
    img = _blend(np.broadcast_to(_jitter("#ffdd1f", rng, 0.04), (*mask.shape, 3)), _jitter("#e8262b", rng), dots)
    img = _blend(img, _jitter("#1546d6", rng), mask)
    return _blend(img, _hex("#000000"), _edge(mask) * 0.95)


def paint_mosaic(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """2x2-pixel tiles with light grout every other tile: greens and teals outside, purples inside."""
    size, tile = mask.shape[0], 2
    n = size // tile
    cover = mask.reshape(n, tile, n, tile).mean(axis=(1, 3)) > 0.5
    greens = np.stack([_hex(c) for c in ("#2e8b57", "#3cb371", "#20b2aa", "#66cdaa")])
    purples = np.stack([_hex(c) for c in ("#6a0dad", "#8e44ad", "#9b59b6")])
    tiles = np.where(cover[..., None], purples[rng.integers(0, 3, size=(n, n))],
                     greens[rng.integers(0, 4, size=(n, n))])
    tiles = tiles + rng.uniform(-0.05, 0.05, size=(n, n, 1))
    img = np.repeat(np.repeat(tiles, tile, axis=0), tile, axis=1)
    grout = (np.arange(size) % (2 * tile) == 0)
    return _blend(img, _hex("#e8e4da"), (grout[:, None] | grout[None, :]).astype(np.float32) * 0.5)


PAINTERS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "ukiyo-e": paint_ukiyo, "pointillist": paint_pointillist, "cubist": paint_cubist,
    "watercolour": paint_watercolour, "neon": paint_neon, "pencil sketch": paint_pencil,
    "pop-art": paint_popart, "mosaic": paint_mosaic,
}


# --- corpus --------------------------------------------------------------------------------------

def render(content: str, style: str, rng: np.random.Generator) -> np.ndarray:
    """One image uint8 [IMAGE_SIZE, IMAGE_SIZE, 3] of `content` painted in `style`."""
    if style not in PAINTERS:
        raise InputError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    mask = draw_silhouette(content, rng)
    img = PAINTERS[style](mask, rng)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def cell_of(index: int) -> tuple[str, str]:
    """(content, style) of item `index`: items cycle through all content x style cells."""
    cell = index % (len(CONTENTS) * len(STYLES))
    return CONTENTS[cell % len(CONTENTS)], STYLES[cell // len(CONTENTS)]


def render_item(seed: int, index: int) -> ToyArtItem:
    """Item `index` of the corpus of `seed`; depends only on (seed, index), so shards can be made anywhere."""
    if seed < 0 or index < 0:
        raise InputError(f"seed and index must be non-negative, got {seed} and {index}")
    content, style = cell_of(index)
    rng = np.random.default_rng([seed, index])
    return ToyArtItem(render(content, style, rng), content, style, caption_for(content, style))


def iter_corpus(seed: int, num_items: int, *, start: int = 0) -> Iterator[ToyArtItem]:
    """Items start .. start + num_items - 1 of the corpus of `seed`, balanced over the 48 cells."""
    for index in range(start, start + num_items):
        yield render_item(seed, index)


def corpus_arrays(seed: int, per_cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The corpus as arrays: images uint8 [N, H, W, 3], content ids [N], style ids [N]; N = 48 per_cell."""
    items = list(iter_corpus(seed, per_cell * len(CONTENTS) * len(STYLES)))
    images = np.stack([it.image for it in items])
    contents = np.array([CONTENTS.index(it.content) for it in items], dtype=np.int64)
    styles = np.array([STYLES.index(it.style) for it in items], dtype=np.int64)
    return images, contents, styles


def item_id(image: np.ndarray) -> str:
    """Content-addressed id: the first 16 hex digits of the SHA-256 of the raw pixels."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]
