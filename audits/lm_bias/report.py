"""report.json / report.md / report.html of the LM bias audit (self-contained, like the
fairness report: flagged findings first, then the per-group plots and example generations)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import common
from ..reporting import esc, figure_png, fmt, fmt_ci, md_table, page, table


def _bars(series: dict[str, dict[str, Any]], title: str, xlabel: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(series)
    v = np.array([series[g]["value"] for g in names], float)
    ci = np.array([series[g]["ci"] for g in names], float)
    err = np.stack([np.nan_to_num(v - ci[:, 0]).clip(0), np.nan_to_num(ci[:, 1] - v).clip(0)])
    fig, ax = plt.subplots(figsize=(4.6, 0.4 * len(names) + 1.1))
    y = np.arange(len(names))
    ax.barh(y, v, xerr=err, color="#2e86c1", capsize=3)
    ax.axvline(0, color="#333", lw=1)
    ax.set_yticks(y, names, fontsize=9)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


STATUS_TEXT = {"flagged": "exceeds the tolerance",
               "insufficient_data": "insufficient data to decide",
               "not_flagged": "not shown to exceed the tolerance"}


def method_text(report: dict[str, Any]) -> str:
    """How the verdicts were reached: the error control, and what scored the generations."""
    ec, sc = report["error_control"], report["scoring"]
    crit = ec["critical_value"]
    return (f"Flags rest on {int(ec['level'] * 100)}% {ec['method']}: "
            f"{ec['comparisons']} comparisons"
            + (f", critical value {crit:.2f}" if crit is not None else "")
            + ". A gap is flagged when its whole simultaneous interval lies beyond the "
            "tolerance; 'insufficient data' when the interval is wider than the tolerance on "
            "either side; otherwise it is not shown to exceed the tolerance (which is not a "
            "proof that it is small). Generated text scored by "
            + " and ".join(sc["scorers"]) + f", reading the {sc['scored_text']} only.")


def _pair_rows(gap: dict[str, Any]) -> list[list[str]]:
    return [[f"{p['higher']} - {p['lower']}", fmt(p["value"]), fmt_ci(p["ci"]),
             fmt_ci(p["ci_simultaneous"]), STATUS_TEXT[p["status"]]] for p in gap["pairs"]]


PAIR_HEAD = ["pair", "gap", "marginal interval", "simultaneous interval", "verdict"]


def _gaps(r: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(title, gap summary) of one attribute's counterfactual or generation result."""
    if "scores" in r:
        return [(f"{name} score", sc["gap"]) for name, sc in r["scores"].items()]
    return [(what, r[key]) for key, what in (("likelihood_gap", "likelihood preference"),
                                             ("sentiment_gap", "positivity")) if key in r]


def render_html(report: dict[str, Any]) -> str:
    st = report["settings"]
    lines = report["summary"]["lines"]
    n = report["summary"]["n_flagged"]
    ni = report["summary"]["n_insufficient_data"]
    cls = "lead" if n else "lead ok"
    head = f"{n} finding(s) flagged" if n else "Nothing flagged"
    if ni:
        head += f"; {ni} with insufficient data to decide"
    body = [f"<h1>LM bias probes</h1><p class=meta>run {esc(report['run'])} · probe set "
            f"{esc(report['probe_set'])} · {st['n_boot']} bootstrap resamples, "
            f"{int(st['confidence'] * 100)}% intervals</p>",
            f'<div class="{cls}"><b>{head}</b><ul>'
            + "".join(f"<li>{esc(s)}</li>" for s in lines) + "</ul></div>",
            f"<p class=note>{esc(method_text(report))}</p>"]
    for r in report["counterfactual"]:
        body.append(f"<h2>Counterfactual pairs: {esc(r['attribute'])}</h2><p class=note>"
                    f"{r['templates']} templates, {r['instances']} tuples. Preference: how much "
                    "more likely (nats) the same words are after this group's term than after "
                    "the average group's.</p>")
        body.append(_bars(r["preference"], f"{r['attribute']}: likelihood preference", "nats"))
        if "positivity" in r:
            body.append(_bars(r["positivity"], f"{r['attribute']}: positivity "
                              "(positive minus negative templates)", "nats"))
        rows = [[esc(g), f"{fmt(r['preference'][g]['value'])} "
                 f"{fmt_ci(r['preference'][g]['ci'])}", fmt(r["preferred_share"][g], 2)]
                + ([f"{fmt(r['positivity'][g]['value'])} {fmt_ci(r['positivity'][g]['ci'])}"]
                   if "positivity" in r else []) for g in r["groups"]]
        body.append(table(["group", "preference", "share preferred"]
                          + (["positivity"] if "positivity" in r else []), rows))
    for r in report["generation"]:
        body.append(f"<h2>Generations: {esc(r['attribute'])}</h2>")
        for name, sc in r["scores"].items():
            body.append(_bars(sc["by_group"], f"{r['attribute']}: {name}", "mean score"))
        rows = [[esc(g), "<br>".join(esc(t) for t in ex)] for g, ex in r["examples"].items()]
        body.append("<details><summary>example continuations</summary>"
                    + table(["group", "text"], rows, left=2) + "</details>")
    body.append("<h2>Every comparison</h2>")
    for r in report["counterfactual"] + report["generation"]:
        for what, gap in _gaps(r):
            body.append(f"<h3>{esc(r['attribute'])}: {esc(what)} (tolerance "
                        f"{gap['threshold']:g})</h3>")
            rows = [[esc(c) for c in row] for row in _pair_rows(gap)]
            for row, p in zip(rows, gap["pairs"]):
                if p["status"] == "flagged":
                    row[-1] = f'<td class="flag">{row[-1]}</td>'
            body.append(table(PAIR_HEAD, rows))
    body.append(f"<p class=meta>model sha256 {esc(report['inputs']['model_sha256'])} · "
                + esc(", ".join(f"{k} {v}" for k, v in report["versions"].items())) + "</p>")
    return page("LM bias probes", "".join(body))


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# LM bias probes: {report['run']}", "", f"Probe set {report['probe_set']}.", ""]
    out += [f"- {s}" for s in report["summary"]["lines"]] + ["", method_text(report), ""]
    for r in report["counterfactual"]:
        out += [f"## Counterfactual: {r['attribute']}", ""]
        out += [f"- {g}: preference {fmt(v['value'])} {fmt_ci(v['ci'])}"
                for g, v in r["preference"].items()] + [""]
    for r in report["generation"]:
        out += [f"## Generation: {r['attribute']}", ""]
        for name, sc in r["scores"].items():
            out += [f"- {name} {g}: {fmt(v['value'])} {fmt_ci(v['ci'])}"
                    for g, v in sc["by_group"].items()]
        out.append("")
    out += ["## Every comparison", ""]
    for r in report["counterfactual"] + report["generation"]:
        for what, gap in _gaps(r):
            out += [f"{r['attribute']}: {what} (tolerance {gap['threshold']:g})", "",
                    md_table(PAIR_HEAD, _pair_rows(gap)), ""]
    return "\n".join(out)


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Render, then write with the audits' one writer."""
    return common.write_report(report, out, markdown=render_markdown(report),
                               html=render_html(report))
