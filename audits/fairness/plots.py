"""Figures of the fairness report: group bars with error bars, a disparity chart, calibration
by group, before/after mitigation and the change against a baseline.

Colours carry one meaning throughout: red = flagged, amber (hatched) = small group, grey =
everything else; the dashed line is the overall value or the tolerance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..reporting import figure_png

RED, GREY, AMBER, BLUE = "#c0392b", "#7f8c8d", "#d4a017", "#2e86c1"
NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
         "selection_rate": "selection rate", "tpr": "TPR", "fpr": "FPR", "fnr": "FNR",
         "calibration_error": "calibration error", "perplexity": "perplexity",
         "macro_precision": "macro precision", "macro_recall": "macro recall",
         "macro_f1": "macro F1", "demographic_parity": "demographic parity",
         "equalized_odds": "equalized odds"}


def metric_name(m: str) -> str:
    if m.startswith("selection_rate_"):
        return f"selection rate ({m[len('selection_rate_'):]})"
    return NAMES.get(m, m)


def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _err(values: np.ndarray, cis: np.ndarray) -> np.ndarray:
    lo = np.nan_to_num(values - cis[:, 0], nan=0.0).clip(min=0)
    hi = np.nan_to_num(cis[:, 1] - values, nan=0.0).clip(min=0)
    return np.stack([lo, hi])


def group_bars(entries: list[dict[str, Any]], overall: dict[str, Any], metrics: list[str],
               flagged: set[tuple[str, str]]) -> str:
    """One panel per metric: a bar per group with its interval; dashed = overall."""
    plt = _plt()
    labels = [e["label"] for e in entries]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics),
                                                       0.32 * len(entries) + 1.2),
                             sharey=True, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        v = np.array([e["metrics"][m]["value"] for e in entries], float)
        ci = np.array([e["metrics"][m]["ci"] for e in entries], float)
        colors = [RED if (e["label"], m) in flagged else (AMBER if e["small"] else GREY)
                  for e in entries]
        y = np.arange(len(entries))
        ax.barh(y, np.nan_to_num(v), xerr=_err(v, ci), color=colors, ecolor="#333",
                capsize=2, hatch=[("//" if e["small"] else "") for e in entries])
        ax.axvline(overall[m]["value"], color="#333", ls="--", lw=1)
        ax.set_title(metric_name(m), fontsize=10)
        ax.set_yticks(y, labels, fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    axes[0][0].invert_yaxis()  # shared y: inverting every panel would toggle it back
    fig.tight_layout()
    return figure_png(fig)


def disparity_chart(entries: list[dict[str, Any]], panels: list[tuple[str, str]]) -> str:
    """Forest plot: each group's ratio or difference to overall with its interval, the
    tolerance band shaded; red = flagged."""
    plt = _plt()
    rows = {(d["metric"], d["kind"]): [] for d in entries}
    for d in entries:
        rows[(d["metric"], d["kind"])].append(d)
    panels = [p for p in panels if rows.get(p)]
    if not panels:
        return ""
    n = max(len(rows[p]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 0.32 * n + 1.2),
                             squeeze=False)
    for ax, (m, kind) in zip(axes[0], panels):
        ds = rows[(m, kind)]
        v = np.array([d["value"] for d in ds], float)
        ci = np.array([d.get("ci_simultaneous", d["ci"]) for d in ds], float)
        y = np.arange(len(ds))
        colors = [RED if d["flagged"] else (AMBER if d["small"] else BLUE) for d in ds]
        ax.errorbar(v, y, xerr=_err(v, ci), fmt="none", ecolor="#555", capsize=2)
        ax.scatter(v, y, c=colors, zorder=3, s=22)
        t = ds[0]["threshold"]
        neutral = 1.0 if kind == "ratio" else 0.0
        ax.axvline(neutral, color="#333", lw=1)
        if t is not None:
            lo, hi = (t, 1 / t) if kind == "ratio" else (-t, t)
            ax.axvspan(lo, hi, color="#27ae60", alpha=0.08)
            for x in (lo, hi):
                ax.axvline(x, color="#27ae60", ls="--", lw=1)
        ax.set_yticks(y, [d["label"] for d in ds], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{metric_name(m)}: {kind} to overall", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return figure_png(fig)


def calibration(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], title: str
                ) -> str:
    """Reliability diagram per group: mean score vs observed rate per bin (size ~ rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    ax.plot([0, 1], [0, 1], color="#333", ls="--", lw=1)
    for label, (x, y, n) in curves.items():
        keep = n > 0
        ax.plot(x[keep], y[keep], marker="o", ms=3, lw=1.2, label=f"{label} (n={int(n.sum())})")
    ax.set_xlabel("mean score in bin", fontsize=9)
    ax.set_ylabel("observed rate", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return figure_png(fig)


def before_after(groups: list[dict[str, Any]], metric: str, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 0.36 * len(groups) + 1.3))
    y = np.arange(len(groups))
    for off, key, color in ((-0.2, "before", GREY), (0.2, "after", BLUE)):
        v = np.array([g["metrics"][metric][key]["value"] for g in groups], float)
        ci = np.array([g["metrics"][metric][key]["ci"] for g in groups], float)
        ax.barh(y + off, v, height=0.4, xerr=_err(v, ci), color=color, label=key, capsize=2)
    ax.set_yticks(y, [g["label"] for g in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def change_chart(entries: list[dict[str, Any]], metric: str) -> str:
    """Per-group change against the baseline with its paired interval."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 0.3 * len(entries) + 1.2))
    v = np.array([e["metrics"][metric]["change"] for e in entries], float)
    ci = np.array([e["metrics"][metric]["ci"] for e in entries], float)
    y = np.arange(len(entries))
    colors = [RED if e["metrics"][metric]["significant"] else BLUE for e in entries]
    ax.errorbar(v, y, xerr=_err(v, ci), fmt="none", ecolor="#555", capsize=2)
    ax.scatter(v, y, c=colors, zorder=3, s=22)
    ax.axvline(0, color="#333", lw=1)
    ax.set_yticks(y, [f"{e['label']}" for e in entries], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"change in {metric_name(metric)} (this run - baseline)", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)
