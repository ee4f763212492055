"""A self-contained HTML page: sections of text, tables, figures (inlined, compressed) and commands.

The page needs no server and no other files: each figure is downscaled to at most ``MAX_IMAGE_PX`` on
its longer side and inlined as JPEG or PNG, whichever is smaller, so ``report.html`` can be mailed or
attached to a ticket (a few MB). Each figure also links to its full-size file beside the report.
Everything is written as HTML elements; no Markdown is left for the reader to parse.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from openpluto.io import write_text_atomic

MAX_IMAGE_PX = 1400  # longer side of an inlined figure, px
JPEG_QUALITY = 85

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #8a2be2;padding-bottom:.2em}h2{margin-top:1.8em;color:#4b1d7a}
figure{display:inline-block;margin:.5em;vertical-align:top;text-align:center;max-width:100%}
figure img{max-width:100%;border:1px solid #ccc}
figure.half img{max-width:540px}figure.full{display:block}
figcaption{font-size:.9em;color:#444;max-width:100%}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #bbb;padding:.3em .7em;text-align:right}
th{background:#f3eefa}td:first-child,th:first-child{text-align:left}
caption{caption-side:bottom;text-align:left;font-size:.9em;color:#444;padding-top:.3em}
pre{background:#f6f6f6;padding:.6em;font-size:.85em;white-space:pre-wrap;overflow-wrap:anywhere}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.5em .8em}.muted{color:#777;font-size:.9em}
"""


@dataclass
class Figure:
    """An image file shown in the report; ``full`` spans the page, else it sits beside others."""

    path: Path
    caption: str = ""
    full: bool = False


@dataclass
class Bold:
    """A table cell shown in bold (e.g. the better of two numbers)."""

    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str | Bold]]
    caption: str = ""


@dataclass
class Section:
    title: str
    text: str = ""  # paragraphs separated by blank lines
    note: str = ""  # highlighted (e.g. "this run was cut short")
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    code: str = ""  # shown as a wrapped, monospaced block


def compressed_image(path: Path, max_px: int = MAX_IMAGE_PX) -> tuple[str, bytes]:
    """``(mime type, bytes)`` of the image downscaled to ``max_px`` and encoded as JPEG or PNG (smaller)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        img = im.convert("RGBA") if im.mode in ("P", "LA") else im
        if img.mode == "RGBA":  # flatten transparency onto white
            bg = Image.new("RGB", img.size, "white")
            bg.paste(img, mask=img.getchannel("A"))
            img = bg
        img = img.convert("RGB")
    if max(img.size) > max_px:
        scale = max_px / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    png, jpg = io.BytesIO(), io.BytesIO()
    img.save(png, format="PNG", optimize=True)
    img.save(jpg, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return ("image/png", png.getvalue()) if png.tell() <= jpg.tell() else ("image/jpeg", jpg.getvalue())


def _figure_html(fig: Figure, report_dir: Path) -> str:
    cap = html.escape(fig.caption)
    if not Path(fig.path).is_file():
        return f"<p class='muted'>missing figure: {html.escape(str(fig.path))}</p>"
    mime, data = compressed_image(Path(fig.path))
    rel = html.escape(os.path.relpath(fig.path, report_dir))
    src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return (f'<figure class="{"full" if fig.full else "half"}"><a href="{rel}"><img src="{src}" alt="{cap}">'
            f"</a><figcaption>{cap}</figcaption></figure>")


def _cell(c: str | Bold, tag: str) -> str:
    if isinstance(c, Bold):
        return f"<{tag}><b>{html.escape(c.text)}</b></{tag}>"
    return f"<{tag}>{html.escape(str(c))}</{tag}>"


def table_html(table: Table) -> str:
    out = ["<table>"]
    if table.caption:
        out.append(f"<caption>{html.escape(table.caption)}</caption>")
    out.append("<tr>" + "".join(_cell(c, "th") for c in table.header) + "</tr>")
    out += ["<tr>" + "".join(_cell(c, "td") for c in row) + "</tr>" for row in table.rows]
    return "\n".join(out) + "</table>"


def _section_html(sec: Section, report_dir: Path) -> list[str]:
    parts = [f"<h2>{html.escape(sec.title)}</h2>"]
    if sec.note:
        parts.append(f"<p class='note'>{html.escape(sec.note)}</p>")
    parts += [f"<p>{html.escape(p)}</p>" for p in sec.text.split("\n\n") if p.strip()]
    parts += [table_html(t) for t in sec.tables]
    parts += [_figure_html(f, report_dir) for f in sec.figures]
    if sec.code:
        parts.append(f"<pre>{html.escape(sec.code)}</pre>")
    return parts


def write_report(path: str | Path, title: str, sections: list[Section], footer: str = "") -> Path:
    """Write ``path`` (HTML) atomically; a missing figure is listed as missing, not fatal."""
    path = Path(path)
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for sec in sections:
        parts += _section_html(sec, path.parent)
    if footer:
        parts.append(f"<p class='muted'>{html.escape(footer)}</p>")
    parts.append("</body></html>\n")
    write_text_atomic(path, "\n".join(parts))
    return path
