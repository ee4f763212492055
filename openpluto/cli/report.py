"""A self-contained HTML report: sections of text, PNG figures (embedded as base64) and tables.

The report needs no server and no other files: images are inlined, so ``report.html`` can be mailed
or attached to a ticket. Each figure also links to its PNG beside the report.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from openpluto.io import write_text_atomic

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{border-bottom:2px solid #8a2be2;padding-bottom:.2em}h2{margin-top:1.8em;color:#4b1d7a}
figure{display:inline-block;margin:.5em;vertical-align:top;text-align:center;max-width:100%}
figure img{max-width:520px;max-height:520px;border:1px solid #ccc}
figcaption{font-size:.85em;color:#555;max-width:520px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .7em;text-align:right}
th{background:#f3eefa}td:first-child,th:first-child{text-align:left}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}.muted{color:#777;font-size:.9em}
"""


@dataclass
class Figure:
    """A PNG shown in the report (path relative to the report or absolute)."""

    path: Path
    caption: str = ""


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[Figure] = field(default_factory=list)
    table: list[list[str]] | None = None  # first row is the header
    code: str = ""


def _img_tag(fig: Figure, report_dir: Path) -> str:
    data = base64.b64encode(Path(fig.path).read_bytes()).decode("ascii")
    rel = os.path.relpath(fig.path, report_dir)
    cap = html.escape(fig.caption)
    return (
        f'<figure><a href="{html.escape(rel)}"><img src="data:image/png;base64,{data}" alt="{cap}"></a>'
        f"<figcaption>{cap}</figcaption></figure>"
    )


def _table_html(rows: list[list[str]]) -> str:
    head, *body = rows
    out = ["<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr>"]
    for row in body:
        cells = []
        for c in row:
            s = html.escape(str(c))
            if s.startswith("**") and s.endswith("**"):
                s = f"<b>{s[2:-2]}</b>"
            cells.append(f"<td>{s}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def write_report(path: str | Path, title: str, sections: list[Section], footer: str = "") -> Path:
    """Write ``path`` (HTML) atomically; missing figures are listed as missing, not fatal."""
    path = Path(path)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append("".join(f"<p>{html.escape(p)}</p>" for p in sec.text.split("\n\n")))
        if sec.table:
            parts.append(_table_html(sec.table))
        for fig in sec.figures:
            if Path(fig.path).is_file():
                parts.append(_img_tag(fig, path.parent))
            else:
                parts.append(f"<p class='muted'>missing figure: {html.escape(str(fig.path))}</p>")
        if sec.code:
            parts.append(f"<pre>{html.escape(sec.code)}</pre>")
    if footer:
        parts.append(f"<p class='muted'>{html.escape(footer)}</p>")
    parts.append("</body></html>\n")
    write_text_atomic(path, "\n".join(parts))
    return path
