"""The fairness audit's ``--explain RUN --data FILE``: for each flagged group, the words
that most drive that group's predictions, compared with the rest of the table.

Every explained row is attributed towards the same class (the audit's positive label for a
binary task, else each row's predicted class), so signs mean the same thing in every row: a
positive attribution pushes towards the favourable outcome. For a word w and a group G, the
group's value is the mean over G's rows of w's attribution in the row (0 where w is absent),
so it folds together how often the word occurs and how hard it pushes; the rest's value is the
same over the other explained rows, and the words are ranked by |G - rest| (a negative
difference: the word pushes G's predictions down more than the others'), each with a 95%
row-bootstrap interval (marginal, and computed after the words were picked by the same
rows: a gauge of the noise, not a test). Flagged groups
are those of :func:`flagged_groups`. Rows: every row of the predictions
table up to ``max_rows`` (a seeded sample), topped up so each flagged group has at least
``min_group_rows`` of its rows when it has them (the top-up over-represents flagged groups
in another group's "rest").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safelm import UserError, load_run
from safelm.explain import require_captum, require_classifier

from .compute import ExplainSettings, explain_rows, faithfulness, method, word_key

TOP_WORDS = 10
BOOT = 1000  # row resamples behind each word's interval


def flagged_groups(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Groups the audit flagged: ``by_group`` entries with status ``flagged`` (against overall
    or a reference group), and the worse-off group of every flagged pair between groups (the
    lower one, or the higher for metrics where higher is worse); each with ``flagged_by``."""
    from ..fairness.disparities import HIGHER_IS_WORSE
    by_key = {(e["slice"], e["label"]): e for e in report["by_group"]}
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for e in report["by_group"]:
        if e.get("status") == "flagged" and e["slice"] != "overall":
            found[(e["slice"], e["label"])] = {**_entry(e), "flagged_by": ["its own comparisons"]}
    for d in report["disparities"]:
        if not d["flagged"] or d.get("scope") != "pair":
            continue
        lower_is_worse = d["metric"] not in HIGHER_IS_WORSE
        higher = d["value"] > 0 if d["kind"] == "difference" else d["value"] > 1
        label = d["other_label"] if higher == lower_is_worse else d["label"]
        e = by_key.get((d["slice"], label))
        if e is None:
            continue
        other = d["label"] if label == d["other_label"] else d["other_label"]
        item = found.setdefault((d["slice"], label), {**_entry(e), "flagged_by": []})
        item["flagged_by"].append(f"{d['metric']} {d['kind']} vs {other}")
    return list(found.values())


def _entry(e: dict[str, Any]) -> dict[str, Any]:
    return {"slice": e["slice"], "group": e["group"], "label": e["label"]}


def group_explanations(report: dict[str, Any], df: pd.DataFrame, run_dir: str | Path,
                       data: str | Path, *, max_rows: int = 300, min_group_rows: int = 60,
                       seed: int = 0, settings: ExplainSettings | None = None
                       ) -> dict[str, Any]:
    """The ``explanations`` section of the fairness report (see the module docstring)."""
    from .cli import load_rows
    require_captum("--explain")
    run = load_run(run_dir, device="cpu")
    require_classifier(run, "--explain")
    groups = flagged_groups(report)
    out: dict[str, Any] = {"run": str(run_dir), "data": str(data), "groups": [],
                           "target": report.get("pos_label") or "predicted class"}
    if not groups:
        out["note"] = "no group is flagged; nothing to explain"
        return out
    settings = settings or ExplainSettings(attention=False, max_steps=512)
    ids = [str(i) for i in df["example_id"]]
    text = {r["id"]: r["text"] for r in load_rows(run, data, None, 10 ** 9)}
    known = [i for i in ids if i in text]
    if not known:
        raise UserError(f"--explain: no example_id of the predictions table is in {data}; "
                        "pass the data file the predictions were made from (--data)")
    rng = np.random.default_rng(seed)
    d = df.assign(example_id=df["example_id"].astype(str)).set_index("example_id")
    d = d.loc[known]
    chosen = list(rng.permutation(known)[:max_rows])
    for g in groups:
        members = _members(d, g["group"])
        have = set(chosen) & set(members)
        need = max(0, min(min_group_rows, len(members)) - len(have))
        chosen += list(rng.permutation(sorted(set(members) - have))[:need])
    target = report.get("pos_label")
    records = explain_rows(run, [{"id": i, "text": text[i]} for i in chosen], target, settings)
    attr = _word_table(records)
    for g in groups:
        inside = np.isin(attr.index, _members(d, g["group"]))
        a, b = attr[inside].mean(axis=0), attr[~inside].mean(axis=0)
        diff = (a - b).sort_values()
        present = attr != 0
        present_g, present_r = present[inside].mean(axis=0), present[~inside].mean(axis=0)
        top = list(diff.abs().sort_values(ascending=False).index[:TOP_WORDS])
        cis = _bootstrap(attr[top].to_numpy(), inside, rng)
        words = [{"word": w, "group_mean": float(a[w]), "rest_mean": float(b[w]),
                  "difference": float(diff[w]), "ci": [float(lo), float(hi)],
                  "excludes_zero": bool(lo > 0 or hi < 0),
                  "share_of_group_rows": float(present_g[w]),
                  "share_of_rest_rows": float(present_r[w])}
                 for w, (lo, hi) in zip(top, cis)]
        out["groups"].append({"slice": g["slice"], "group": g["group"], "label": g["label"],
                              "flagged_by": g["flagged_by"], "n_explained": int(inside.sum()),
                              "n_rest": int((~inside).sum()), "top_words": words})
    out.update({"rows_explained": len(records), "method": method(settings),
                "max_convergence_delta": max(r["convergence_delta"] for r in records),
                "faithfulness": faithfulness(run, records, settings),
                "ranking": "words by |mean attribution in the group - mean in the rest| "
                           "(0 where a row lacks the word); ci: 95% row-bootstrap percentile "
                           "interval, marginal and after selection (a noise gauge)"})
    return out


def _bootstrap(x: np.ndarray, inside: np.ndarray, rng: np.random.Generator,
               n_boot: int = BOOT) -> np.ndarray:
    """Percentile intervals [words, 2] of mean(group) - mean(rest) per column of ``x``
    [rows, words], resampling rows within the group and within the rest. Marginal, per
    word: the words were chosen by the same data, so read them as a noise gauge, not a test."""
    g, r = x[inside], x[~inside]
    if len(g) == 0 or len(r) == 0:
        return np.full((x.shape[1], 2), np.nan)
    stats = np.empty((n_boot, x.shape[1]))
    for i in range(n_boot):
        stats[i] = (g[rng.integers(0, len(g), len(g))].mean(0)
                    - r[rng.integers(0, len(r), len(r))].mean(0))
    return np.percentile(stats, [2.5, 97.5], axis=0).T


def _members(d: pd.DataFrame, group: dict[str, str]) -> list[str]:
    m = np.ones(len(d), dtype=bool)
    for col, val in group.items():
        m &= d[col].astype(str).to_numpy() == str(val)
    return list(d.index[m])


def _word_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """[rows x words] attribution of each word key in each row (summed over repeats)."""
    per = []
    for r in records:
        row: dict[str, float] = {}
        for w in r["words"]:
            k = word_key(w["word"])
            if k:
                row[k] = row.get(k, 0.0) + w["attribution"]
        per.append(row)
    return pd.DataFrame(per, index=[r["id"] for r in records]).fillna(0.0)


def lines(section: dict[str, Any]) -> list[str]:
    """Plain sentences for the CLI, Markdown and HTML."""
    if not section["groups"]:
        return [f"explanations ({section['run']}): {section.get('note', '')}"]
    out = []
    for g in section["groups"]:
        down = [w for w in g["top_words"] if w["difference"] < 0][:5]
        up = [w for w in g["top_words"] if w["difference"] > 0][:3]
        out.append(f"{g['label']} ({g['n_explained']} rows vs {g['n_rest']}): words pushing "
                   f"towards {section['target']!r} less than elsewhere: "
                   + (", ".join(_w(w) for w in down) or "none") + "; more: "
                   + (", ".join(_w(w) for w in up) or "none"))
    out.append("(* : the word's 95% bootstrap interval excludes 0; marginal, after selection)")
    return out


def _w(w: dict[str, Any]) -> str:
    return f"{w['word']} {w['difference']:+.3f}{'*' if w.get('excludes_zero') else ''}"
    return out
