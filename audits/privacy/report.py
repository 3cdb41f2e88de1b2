"""report.json, report.md and a self-contained report.html for the privacy audit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common import atomic_write_json, atomic_write_text
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
    rows = []
    for a in report["attacks"]:
        e = a["empirical_epsilon"]
        rows.append([a["name"], fmt(a["auc"]["value"]), fmt_ci(a["auc"].get("ci"), 3)]
                    + [x for lv in LEVELS for x in (fmt(a["tpr_at_fpr"][lv]["value"], 4),
                                                     fmt_ci(a["tpr_at_fpr"][lv].get("ci"), 4))]
                    + [fmt(e["value"], 2), f"{e['confidence']:.4g}"])
    return rows


HEADERS = ["attack", "AUC", "AUC CI", "TPR@1%FPR", "CI", "TPR@0.1%FPR", "CI", "eps lower bound",
           "confidence"]


def canary_rows(c: dict[str, Any]) -> list[list[str]]:
    return [[r["secret"], str(r["rank"]), fmt(r["exposure"], 2),
             fmt(r["exposure_extrapolated"], 2), fmt(r["total_nll"], 2)] for r in c["canaries"]]


CANARY_HEADERS = ["secret", "rank", "exposure (bits)", "extrapolated (bits)", "total NLL"]


def summary_lines(report: dict[str, Any]) -> list[str]:
    claimed = report["claimed_epsilon"]
    lines = [report["verdict"],
             f"empirical epsilon lower bound {report['empirical_epsilon']:.2f} "
             f"({report['empirical_epsilon_attack']} attack, confidence "
             f"{report['confidence']:g}) vs claimed "
             + (f"{claimed:.2f}" if claimed is not None else "none (not DP)")]
    for a in report["attacks"]:
        t = a["tpr_at_fpr"]["0.01"]
        lines.append(f"{a['name']}: AUC {a['auc']['value']:.3f} {fmt_ci(a['auc'].get('ci'), 3)}, "
                     f"TPR@1%FPR {t['value']:.4f}")
    c = report.get("canaries")
    if c:
        lines.append(f"canaries: mean exposure {c['mean_exposure']:.2f} bits of "
                     f"{c['max_exposure']:.2f} possible (chance ~{c['chance_exposure']:.2f}); "
                     f"{c['n_canaries']} secrets x {c['repeats']} repeats")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    out = ["# Privacy audit", "", f"Run: `{report['run']['path']}` ({report['run']['task']}); "
           f"{report['n']['members']} members, {report['n']['non_members']} non-members.", ""]
    out += [f"- {s}" for s in summary_lines(report)] + ["", "## Attacks", ""]
    out += [md_table(HEADERS, attack_rows(report)), ""]
    out += [f"- {a['name']}: {a['description']}" for a in report["attacks"]]
    if report.get("canaries"):
        out += ["", "## Canary exposure", "", md_table(CANARY_HEADERS,
                                                       canary_rows(report["canaries"]))]
    out += ["", "## Method", "", *METHOD, "", "## Inputs", ""]
    out += [f"- {k}: `{v}`" for k, v in report["inputs"].items()]
    return "\n".join(out) + "\n"


METHOD = [
    "Empirical epsilon: for an (eps, delta)-DP algorithm every membership test with false "
    "positive rate FPR and true positive rate TPR satisfies TPR <= e^eps FPR + delta and "
    "1 - FPR <= e^eps (1 - TPR) + delta. The lower bound is max(log((TPR_lo - delta)/FPR_hi), "
    "log((1 - FPR_hi - delta)/(1 - TPR_lo))) with Clopper-Pearson ends; the threshold is chosen "
    "on a random half of the rows and the bound computed on the other half; each attack's "
    "confidence is Bonferroni-adjusted so that the maximum holds at the stated level.",
    "The bound is only meaningful if members were drawn at random from the same population "
    "as the non-members; it is a lower bound: a bound below the claim does not prove the claim.",
    "AUC and TPR-at-FPR intervals: Poisson bootstrap percentile intervals.",
]


def to_html(report: dict[str, Any]) -> str:
    ok = report["passed"]
    lead = (f'<div class="lead{" ok" if ok else ""}"><ul>'
            + "".join(f"<li>{esc(s)}</li>" for s in summary_lines(report)) + "</ul></div>")
    body = [f"<h1>Privacy audit</h1><p class=\"meta\">run {esc(report['run']['path'])} "
            f"({esc(report['run']['task'])}); {report['n']['members']} members, "
            f"{report['n']['non_members']} non-members; versions "
            f"{esc(', '.join(f'{k} {v}' for k, v in report['versions'].items()))}</p>", lead,
            "<h2>Membership inference</h2>",
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
    """Render all three first, then write each atomically."""
    texts = {"md": to_markdown(report), "html": to_html(report)}
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], texts["md"])
    atomic_write_text(paths["html"], texts["html"])
    return paths
