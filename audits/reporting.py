"""Self-contained HTML for audit reports: one file, inline CSS, plots as base64 PNG.

Why self-contained: a report is mailed, archived and opened offline; an external stylesheet,
font or script would break it or leak that it was opened. Figures are drawn with matplotlib's
Agg backend (no display needed) and embedded as ``data:`` URIs.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Iterable

CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:24px auto;padding:0 16px;color:#1d1d1f}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;margin-top:28px;border-bottom:1px solid
#ddd;padding-bottom:3px}h3{font-size:16px}
.meta{color:#555;font-size:13px}
.lead{border-left:5px solid #c0392b;background:#fdf2f0;padding:10px 14px;margin:14px 0}
.lead.ok{border-color:#27ae60;background:#eef9f1}
.lead li{margin:3px 0}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.l,th.l{text-align:left}
td.flag{background:#f9d6d2;font-weight:600}td.small,tr.small td.l{color:#8a6d00}
.ci{color:#777;font-size:12px}
img{max-width:100%;margin:6px 0}
details{margin:8px 0}summary{cursor:pointer;font-weight:600}
.note{color:#555;font-size:13px}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(ci: Iterable[Any] | None, digits: int = 2) -> str:
    if not ci:
        return ""
    lo, hi = list(ci)
    return f"[{fmt(lo, digits)}, {fmt(hi, digits)}]"


def figure_png(fig: Any) -> str:
    """A matplotlib figure as an ``<img>`` tag with a base64 PNG; closes the figure."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def table(headers: list[str], rows: list[list[str]], left: int = 1,
          row_classes: list[str] | None = None) -> str:
    """An HTML table; cells are pre-escaped HTML; the first ``left`` columns align left."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>'
                   for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(c if c.startswith("<td") else
                        f'<td class="{"l" if i < left else ""}">{c}</td>'
                        for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)
