"""PNG result grids: one row per query, thumbnails of its results, ground truth outlined."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

GREEN = (0, 170, 0)
GREY = (170, 170, 170)
WHITE = (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of the result grid: rows = queries, columns = ranks."""

    rows: int
    cols: int
    thumb: tuple[int, int] = (128, 128)   # (H, W) box each thumbnail is fitted into
    pad: int = 6                           # space around a thumbnail (the outline lives here)
    title_h: int = 22                      # query text above each row
    label_h: int = 16                      # score under each thumbnail
    margin: int = 8

    @property
    def cell(self) -> tuple[int, int]:
        return self.thumb[0] + 2 * self.pad + self.label_h, self.thumb[1] + 2 * self.pad

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the PNG."""
        ch, cw = self.cell
        return (2 * self.margin + self.cols * cw, 2 * self.margin + self.rows * (self.title_h + ch))

    def thumb_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the thumbnail box (exclusive x1, y1)."""
        ch, cw = self.cell
        x0 = self.margin + col * cw + self.pad
        y0 = self.margin + row * (self.title_h + ch) + self.title_h + self.pad
        return x0, y0, x0 + self.thumb[1], y0 + self.thumb[0]


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_grid(texts: Sequence[str], paths: Sequence[Sequence[str]], scores, image_root: str,
                out_path: str | None = None, ground_truth: Sequence[Sequence[str]] | None = None,
                thumb: tuple[int, int] = (128, 128), cosine=None):
    """PNG grid of search results -> (PIL.Image, GridLayout).

    One row per query (texts[q] above it), thumbnails of paths[q] (relative to image_root), each
    with its score below (scores [Q, k]; with cosine [Q, k], e.g. SearchResult.cosine of a
    two-stage search, "cos" and the global cosine follow it, cut to the thumbnail's width); with
    ground_truth (Q lists of relative paths) a correct match is outlined in green (4 px), others in
    thin grey (1 px). Writes `out_path` when given (local or gs://).
    """
    from PIL import Image, ImageDraw, ImageFont

    scores = np.asarray(scores)
    layout = GridLayout(rows=len(texts), cols=max((len(p) for p in paths), default=1), thumb=tuple(thumb))
    canvas = Image.new("RGB", layout.size, WHITE)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, text in enumerate(texts):
        x0, y0, _, _ = layout.thumb_box(r, 0)
        title_w = layout.size[0] - 2 * layout.margin
        draw.text((layout.margin, y0 - layout.pad - layout.title_h + 4),
                  _fit_text(draw, f"{r + 1}. {text}", font, title_w), fill=(0, 0, 0), font=font)
        truth = {os.path.normpath(p) for p in (ground_truth[r] if ground_truth is not None else ())}
        for c, rel in enumerate(paths[r]):
            bx0, by0, bx1, by1 = layout.thumb_box(r, c)
            try:
                with Image.open(os.path.join(image_root, rel)) as im:
                    im = im.convert("RGB")
                    fit = min(layout.thumb[1] / im.width, layout.thumb[0] / im.height)
                    im = im.resize((max(1, min(layout.thumb[1], round(im.width * fit))),
                                    max(1, min(layout.thumb[0], round(im.height * fit)))),
                                   Image.Resampling.BILINEAR)
                    canvas.paste(im, (bx0 + (layout.thumb[1] - im.width) // 2,
                                      by0 + (layout.thumb[0] - im.height) // 2))
            except OSError:  # moved/unreadable since indexing: leave the box empty, say so
                draw.text((bx0 + 4, by0 + 4), "missing", fill=(200, 0, 0), font=font)
            hit = os.path.normpath(rel) in truth
            width = 4 if hit else 1
            draw.rectangle((bx0 - width, by0 - width, bx1 - 1 + width, by1 - 1 + width),
                           outline=GREEN if hit else GREY, width=width)
            label = f"#{c + 1}  {float(scores[r][c]):.3f}"
            if cosine is not None:
                label += f"  cos {float(cosine[r][c]):.3f}"
            draw.text((bx0, by1 + layout.pad - 2), _fit_text(draw, label, font, layout.cell[1] - 2),
                      fill=(0, 0, 0), font=font)
    if out_path:
        from xmr_jax.logging_utils import as_path

        target = as_path(out_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as fh:
            canvas.save(fh, format="PNG")
    return canvas, layout

