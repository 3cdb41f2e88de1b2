"""``safelm explain`` end to end: load, explain, test faithfulness, write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safelm import load_run, model_sha256
from safelm.explain import require_captum, require_classifier

from .. import common
from .compute import ExplainSettings, explain_rows, faithfulness, method
from .report import render_html, render_markdown

VERSIONED = ("captum",)


def explain(run_dir: str | Path, data: str | Path, out: str | Path | None, *,
            ids: list[str] | None = None, max_rows: int = 50, target: str | None = None,
            settings: ExplainSettings | None = None, text_col: str | None = None,
            id_col: str | None = None) -> dict[str, Any]:
    """Explain rows of ``data`` with ``run_dir``'s classifier; write ``explanations.json``
    and report.json/md/html into ``out`` (when given). Everything is computed first."""
    from .cli import load_rows
    require_captum()
    settings = settings or ExplainSettings()
    run = load_run(run_dir, device="cpu")
    require_classifier(run)
    rows = load_rows(run, data, ids, max_rows, text_col, id_col)
    records = explain_rows(run, rows, target, settings)
    faith = faithfulness(run, records, settings)
    deltas = [r["convergence_delta"] for r in records]
    rep: dict[str, Any] = {
        "kind": "explanations", "run": str(run_dir), "data": str(data),
        "method": method(settings), "settings": vars(settings).copy(),
        "faithfulness": faith,
        "summary": {"rows": len(records), "max_convergence_delta": max(deltas, default=0.0),
                    "mean_convergence_delta": sum(deltas) / len(deltas) if deltas else 0.0,
                    "truncated_rows": sum(r["truncated"] for r in records),
                    # f(baseline) within 0.05 of f(x): the explanation has little to share out
                    "uninformative_baseline_rows": sum(abs(r["score"] - r["f_baseline"]) < 0.05
                                                       for r in records)},
        "inputs": {"model_sha256": model_sha256(run), "data_sha256": common.sha256_file(data)},
        "versions": common.versions(*VERSIONED)}
    explanations = {"kind": "safelm-explanations", "run": str(run_dir), "data": str(data),
                    "method": rep["method"],
                    "rows": [{k: v for k, v in r.items() if k != "ids"} | {"token_ids": r["ids"]}
                             for r in records]}
    if out is not None:
        md, html = render_markdown(rep, records), render_html(rep, records)
        d = common.prepare_out_dir(out)
        common.atomic_write_json(d / "explanations.json", explanations)
        rep["_paths"] = common.write_report(rep, out, markdown=md, html=html)
        rep["_paths"]["explanations"] = d / "explanations.json"
    rep["_records"] = records
    return rep

