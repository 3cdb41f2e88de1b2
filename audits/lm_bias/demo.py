"""The demo's LM bias step: probe the demo language model (not registered as a plugin step; the
demo's audit plugin calls :func:`demo_step`).

Why no classifier scorer here: the demo's sentiment classifier is trained on labels the
bundled corpus biases *on purpose* (positive reviews by old women flipped to negative), so it
has learned to rate text about some groups lower. Scoring the language model's continuations
with it would mix that classifier's bias into the verdict on the language model. The demo
scores continuations with the offline lexicon (``lexicon.py``: a fixed word list, the same for
every group), reading the continuation alone, never the prompt that names the group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .audit import LMBiasSettings, lm_bias_audit

SCORER_NOTE = ("generated continuations scored by the offline sentiment lexicon, continuation "
               "only (not by the demo classifier: it was trained on deliberately biased labels)")


def demo_step(ctx: dict[str, Any]) -> dict[str, Any]:
    """Run the LM bias audit on ``ctx["lm_run"]``; record the report path in ``ctx``."""
    quick = bool(ctx.get("quick"))
    print("\n[audit] bias probes of the language model")
    print(f"  {SCORER_NOTE}")
    lm = lm_bias_audit(ctx["lm_run"], Path(ctx["out"]) / "audit-lm-bias", classifier=None,
                       settings=LMBiasSettings(samples=2 if quick else 4, max_new_tokens=20,
                                               n_boot=300 if quick else 1000))
    ctx["lm_bias_report"] = lm["_paths"]["html"]
    sm = lm["summary"]
    print(f"  {sm['n_flagged']} finding(s) flagged, {sm['n_insufficient_data']} with "
          f"insufficient data to decide ({lm['error_control']['comparisons']} comparisons, "
          "simultaneous intervals)")
    for s in sm["lines"][:4]:
        print(f"    {s}")
    print(f"  LM bias report: {lm['_paths']['html']}")
    return lm
