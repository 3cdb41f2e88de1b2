"""report.json, report.md and a self-contained report.html for a fairness audit.

The HTML is built for a ten-second read: it opens with the flagged disparities in plain
sentences ("female*old: selection rate 0.27 vs 0.46 overall, ratio 0.60 [0.47, 0.74], below the
4/5 threshold"), worse-off groups first, then the plots for the slice where they are, then the
tables. Every number in the HTML and Markdown comes from report.json, which is complete on its
own (docs/design.md's shape plus settings, summary, comparison and mitigation sections).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from .. import common
from ..common import versions
from ..reporting import esc, fmt, fmt_ci, md_table, page, table
from . import plots
from .plots import metric_name
from .table import PredTable

HEADLINE_MAX = 8


def used_ci(d: dict[str, Any]) -> list[float]:
    """The interval the flag rests on: the simultaneous one unless the report was made
    with ``--error-control none`` (recorded per entry as ``flags_use``)."""
    return d[d.get("flags_use", "ci_simultaneous")] if "ci_simultaneous" in d else d["ci"]


def _severity(d: dict[str, Any]) -> float:
    """How far the interval's edge nearest to parity lies beyond the tolerance, as a
    multiple of it (>= 1 when flagged): big *and* sure disparities sort first."""
    lo, hi = used_ci(d)
    t = d["threshold"]
    if t is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return 0.0
    if d["kind"] == "ratio":
        return t / max(hi, 1e-9) if hi < t else lo * t
    edge = lo if lo > 0 else -hi
    return edge / max(t, 1e-9)
BAR_METRICS = {"binary": ["selection_rate", "accuracy", "tpr", "fpr"],
               "multiclass": ["accuracy", "balanced_accuracy", "macro_f1"],
               "lm": ["perplexity"]}
DISPARITY_PANELS = {"binary": [("selection_rate", "ratio"), ("tpr", "difference"),
                               ("fpr", "difference")],
                    "multiclass": [("accuracy", "difference"), ("macro_f1", "difference")],
                    "lm": [("perplexity", "ratio")]}


def _threshold_words(d: dict[str, Any]) -> str:
    t, (lo, hi) = d["threshold"], used_ci(d)
    if d["kind"] == "ratio":
        name = "4/5" if abs(t - 0.8) < 1e-12 else f"{t:.2f}"
        return (f"below the {name} threshold" if hi < t else
                f"above the {'5/4' if name == '4/5' else f'{1 / t:.2f}'} threshold")
    if d.get("reference") == "between_groups":
        return f"above the {t:.2f} tolerance"
    return f"beyond the ±{t:.2f} tolerance"


METRIC_PRIORITY = ("selection_rate", "accuracy", "tpr", "fpr", "balanced_accuracy",
                   "calibration_error", "perplexity")


def sentence(d: dict[str, Any], short: bool = False) -> str:
    """One flagged disparity in words (``short``: without the group and the verdict)."""
    kind, m, ci = d["kind"], metric_name(d["metric"]), fmt_ci(used_ci(d))
    if d["reference"] in ("overall", "group"):
        if short:
            return f"{m} {kind} {fmt(d['value'], 2)} {ci}"
        small = f" (small group, n={d['n']})" if d["small"] else ""
        other = (f"{fmt(d['overall_value'], 2)} overall" if d["reference"] == "overall" else
                 f"{fmt(d['reference_value'], 2)} for {d['reference_label']} (reference)")
        return (f"{d['label']}: {m} {fmt(d['group_value'], 2)} vs {other}, {kind} "
                f"{fmt(d['value'], 2)} {ci}, {_threshold_words(d)}{small}")
    if d.get("scope") == "pair":
        return (f"{d['slice']}: {m} {kind} {d['label']} vs {d['other_label']} "
                f"{fmt(d['value'], 2)} {ci}, {_threshold_words(d)}")
    via = f"{metric_name(d['via'])}: " if "via" in d else ""
    who = f" ({via}{d['max_group']} vs {d['min_group']})" if "max_group" in d else ""
    return (f"{d['slice']}: {m} {kind} between groups {fmt(d['value'], 2)} {ci}"
            f"{who}, {_threshold_words(d)}")


def _priority(metric: str) -> int:
    base = "selection_rate" if metric.startswith("selection_rate") else metric
    return METRIC_PRIORITY.index(base) if base in METRIC_PRIORITY else len(METRIC_PRIORITY)


def headline(report: dict[str, Any]) -> list[str]:
    """One sentence per group with flagged disparities to overall (and one per group with
    flagged disparities to its reference group): worse-off groups first, then by metric,
    single attributes before intersections; the group's most telling metric in full (a
    flagged ratio before a difference), the others briefly. Then the flagged demographic
    parity / equalized odds ranges of each slice."""
    flagged = [d for d in report["disparities"] if d["flagged"]]
    by_group: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in (x for x in flagged if x["reference"] in ("overall", "group")):
        by_group.setdefault((d["slice"], d["label"], d["reference"]), []).append(d)
    order = {name: i for i, name in enumerate(report["slices"])}
    lines = []
    for (slice_name, _, _), ds in by_group.items():
        best: dict[str, dict[str, Any]] = {}
        for d in ds:  # one entry per metric: the ratio when both kinds are flagged
            if d["metric"] not in best or d["kind"] == "ratio":
                best[d["metric"]] = d
        items = sorted(best.values(), key=lambda d: (_priority(d["metric"]),
                                                     d["kind"] != "ratio"))
        text = sentence(items[0])
        if len(items) > 1:
            text += "; also " + ", ".join(sentence(d, short=True) for d in items[1:4])
            text += f" (+{len(items) - 4} more)" if len(items) > 4 else ""
        worse = any(d["worse_off"] for d in items)
        lines.append(((not worse, _priority(items[0]["metric"]), order.get(slice_name, 0),
                       items[0]["reference"] != "group", -_severity(items[0])), text))
    between = [sentence(d) for d in flagged if d.get("scope") == "range"
               and d["metric"] in ("demographic_parity", "equalized_odds", "perplexity")]
    return [t for _, t in sorted(lines, key=lambda x: x[0])] + between


GROUP_STATUSES = ("flagged", "insufficient_data", "not_flagged", "within_tolerance",
                  "not_judged")


def insufficient(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Groups whose intervals are too wide to decide either way, with n and, per undecided
    metric, the smallest gap to overall (or the reference) that would be flagged at that n."""
    out = []
    for e in report["by_group"]:
        if e.get("status") != "insufficient_data":
            continue
        gaps = {m: e["detectable_gap"][m] for m in e["insufficient_metrics"]
                if m in e["detectable_gap"]}
        out.append({"slice": e["slice"], "label": e["label"], "n": e["n"],
                    "metrics": e["insufficient_metrics"], "detectable_gap": gaps})
    return out


def insufficient_line(g: dict[str, Any]) -> str:
    gaps = g["detectable_gap"]
    worst = max(gaps.items(), key=lambda kv: kv[1]) if gaps else None
    gap = (f"; smallest detectable gap {worst[1]:.2f} ({metric_name(worst[0])})"
           if worst else "")
    return f"{g['label']} (n={g['n']}): {', '.join(map(metric_name, g['metrics']))}{gap}"


def complete(report: dict[str, Any], pt: PredTable, extra_inputs: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Add inputs, versions and the plain-language summary to ``run_audit``'s dict."""
    report["summary"] = {"n_flagged": sum(d["flagged"] for d in report["disparities"]),
                         "flagged": headline(report),
                         "insufficient_data": insufficient(report),
                         "group_status": {s: sum(e.get("status") == s
                                                 for e in report["by_group"])
                                          for s in GROUP_STATUSES}}
    report["inputs"] = {"predictions": str(pt.path), "predictions_sha256": pt.sha256,
                        "model_sha256": pt.model_sha256, "rows": len(pt.df),
                        "warnings": pt.warnings, **(extra_inputs or {})}
    report["versions"] = versions()
    report["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return report


def calibration_curves(pt: PredTable, cols: tuple[str, ...], n_bins: int
                       ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per group: mean score, observed rate (positives; correct for multiclass), rows per bin."""
    d = pt.df
    s = d["score"].to_numpy(float)
    hit = ((d["y_true"] == pt.task.pos_label) if pt.task.kind == "binary"
           else (d["y_true"] == d["y_pred"])).to_numpy(float)
    b = np.clip((s * n_bins).astype(int), 0, n_bins - 1)
    out = {}
    for key, idx in d.groupby(list(cols), sort=True).indices.items():
        key = key if isinstance(key, tuple) else (key,)
        n = np.bincount(b[idx], minlength=n_bins).astype(float)
        with np.errstate(all="ignore"):
            out["*".join(map(str, key))] = (np.bincount(b[idx], s[idx], n_bins) / n,
                                            np.bincount(b[idx], hit[idx], n_bins) / n, n)
    return out


def _cell(m: dict[str, Any], flagged: bool, small: bool) -> str:
    cls = "flag" if flagged else ("small" if small else "")
    return (f'<td class="{cls}">{fmt(m["value"])} <span class="ci">{fmt_ci(m["ci"])}</span>'
            "</td>")


def _slice_section(report: dict[str, Any], name: str, pt: PredTable | None,
                   flagged: set[tuple[str, str]], with_plots: bool = True) -> str:
    entries = [e for e in report["by_group"] if e["slice"] == name]
    metrics = report["metrics"]
    rows = [[esc(e["label"]) + (" ⚠ small" if e["small"] else ""), str(e["n"])]
            + [_cell(e["metrics"][m], (e["label"], m) in flagged, e["small"]) for m in metrics]
            for e in entries]
    html = table(["group", "n"] + [esc(metric_name(m)) for m in metrics], rows,
                 row_classes=["small" if e["small"] else "" for e in entries])
    kind = report["task"]
    if with_plots and len(entries) <= 30:
        html += plots.group_bars(entries, report["overall"]["metrics"],
                                 [m for m in BAR_METRICS[kind] if m in metrics], flagged)
        to_overall = [d for d in report["disparities"]
                      if d["slice"] == name and d["reference"] == "overall"]
        html += plots.disparity_chart(to_overall, DISPARITY_PANELS[kind])
    if with_plots and pt is not None and pt.task.has_score and len(entries) <= 8:
        html += plots.calibration(calibration_curves(pt, tuple(entries[0]["group"]),
                                                     pt.task.n_bins),
                                  f"calibration by {name}")
    return html


def _headline_slice(report: dict[str, Any]) -> str:
    """The slice shown first: where the most telling worse-off disparity is, among slices
    small enough to plot legibly (<= 12 groups)."""
    sizes: dict[str, int] = {}
    for e in report["by_group"]:
        sizes[e["slice"]] = sizes.get(e["slice"], 0) + 1
    cands = [d for d in report["disparities"] if d["flagged"] and d["reference"] == "overall"
             and d["worse_off"] and sizes[d["slice"]] <= 12]
    if cands:
        return min(cands, key=lambda d: (_priority(d["metric"]), -_severity(d)))["slice"]
    multi = [s for s in report["slices"] if "*" in s and sizes[s] <= 12]
    return multi[0] if multi else report["slices"][0]


def render_html(report: dict[str, Any], pt: PredTable | None = None) -> str:
    inp, st = report["inputs"], report["settings"]
    flagged = {(d["label"], d["metric"]) for d in report["disparities"]
               if d["flagged"] and d["reference"] == "overall"}
    task = report["task"] + (f" (positive label {report['pos_label']!r})"
                             if report.get("pos_label") else "")
    body = [f"<h1>Fairness audit</h1><p class=meta>{esc(Path(inp['predictions']).name)} · "
            f"{inp['rows']} rows · {esc(task)} · sensitive: {esc(', '.join(report['sensitive']))}"
            f" · {st['n_boot']} bootstrap resamples, {int(st['confidence'] * 100)}% intervals</p>"]
    lines = report["summary"]["flagged"]
    if lines:
        items = "".join(f"<li>{esc(s)}</li>" for s in lines[:HEADLINE_MAX])
        more = (f"<p class=note>… and {len(lines) - HEADLINE_MAX} more in the tables below.</p>"
                if len(lines) > HEADLINE_MAX else "")
        body.append(f'<div class="lead"><b>{report["summary"]["n_flagged"]} disparities flagged'
                    f"</b> (each interval lies entirely beyond its tolerance); in short:"
                    f"<ul>{items}</ul>{more}</div>")
    else:
        body.append('<div class="lead ok"><b>No disparity is flagged</b>: no interval lies '
                    "entirely beyond its tolerance.</div>")
    small = sorted({e["label"] for e in report["by_group"] if e["small"]})
    undecided = report["summary"]["insufficient_data"]
    if undecided:
        items = "".join(f"<li>{esc(insufficient_line(g))}</li>" for g in undecided[:12])
        more = f"<li>… and {len(undecided) - 12} more</li>" if len(undecided) > 12 else ""
        body.append(f'<div class="lead"><b>{len(undecided)} group(s) with insufficient '
                    "data</b>: their intervals are wider than the tolerance band, so the "
                    "audit can neither flag them nor show them within tolerance (not a clean "
                    f"bill of health):<ul>{items}{more}</ul></div>")
    if small:
        body.append(f"<p class=note>⚠ {len(small)} small group(s) (n &lt; "
                    f"{st['min_group_size']}) are kept with their wide intervals: "
                    f"{esc(', '.join(small[:12]))}{' …' if len(small) > 12 else ''}</p>")
    if inp.get("warnings"):
        body.append("<p class=note>Input notes: " + esc("; ".join(inp["warnings"])) + "</p>")
    first = _headline_slice(report)
    body.append(f"<h2>By {esc(first)}</h2>" + _slice_section(report, first, pt, flagged))
    ov = report["overall"]["metrics"]
    body.append("<h2>Overall</h2>" + table(
        ["metric", "value", "interval"],
        [[esc(metric_name(m)), fmt(v["value"]), fmt_ci(v["ci"])] for m, v in ov.items()]))
    for name in report["slices"]:  # plots for single attributes; tables for the rest
        if name != first:
            body.append(f"<details><summary>By {esc(name)}</summary>"
                        f"{_slice_section(report, name, pt, flagged, '*' not in name)}"
                        "</details>")
    body.append(_reference_html(report))
    body.append(_between_html(report))
    if report.get("mitigation"):
        body.append(_mitigation_html(report["mitigation"]))
    if report.get("comparison"):
        body.append(_comparison_html(report["comparison"]))
    if report.get("explanations"):
        body.append(_explanations_html(report["explanations"]))
    body.append(_footer(report))
    return page("Fairness audit", "".join(body))


def _explanations_html(ex: dict[str, Any]) -> str:
    from ..explain.groups import lines
    head = (f"<h2>What drives the flagged groups' predictions</h2><p class=note>Integrated "
            f"gradients of {esc(ex['run'])} towards {esc(ex['target'])!s}; "
            f"{esc(ex.get('ranking', ''))}.</p>")
    if not ex["groups"]:
        return head + f"<p>{esc(ex.get('note', ''))}</p>"
    parts = [head, "<ul>" + "".join(f"<li>{esc(s)}</li>" for s in lines(ex)) + "</ul>"]
    for g in ex["groups"]:
        rows = [[esc(w["word"]), fmt(w["group_mean"]), fmt(w["rest_mean"]),
                 fmt(w["difference"]), fmt_ci(w.get("ci"), 3), fmt(w["share_of_group_rows"], 2),
                 fmt(w["share_of_rest_rows"], 2)] for w in g["top_words"]]
        parts.append(f"<h3>{esc(g['label'])}</h3>" + table(
            ["word", "group mean", "rest mean", "difference", "95% interval",
             "share of group rows", "share of rest rows"], rows))
    return "".join(parts)


def _row(d: dict[str, Any]) -> list[str]:
    return [fmt(d["value"]), fmt_ci(d["ci"]), fmt_ci(d["ci_simultaneous"]),
            fmt(d["threshold"], 2), d["status"].replace("_", " ").upper()
            if d["status"] == "flagged" else d["status"].replace("_", " ")]


def _reference_html(report: dict[str, Any]) -> str:
    ds = [d for d in report["disparities"] if d["reference"] == "group"
          and d["threshold"] is not None]
    if not ds:
        return ""
    rows = [[esc(d["slice"]), esc(d["label"]), esc(d["reference_label"]),
             esc(metric_name(d["metric"])), d["kind"]] + _row(d) for d in ds]
    return ("<h2>Against the reference group</h2><p class=note>value = group - reference "
            "(difference) or group / reference (ratio); in these slices the four-fifths rule "
            "uses the reference's selection rate.</p>"
            + table(["slice", "group", "reference", "metric", "kind", "value", "interval",
                     "simultaneous", "tolerance", "status"], rows, left=5))


def _between_html(report: dict[str, Any]) -> str:
    ds = [d for d in report["disparities"] if d.get("scope") == "range"]
    pairs = [d for d in report["disparities"] if d.get("scope") == "pair" and d["flagged"]]
    rows = [[esc(d["slice"]), esc(metric_name(d["metric"])), d["kind"]] + _row(d) for d in ds]
    prow = [[esc(d["slice"]), esc(f"{d['label']} vs {d['other_label']}"),
             esc(metric_name(d["metric"])), d["kind"]] + _row(d) for d in pairs]
    return ("<details><summary>Between-group disparities (every pair of groups that are not "
            "small; the range of each slice follows from its pairs)</summary>"
            + table(["slice", "metric", "kind", "value", "interval (extreme pair)",
                     "simultaneous", "tolerance", "status"], rows, left=3)
            + (f"<p>Flagged pairs ({len(pairs)}):</p>" + table(
                ["slice", "pair", "metric", "kind", "value", "interval", "simultaneous",
                 "tolerance", "status"], prow, left=4) if pairs else "")
            + "</details>")


def _mitigation_html(items: list[dict[str, Any]]) -> str:
    out = ["<h2>Mitigation, before and after</h2>"]
    for it in items:
        acc, gaps = it["overall"]["accuracy"], it["disparities"]
        out.append(
            f"<h3>{esc(_mitigation_title(it))}</h3><p>{esc(_mitigation_source(it))} Accuracy "
            f"{fmt(acc['before']['value'])} → {fmt(acc['after']['value'])} (cost "
            f"{fmt(it['accuracy_cost']['value'])} {fmt_ci(it['accuracy_cost']['ci'])}).</p>"
            + table(["", "before", "after", "before, simultaneous", "after, simultaneous"],
                    [[esc(k.replace("_", " ")),
                      f"{fmt(v['before']['value'])} {fmt_ci(v['before']['ci'])}",
                      f"{fmt(v['after']['value'])} {fmt_ci(v['after']['ci'])}",
                      fmt_ci(v['before']['ci_simultaneous']),
                      fmt_ci(v['after']['ci_simultaneous'])] for k, v in gaps.items()])
            + plots.before_after(it["by_group"], "selection_rate",
                                 f"selection rate by {it['slice']}, before/after"))
    return "".join(out)


def _mitigation_title(it: dict[str, Any]) -> str:
    if it["constraint"] == "in_training":
        return f"In training: {it['method']}"
    return f"Group thresholds (fairlearn ThresholdOptimizer): {it['constraint']}"


def _mitigation_source(it: dict[str, Any]) -> str:
    if it["constraint"] == "in_training":
        return (f"Before: the unmitigated model's predictions {Path(it['unmitigated']).name}; "
                f"after: the audited table ({it['rows_paired']} paired rows).")
    return (f"Fit on {Path(it['fit_on']).name} ({it['fit_rows']} rows), evaluated on the "
            "audited table.")


def _comparison_html(c: dict[str, Any]) -> str:
    groups = [e for e in c["by_group"]]
    metric = "accuracy" if "accuracy" in groups[0]["metrics"] else next(iter(groups[0]["metrics"]))
    rows = []
    for e in groups:
        m = e["metrics"][metric]
        rows.append([esc(e["slice"]), esc(e["label"]), str(e["n"]), fmt(m["baseline"]),
                     fmt(m["value"]), f'{fmt(m["change"])} <span class="ci">{fmt_ci(m["ci"])}'
                     "</span>", fmt_ci(m["ci_simultaneous"]),
                     "yes" if m["significant"] else "",
                     fmt_ci(m["change_vs_overall"]["ci_simultaneous"])])
    return (f"<h2>Against the baseline {esc(Path(c['baseline']).name)}</h2><p class=note>"
            f"{c['rows_joined']} rows paired on example_id; change = this table - baseline, "
            "paired bootstrap intervals; significant = the simultaneous interval (all groups "
            f"and metrics together, critical value {c['error_control']['critical_value']:.2f})"
            " excludes 0.</p>" + plots.change_chart(groups, metric)
            + table(["slice", "group", "n", f"baseline {metric_name(metric)}", "this table",
                     "change", "simultaneous", "significant",
                     "change vs overall change (simultaneous)"], rows, left=2))


def _footer(report: dict[str, Any]) -> str:
    st, inp = report["settings"], report["inputs"]
    th, ec = st["thresholds"], st["error_control"]
    control = (f"Flags use simultaneous intervals: {esc(ec['method'])} ({esc(ec['reference'])}"
               f"); critical value {ec['critical_value']:.2f} over {ec['family_size']} "
               "comparisons, so all of them hold together at the stated level."
               if ec["mode"] == "simultaneous" else
               "Flags use the marginal intervals (--error-control none): with many "
               "comparisons, some flags are expected by chance.")
    return (f"<h2>How to read this</h2><p class=note>Intervals: {int(st['confidence'] * 100)}% "
            f"percentile bootstrap ({st['n_boot']} resamples, seed {st['seed']}); proportions "
            f"also include the Jeffreys interval. {control} A disparity is flagged only when "
            f"its whole interval lies beyond the tolerance: differences beyond "
            f"±{th['difference']}, ratios below {th['ratio']} or above {1 / th['ratio']:.2f} "
            "(selection rates, perplexity). Status: flagged; within tolerance (the interval "
            "lies inside the tolerance band); not flagged (it straddles an edge: not shown "
            "to exceed the tolerance); insufficient data (wider than the whole band). Groups "
            "are never dropped; small ones are marked. Full numbers: "
            f"report.json.</p><p class=meta>input sha256 {esc(inp['predictions_sha256'])} · "
            f"model sha256 {esc(inp.get('model_sha256') or 'unknown')} · "
            + esc(", ".join(f"{k} {v}" for k, v in report["versions"].items())) + "</p>")


def render_markdown(report: dict[str, Any]) -> str:
    inp, st = report["inputs"], report["settings"]
    out = [f"# Fairness audit: {Path(inp['predictions']).name}", "",
           f"{inp['rows']} rows, task {report['task']}, sensitive "
           f"{', '.join(report['sensitive'])}; {st['n_boot']} bootstrap resamples, "
           f"{int(st['confidence'] * 100)}% intervals.", ""]
    lines = report["summary"]["flagged"]
    out += ([f"**{report['summary']['n_flagged']} disparities flagged:**", ""]
            + [f"- {s}" for s in lines] if lines else ["**No disparity is flagged.**"]) + [""]
    undecided = report["summary"]["insufficient_data"]
    if undecided:
        out += [f"**{len(undecided)} group(s) with insufficient data** (intervals wider than "
                "the tolerance band: neither flagged nor shown within tolerance):", ""]
        out += [f"- {insufficient_line(g)}" for g in undecided] + [""]
    metrics = report["metrics"]
    out += ["## Overall", "", md_table(["metric", "value", "interval"], [
        [metric_name(m), fmt(v["value"]), fmt_ci(v["ci"])]
        for m, v in report["overall"]["metrics"].items()]), ""]
    for name in report["slices"]:
        rows = [[e["label"] + (" (small)" if e["small"] else ""), str(e["n"])]
                + [f"{fmt(e['metrics'][m]['value'])} {fmt_ci(e['metrics'][m]['ci'])}"
                   for m in metrics] for e in report["by_group"] if e["slice"] == name]
        out += [f"## {name}", "", md_table(["group", "n"] + [metric_name(m) for m in metrics],
                                           rows), ""]
    if report.get("explanations"):
        from ..explain.groups import lines
        out += ["## What drives the flagged groups' predictions", "",
                *[f"- {s}" for s in lines(report["explanations"])], ""]
    for it in report.get("mitigation") or []:
        out += [f"## Mitigation: {_mitigation_title(it)}", "", _mitigation_source(it), "",
                f"accuracy cost {fmt(it['accuracy_cost']['value'])} "
                f"{fmt_ci(it['accuracy_cost']['ci'])}", ""]
        out += [f"- {k.replace('_', ' ')}: {fmt(v['before']['value'])} -> "
                f"{fmt(v['after']['value'])} {fmt_ci(v['after']['ci'])}"
                for k, v in it["disparities"].items()] + [""]
    if report.get("comparison"):
        c = report["comparison"]
        out += [f"## Against the baseline {Path(c['baseline']).name}", ""]
        for e in c["by_group"]:
            m = e["metrics"].get("accuracy") or next(iter(e["metrics"].values()))
            out.append(f"- {e['label']} (n={e['n']}): change {fmt(m['change'])} "
                       f"{fmt_ci(m['ci'])}, simultaneous {fmt_ci(m['ci_simultaneous'])}"
                       + (" (significant)" if m["significant"] else ""))
        out.append("")
    out += [f"Input sha256: `{inp['predictions_sha256']}`; model sha256: "
            f"`{inp.get('model_sha256') or 'unknown (no predictions sidecar)'}`", ""]
    return "\n".join(out)


def write_report(report: dict[str, Any], out: str | Path, pt: PredTable | None = None
                 ) -> dict[str, Path]:
    """Render (figures need the table ``pt``), then write with the audits' one writer."""
    return common.write_report(report, out, markdown=render_markdown(report),
                               html=render_html(report, pt))
