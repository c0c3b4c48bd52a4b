"""Pillow drawing for rendered problems: fonts, readable colour pairs, styled rotated text, PNG bytes.

Fonts are what is available offline for sure: Pillow's built-in scalable font
(``ImageFont.load_default(size=...)``, Aileron) and, when present, TrueType fonts shipped inside
installed Python packages (found at run time, never required; system fonts are never used).
The style of a text (font, size, bold by a stroke, italic by a shear, colours, rotation) is drawn
from its own random stream (`style_rng`), so the values and questions of an example never depend on
which fonts a machine happens to have; only the pixels do.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import random
import re
import site
import sysconfig

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Pictures are drawn for a tower that sees them squashed to 224 x 224 (configs/nano_vision.py): sides of
# 224..288 px shrink by at most 0.78, so text of at least MIN_TEXT_SIZE px keeps about 7 px per
# character there (7-11 px, median per task). Drawn on canvases up to 448 px with text down to 11 px,
# a character had 4.5-7 px, and a tower trained to read every cell's characters
# (train/tower_pretrain.py) read a third of them after 3,000 steps; on these, 52% (at lr 3e-3).
MIN_SIDE, MAX_SIDE = 224, 288
MIN_TEXT_SIZE = 16
# Faces that draw symbols or icons where letters and digits should be.
_NOT_TEXT = re.compile(r"sym|cmex|cmsy|cmmi|math|icon|emoji|awesome|dingbat|wingding", re.I)


def site_package_dirs() -> list[str]:
    """The folders installed Python packages live in."""
    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:  # some virtualenvs' site module lacks it
        pass
    return sorted(d for d in dirs if os.path.isdir(d))


@functools.lru_cache(maxsize=1)
def package_fonts() -> tuple[str, ...]:
    """Paths of the TrueType/OpenType text fonts shipped inside installed Python packages, sorted.

    Scanned once per process (matplotlib, reportlab and others ship fonts in their wheels); faces
    that fail to load or draw no digits are left out.
    """
    found = set()
    for root in site_package_dirs():
        for folder, _, files in os.walk(root):
            found.update(os.path.join(folder, f) for f in files
                         if f.lower().endswith((".ttf", ".otf")) and not _NOT_TEXT.search(f))
    usable = []
    for path in sorted(found):
        try:
            font = ImageFont.truetype(path, 16)
            if font.getmask("0123456789").getbbox() is None or font.getmask("Ag").getbbox() is None:
                continue
        except OSError:
            continue  # not a face FreeType reads
        usable.append(path)
    return tuple(usable)


def font_names() -> tuple[str, ...]:
    """Every font this machine offers: ``"builtin"`` first, then package TTFs."""
    return ("builtin",) + package_fonts()


@functools.lru_cache(maxsize=256)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """The font `name` (from `font_names`) at `size` pixels."""
    if name == "builtin":
        font = ImageFont.load_default(size=size)
        if not isinstance(font, ImageFont.FreeTypeFont):
            raise RuntimeError("Pillow was built without FreeType; rendered problems need scalable fonts")
        return font
    return ImageFont.truetype(name, size)


def style_rng(rng: random.Random) -> random.Random:
    """A random stream for looks only, seeded from `rng` (advancing it by one draw)."""
    return random.Random(rng.getrandbits(64))


def _luminance(rgb: tuple[int, int, int]) -> float:
    def lin(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """The WCAG contrast ratio of two colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def colours(rng: random.Random, min_contrast: float = 7.0) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A (background, ink) pair, light on dark or dark on light, at least `min_contrast` apart."""
    while True:
        dark = rng.random() < 0.2
        bg = tuple(rng.randint(20, 70) if dark else rng.randint(215, 255) for _ in range(3))
        ink = tuple(rng.randint(200, 255) if dark else rng.randint(0, 90) for _ in range(3))
        if contrast(bg, ink) >= min_contrast:
            return bg, ink


def bar_colour(rng: random.Random, bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """A saturated fill that stands out from `bg`."""
    while True:
        h = rng.random()
        r, g, b = (int(255 * (0.5 + 0.4 * math.cos(2 * math.pi * (h + k / 3)))) for k in range(3))
        if contrast((r, g, b), bg) >= 1.8:
            return r, g, b


@dataclasses.dataclass(frozen=True)
class TextStyle:
    """How a block of text looks.

    Attributes:
      font: a name from `font_names`.
      size: pixels.
      ink: the text colour.
      bold: thicken strokes (a 1-pixel outline in the ink colour).
      italic: slant by a shear of the rendered text.
      rotation: degrees, counter-clockwise.
    """

    font: str
    size: int
    ink: tuple[int, int, int]
    bold: bool = False
    italic: bool = False
    rotation: float = 0.0


def random_style(rng: random.Random, ink: tuple[int, int, int], size: int, max_rotation: float) -> TextStyle:
    """A style with a random font, weight, slant and a rotation within ``±max_rotation``."""
    fonts = font_names()
    return TextStyle(font=fonts[rng.randrange(len(fonts))], size=size, ink=ink,
                     # A 1-px stroke clogs small glyphs: bold only from 20 px up.
                     bold=rng.random() < 0.3 and size >= 20, italic=rng.random() < 0.25,
                     rotation=round(rng.uniform(-max_rotation, max_rotation), 1))


def wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` pixels long (a longer word gets its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}" if line else word
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def glyph_centres(line: str, font: ImageFont.FreeTypeFont, x: float, y: float) -> list[tuple[str, float, float]]:
    """Each inked character of `line` drawn from (`x`, `y`) (Pillow's default "la" anchor) with its
    ink box's centre: ``(char, cx, cy)``; spaces are left out."""
    out = []
    for j, ch in enumerate(line):
        box = font.getbbox(ch)
        if ch.isspace() or box[2] <= box[0]:
            continue
        left = x + font.getlength(line[:j])
        out.append((ch, left + (box[0] + box[2]) / 2, y + (box[1] + box[3]) / 2))
    return out


def _slant_and_turn(layer: Image.Image, style: TextStyle, resample: Image.Resampling) -> Image.Image:
    """`layer` slanted (italic) and rotated as `style` says, grown to hold the result."""
    w, h = layer.size
    if style.italic:  # x' = x + 0.2 * (h - y): the top leans right
        shear = 0.2
        extra = int(math.ceil(shear * h))
        layer = layer.transform((w + extra, h), Image.Transform.AFFINE, (1, shear, -shear * h, 0, 1, 0),
                                resample=resample)
    if style.rotation:
        layer = layer.rotate(style.rotation, resample=resample, expand=True)
    return layer


def _moved_points(points: list[tuple[float, float]], size: tuple[int, int], style: TextStyle,
                  crop: tuple[int, int, int, int] | None) -> list[tuple[float, float]]:
    """Where `points` of a layer of `size` land after `_slant_and_turn` and the crop to `crop`.

    Each point is marked by its own value on an integer image that takes the same transform with
    nearest-neighbour sampling, so the geometry is Pillow's own; a point whose mark vanishes (a
    rounding edge case) is moved by its nearest marked neighbour's shift instead.
    """
    marks = Image.new("I", size, 0)
    for k, (px, py) in enumerate(points, start=1):
        x0, y0 = int(px), int(py)
        marks.paste(k, (x0 - 1, y0 - 1, x0 + 2, y0 + 2))  # 3 x 3: survives a turn by nearest sampling
    moved = _slant_and_turn(marks, style, Image.Resampling.NEAREST)
    if crop:
        moved = moved.crop(crop)
    grid = np.asarray(moved, dtype=np.int64)
    ys, xs = np.nonzero(grid)
    values = grid[ys, xs]
    out: list[tuple[float, float] | None] = []
    for k, (px, py) in enumerate(points, start=1):
        hit = values == k
        # The 3 x 3 mark's centre is the pixel (x0, y0); the point's sub-pixel offset rides along.
        out.append((float(xs[hit].mean()) + px - int(px), float(ys[hit].mean()) + py - int(py)) if hit.any() else None)
    for k, got in enumerate(out):
        if got is None:
            near = min((j for j, o in enumerate(out) if o is not None),
                       key=lambda j: math.dist(points[j], points[k]), default=None)
            if near is None:
                raise RuntimeError("no character position survived the text's slant and rotation")
            dx, dy = out[near][0] - points[near][0], out[near][1] - points[near][1]
            out[k] = (points[k][0] + dx, points[k][1] + dy)
    return out  # type: ignore[return-value]


def text_layer(text: str, style: TextStyle, width: float,
               glyphs: list[tuple[str, float, float]] | None = None) -> Image.Image:
    """`text` wrapped to `width`, drawn in `style` on a transparent layer cropped to its ink.

    When `glyphs` is a list, each inked character is appended to it as ``(char, x, y)``: its ink
    centre on the returned layer, after the slant, rotation and crop (in reading order).
    """
    font = load_font(style.font, style.size)
    lines = wrap(text, font, width)
    line_h = round(style.size * 1.3)
    stroke = 1 if style.bold else 0
    pad = 4 + stroke
    w = int(max(font.getlength(ln) for ln in lines)) + 2 * pad
    h = line_h * len(lines) + 2 * pad
    layer = Image.new("RGBA", (w, h), style.ink + (0,))
    draw = ImageDraw.Draw(layer)
    for i, ln in enumerate(lines):
        draw.text((pad, pad + i * line_h), ln, font=font, fill=style.ink + (255,),
                  stroke_width=stroke, stroke_fill=style.ink + (255,))
    layer = _slant_and_turn(layer, style, Image.Resampling.BICUBIC)
    box = layer.getchannel("A").getbbox()
    placed = [] if glyphs is None else [g for i, ln in enumerate(lines)
                                        for g in glyph_centres(ln, font, pad, pad + i * line_h)]
    if placed:
        points = _moved_points([(x, y) for _, x, y in placed], (w, h), style, box)
        glyphs.extend((ch, x, y) for (ch, _, _), (x, y) in zip(placed, points))
    return layer.crop(box) if box else layer


def paste(canvas: Image.Image, layer: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int, int]:
    """Alpha-composites `layer` onto `canvas` at `xy`; returns the layer's box on the canvas.

    Raises:
      ValueError: the layer does not lie wholly inside the canvas.
    """
    x, y = xy
    box = (x, y, x + layer.width, y + layer.height)
    if x < 0 or y < 0 or box[2] > canvas.width or box[3] > canvas.height:
        raise ValueError(f"layer box {box} leaves the {canvas.width}x{canvas.height} canvas")
    canvas.alpha_composite(layer, (x, y)) if canvas.mode == "RGBA" else canvas.paste(layer, (x, y), layer)
    return box


def draw_label(canvas: Image.Image, text: str, font: ImageFont.FreeTypeFont, fill, anchor_xy: tuple[float, float],
               anchor: str = "mm", glyphs: list[tuple[str, float, float]] | None = None) -> tuple[int, int, int, int]:
    """Draws one unrotated label with a Pillow text anchor; returns its ink box.

    When `glyphs` is a list, each inked character is appended to it as ``(char, x, y)``, its ink
    centre on the canvas.
    """
    draw = ImageDraw.Draw(canvas)
    draw.text(anchor_xy, text, font=font, fill=fill, anchor=anchor)
    if glyphs is not None:  # where the same text's "la" origin is: shift by the two boxes' difference
        at = draw.textbbox(anchor_xy, text, font=font, anchor=anchor)
        la = draw.textbbox((0, 0), text, font=font, anchor="la")
        glyphs.extend(glyph_centres(text, font, at[0] - la[0], at[1] - la[1]))
    return tuple(int(v) for v in draw.textbbox(anchor_xy, text, font=font, anchor=anchor))


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes (RGB; the same pixels always give the same bytes)."""
    buf = io.BytesIO()
    # Level 1: encoding dominates rendering time; level 6 saves only ~12% of the bytes.
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
