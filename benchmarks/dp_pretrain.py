"""Pretrain on public text, fine-tune privately: the recipe of Li et al. (ICLR 2022) and Yu et
al. (ICLR 2022), measured on the bundled corpora.

1. Pretrain a language model on the bundled stories (public, synthetic).
2. Fine-tune the sentiment classifier (bias-free corpus, split by user) without DP and with DP
   at each epsilon, four ways: from scratch (its own tokenizer, random weights), full
   fine-tuning from the pretrained LM (``--init-from``), LoRA from it (``model.lora_rank``;
   only the adapters and the head train), and the demo's small classifier from scratch
   (1 layer, d_model 32, block 32: ``safelm demo``'s recipe). ``--ways`` picks some.
3. Print test accuracy per way and epsilon, and, per way, the DP step's time and peak resident
   memory as ratios to the same way without DP (each run in a fresh process, so its peak RSS
   is its own; time per optimizer step from the run's own epoch timings).

The same classifier shape (the pretrained LM's; the small way's own), data, schedule and seed
in every row; the noise is calibrated to each target epsilon for the whole schedule (delta
1e-5, PRV).

Learning rates: DP and non-private training want different ones (clipping and noise change the
update's scale), so every cell tries each rate of its way's grid (``LR_GRID``) and reports the
test accuracy of the rate with the best final validation accuracy; the chosen rate is printed.
Choosing on the validation split of the private data is what the cited papers do too; its own
privacy cost (Papernot & Steinke, ICLR 2022) is not in the epsilon shown.

``--demo`` asks the question ``safelm demo`` has to answer, in the demo's own setting (its
data: 20,000 rows with the planted bias; its LM: 4 layers, d_model 128, pretrained on its
stories; its DP settings: epsilon 8, batch 512, 8 epochs, clip 5): which recipe should its DP
classifier use? The demo's small classifier from scratch, full fine-tuning of the demo's LM,
or LoRA on it, each over a small learning-rate grid (``DEMO_LR_GRID``), chosen by validation
accuracy as above.

Usage: python benchmarks/dp_pretrain.py [--quick] [--n 8000] [--epochs 4] [--eps 1,3,8]
       [--jobs 1] (--jobs 2 runs two trainings at once: faster, timings shared by both)
       python benchmarks/dp_pretrain.py --demo [--jobs 1]
Last line: {"pretrain": {...}, "rows": {"scratch": {"non_private": {...}, "eps_8": {...}},
            ...}, "ratios": {"lora": {"time": ..., "peak_rss": ...}, ...}}
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SHAPE = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.block_size=64",
         "model.vocab_size=512", "model.dropout=0.0"]
FINETUNE = ["train.task=classify", "train.batch_size=256", "train.warmup_steps=5",
            "train.progress=off", "data.user_col=user", "privacy.max_grad_norm=5.0",
            "train.log_every=1000", "train.checkpoint_every=100000"]
# "small": the demo's own classifier recipe (safelm/demo.py's shape: 1 layer, d_model 32,
# block 32) from scratch, so the demo's choice is measured beside the pretrained recipes
SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32"]
WAYS = {"scratch": [],
        "full": [],
        "lora": ["model.lora_rank=8", "model.lora_alpha=16", "model.lora_targets=attn,mlp"],
        "small": SMALL}
LR_GRID = {"scratch": [3e-3, 1e-2, 3e-2], "full": [1e-3, 3e-3, 1e-2],
           "lora": [3e-3, 1e-2, 3e-2], "small": [3e-3, 1e-2, 3e-2]}
PRETRAINED_WAYS = ("full", "lora")
DEMO_LR_GRID = {"small": [1e-2, 2e-2, 3e-2], "full": [1e-3, 3e-3, 1e-2], "lora": [1e-2, 3e-2]}


def _child(data: str, settings: list[str], out: str, q: mp.Queue) -> None:
    import torch

    from safelm import Config, train_run
    from safelm.rundir import read_metrics
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    final = train_run(data, Config.load(None, settings), out)
    wall = time.perf_counter() - t0
    recs = read_metrics(out)
    epochs = [r for r in recs if r.get("kind") == "epoch"]
    steps = epochs[-1]["step"] if epochs else 0
    train_s = sum(r["seconds"] for r in epochs)
    val = [r["val_accuracy"] for r in epochs if r.get("val_accuracy") is not None]
    q.put({"test_accuracy": final.get("test_accuracy"), "epsilon": final.get("epsilon"),
           "val_accuracy": val[-1] if val else None,
           "steps": steps, "seconds_per_step": train_s / max(steps, 1), "wall_s": wall,
           "trainable_parameters": final.get("trainable_parameters"),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run(data: Path, settings: list[str], out: Path) -> dict:
    """One training run in a fresh process (its own peak RSS)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(str(data), settings, str(out), q))
    p.start()
    while True:  # a child that dies puts nothing: do not wait for it forever
        try:
            res = q.get(timeout=2)
            break
        except queue.Empty:
            if not p.is_alive():
                raise SystemExit(f"run {out} failed (exit {p.exitcode})") from None
    p.join()
    if p.exitcode:
        raise SystemExit(f"run {out} failed (exit {p.exitcode})")
    return res


def best_of(cells: list[tuple[str, float, list[str]]], data: Path, out: Path, jobs: int
            ) -> dict[str, dict]:
    """Run every (label, lr, settings) cell (run dir ``out/<label>-lr<lr>``); per label, the
    run with the best validation accuracy, with each lr's validation accuracy in ``tried``."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:  # each run is its own process
        done = list(pool.map(lambda c: run(data, c[2], out / f"{c[0]}-lr{c[1]:g}"), cells))
    tried: dict[str, list[dict]] = {}
    for (label, lr, _), r in zip(cells, done):
        tried.setdefault(label, []).append({**r, "lr": lr})
    best = {}
    for label, rs in tried.items():
        best[label] = max(rs, key=lambda x: x["val_accuracy"] or 0.0)
        best[label]["tried"] = {f"{x['lr']:g}": x["val_accuracy"] for x in rs}
    return best


def demo_setting(jobs: int, out_dir: str | None) -> None:
    """The ``--demo`` comparison (module doc)."""
    from safelm import corpus
    from safelm.demo import BIAS, CLS_SETTINGS, DP_SETTINGS, LM_SETTINGS, N_SENTIMENT
    out = Path(out_dir or tempfile.mkdtemp(prefix="dp-pretrain-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    stories, sentiment = out / "stories.txt", out / "sentiment.csv"
    corpus.write_story_text(stories)
    corpus.write_sentiment_csv(sentiment, n=N_SENTIMENT, bias=BIAS)
    quiet = ["train.progress=off", "train.log_every=1000"]
    run(stories, LM_SETTINGS + quiet, out / "lm")  # the demo's LM, as the demo trains it
    shape = ("model.n_layer", "model.d_model", "model.n_head", "model.vocab_size")
    tuned = [x for x in CLS_SETTINGS if not x.startswith(shape)] + DP_SETTINGS + quiet + [
        f"train.init_from={out / 'lm'}"]
    ways = {"small": CLS_SETTINGS + DP_SETTINGS + quiet, "full": tuned,
            "lora": tuned + ["model.lora_rank=8", "model.lora_alpha=16",
                             "model.lora_targets=attn,mlp"]}
    cells = [(way, lr, settings + [f"train.lr={lr:g}"])
             for way, settings in ways.items() for lr in DEMO_LR_GRID[way]]
    best = best_of(cells, sentiment, out, jobs)
    for way, r in best.items():
        print(f"{way:6s} epsilon {r['epsilon']:.2f}: test accuracy {r['test_accuracy']:.3f} "
              f"(lr {r['lr']:g}; validation by lr {r['tried']}), "
              f"{r['trainable_parameters']:,} trainable, {r['seconds_per_step'] * 1e3:.0f} ms/step",
              flush=True)
    print(json.dumps({"demo": best}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data, few steps (a smoke run)")
    ap.add_argument("--n", type=int, default=8000, help="sentiment rows")
    ap.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs")
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--eps", default="1,3,8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"of {', '.join(WAYS)}")
    ap.add_argument("--demo", action="store_true", help="the demo's recipe question (doc)")
    args = ap.parse_args()
    if args.demo:
        demo_setting(args.jobs, args.out)
        return
    grid = LR_GRID
    if args.quick:
        args.n, args.epochs, args.pretrain_epochs, args.eps = 1200, 1, 1, "8"
        grid = {w: g[1:2] for w, g in LR_GRID.items()}
    from safelm.corpus import write_sentiment_csv, write_story_text
    out = Path(args.out or tempfile.mkdtemp(prefix="dp-pretrain-"))
    out.mkdir(parents=True, exist_ok=True)
    stories, sentiment = out / "stories.txt", out / "sentiment.csv"
    write_story_text(stories, **({"n_stories": 300} if args.quick else {}))
    write_sentiment_csv(sentiment, n=args.n, bias=0.0)
    ways = {w: WAYS[w] for w in args.ways.split(",")}
    t0 = time.perf_counter()
    pre = {"steps": 0}
    if any(w in PRETRAINED_WAYS for w in ways):
        pre = run(stories, SHAPE + ["train.task=lm", f"train.epochs={args.pretrain_epochs}",
                                    "train.progress=off", "train.lr=2e-3"], out / "pretrained")
    pre_s = time.perf_counter() - t0
    print(f"pretrained LM on the bundled stories: {pre['steps']} steps, {pre_s:.0f} s",
          flush=True)
    eps_list = [float(e) for e in args.eps.split(",")]
    cells = []  # (way-name, lr, settings)
    for way, extra in ways.items():
        base = SHAPE + FINETUNE + extra + [f"train.epochs={args.epochs}"]
        if way in PRETRAINED_WAYS:
            base = [s for s in base if not s.startswith(("model.n_layer", "model.d_model",
                                                         "model.n_head", "model.vocab_size"))]
            base += [f"train.init_from={out / 'pretrained'}"]
        for eps in [None] + eps_list:
            name = "non_private" if eps is None else f"eps_{eps:g}"
            dp = [] if eps is None else ["privacy.enabled=true", f"privacy.target_epsilon={eps}"]
            cells += [(f"{way}-{name}", lr, base + dp + [f"train.lr={lr:g}"])
                      for lr in grid[way]]
    rows: dict[str, dict] = {}
    for label, r in best_of(cells, sentiment, out, args.jobs).items():
        way, name = label.split("-", 1)
        rows.setdefault(way, {})[name] = r
        print(f"{way:8s} {name:12s} test accuracy {r['test_accuracy']:.3f} (lr {r['lr']:g}, "
              f"val {r['val_accuracy']:.3f})  {r['seconds_per_step'] * 1e3:.0f} ms/step  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB  trainable {r['trainable_parameters']:,}",
              flush=True)
    ratios = {}
    for way, by in rows.items():
        np_, dps = by["non_private"], [v for k, v in by.items() if k != "non_private"]
        ratios[way] = {
            "time": round(sum(d["seconds_per_step"] for d in dps) / len(dps)
                          / np_["seconds_per_step"], 2),
            "peak_rss": round(sum(d["peak_rss_mb"] for d in dps) / len(dps)
                              / np_["peak_rss_mb"], 2)}
    print("\n| way | non-private | " + " | ".join(f"eps {e:g}" for e in eps_list)
          + " | DP/non-private time per step | DP/non-private peak RSS |")
    print("| --- " * (4 + len(eps_list)) + "|")
    for way, by in rows.items():
        cells = [f"{by[k]['test_accuracy']:.3f} (lr {by[k]['lr']:g})" for k in by]
        print(f"| {way} | " + " | ".join(cells) + f" | x{ratios[way]['time']} | "
              f"x{ratios[way]['peak_rss']} |")
    print(f"\n{args.n} rows, {args.epochs} epochs, batch 256, delta 1e-5, clip 5; learning rate "
          f"per cell from {grid} by validation accuracy; runs in {out}")
    print(json.dumps({"pretrain": {"steps": pre["steps"], "seconds": round(pre_s, 1)},
                      "rows": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()
