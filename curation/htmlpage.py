"""The page both HTML reports share: title, a table of contents, sections, inline CSS.

    page(title, sections, css) -> HTML text

``sections``: (id, title, body HTML) in order; the table of contents links every one (``#id``), so
each section is one click from the top. No script and no external resource: the file can be mailed
or opened from an archive.
"""
from __future__ import annotations

import html
from typing import Any, Sequence

BASE_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em;margin:.2em 0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
nav.toc{position:sticky;top:0;background:#fffe;padding:.4em 0;border-bottom:1px solid #ddd;z-index:1}
nav.toc a{margin-right:1.2em;text-decoration:none;color:#246}nav.toc a:hover{text-decoration:underline}
table.nums td,table.nums th{padding:.15em .8em;text-align:left}table.nums td.n{text-align:right}
.small{font-size:11px;color:#555;word-break:break-all}
.note{color:#865;font-style:italic}
.plots{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
img.plot{max-width:100%;height:auto}
section{scroll-margin-top:2.8em}
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(x: Any) -> str:
    """Numbers as a person reads them: floats to 4 significant digits."""
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def table(rows: Sequence[tuple[Any, Any]]) -> str:
    """A two-column table of (name, value); empty values are left out."""
    body = "".join(f'<tr><th>{escape(k)}</th><td class="n">{escape(fmt(v))}</td></tr>'
                   for k, v in rows if v is not None and v != "")
    return f'<table class="nums">{body}</table>'


def page(title: str, sections: Sequence[tuple[str, str, str]], css: str = "", subtitle: str = "") -> str:
    ids = [sid for sid, _, _ in sections]
    if len(set(ids)) != len(ids):
        raise ValueError(f"section ids must be distinct, got {ids}")
    nav = "".join(f'<a href="#{sid}">{escape(t)}</a>' for sid, t, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{escape(t)}</h2>\n{b}\n</section>\n' for sid, t, b in sections)
    sub = f'<p class="small">{escape(subtitle)}</p>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{BASE_CSS}{css}</style></head>\n<body>"
            f"<h1>{escape(title)}</h1>{sub}<nav class=\"toc\">{nav}</nav>\n{body}</body></html>\n")
