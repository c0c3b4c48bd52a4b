"""The four pictures a rendered problem can be: a text block, a table, a bar chart, a right triangle.

Each ``draw_*`` function takes the content (what the question is about, drawn by the caller from
the example's RNG) and a style RNG (looks only), and returns a `Figure`: the image, every string
it drew (so tests can tie the reasoning's values to the pixels' source without OCR) and the ink box
of each string (so tests can check nothing leaves the canvas). Sides stay within
``MIN_SIDE..MAX_SIDE`` (224..288 px) and text at ``MIN_TEXT_SIZE`` px or more, so that every
character stays legible at the tower's 224 px (see ``drawing.py``).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import random

from PIL import Image, ImageDraw

from train.synthetic.drawing import (MAX_SIDE, MIN_SIDE, MIN_TEXT_SIZE, TextStyle, bar_colour, colours, draw_label,
                                     load_font, paste, random_style, text_layer)

MARGIN = 10


@dataclasses.dataclass
class Figure:
    """A drawn picture.

    Attributes:
      image: RGB, each side in ``MIN_SIDE..MAX_SIDE``.
      texts: every string drawn, in drawing order.
      boxes: the ink box ``(x0, y0, x1, y1)`` of each string (same order).
      background: the background colour.
      style: how a text block was drawn (font, size, bold, italic, rotation); empty for the others.
      glyphs: every inked character drawn, as ``(char, x, y)``: its ink centre on the image, string
        after string in drawing order (what a tower's per-patch reading objective learns from).
    """

    image: Image.Image
    texts: list[str]
    boxes: list[tuple[int, int, int, int]]
    background: tuple[int, int, int]
    style: dict = dataclasses.field(default_factory=dict)
    glyphs: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)


def _side(rng: random.Random, lo: int = MIN_SIDE, hi: int = MAX_SIDE) -> int:
    return rng.randrange(lo, hi + 1, 32)


def draw_text(text: str, rng: random.Random, level: int) -> Figure:
    """`text` wrapped, in a random font, size, weight, slant and colours, rotated by a few degrees.

    The size shrinks (and the canvas widens) until the rotated block fits with a margin; harder
    levels start smaller and turn further (up to 6 degrees).

    Raises:
      ValueError: the text cannot fit a ``MAX_SIDE`` square canvas even at ``MIN_TEXT_SIZE`` px.
    """
    bg, ink = colours(rng)
    width = _side(rng)
    size = max(MIN_TEXT_SIZE, 25 - level + rng.randint(-2, 2))
    base = random_style(rng, ink, size, max_rotation=min(1.5 * level, 6.0))
    while True:
        style = dataclasses.replace(base, size=size)
        # Wrap narrower than the canvas: the slant and the rotation widen the block.
        placed: list[tuple[str, float, float]] = []
        layer = text_layer(text, style, width - 2 * MARGIN - 16 - 0.25 * size, placed)
        if layer.width <= width - 2 * MARGIN and layer.height <= MAX_SIDE - 2 * MARGIN:
            break
        if size > MIN_TEXT_SIZE:
            size -= 1
        elif width < MAX_SIDE:
            width += 32
        else:
            raise ValueError(f"text of {len(text)} characters does not fit a {MAX_SIDE}px image")
    height = max(MIN_SIDE, min(MAX_SIDE, layer.height + 2 * MARGIN + rng.randint(0, 40)))
    canvas = Image.new("RGB", (width, height), bg)
    x = rng.randint(MARGIN, width - MARGIN - layer.width)
    y = rng.randint(MARGIN, height - MARGIN - layer.height)
    box = paste(canvas, layer, (x, y))
    look = {"font": pathlib.Path(style.font).name, "size": style.size, "bold": style.bold, "italic": style.italic,
            "rotation": style.rotation}
    return Figure(canvas, [text], [box], bg, look, [(ch, gx + x, gy + y) for ch, gx, gy in placed])


def draw_table(title: str, rows: list[list[str]], rng: random.Random) -> Figure:
    """A grid with a shaded header row (``rows[0]``); the first column left-aligned, numbers right.

    Raises:
      ValueError: the table does not fit ``MAX_SIDE`` px even at ``MIN_TEXT_SIZE`` px.
    """
    bg, ink = colours(rng)
    fonts = random_style(rng, ink, 16, 0.0)
    size = rng.randint(MIN_TEXT_SIZE, MIN_TEXT_SIZE + 3)
    while True:
        font = load_font(fonts.font, size)
        pad = max(4, size // 3)
        col_w = [int(max(font.getlength(r[c]) for r in rows)) + 2 * pad for c in range(len(rows[0]))]
        row_h, title_h = int(size * 1.6), int((size + 2) * 1.7)
        if sum(col_w) + 2 * MARGIN <= MAX_SIDE and title_h + row_h * len(rows) + 2 * MARGIN <= MAX_SIDE:
            break
        if size <= MIN_TEXT_SIZE:
            raise ValueError(f"table {title!r} with {len(rows)} rows does not fit a {MAX_SIDE}px image")
        size -= 1
    title_font = load_font(fonts.font, size + 2)
    table_w = sum(col_w)
    content_w = max(table_w, int(title_font.getlength(title)))
    width = max(MIN_SIDE, min(MAX_SIDE, content_w + 2 * MARGIN + rng.randint(0, 32)))
    height = max(MIN_SIDE, min(MAX_SIDE, title_h + row_h * len(rows) + 2 * MARGIN + rng.randint(0, 32)))
    canvas = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(canvas)
    x0 = (width - table_w) // 2
    y0 = MARGIN + title_h
    glyphs: list[tuple[str, float, float]] = []
    texts = [title]
    boxes = [draw_label(canvas, title, title_font, ink, (width / 2, MARGIN + title_h / 2), glyphs=glyphs)]
    shade = tuple(int(0.82 * b + 0.18 * i) for b, i in zip(bg, ink))
    draw.rectangle((x0, y0, x0 + table_w, y0 + row_h), fill=shade)
    for r, row in enumerate(rows):
        y = y0 + r * row_h
        x = x0
        for c, cell in enumerate(row):
            numeric = c > 0 and r > 0
            anchor_x = x + col_w[c] - pad if numeric else x + pad
            texts.append(cell)
            boxes.append(draw_label(canvas, cell, font, ink, (anchor_x, y + row_h / 2), "rm" if numeric else "lm",
                                    glyphs))
            x += col_w[c]
    for r in range(len(rows) + 1):
        draw.line((x0, y0 + r * row_h, x0 + table_w, y0 + r * row_h), fill=ink, width=2 if r in (0, 1) else 1)
    x = x0
    for w in [0] + col_w:
        x += w
        draw.line((x, y0, x, y0 + row_h * len(rows)), fill=ink, width=1)
    return Figure(canvas, texts, boxes, bg, glyphs=glyphs)


def draw_bar_chart(title: str, labels: list[str], values: list[str], rng: random.Random) -> Figure:
    """Bars with each value written at its bar's end and its label at its foot, and a title.

    The bars stand upright (labels below, values above) when every label and value fits its bar's
    slot at ``MIN_TEXT_SIZE`` px or more; otherwise, and for a third of the charts anyway, they lie
    along rows (labels left, values right), where seven bars of six-letter labels still fit 288 px.
    """
    bg, ink = colours(rng)
    style = random_style(rng, ink, 14, 0.0)
    width, height = _side(rng, 256), _side(rng)
    n = len(labels)
    slot = (width - 2 * MARGIN - 10) / n
    size = MIN_TEXT_SIZE + 2
    while size >= MIN_TEXT_SIZE:
        font = load_font(style.font, size)
        if max(font.getlength(s) for s in labels + values) <= slot - 4:
            break
        size -= 1
    upright = size >= MIN_TEXT_SIZE and rng.random() < 2 / 3
    size = max(size, MIN_TEXT_SIZE)
    font = load_font(style.font, size)
    title_font = load_font(style.font, size + 2)
    canvas = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(canvas)
    texts = [title]
    glyphs: list[tuple[str, float, float]] = []
    boxes = [draw_label(canvas, title, title_font, ink, (width / 2, MARGIN + (size + 2) * 0.8), glyphs=glyphs)]
    peak = max(float(v) for v in values)
    fill = bar_colour(rng, bg) if rng.random() < 0.5 else None
    top = MARGIN + int((size + 2) * 1.6)  # below the title
    if upright:
        top += int(size * 1.4)  # room for the tallest value label
        bottom = height - MARGIN - int(size * 1.6)
        axis_x = MARGIN + 6
        for i, (label, value) in enumerate(zip(labels, values)):
            cx = axis_x + 4 + slot * (i + 0.5)
            h = max(2.0, (bottom - top) * float(value) / peak)
            half = slot * rng.uniform(0.28, 0.36)
            draw.rectangle((cx - half, bottom - h, cx + half, bottom), fill=fill or bar_colour(rng, bg), outline=ink)
            texts += [value, label]
            boxes.append(draw_label(canvas, value, font, ink, (cx, bottom - h - 3), "ms", glyphs))
            boxes.append(draw_label(canvas, label, font, ink, (cx, bottom + 6), "mt", glyphs))
        draw.line((axis_x, top - 4, axis_x, bottom), fill=ink, width=2)
        draw.line((axis_x, bottom, width - MARGIN, bottom), fill=ink, width=2)
    else:
        row = (height - top - MARGIN) / n
        if row < size * 1.2:
            raise ValueError(f"{n} bars do not fit a {height}px chart at {size}px")
        axis_x = MARGIN + max(font.getlength(s) for s in labels) + 8
        longest = axis_x + 6 + max(font.getlength(s) for s in values) + MARGIN
        for i, (label, value) in enumerate(zip(labels, values)):
            cy = top + row * (i + 0.5)
            w = max(2.0, (width - longest) * float(value) / peak)
            half = row * rng.uniform(0.28, 0.36)
            draw.rectangle((axis_x, cy - half, axis_x + w, cy + half), fill=fill or bar_colour(rng, bg), outline=ink)
            texts += [label, value]
            boxes.append(draw_label(canvas, label, font, ink, (axis_x - 6, cy), "rm", glyphs))
            boxes.append(draw_label(canvas, value, font, ink, (axis_x + w + 4, cy), "lm", glyphs))
        draw.line((axis_x, top, axis_x, height - MARGIN), fill=ink, width=2)
    return Figure(canvas, texts, boxes, bg, glyphs=glyphs)


def draw_right_triangle(sides: dict[str, str], legs: tuple[float, float], rng: random.Random,
                        angle_mark: str | None = None) -> Figure:
    """Triangle ABC right-angled at C, with a right-angle mark and side labels.

    Args:
      sides: label text per side ``"a"`` (BC), ``"b"`` (AC), ``"c"`` (AB); a side left out is
        unlabelled.
      legs: the lengths of BC and AC, for the shape (drawn to scale, aspect ratio kept within 1:3).
      rng: the style RNG (colours, size, which way the triangle faces).
      angle_mark: a label for the angle at A (marked by an arc), or None.
    """
    bg, ink = colours(rng)
    style = random_style(rng, ink, 15, 0.0)
    font = load_font(style.font, rng.randint(MIN_TEXT_SIZE, MIN_TEXT_SIZE + 3))
    width, height = _side(rng, 256), _side(rng, 256)
    ratio = min(3.0, max(1 / 3, legs[0] / legs[1]))  # height / width of the drawn triangle
    # Side labels sit beside the legs: keep room for the widest one (and a vertex letter) around.
    label_w = max([font.getlength(t) for t in sides.values()] + [font.getlength("M")])
    margin_x, margin_y = 24 + label_w, 24 + 2 * font.size
    room_w, room_h = width - 2 * margin_x, height - 2 * margin_y
    scale = min(room_w, room_h / ratio)
    tw, th = scale, scale * ratio
    left, top = (width - tw) / 2, (height - th) / 2
    flip_x, flip_y = rng.random() < 0.5, rng.random() < 0.5

    def pt(u: float, v: float) -> tuple[float, float]:  # u rightwards from C, v upwards from C
        x = left + (tw - u if flip_x else u)
        y = top + (v if flip_y else th - v)
        return x, y

    c, a, b = pt(0, 0), pt(tw, 0), pt(0, th)  # A on the horizontal leg, B on the vertical one
    canvas = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([a, b, c], outline=ink, width=2)
    m = 12
    draw.line([pt(m, 0), pt(m, m), pt(0, m)], fill=ink, width=1)
    centroid = ((a[0] + b[0] + c[0]) / 3, (a[1] + b[1] + c[1]) / 3)
    texts, boxes = [], []
    glyphs: list[tuple[str, float, float]] = []

    def outward(p: tuple[float, float], dist: float) -> tuple[float, float]:
        dx, dy = p[0] - centroid[0], p[1] - centroid[1]
        norm = math.hypot(dx, dy) or 1.0
        return p[0] + dist * dx / norm, p[1] + dist * dy / norm

    for name, p in (("A", a), ("B", b), ("C", c)):
        texts.append(name)
        boxes.append(draw_label(canvas, name, font, ink, outward(p, 16), glyphs=glyphs))
    mids = {"a": ((b[0] + c[0]) / 2, (b[1] + c[1]) / 2), "b": ((a[0] + c[0]) / 2, (a[1] + c[1]) / 2),
            "c": ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)}
    for side, text in sides.items():
        mx, my = mids[side]
        if side == "a":
            anchor = "rm" if not flip_x else "lm"
            xy = (mx - 8, my) if not flip_x else (mx + 8, my)
        elif side == "b":
            anchor = "mt" if not flip_y else "ms"
            xy = (mx, my + 8) if not flip_y else (mx, my - 8)
        else:  # centred beyond the hypotenuse's midpoint, far enough that the text clears the line
            reach = 6 + 0.5 * math.hypot(font.getlength(text), font.size)
            xy, anchor = outward((mx, my), reach), "mm"
        texts.append(text)
        boxes.append(draw_label(canvas, text, font, ink, xy, anchor, glyphs))
    if angle_mark is not None:
        r = 28
        ang_b = math.degrees(math.atan2(b[1] - a[1], b[0] - a[0]))
        ang_c = math.degrees(math.atan2(c[1] - a[1], c[0] - a[0]))
        lo, hi = sorted((ang_b, ang_c))
        if hi - lo > 180:
            lo, hi = hi, lo + 360
        draw.arc((a[0] - r, a[1] - r, a[0] + r, a[1] + r), lo, hi, fill=ink, width=2)
        mid = math.radians((lo + hi) / 2)
        texts.append(angle_mark)
        boxes.append(draw_label(canvas, angle_mark, font, ink,
                                (a[0] + (r + 12) * math.cos(mid), a[1] + (r + 12) * math.sin(mid)), glyphs=glyphs))
    return Figure(canvas, texts, boxes, bg, glyphs=glyphs)


__all__ = ["Figure", "TextStyle", "draw_bar_chart", "draw_right_triangle", "draw_table", "draw_text", "paste"]
