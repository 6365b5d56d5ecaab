"""Self-contained HTML assembly for the reports.

A report is a list of :class:`Section` objects rendered into one HTML file
with inline CSS and figures embedded as base64 PNG ``data:`` URIs: the file
opens offline, can be mailed or archived alone, and references no external
URL. :func:`report_section` builds a section and turns any exception raised
while building it into an error box, so one failing figure never stops a
report (or a run).
"""

from __future__ import annotations

import base64
import html
import logging
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

LOGGER = logging.getLogger("bids_dmri_ldm.reports")

_CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1360px; padding: 0 18px 40px; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin: 18px 0 4px; }
h2 { font-size: 1.3em; border-bottom: 2px solid #3b6ea5; padding-bottom: 3px; margin-top: 30px; }
h3 { font-size: 1.05em; margin: 18px 0 6px; color: #3b6ea5; }
p.meta { color: #555; margin: 2px 0 10px; }
nav { background: #f3f5f8; padding: 8px 12px; border-radius: 4px; font-size: 0.9em; }
nav a { margin-right: 14px; color: #3b6ea5; text-decoration: none; }
figure { margin: 6px 0 14px; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; margin-top: 3px; max-width: 1100px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 6px 0 12px; }
th, td { border: 1px solid #d6d9de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f8; }
td.num { font-variant-numeric: tabular-nums; }
div.error { background: #fdecea; border-left: 5px solid #c62828; padding: 8px 12px;
            margin: 6px 0 12px; }
div.error pre { white-space: pre-wrap; margin: 4px 0 0; font-size: 0.85em; }
ul.warnings li { color: #8a4b00; }
pre.config { background: #f6f8fa; padding: 10px; font-size: 0.8em; overflow-x: auto; }
"""


class ReportInputError(Exception):
    """An input a part of the report needs is missing or unreadable (message says which)."""


@dataclass
class Section:
    """One block of a report.

    Attributes
    ----------
    title : str
        Heading text.
    blocks : list of str
        HTML fragments (already escaped) in display order.
    error : str or None
        When set, the section failed and shows this message instead.
    level : int
        Heading level (2 = run, 3 = part of a run).
    anchor : str
        ``id`` of the heading, for the table of contents.
    """

    title: str
    blocks: list[str] = field(default_factory=list)
    error: str | None = None
    level: int = 3
    anchor: str = ""

    def render(self) -> str:
        """HTML of the section (heading, then content or the error box)."""
        anchor = f' id="{html.escape(self.anchor)}"' if self.anchor else ""
        head = f"<h{self.level}{anchor}>{html.escape(self.title)}</h{self.level}>"
        if self.error is not None:
            return head + error_html(self.error)
        return head + "\n".join(self.blocks)


def report_section(
    title: str,
    build: Callable[..., Iterable[str]],
    *args,
    logger: logging.Logger | None = None,
    **kwargs,
) -> Section:
    """Build a section; an exception becomes an error message, not a crash.

    Parameters
    ----------
    title : str
        Section heading.
    build : callable
        Called as ``build(*args, **kwargs)``; returns HTML fragments.
    logger : logging.Logger, optional
        Where the failure is logged (warning with the message; traceback at
        debug level). Defaults to ``bids_dmri_ldm.reports``.

    Returns
    -------
    Section
        With ``error`` set when ``build`` raised.
    """
    logger = logger or LOGGER
    try:
        return Section(title=title, blocks=list(build(*args, **kwargs)))
    except Exception as exc:  # noqa: BLE001 - a report section must never fail the run
        message = str(exc) if isinstance(exc, ReportInputError) else f"{type(exc).__name__}: {exc}"
        logger.warning("report section %r could not be made: %s", title, message)
        logger.debug("traceback of the failed report section:\n%s", traceback.format_exc())
        return Section(title=title, error=message)


def figure_html(png: bytes, alt: str, caption: str = "") -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URI, in a figure.

    Parameters
    ----------
    png : bytes
        PNG file content.
    alt : str
        Alternative text.
    caption : str
        Plain-text caption (escaped).
    """
    if not png.startswith(b"\x89PNG"):
        raise ValueError("figure is not a PNG")
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"{cap}</figure>")


def error_html(message: str) -> str:
    """Error box shown in place of a section that could not be made."""
    return ('<div class="error"><strong>This part of the report could not be made.</strong>'
            f"<pre>{html.escape(message)}</pre></div>")


def format_value(value) -> str:
    """Readable text of a table value (floats to 4 significant digits)."""
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    if value is None:
        return "n/a"
    return str(value)


def table_html(rows: Mapping[str, object] | Sequence[Sequence[object]],
               header: Sequence[str] | None = None) -> str:
    """A simple escaped table.

    Parameters
    ----------
    rows : dict or sequence of rows
        ``{key: value}`` gives a two-column table; a sequence of sequences
        gives one row each.
    header : sequence of str, optional
        Column names.
    """
    if isinstance(rows, Mapping):
        rows = list(rows.items())
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            text = html.escape(format_value(value))
            if i == 0:
                cells.append(f"<th>{text}</th>")
            else:
                cls = ' class="num"' if isinstance(value, (int, float)) else ""
                cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def list_html(items: Sequence[str], css_class: str = "") -> str:
    """An escaped bullet list (``<p>None.</p>`` when empty)."""
    if not items:
        return "<p>None.</p>"
    cls = f' class="{css_class}"' if css_class else ""
    return f"<ul{cls}>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in items) + "</ul>"


def paragraph(text: str, css_class: str = "") -> str:
    """An escaped paragraph."""
    cls = f' class="{css_class}"' if css_class else ""
    return f"<p{cls}>{html.escape(text)}</p>"


def preformatted(text: str) -> str:
    """Escaped preformatted text (configuration dumps)."""
    return f'<pre class="config">{html.escape(text)}</pre>'


def render_document(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """Full HTML document: inline CSS, a table of contents and the sections.

    Level-2 sections get an anchor and a link in the table of contents.
    """
    nav = []
    for i, section in enumerate(sections):
        if section.level == 2:
            section.anchor = section.anchor or f"section-{i}"
            nav.append(f'<a href="#{html.escape(section.anchor)}">{html.escape(section.title)}</a>')
    body = "\n".join(s.render() for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n"
            + (paragraph(subtitle, "meta") if subtitle else "")
            + (f"<nav>{''.join(nav)}</nav>\n" if nav else "")
            + body + "\n</body>\n</html>\n")
