"""``safelm demo``: the embedded default, on the bundled synthetic corpus, in a few minutes.

1. writes the bundled corpora to ``OUT/data`` (sentiment rows with a planted bias; stories),
2. trains a small Transformer language model on the stories and prints its validation
   perplexity before and after, and a few samples,
3. trains a Transformer sentiment classifier and prints its test accuracy, macro-F1 and
   accuracy per demographic group (where the planted bias shows),
4. trains the same classifier with DP-SGD at epsilon 8 and prints its accuracy beside the
   non-private one, then writes both predictions tables for the test split;
5. (full demo) retrains it with reweighing (``train.reweight=groups_labels``), the in-training
   fairness mitigation, and prints the predicted-positive gap before and after;
6. runs the demo steps of installed plugins (the audits), then collects their verdicts: the
   demo fails (``safelm demo`` exits 1, naming each failure) when any audit verdict or any
   release gate fails, so a green demo means every check it ran passed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from . import corpus, rundir
from .api import generate, load_run, predictions_table, train_run, write_csv
from .config import Config
from .errors import UserError
from .plugins import load_plugins

LM_SETTINGS = ["model.n_layer=4", "model.d_model=128", "model.n_head=4", "model.block_size=64",
               "model.vocab_size=512", "model.dropout=0.0", "train.epochs=6", "train.lr=2e-3",
               "train.batch_size=32", "train.warmup_steps=30", "train.checkpoint_every=100000"]
# The classifier is small (one layer, d_model 32) so that its DP twin trains in the demo's
# time; the same model, data and seed serve both (benchmarks/dp_utility.py for the table).
CLS_SETTINGS = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32",
                "model.vocab_size=512", "train.epochs=6", "train.lr=3e-3", "train.batch_size=256",
                "train.warmup_steps=10", "train.task=classify", "train.checkpoint_every=100000",
                "data.group_cols=gender,age_group,region", "data.user_col=user"]
# DP-SGD wants a larger step than AdamW's usual: at lr 3e-3 and batch 1024 the noisy model
# stayed near chance (0.59); batch 512 at lr 2e-2 reached 0.92 (measured, same epsilon).
DP_SETTINGS = ["train.batch_size=512", "train.lr=2e-2", "train.epochs=8",
               "train.warmup_steps=5", "privacy.enabled=true", "privacy.target_epsilon=8",
               "privacy.delta=1e-5", "privacy.max_grad_norm=5.0"]
# The recipe is chosen by measurement, in the demo's own setting (benchmarks/dp_pretrain.py
# --demo): this small classifier from scratch beat DP fine-tuning of the demo's LM, fully or
# with LoRA, at epsilon 8 (table in benchmarks/README.md).
DP_RECIPE = ("recipe: the small classifier from scratch, the best of three measured in this "
             "setting at epsilon 8 (fine-tuning the demo LM fully or with LoRA did worse; "
             "benchmarks/dp_pretrain.py --demo)")
N_SENTIMENT = 20000
QUICK = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "train.epochs=1",
         "model.vocab_size=300"]
PROMPTS = ["Once upon a time", "One rainy morning,", '"Can I help?"']
GROUP_COLS = ["gender", "age_group"]
BIAS = 0.8  # share of positive training labels of old women flipped to negative
REWEIGHT = "train.reweight=groups_labels"


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _fresh(path: Path) -> Path:
    """A demo sub-folder from an earlier demo is replaced; anything else is refused."""
    if path.exists():
        if not (path / rundir.CONFIG).is_file():
            raise UserError(f"{path} exists and is not a SafeLM run dir; choose another --out")
        shutil.rmtree(path)
    return path


def _positive_rate_gap(table: pd.DataFrame) -> float:
    """Predicted-positive rate of everyone else minus that of old women (the planted bias)."""
    target = (table["gender"] == "female") & (table["age_group"] == "old")
    pos = table["y_pred"] == "positive"
    return float(pos[~target].mean() - pos[target].mean())


def _reweighted(out: Path, sentiment: Path, before: pd.DataFrame) -> Path:
    """The classifier retrained with reweighing (in-training mitigation), test predictions."""
    print(f"\n[+] the same classifier with in-training mitigation ({REWEIGHT})")
    cfg = Config.load(None, CLS_SETTINGS + [REWEIGHT, "train.progress=auto"])
    run_dir = _fresh(out / "classifier-reweighted")
    final = train_run(sentiment, cfg, run_dir)
    table = predictions_table(load_run(run_dir), sentiment, split="test")
    path = out / "predictions_test_reweighted.csv"
    write_csv(table, path)
    acc0 = float((before["y_true"] == before["y_pred"]).mean())
    print(f"  test accuracy {_fmt(acc0)} -> {_fmt(final['test_accuracy'])}; predicted-positive "
          f"gap, others minus female x old: {_fmt(_positive_rate_gap(before))} -> "
          f"{_fmt(_positive_rate_gap(table))}")
    return path


def demo_verdicts(ctx: dict) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) of every verdict the demo's steps produced.

    Read from what the plugins' demo steps leave in ``ctx``, without importing them (safelm
    never imports audits): ``verdicts`` (a list of such triples any step may append to), the
    privacy audit's ``report.json`` (its ``passed``) and the release's verify gates
    (``release_ok`` with the gate lines)."""
    out = [tuple(v) for v in ctx.get("verdicts", [])]
    report = ctx.get("privacy_audit")
    if report and Path(report).is_file():
        rep = json.loads(Path(report).read_text(encoding="utf-8"))
        if rep.get("passed") is not None:  # null: a descriptive audit, no verdict drawn
            out.append(("privacy audit", bool(rep["passed"]), str(report)))
    if "release_ok" in ctx:
        failed = [g for g in ctx.get("release_gates", []) if str(g).startswith("FAIL")]
        out.append(("release verify", bool(ctx["release_ok"]),
                    "; ".join(failed) or "every gate passed"))
    return out  # type: ignore[return-value]


def run_demo(out: Path, quick: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    data.mkdir(exist_ok=True)
    stories, sentiment = data / "stories.txt", data / "sentiment.csv"
    corpus.write_story_text(stories, n_stories=200 if quick else 1500)
    corpus.write_sentiment_csv(sentiment, n=1200 if quick else N_SENTIMENT, bias=BIAS)
    print(f"SafeLM demo -> {out}")
    print(f"bundled synthetic corpus: {stories} (stories), {sentiment} "
          f"(sentiment, planted bias {BIAS} against old women in the training split)")

    # ---- language model -------------------------------------------------------------------
    progress = ["train.progress=auto"]
    lm_cfg = Config.load(None, LM_SETTINGS + (QUICK if quick else []) + progress)
    print("\n[1/3] language model: decoder-only Transformer on the stories")
    lm_dir = _fresh(out / "lm")
    final = train_run(stories, lm_cfg, lm_dir)
    start = next(r for r in rundir.read_metrics(lm_dir) if r["kind"] == "eval")
    print(f"  validation perplexity {start['val_perplexity']:.1f} -> "
          f"{final['val_perplexity']:.2f} (test {final['test_perplexity']:.2f}), "
          f"{final['tokens_per_s']:.0f} tokens/s")
    run = load_run(lm_dir)
    for i, prompt in enumerate(PROMPTS):
        text = generate(run, prompt, max_new_tokens=40, temperature=0.8, top_k=40, seed=i)
        print(f"  sample: {text!r}")

    # ---- classifier -----------------------------------------------------------------------
    print("\n[2/3] sentiment classifier: Transformer, split by user")
    cls_cfg = Config.load(None, CLS_SETTINGS + (QUICK if quick else []) + progress)
    cls_dir = _fresh(out / "classifier")
    final_c = train_run(sentiment, cls_cfg, cls_dir)
    print(f"  test accuracy {_fmt(final_c['test_accuracy'])}, "
          f"macro-F1 {_fmt(final_c['test_macro_f1'])}")
    table = predictions_table(load_run(cls_dir), sentiment, split="test")
    preds = out / "predictions_test.csv"
    write_csv(table, preds)
    correct = (table["y_true"] == table["y_pred"])
    by = (pd.DataFrame({"correct": correct, "positive": table["y_pred"] == "positive",
                        **{c: table[c] for c in GROUP_COLS}})
          .groupby(GROUP_COLS).agg(n=("correct", "size"), accuracy=("correct", "mean"),
                                   predicted_positive=("positive", "mean")))
    print("  test accuracy and predicted-positive rate by gender x age group "
          "(the planted bias targets female x old):")
    for line in by.round(3).to_string().splitlines():
        print(f"    {line}")

    # ---- the same classifier with DP-SGD ----------------------------------------------------
    print("\n[3/3] the same classifier trained with DP-SGD (Opacus; per-example, Poisson "
          "sampling)")
    print(f"  {DP_RECIPE}")
    dp_cfg = Config.load(None, CLS_SETTINGS + DP_SETTINGS + (QUICK if quick else []) + progress)
    dp_dir = _fresh(out / "classifier-dp")
    final_dp = train_run(sentiment, dp_cfg, dp_dir)
    dp_preds = out / "predictions_test_dp.csv"
    write_csv(predictions_table(load_run(dp_dir), sentiment, split="test"), dp_preds)
    print(f"  test accuracy {_fmt(final_dp['test_accuracy'])} at epsilon "
          f"{final_dp['epsilon']:.2f} (delta {dp_cfg.privacy.delta:g}) vs "
          f"{_fmt(final_c['test_accuracy'])} without DP; ledger: {dp_dir / rundir.PRIVACY}")
    rw_preds = None
    if not quick:  # --quick's 1,200 rows leave too few old women to reweigh by
        rw_preds = _reweighted(out, sentiment, table)
    rw = f"  {out / 'classifier-reweighted'}" if rw_preds else ""
    print(f"\nruns: {lm_dir}  {cls_dir}  {dp_dir}{rw}")
    print(f"predictions tables: {preds}  {dp_preds}" + (f"  {rw_preds}" if rw_preds else ""))
    ctx = {"out": out, "quick": quick, "data": {"stories": stories, "sentiment": sentiment},
           "lm_run": lm_dir, "classifier_run": cls_dir, "predictions": preds,
           "dp_classifier_run": dp_dir, "dp_predictions": dp_preds,
           "group_cols": cls_cfg.data.group_cols, "reweighted_predictions": rw_preds,
           "reweight_method": REWEIGHT}
    for plugin in load_plugins():
        if hasattr(plugin, "demo_step"):
            plugin.demo_step(ctx)
    verdicts = demo_verdicts(ctx)
    failed = [f"{name}: {detail}" for name, ok, detail in verdicts if not ok]
    print(f"done in {time.perf_counter() - t0:.0f} s; {len(verdicts) - len(failed)} of "
          f"{len(verdicts)} verdicts passed")
    return {"lm_val_perplexity": final["val_perplexity"],
            "classifier_test_accuracy": final_c["test_accuracy"], "failed": failed}
