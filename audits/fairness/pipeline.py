"""One call from a predictions file to a written report (what the CLI and the demo run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safelm.errors import UserError

from .audit import FairnessSettings, run_audit
from .compare import compare as compare_tables
from .mitigate import CONSTRAINTS, mitigate as mitigate_table, training_mitigation
from .report import complete, write_report
from .table import load_predictions


def fairness_audit(predictions: str | Path, sensitive: str | list[str],
                   out: str | Path | None = None, *, pos_label: str | None = None,
                   settings: FairnessSettings | None = None, n_bins: int = 10,
                   compare: str | Path | None = None, mitigate: list[str] | None = None,
                   fit_predictions: str | Path | None = None,
                   unmitigated: str | Path | None = None,
                   mitigation_method: str = "",
                   explain: tuple[str | Path, str | Path] | None = None,
                   explain_rows: int = 300) -> dict[str, Any]:
    """Audit ``predictions`` by ``sensitive`` columns; write report.* into ``out`` if given.

    Everything is computed before anything is written, so a failing audit leaves an
    earlier report in ``out`` untouched. Returns the report dict (report.json's content),
    with the written paths under ``"_paths"`` when ``out`` is given.

    ``explain = (RUN, DATA)``: for each flagged group, the words that most drive its
    predictions vs the rest (``audits/explain/groups.py``), in ``report["explanations"]``.
    """
    settings = settings or FairnessSettings()
    _check_settings(settings, n_bins)
    if explain is not None:  # refuse a missing captum or an LM run before the slow part
        from safelm.explain import require_captum
        require_captum("--explain")
    pt = load_predictions(predictions, sensitive, pos_label=pos_label, n_bins=n_bins)
    report = run_audit(pt, settings)
    extra: dict[str, Any] = {}
    if compare is not None:
        base = load_predictions(compare, pt.sensitive, pos_label=pt.task.pos_label,
                                n_bins=n_bins)
        report["comparison"] = compare_tables(pt, base, settings)
        extra["baseline_sha256"] = base.sha256
    if mitigate:
        bad = [c for c in mitigate if c not in CONSTRAINTS]
        if bad:
            raise UserError(f"--mitigate {bad[0]!r}: choose from {', '.join(CONSTRAINTS)}")
        if fit_predictions is None:
            raise UserError("--mitigate needs --fit-predictions FILE: predictions on other rows "
                            "(e.g. 'safelm predict RUN --split val') to fit the thresholds on")
        fit = load_predictions(fit_predictions, pt.sensitive, pos_label=pt.task.pos_label,
                               n_bins=n_bins)
        report["mitigation"] = [mitigate_table(pt, fit, c, settings) for c in mitigate]
        extra["fit_predictions_sha256"] = fit.sha256
    if unmitigated is not None:
        before = load_predictions(unmitigated, pt.sensitive, pos_label=pt.task.pos_label,
                                  n_bins=n_bins)
        report.setdefault("mitigation", []).append(
            training_mitigation(pt, before, settings, mitigation_method))
        extra["unmitigated_sha256"] = before.sha256
    complete(report, pt, extra)
    if explain is not None:
        from ..explain.groups import group_explanations
        report["explanations"] = group_explanations(report, pt.df, explain[0], explain[1],
                                                    max_rows=explain_rows, seed=settings.seed)
    if out is not None:
        report["_paths"] = {k: str(v) for k, v in write_report(report, out, pt).items()}
    return report


def _check_settings(st: FairnessSettings, n_bins: int) -> None:
    if st.n_boot < 10:
        raise UserError(f"--n-boot {st.n_boot}: use at least 10 resamples (1000 recommended)")
    if not 0.5 <= st.confidence < 1:
        raise UserError(f"--confidence {st.confidence}: give a level in [0.5, 1), e.g. 0.95")
    if st.min_group_size < 1:
        raise UserError("--min-group-size must be >= 1")
    if not 2 <= n_bins <= 100:
        raise UserError("--bins must be in [2, 100]")
    t = st.thresholds
    if not 0 < t.ratio <= 1 or not t.difference >= 0:
        raise UserError("--ratio-threshold must be in (0, 1] and --difference-threshold >= 0")
