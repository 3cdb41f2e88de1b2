"""How a training step's cost grows with the work: step time against batch size and context,
plain and DP, with a plot.

Model: the demo language model (4 layers, d_model 128, 4 heads, vocab 512), AdamW. Two
sweeps, each cell one fresh process of ``bench_dp.py``'s paired timer (plain and SafeLM's DP
step alternate on the same batches; medians after 3 warm-up pairs):

* batch size 32, 64, 128, 256, 512 at context 64;
* context 64, 128, 256, 512 at batch size 32.

Prints one line per cell (ms per step, plain and DP, and their paired ratio) and writes
``--plot`` (default ``benchmarks/cost_curves.png``): ms per step against tokens per step,
log-log, one panel per sweep. A straight line of slope 1 is cost proportional to the work;
the DP/plain gap shows what privacy adds.

Usage: python benchmarks/cost_curves.py [--steps 5] [--plot FILE] [--batches 32,64,...]
       [--contexts 64,128,...]
Last line: {"batch_sweep": [{"batch", "context", "plain_ms", "dp_ms", "ratio"}, ...],
            "context_sweep": [...]}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bench_dp


def cell(B: int, T: int, steps: int) -> dict | None:
    bench_dp.SHAPE.update(block_size=T)
    got = bench_dp._run("time", "safelm", B, steps)
    if got is None:
        return None
    rec = {"batch": B, "context": T, "plain_ms": round(got["plain_s"] * 1000, 1),
           "dp_ms": round(got["step_s"] * 1000, 1), "ratio": round(got["time_ratio"], 3)}
    print(f"batch {B:4d} context {T:4d}: plain {rec['plain_ms']:8.1f} ms  DP "
          f"{rec['dp_ms']:8.1f} ms  (paired x{rec['ratio']:.2f})", flush=True)
    return rec


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (key, label, vary) in zip(axes, [("batch_sweep", "batch size (context 64)", "batch"),
                                             ("context_sweep", "context (batch 32)", "context")]):
        rows = result[key]
        work = [r["batch"] * r["context"] for r in rows]
        for field, name, style in (("plain_ms", "non-private", "o-"), ("dp_ms", "DP-SGD", "s-")):
            ax.plot(work, [r[field] for r in rows], style, label=name)
        for r, w in zip(rows, work):
            ax.annotate(f"{vary[0]}={r[vary]}\nx{r['ratio']:.2f}", (w, r["dp_ms"]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
        if rows:
            w0, t0 = work[0], rows[0]["plain_ms"]
            ax.plot([w0, work[-1]], [t0, t0 * work[-1] / w0], ":", color="grey",
                    label="proportional to tokens")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"tokens per step, varying {label}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("ms per optimizer step (median)")
    fig.suptitle("Step cost of the demo LM (4 layers, d 128): non-private vs DP-SGD")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed step pairs per cell")
    ap.add_argument("--batches", default="32,64,128,256,512")
    ap.add_argument("--contexts", default="64,128,256,512")
    ap.add_argument("--plot", default=str(Path(__file__).with_name("cost_curves.png")))
    args = ap.parse_args()
    result: dict = {"batch_sweep": [], "context_sweep": []}
    for B in (int(b) for b in args.batches.split(",")):
        if (r := cell(B, 64, args.steps)) is not None:
            result["batch_sweep"].append(r)
    for T in (int(t) for t in args.contexts.split(",")):
        if (r := cell(32, T, args.steps)) is not None:
            result["context_sweep"].append(r)
    plot(result, Path(args.plot))
    print(f"plot: {args.plot}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
