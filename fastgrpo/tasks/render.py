"""Drawing helpers shared by the visual tasks: Pillow import, fonts, colours, shapes, image sizes.

Pillow is imported lazily (:func:`pil`) so that the text tasks work without it. Fonts come from
``ImageFont.load_default(size=...)``: Pillow embeds a scalable font (Aileron Regular, ASCII plus a few
symbols such as the degree sign) that needs no font file, only Pillow's FreeType support, which every Pillow
wheel has. A Pillow built without FreeType gets the fixed-size bitmap font instead (one warning): images
stay correct, labels just do not scale.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLOURS",
    "SHAPES",
    "pil",
    "font",
    "text_box",
    "draw_shape",
    "check_size",
    "scaled_size",
    "fit",
]

logger = logging.getLogger(__name__)

# Named colours the questions refer to: saturated, far apart from each other and from white / black.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "blue": (37, 99, 235),
    "green": (22, 163, 74),
    "yellow": (234, 179, 8),
    "purple": (147, 51, 234),
    "orange": (249, 115, 22),
    "brown": (133, 77, 14),
    "pink": (236, 72, 153),
    "cyan": (6, 182, 212),
    "gray": (107, 114, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")


def pil() -> tuple[Any, Any, Any]:
    """``(Image, ImageDraw, ImageFont)`` from Pillow, or an ImportError that says how to install it."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as e:  # pragma: no cover - Pillow is installed wherever transformers' processors run
        raise ImportError("the visual tasks draw their images with Pillow: pip install pillow") from e
    return Image, ImageDraw, ImageFont


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's embedded font at ``size`` pixels (at least 1); the bitmap default without FreeType."""
    _, _, ImageFont = pil()
    try:
        return ImageFont.load_default(size=max(1, int(round(size))))
    except (ImportError, OSError):
        _warn_bitmap_font()
        return ImageFont.load_default()


@functools.lru_cache(maxsize=1)
def _warn_bitmap_font() -> None:
    logger.warning("Pillow has no FreeType support: labels use the fixed-size bitmap font")


def text_box(fnt: Any, text: str) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of ``text`` drawn at the origin with anchor ``"la"``."""
    return tuple(int(v) for v in fnt.getbbox(text))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    center: tuple[float, float],
    radius: float,
    fill: tuple[int, int, int],
    outline: tuple[int, int, int] | None = None,
) -> None:
    """Draw a filled ``shape`` (one of :data:`SHAPES`) of half-size ``radius`` pixels at ``center``."""
    cx, cy = center
    r = radius
    width = max(1, int(round(r / 8)))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        pts = [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    elif shape == "diamond":
        draw.polygon(
            [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=outline, width=width
        )
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill, outline=outline, width=width)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def check_size(task: str, option: str, value: Any, minimum: int = 16) -> int | None:
    """Validate an image-size option: None (the task's natural size) or an int >= ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{task} task: {option} must be None or an integer >= {minimum} pixels, got {value!r}"
        )
    return value


def scaled_size(natural: tuple[int, int], longest: int | None) -> tuple[int, int]:
    """``natural`` ``(width, height)`` scaled so that its longer side is ``longest`` (unchanged for None)."""
    if longest is None:
        return natural
    w, h = natural
    s = longest / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` resized to ``size`` (Lanczos) unless it already has that size."""
    if image.size == tuple(size):
        return image
    pil_image, _, _ = pil()
    return image.resize(size, pil_image.Resampling.LANCZOS)
