"""report.md and the self-contained report.html of ``safelm explain``: each row's words
coloured by attribution (green towards the explained class, red against), the faithfulness
test, and attention heatmaps (layer x head rows, token columns) beside the attributions."""

from __future__ import annotations

from typing import Any

from ..reporting import esc, figure_png, fmt, md_table, page, table

ATTENTION_FIGURES = 12  # rows with a heatmap in the HTML (every row keeps it in the JSON)


def faithfulness_lines(f: dict[str, Any]) -> list[str]:
    if not f["rows"]:
        return ["faithfulness: no row had two or more tokens; not measured"]
    return [f"faithfulness (deleting the top-{f['k']} attributed tokens vs {f['k']} random "
            f"ones, {f['draws']} draws, {f['rows']} rows): mean drop in the explained class's "
            f"probability {f['top_k_drop_mean']:.3f} vs {f['random_drop_mean']:.3f}; top-k "
            f"moves it more in {100 * f['fraction_top_beats_random']:.0f}% of rows "
            f"(Wilcoxon one-sided p = {_p(f['wilcoxon_p'])}, sign test p = "
            f"{_p(f['sign_test_p'])}): {'passed' if f['passed'] else 'FAILED'}"]


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def baseline_line(summary: dict[str, Any]) -> str:
    return (f"{summary['uninformative_baseline_rows']} of {summary['rows']} rows have "
            "f(baseline) within 0.05 of f(x): their attributions share out little (try "
            "--baseline-word)" if summary["uninformative_baseline_rows"] else
            "every row's baseline differs from the input by more than 0.05 in probability")


def _word_line(rec: dict[str, Any], n: int = 3) -> str:
    ws = sorted(rec["words"], key=lambda w: -w["attribution"])[:n]
    return ", ".join(f"{w['word']} {w['attribution']:+.3f}" for w in ws)


def render_markdown(rep: dict[str, Any], records: list[dict[str, Any]]) -> str:
    out = [f"# Explanations of {rep['run']}", "",
           f"Method: {rep['method']['name']}; baseline: {rep['method']['baseline']}.", "",
           *faithfulness_lines(rep["faithfulness"]), "",
           f"Largest convergence delta (completeness error): "
           f"{fmt(rep['summary']['max_convergence_delta'], 4)}", "",
           baseline_line(rep["summary"]), ""]
    rows = [[r["id"], r["predicted"], r["target"], f"{r['score']:.3f}", _word_line(r),
             f"{r['convergence_delta']:.4f}"] for r in records]
    out.append(md_table(["id", "predicted", "explained", "p", "top words (attribution)",
                         "delta"], rows))
    return "\n".join(out) + "\n"


def _colour(a: float, scale: float) -> str:
    x = max(-1.0, min(1.0, a / scale)) if scale > 0 else 0.0
    if x >= 0:
        return f"rgba(39,174,96,{0.75 * x:.2f})"
    return f"rgba(192,57,43,{-0.75 * x:.2f})"


def _coloured_text(rec: dict[str, Any]) -> str:
    scale = max((abs(w["attribution"]) for w in rec["words"]), default=0.0)
    return " ".join(f'<span title="{w["attribution"]:+.4f}" style="background:'
                    f'{_colour(w["attribution"], scale)};padding:1px 2px">{esc(w["word"])}</span>'
                    for w in rec["words"])


def _attention_figure(rec: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt
    import numpy as np
    att = np.asarray(rec["attention"])  # [L, H, T]
    L, H, T = att.shape
    fig, ax = plt.subplots(figsize=(min(12, 1.5 + 0.45 * T), 0.9 + 0.28 * L * H))
    ax.imshow(att.reshape(L * H, T), aspect="auto", cmap="Blues", vmin=0,
              vmax=max(float(att.max()), 1e-9))
    ax.set_xticks(range(T), [t.strip() or "_" for t in rec["tokens"]], rotation=60,
                  fontsize=8)
    ax.set_yticks(range(L * H), [f"L{i // H} H{i % H}" for i in range(L * H)], fontsize=7)
    ax.set_title(f"attention from the last token ({rec['id']}; darkest = {att.max():.2f})",
                 fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def render_html(rep: dict[str, Any], records: list[dict[str, Any]]) -> str:
    f = rep["faithfulness"]
    ok = f["rows"] and f["passed"]
    body = [f"<h1>Explanations: {esc(rep['run'])}</h1>",
            f'<p class="meta">{esc(rep["method"]["name"])}; baseline: '
            f'{esc(rep["method"]["baseline"])}; {len(records)} rows of {esc(rep["data"])}</p>',
            f'<div class="lead{" ok" if ok else ""}"><ul>'
            + "".join(f"<li>{esc(s)}</li>" for s in faithfulness_lines(f)) + "</ul></div>",
            '<p class="note">Green words push towards the explained class, red against '
            "(integrated gradients, summed over each word's BPE pieces; hover for the value). "
            f"Largest convergence delta: {fmt(rep['summary']['max_convergence_delta'], 4)}. "
            f"{esc(baseline_line(rep['summary']))}. {esc(f['assumptions'])}.</p>",
            "<h2>Rows</h2>"]
    rows = [[esc(r["id"]), esc(r["predicted"]), esc(r["target"]), f"{r['score']:.3f}",
             f'<td class="l" style="white-space:normal">{_coloured_text(r)}</td>',
             f"{r['convergence_delta']:.4f}"] for r in records]
    body.append(table(["id", "predicted", "explained", "p", "words", "delta"], rows, left=3))
    with_att = [r for r in records if r.get("attention")][:ATTENTION_FIGURES]
    if with_att:
        body.append("<h2>Attention beside the attributions</h2><p class=\"note\">Each head's "
                    "attention from the last real token (the one the class head reads); "
                    "attention weights are not attributions and may disagree with them.</p>")
        for r in with_att:
            body.append(f"<h3>{esc(r['id'])}</h3><p>{_coloured_text(r)}</p>"
                        + _attention_figure(r))
    return page(f"Explanations: {rep['run']}", "".join(body))
