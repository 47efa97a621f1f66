"""The PDF rendering of a :class:`pipeline.report.document.Doc`: the same sections, tables and figures
as the HTML, laid out on A4 pages by reportlab's platypus (paragraph flow, tables that wrap their cells
and repeat their header row across pages, figures kept with their captions, headings kept with what
follows). Text is real text in reading order (``pdftotext`` extracts it), set in DejaVu Sans taken from
matplotlib's bundled fonts (full Unicode, embedded as a subset; nothing is downloaded).

Reportlab's paragraphs read a small XML markup, so every text is XML-escaped before it becomes one.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import inch, mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import Image, KeepTogether, Paragraph, SimpleDocTemplate, Table, TableStyle

from pipeline.io import atomic_path
from pipeline.report.document import Table as DocTable
from pipeline.report.document import numeric_columns

if TYPE_CHECKING:
    from pipeline.report.document import Doc, Figure

__all__ = ["write_pdf"]

MARGIN = 15 * mm
PAGE_W, PAGE_H = A4
TEXT_W = PAGE_W - 2 * MARGIN
#: Figures keep the pixel density of the PNGs the plots module writes (about 110 px per inch on paper).
PX_PER_INCH = 110.0
CELL_SIZES = (7.0, 6.5, 6.0, 5.5)  # table font sizes tried until the columns' longest words fit
CELL_PAD = 3.0


@cache
def _fonts() -> tuple[str, str]:
    """Register DejaVu Sans (regular, bold) from matplotlib's data folder; returns the two font names."""
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    pdfmetrics.registerFont(TTFont("MedtlSans", str(ttf / "DejaVuSans.ttf")))
    pdfmetrics.registerFont(TTFont("MedtlSans-Bold", str(ttf / "DejaVuSans-Bold.ttf")))
    pdfmetrics.registerFontFamily(
        "MedtlSans",
        normal="MedtlSans",
        bold="MedtlSans-Bold",
        italic="MedtlSans",
        boldItalic="MedtlSans-Bold",
    )
    return "MedtlSans", "MedtlSans-Bold"


@cache
def _styles() -> dict[str, ParagraphStyle]:
    reg, bold = _fonts()
    body = ParagraphStyle(
        "body", fontName=reg, fontSize=8.5, leading=11, textColor=colors.HexColor("#222222"), spaceAfter=4
    )
    grey = colors.HexColor("#555555")
    return {
        "title": ParagraphStyle("title", parent=body, fontName=bold, fontSize=15, leading=19, spaceAfter=3),
        "subtitle": ParagraphStyle("subtitle", parent=body, fontSize=7.5, leading=9.5, textColor=grey),
        "h": ParagraphStyle(
            "h",
            parent=body,
            fontName=bold,
            fontSize=12,
            leading=15,
            textColor=colors.HexColor("#223344"),
            spaceBefore=12,
            spaceAfter=5,
            keepWithNext=1,
        ),
        "p": body,
        "warn": ParagraphStyle(
            "warn",
            parent=body,
            backColor=colors.HexColor("#fff4d6"),
            borderColor=colors.HexColor("#e0a800"),
            borderWidth=0.6,
            borderPadding=4,
            spaceBefore=6,
            spaceAfter=10,
        ),
        "caption": ParagraphStyle(
            "caption", parent=body, fontSize=7.5, leading=9.5, textColor=grey, spaceAfter=8
        ),
    }


def _para(text: str, style: ParagraphStyle) -> Paragraph:
    return Paragraph(escape(text), style)


def _cell_styles(size: float) -> tuple[ParagraphStyle, ParagraphStyle, ParagraphStyle]:
    reg, bold = _fonts()
    cell = ParagraphStyle(f"cell{size}", fontName=reg, fontSize=size, leading=size * 1.22)
    return (
        cell,
        ParagraphStyle(f"num{size}", parent=cell, alignment=TA_RIGHT),
        ParagraphStyle(f"head{size}", parent=cell, fontName=bold),
    )


def _column_widths(cols: list[list[str]], size: float) -> tuple[list[float], float]:
    """Column widths for one font size, and the sum of the columns' longest words.

    A table that fits keeps its natural widths; otherwise every column gets its longest word (header
    words in bold included) and the rest of the text width is shared by how much each column would
    still need to be unwrapped.
    """
    reg, bold = _fonts()
    natural, floor = [], []
    for col in cols:
        natural.append(max(pdfmetrics.stringWidth(c, bold, size) for c in col) + 2 * CELL_PAD + 1)
        words = [pdfmetrics.stringWidth(w, bold, size) for w in col[0].split()]
        words += [pdfmetrics.stringWidth(w, reg, size) for c in col[1:] for w in c.split()]
        floor.append(max(words, default=0.0) + 2 * CELL_PAD + 1)
    if sum(natural) <= TEXT_W:
        return natural, sum(floor)
    if sum(floor) >= TEXT_W:  # nothing fits unbroken: shrink every column alike
        return [f * TEXT_W / sum(floor) for f in floor], sum(floor)
    slack = [n - f for n, f in zip(natural, floor, strict=True)]
    extra = TEXT_W - sum(floor)
    return [f + extra * s / sum(slack) for f, s in zip(floor, slack, strict=True)], sum(floor)


def _table(t: DocTable) -> Table:
    """A table that wraps its cells at word boundaries, shrinking the font until the longest words fit."""
    ncol = len(t.header)
    rows = [r + [""] * (ncol - len(r)) for r in t.rows]
    cols = [[t.header[i]] + [r[i] for r in rows] for i in range(ncol)]
    for size in CELL_SIZES:
        widths, need = _column_widths(cols, size)
        if need <= TEXT_W:
            break
    cell, num, head = _cell_styles(size)
    data = [[_para(h, head) for h in t.header]]
    data += [[_para(c, num if t.is_num(i, c) else cell) for i, c in enumerate(r[:ncol])] for r in rows]
    table = Table(data, colWidths=widths, repeatRows=1, hAlign="LEFT")
    table.setStyle(
        TableStyle(
            [
                ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#cccccc")),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eef2f6")),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), CELL_PAD),
                ("RIGHTPADDING", (0, 0), (-1, -1), CELL_PAD),
                ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
            ]
        )
    )
    table.spaceBefore, table.spaceAfter = 3, 9
    return table


def _figure(f: Figure) -> KeepTogether:
    """The PNG scaled to the text width (never enlarged past its pixel density), kept with its caption."""
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(f.png)) as im:
        w_px, h_px = im.size
    w = min(TEXT_W, w_px / PX_PER_INCH * inch)
    h = w * h_px / w_px
    max_h = PAGE_H - 2 * MARGIN - 1.0 * inch
    if h > max_h:
        h, w = max_h, max_h * w_px / h_px
    img = Image(io.BytesIO(f.png), width=w, height=h)
    return KeepTogether([img, _para(f.caption or f.name, _styles()["caption"])])


def write_pdf(doc: Doc, path: Path, title: str, subtitle: str) -> None:
    """Write ``doc`` as an A4 portrait PDF at ``path`` (atomically), a footer with the title and page number
    on every page."""
    st = _styles()
    story = [_para(title, st["title"]), _para(subtitle, st["subtitle"])]
    for kind, x in doc.blocks:
        if kind == "h":
            story.append(_para(x, st["h"]))
        elif kind == "p":
            story.append(_para(x, st["p"]))
        elif kind == "warn":
            story.append(_para(f"Warning: {x}", st["warn"]))
        elif kind == "kpi":  # key figures become a two-column table
            rows = [[a, b] for a, b in x]
            story.append(
                _table(DocTable(["figure", "value [confidence interval]"], rows, numeric_columns(rows, 2)))
            )
        elif kind == "table":
            story.append(_table(x))
        elif kind == "fig":
            story.append(_figure(x))
        else:
            raise ValueError(f"report document: unknown block kind {kind!r}")

    reg, _ = _fonts()

    def footer(canvas, _doc) -> None:
        canvas.saveState()
        canvas.setFont(reg, 6.5)
        canvas.setFillColor(colors.HexColor("#777777"))
        canvas.drawString(MARGIN, 0.45 * MARGIN, f"{title}  -  page {canvas.getPageNumber()}")
        canvas.restoreState()

    with atomic_path(path) as tmp:
        pdf = SimpleDocTemplate(
            str(tmp),
            pagesize=A4,
            leftMargin=MARGIN,
            rightMargin=MARGIN,
            topMargin=MARGIN,
            bottomMargin=MARGIN,
            title=title,
            author="medtl",
        )
        pdf.build(story, onFirstPage=footer, onLaterPages=footer)
