"""report.json, report.md and a self-contained report.html for the privacy audit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import common
from ..reporting import esc, figure_png, fmt, fmt_ci, md_table, page, table

LEVELS = ("0.01", "0.001")


def roc_figure(report: dict[str, Any]) -> str:
    """Log-log ROC of every attack (Carlini et al. 2022: the low-FPR corner is what matters)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    floor = 1.0 / max(report["n"]["non_members"], 1)
    for a in report["attacks"]:
        fpr = [max(x, floor / 2) for x in a["roc"]["fpr"]]
        tpr = [max(y, floor / 2) for y in a["roc"]["tpr"]]
        ax.plot(fpr, tpr, label=f"{a['name']} (AUC {a['auc']['value']:.3f})", lw=1.5)
    ax.plot([floor / 2, 1], [floor / 2, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(floor / 2, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("membership inference ROC (log-log)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def attack_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[a["name"], fmt(a["auc"]["value"]), fmt_ci(a["auc"].get("ci"), 3)]
            + [x for lv in LEVELS for x in (fmt(a["tpr_at_fpr"][lv]["value"], 4),
                                             fmt_ci(a["tpr_at_fpr"][lv].get("ci"), 4))]
            for a in report["attacks"]]


HEADERS = ["attack", "AUC", "AUC CI", "TPR@1%FPR", "CI", "TPR@0.1%FPR", "CI"]


def one_run_rows(o: dict[str, Any]) -> list[list[str]]:
    return [[str(g["k_pos"]), str(g["k_neg"]), str(g["guesses"]), str(g["correct"]),
             fmt(g["epsilon_lower_bound"], 3)] for g in o["grid"]]


ONE_RUN_HEADERS = ["k+ (guess in)", "k- (guess out)", "guesses", "correct", "eps lower bound"]


def one_run_lines(o: dict[str, Any]) -> list[str]:
    c = o["claim"]
    claim = ("none (not DP)" if o["claimed_epsilon"] is None else
             f"{o['claimed_epsilon']:.3g}" + ("" if c["group_size"] == 1 else
                                             f" (group of {c['group_size']} rows: "
                                             f"{c['group_size']} x {c['run_epsilon']:.3g})"))
    return [f"one-run epsilon lower bound {o['epsilon_lower_bound']:.3f} at confidence "
            f"{o['confidence']:g}, delta {o['delta']:.3g}: {o['correct']} of {o['guesses']} "
            f"guesses correct over m = {o['m']} canaries ({o['n_included']} included by "
            f"their coins, {o['repeats']} rows each); claimed epsilon per canary {claim}",
            f"guess counts: {o['selection']}; score: {o['score']}"]


SHOWN = 50  # canary rows in md/html (report.json has all)


def canary_rows(c: dict[str, Any]) -> list[list[str]]:
    """The ``SHOWN`` most exposed canaries (all of them when there are few)."""
    top = sorted(c["canaries"], key=lambda r: -r["exposure"])[:SHOWN]
    return [[r["secret"], str(r["rank"]), fmt(r["exposure"], 2),
             fmt(r["exposure_extrapolated"], 2), fmt(r["total_nll"], 2)] for r in top]


CANARY_HEADERS = ["secret", "rank", "exposure (bits)", "extrapolated (bits)", "total NLL"]


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [report["verdict"]]
    if report.get("one_run"):
        lines += one_run_lines(report["one_run"])
    for a in report["attacks"]:
        t = a["tpr_at_fpr"]["0.01"]
        lines.append(f"{a['name']} attack (descriptive): AUC {a['auc']['value']:.3f} "
                     f"{fmt_ci(a['auc'].get('ci'), 3)}, TPR@1%FPR {t['value']:.4f}")
    c = report.get("canaries")
    if c:
        lines.append(f"canaries: mean exposure {c['mean_exposure']:.2f} bits of "
                     f"{c['max_exposure']:.2f} possible (chance ~{c['chance_exposure']:.2f}); "
                     f"{c['n_canaries']} secrets x {c['repeats']} repeats")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    out = ["# Privacy audit", "", f"Run: `{report['run']['path']}` ({report['run']['task']}); "
           f"{report['n']['members']} members, {report['n']['non_members']} non-members.", ""]
    out += [f"- {s}" for s in summary_lines(report)]
    if report.get("one_run"):
        out += ["", "## One-run audit (Steinke, Nasr, Jagielski 2023)", "",
                md_table(ONE_RUN_HEADERS, one_run_rows(report["one_run"]))]
    if report["attacks"]:
        out += ["", "## Membership inference (descriptive only)", "",
                md_table(HEADERS, attack_rows(report)), ""]
        out += [f"- {a['name']}: {a['description']}" for a in report["attacks"]]
    if report.get("canaries"):
        out += ["", "## Canary exposure", "", md_table(CANARY_HEADERS,
                                                       canary_rows(report["canaries"]))]
    out += ["", "## Method", "", *METHOD, "", "## Inputs", ""]
    out += [f"- {k}: `{v}`" for k, v in report["inputs"].items()]
    return "\n".join(out) + "\n"


METHOD = [
    "One-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023): each of m canaries was "
    "included in training by an independent fair coin drawn from the OS. Every canary is "
    "scored by the model; the k+ highest scores are guessed 'in', the k- lowest 'out', the "
    "rest abstain. Under (eps, delta)-DP per canary, P[>= v correct of r] <= "
    "P[Binomial(r, e^eps/(1+e^eps)) >= v] + 2 m delta max_i P[v-i <= Binomial < v]/i; the "
    "bound is the largest eps this rejects at 1 - confidence. It assumes only the fair, "
    "secret coins and scores that do not see them; when (k+, k-) is searched over a grid, "
    "each pair is tested at (1 - confidence)/G (Bonferroni). It is a lower bound: a bound "
    "below the claim does not prove the claim. A canary of k rows under example-level DP is "
    "tested against group privacy (k eps, k e^((k-1) eps) delta).",
    "Membership inference over members/non-members is descriptive only: AUC and TPR at low "
    "FPR with Poisson-bootstrap percentile intervals that treat rows as independent. Rows "
    "share one model and users, and members are chosen by a split, not by independent coins, "
    "so no epsilon bound or verdict is drawn from it.",
]


def render_html(report: dict[str, Any]) -> str:
    ok = report["passed"] is not False
    lead = (f'<div class="lead{" ok" if ok else ""}"><ul>'
            + "".join(f"<li>{esc(s)}</li>" for s in summary_lines(report)) + "</ul></div>")
    body = [f"<h1>Privacy audit</h1><p class=\"meta\">run {esc(report['run']['path'])} "
            f"({esc(report['run']['task'])}); {report['n']['members']} members, "
            f"{report['n']['non_members']} non-members; versions "
            f"{esc(', '.join(f'{k} {v}' for k, v in report['versions'].items()))}</p>", lead]
    if report.get("one_run"):
        body += ["<h2>One-run audit (Steinke, Nasr, Jagielski 2023)</h2>",
                 table(ONE_RUN_HEADERS, [[esc(c) for c in r]
                                         for r in one_run_rows(report["one_run"])])]
    if report["attacks"]:
        body += ["<h2>Membership inference (descriptive only)</h2>",
                 table(HEADERS, [[esc(c) for c in r] for r in attack_rows(report)]),
                 "<ul>" + "".join(f"<li><b>{esc(a['name'])}</b>: {esc(a['description'])}</li>"
                                  for a in report["attacks"]) + "</ul>", roc_figure(report)]
    if report.get("canaries"):
        body += ["<h2>Canary exposure</h2>",
                 table(CANARY_HEADERS, [[esc(c) for c in r]
                                        for r in canary_rows(report["canaries"])])]
    body += ["<h2>Method</h2>", "".join(f'<p class="note">{esc(s)}</p>' for s in METHOD),
             "<h2>Inputs</h2>", table(["input", "sha256"],
                                      [[esc(k), esc(v)] for k, v in report["inputs"].items()])]
    return page("Privacy audit", "".join(body))


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Render, then write with the audits' one writer."""
    return common.write_report(report, out, markdown=render_markdown(report),
                               html=render_html(report))
