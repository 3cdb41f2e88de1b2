"""report.json / report.md / report.html of the embedding association audit (self-contained,
like the other audits: the table of tests first, then what the numbers assume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import common
from ..reporting import esc, fmt, fmt_ci, md_table, page, table

HEAD = ["test", "targets X / Y", "attributes A / B", "effect size d", "interval", "p-value",
        "Holm p", "n X/Y/A/B", "missing"]


def _missing(r: dict[str, Any]) -> str:
    m = [f"{k}: {', '.join(v[:6])}" + (f" (+{len(v) - 6} more)" if len(v) > 6 else "")
         for k, v in r["missing"].items() if v]
    return "; ".join(m) or "none"


def _rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report["tests"]:
        n = r["n"]
        counts = f"{n['X']}/{n['Y']}/{n['A']}/{n['B']}"
        tn, an = " / ".join(r["target_names"]), " / ".join(r["attribute_names"])
        if r.get("skipped"):
            rows.append([r["name"], tn, an, "skipped", r["skipped"], "", "", counts,
                         _missing(r)])
        else:
            rows.append([r["name"], tn, an, fmt(r["effect_size"], 2), fmt_ci(r["ci"]),
                         f"{r['p_value']:.3g}", f"{r['p_value_holm']:.3g}", counts,
                         _missing(r)])
    return rows


def method_text(report: dict[str, Any]) -> str:
    st, a = report["settings"], report["assumptions"]
    return (f"Effect size d: difference of the mean association of X and Y words with A "
            f"rather than B, over the sample standard deviation (ddof=1) of the association "
            f"across X u Y. p-value: {a['p_value']}; exact over all partitions when there are "
            f"at most {st['exact_limit']:,}, else {st['permutations']:,} random partitions with "
            f"the +1 correction; {a['multiplicity']}. Interval "
            f"({int(st['confidence'] * 100)}%, {st['bootstrap']} replicates): {a['ci']}. Seed {st['seed']}. d > 0: X is closer to A (and Y to B). "
            "A small p-value says the association is unlikely under that null; it does not "
            "say how the embedding will behave in a downstream system.")


def short_method(report: dict[str, Any]) -> str:
    st = report["settings"]
    return (f"d > 0: X closer to A than Y is. p: one-sided permutation test (target words "
            f"exchangeable under the null); interval: {int(st['confidence'] * 100)}% "
            f"word-bootstrap percentile ({st['bootstrap']} replicates); Holm: adjusted over "
            f"the tests above; seed {st['seed']}.")


def _source(report: dict[str, Any]) -> str:
    e = report["embeddings"]
    what = (f"run {e['path']} ({e['word_vector']})" if e["kind"] == "run"
            else f"{e['path']} ({e['format']})")
    return f"{what}, {e['words']:,} words x {e['dim']} dims; tests: {report['tests_source']}"


def render_markdown(report: dict[str, Any]) -> str:
    out = ["# Embedding association (WEAT)", "", _source(report), ""]
    out += [f"- {s}" for s in report["summary"]] + ["", method_text(report), ""]
    out += [md_table(HEAD, _rows(report)), ""]
    return "\n".join(out)


def render_html(report: dict[str, Any]) -> str:
    body = [f"<h1>Embedding association (WEAT)</h1><p class=meta>{esc(_source(report))}</p>",
            '<div class="lead ok"><ul>' + "".join(f"<li>{esc(s)}</li>"
                                                  for s in report["summary"]) + "</ul></div>",
            f"<p class=note>{esc(method_text(report))}</p>",
            table(HEAD, [[esc(c) for c in row] for row in _rows(report)], left=3)]
    notes = []
    for r in report["tests"]:
        for key, what in (("split_words", "split into several tokens (vector = mean)"),
                          ("lowercased", "found only in lower case")):
            words = [w for v in r.get(key, {}).values() for w in v]
            if words:
                notes.append(f"<li>{esc(r['name'])}: {len(words)} word(s) {what}: "
                             f"{esc(', '.join(words[:30]))}</li>")
    if notes:
        body.append("<details><summary>word notes</summary><ul>" + "".join(notes)
                    + "</ul></details>")
    inp = report["inputs"]
    body.append("<p class=meta>"
                + esc(", ".join(f"{k} {v}" for k, v in inp.items() if v)) + " · "
                + esc(", ".join(f"{k} {v}" for k, v in report["versions"].items())) + "</p>")
    return page("Embedding association (WEAT)", "".join(body))


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Render, then write with the audits' one writer."""
    return common.write_report(report, out, markdown=render_markdown(report),
                               html=render_html(report))
