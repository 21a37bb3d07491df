"""Procedural pedestrian-like figures: identity attributes and a PIL renderer.

An identity is one combination of attributes (skin, hair, top, bottom, shoes, bag). Each image of an
identity is drawn at `supersample` times the output size with PIL ImageDraw, then box-downscaled,
with per-image position, scale, brightness, colour jitter and Gaussian noise.
Pure NumPy + PIL (no TensorFlow).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

# Named colours (RGB). The names are what the captions say.
CLOTH_COLOURS = {
    "red": (190, 35, 40),
    "blue": (40, 70, 185),
    "green": (45, 140, 60),
    "yellow": (225, 200, 45),
    "black": (25, 25, 28),
    "white": (235, 235, 232),
    "grey": (128, 128, 130),
    "pink": (235, 130, 170),
    "purple": (120, 50, 150),
    "orange": (235, 125, 30),
}
HAIR_COLOURS = {
    "black": (20, 18, 18),
    "brown": (100, 60, 30),
    "blond": (220, 185, 100),
    "grey": (160, 160, 160),
}
SHOE_COLOURS = {
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "brown": (110, 70, 35),
    "red": (180, 30, 35),
}
SKIN_TONES = ((240, 200, 170), (210, 160, 120), (160, 110, 75), (100, 65, 45))
HAIR_STYLES = ("short", "long")
TOP_STYLES = ("tshirt", "jacket", "dress")
BOTTOM_STYLES = ("pants", "shorts", "skirt")
BAG_STYLES = ("none", "backpack", "handbag")


@dataclasses.dataclass(frozen=True)
class Attributes:
    """One identity: indices/names of its attributes (hashable, so identities can be deduplicated)."""

    skin: int
    hair_style: str
    hair_colour: str
    top_style: str
    top_colour: str
    bottom_style: str
    bottom_colour: str
    shoe_colour: str
    bag_style: str
    bag_colour: str  # "" when bag_style == "none"


def sample_identities(rng: np.random.Generator, count: int) -> list[Attributes]:
    """Draws `count` distinct attribute combinations (rejection of duplicates)."""
    cloth, hair, shoes = list(CLOTH_COLOURS), list(HAIR_COLOURS), list(SHOE_COLOURS)
    seen: set[Attributes] = set()
    out: list[Attributes] = []
    while len(out) < count:
        bag_style = BAG_STYLES[rng.integers(len(BAG_STYLES))]
        attrs = Attributes(
            skin=int(rng.integers(len(SKIN_TONES))),
            hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
            hair_colour=hair[rng.integers(len(hair))],
            top_style=TOP_STYLES[rng.integers(len(TOP_STYLES))],
            top_colour=cloth[rng.integers(len(cloth))],
            bottom_style=BOTTOM_STYLES[rng.integers(len(BOTTOM_STYLES))],
            bottom_colour=cloth[rng.integers(len(cloth))],
            shoe_colour=shoes[rng.integers(len(shoes))],
            bag_style=bag_style,
            bag_colour="" if bag_style == "none" else cloth[rng.integers(len(cloth))],
        )
        if attrs not in seen:
            seen.add(attrs)
            out.append(attrs)
    return out


def _shade(rgb, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Muted vertical gradient plus a few random muted rectangles (street-like clutter)."""
    base = rng.uniform(70, 170, size=3)
    top, bottom = base + rng.uniform(-30, 30, 3), base + rng.uniform(-30, 30, 3)
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    grad = top[None, None] * (1 - t) + bottom[None, None] * t
    img = Image.fromarray(np.broadcast_to(grad, (h, w, 3)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        grey = rng.uniform(60, 190)
        colour = tuple(int(np.clip(grey + d, 0, 255)) for d in rng.uniform(-20, 20, 3))
        x0, y0 = rng.uniform(-0.2 * w, w), rng.uniform(-0.2 * h, h)
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.05, 0.4) * h
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    return img


def _draw_figure(draw: ImageDraw.ImageDraw, a: Attributes, cx: float, y0: float, u: float) -> None:
    """Draws the figure; `u` = 1% of the figure height, (cx, y0) = top centre of the head."""
    skin = SKIN_TONES[a.skin]
    hair = HAIR_COLOURS[a.hair_colour]
    top = CLOTH_COLOURS[a.top_colour]
    bottom = CLOTH_COLOURS[a.bottom_colour]
    shoe = SHOE_COLOURS[a.shoe_colour]
    bag = CLOTH_COLOURS.get(a.bag_colour)

    def rect(x0, ya, x1, yb, fill):
        draw.rectangle([cx + x0 * u, y0 + ya * u, cx + x1 * u, y0 + yb * u], fill=fill)

    def poly(points, fill):
        draw.polygon([(cx + x * u, y0 + y * u) for x, y in points], fill=fill)

    # Behind the body: long hair, backpack.
    if a.hair_style == "long":
        rect(-7.5, 4, 7.5, 30, hair)
    if a.bag_style == "backpack":
        rect(-14, 18, 14, 44, _shade(bag, 0.8))
    # Legs and bottom garment.
    leg_bottom = 93
    rect(-8, 48, -1, leg_bottom, skin)
    rect(1, 48, 8, leg_bottom, skin)
    if a.bottom_style == "pants":
        rect(-8.5, 47, -0.5, leg_bottom, bottom)
        rect(0.5, 47, 8.5, leg_bottom, bottom)
        rect(-8.5, 47, 8.5, 54, bottom)
    elif a.bottom_style == "shorts":
        rect(-9, 47, -0.5, 64, bottom)
        rect(0.5, 47, 9, 64, bottom)
        rect(-9, 47, 9, 54, bottom)
    else:  # skirt
        poly([(-9, 47), (9, 47), (13, 68), (-13, 68)], bottom)
    rect(-9.5, leg_bottom, -0.5, 99, shoe)
    rect(0.5, leg_bottom, 9.5, 99, shoe)
    # Arms (skin), then sleeves.
    rect(-15, 18, -11, 50, skin)
    rect(11, 18, 15, 50, skin)
    if a.top_style == "jacket":
        rect(-15.5, 17, -10.5, 48, top)
        rect(10.5, 17, 15.5, 48, top)
    elif a.top_style == "tshirt":
        rect(-15.5, 17, -10.5, 29, top)
        rect(10.5, 17, 15.5, 29, top)
    # Neck and torso.
    rect(-2.5, 12, 2.5, 18, skin)
    if a.top_style == "dress":
        poly([(-10.5, 17), (10.5, 17), (9, 44), (13, 58), (-13, 58), (-9, 44)], top)
    else:
        poly([(-11, 17), (11, 17), (9.5, 49), (-9.5, 49)], top)
        if a.top_style == "jacket":  # zip line and collar
            rect(-0.6, 18, 0.6, 49, _shade(top, 0.6))
            poly([(-5, 17), (0, 23), (5, 17)], _shade(top, 1.25))
    if a.bag_style == "backpack":  # straps over the shoulders
        rect(-8, 17, -6, 38, bag)
        rect(6, 17, 8, 38, bag)
    elif a.bag_style == "handbag":
        draw.arc([cx + 14 * u, y0 + 40 * u, cx + 20 * u, y0 + 50 * u], 180, 360, fill=bag,
                 width=max(1, int(u)))
        rect(13, 45, 21, 56, bag)
    # Head: hair cap behind the face, then face.
    draw.ellipse([cx - 6.5 * u, y0, cx + 6.5 * u, y0 + 11 * u], fill=hair)
    draw.ellipse([cx - 5 * u, y0 + 2.5 * u, cx + 5 * u, y0 + 14 * u], fill=skin)
    rect(-5.5, 0.5, 5.5, 3.5, hair)  # fringe


def render(attrs: Attributes, rng: np.random.Generator, height: int = 64, width: int = 32,
           supersample: int = 4) -> np.ndarray:
    """Renders one image of an identity.

    Args:
      attrs: the identity.
      rng: per-image generator (position, scale, background, photometric jitter).
      height, width: output size in pixels.
      supersample: drawing resolution factor (>= 1); the drawing is box-downscaled.

    Returns:
      uint8 [height, width, 3].
    """
    if height < 8 or width < 4 or supersample < 1:
        raise ValueError(
            f"render: need height >= 8, width >= 4, supersample >= 1; got {height}x{width}, "
            f"supersample={supersample}")
    h, w = height * supersample, width * supersample
    img = _background(rng, h, w)
    scale = rng.uniform(0.78, 0.95)
    fig_h = scale * h
    u = fig_h / 100.0
    # Keep the figure (about +-21u wide with a handbag) mostly inside the frame.
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    y0 = rng.uniform(0.0, h - fig_h)
    _draw_figure(ImageDraw.Draw(img), attrs, cx, y0, u)
    if supersample > 1:
        img = img.resize((width, height), Image.Resampling.BOX)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = x * rng.uniform(0.8, 1.2)  # brightness
    x = x + rng.uniform(-12, 12, size=3).astype(np.float32) / 255.0  # colour jitter
    x = x + rng.normal(0.0, 0.03, size=x.shape).astype(np.float32)  # sensor noise
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
