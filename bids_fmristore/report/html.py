"""HTML of the reports: one self-contained page, inline CSS, relative links only.

Nothing is fetched from the network (clusters are often offline), so a page keeps working when
OUTPUT_DIR is copied elsewhere.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from bids_fmristore.atomic import atomic_write_text

__all__ = ["colour_scale", "esc", "figure", "page", "relative", "table", "write_page"]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#fafafa}
header{background:#24415e;color:#fff;padding:14px 24px}
header h1{margin:0 0 4px 0;font-size:22px}
header p{margin:2px 0;font-size:13px;color:#dbe4ee}
nav{padding:6px 24px;background:#e8edf2;font-size:13px}
nav a{margin-right:14px;color:#24415e}
main{padding:8px 24px 40px 24px;max-width:1100px}
h2{border-bottom:2px solid #24415e;padding-bottom:3px;margin-top:28px;font-size:19px}
h3{margin:18px 0 6px 0;font-size:16px}
p{font-size:14px}
figure{margin:8px 0 16px 0}
figure img{max-width:100%;border:1px solid #ccc;background:#fff}
img.vol{width:100%;max-width:900px;image-rendering:pixelated}
.scale{font-size:12px;margin:2px 0}.scale .bar{display:inline-block;width:220px;height:10px;
margin:0 6px;border:1px solid #555;vertical-align:middle}
figcaption{font-size:12px;color:#555;margin-top:3px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#e8edf2}
.bad{background:#fde2e1}
.ok{color:#1b7a2f;font-weight:bold}
.fail{color:#b3261e;font-weight:bold}
code{font-size:12px;word-break:break-all}
"""


def esc(text: object) -> str:
    """HTML-escaped text."""
    return html.escape(str(text), quote=True)


def relative(target: Path, page: Path) -> str:
    """``target`` relative to the folder of ``page``, in URL form (forward slashes)."""
    rel = os.path.relpath(Path(target), Path(page).parent)
    return "/".join(html.escape(part, quote=True) for part in Path(rel).parts)


def figure(src: Path, page: Path, caption: str, alt: str, *, volume: bool = False) -> str:
    """An ``<img>`` with a relative ``src`` and a caption; ``volume`` pictures (slice
    mosaics, about one voxel per pixel) are enlarged by the browser without smoothing."""
    cls = ' class="vol"' if volume else ""
    return (f'<figure><img{cls} src="{relative(src, page)}" alt="{esc(alt)}" loading="lazy">'
            f"<figcaption>{caption}</figcaption></figure>")


def colour_scale(stops: Sequence[tuple[float, str]], lo: str, hi: str, what: str) -> str:
    """A colour bar drawn by CSS (``stops``: position 0-1, colour), labelled ``lo`` … ``hi``."""
    css = ",".join(f"{colour} {100 * pos:.0f}%" for pos, colour in stops)
    return (f'<div class="scale"><span>{esc(lo)}</span><span class="bar" '
            f'style="background:linear-gradient(to right,{css})"></span><span>{esc(hi)}</span>'
            f" {esc(what)}</div>")


def table(header: Sequence[str], rows: Iterable[Sequence[object]], *,
          bad: Iterable[bool] | None = None) -> str:
    """A table of escaped cells; rows whose ``bad`` flag is set are shaded."""
    flags = list(bad) if bad is not None else None
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for k, row in enumerate(rows):
        cls = ' class="bad"' if flags is not None and flags[k] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def page(title: str, header_lines: Sequence[str], nav: Sequence[tuple[str, str]],
         body: Sequence[str]) -> str:
    """A whole page: title, header lines (already escaped), anchors to sections, body HTML."""
    links = "".join(f'<a href="#{esc(anchor)}">{esc(text)}</a>' for anchor, text in nav)
    lines = "".join(f"<p>{line}</p>" for line in header_lines)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1>{lines}</header>"
        + (f"<nav>{links}</nav>" if links else "")
        + "<main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )


def write_page(path: Path, text: str) -> Path:
    """Write the page atomically."""
    atomic_write_text(path, text)
    return path
