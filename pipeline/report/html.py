"""HTML and Markdown renderings of a :class:`pipeline.report.document.Doc`, from Jinja2 templates.

``templates/report.html`` is rendered with autoescaping on (every text, table cell and caption is escaped
by Jinja2, never by hand) and ``StrictUndefined`` (a misspelt field is an error, not an empty string). The
page is self-contained: the stylesheet is inlined and figures are base64 PNG data URIs, so it opens on an
offline machine and can be mailed as one file. Markdown (the model card) uses a separate environment
without HTML escaping.
"""

from __future__ import annotations

import base64
from functools import cache
from typing import TYPE_CHECKING

import jinja2

if TYPE_CHECKING:
    from pipeline.report.document import Doc

__all__ = ["environment", "render_html", "render_markdown"]


@cache
def environment(markdown: bool = False) -> jinja2.Environment:
    """The report's Jinja2 environment: templates shipped in ``pipeline/report/templates``.

    Args:
        markdown: True for the Markdown environment (no HTML autoescaping), else HTML (autoescaped).
    """
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.report", "templates"),
        autoescape=False if markdown else jinja2.select_autoescape(["html"], default=True),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["b64png"] = lambda png: base64.b64encode(png).decode("ascii")
    return env


def render_html(doc: Doc, title: str, subtitle: str) -> str:
    """The whole page: title, subtitle and every block of ``doc``."""
    return environment().get_template("report.html").render(title=title, subtitle=subtitle, blocks=doc.blocks)


def render_markdown(doc: Doc) -> str:
    """The blocks of ``doc`` as Markdown (figures become a pointer to report.html / report.pdf)."""
    return environment(markdown=True).get_template("document.md").render(blocks=doc.blocks)
