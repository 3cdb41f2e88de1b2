"""DP-SGD step time and peak memory against non-private training, side by side in one run.

Model: the demo language model (4 layers, d_model 128, 4 heads, block 64, vocab 512, tied
embedding), AdamW, physical batches of 32 and 128 full blocks. Configurations:

* ``plain``: non-private (the baseline of every ratio);
* ``safelm``: SafeLM's DP path as `safelm train` uses it (grad_sample_mode=auto, which picks the
  exact one-backward "book-keeping" clipping for this model), noise multiplier 1, clip 1;
* ``opacus-hooks``, ``opacus-functorch``, ``opacus-ew``: stock Opacus ``make_private``;
* ``opacus-ghost``: stock ghost clipping (it refuses tied weights, so untied, loss via its
  wrapped criterion).

How it measures, identically for every configuration:

* time: a fresh subprocess per configuration builds the plain model and the configuration's
  model from the same initial weights and alternates their steps on the same batches; each
  configuration step is timed right next to a plain step and the ratio of the pair is kept
  (3 warm-up pairs, then ``--steps`` pairs; the run's ratio is the median). The machine this
  runs on is shared, so pairing is what keeps other processes' load out of the ratio.
* peak memory: another fresh subprocess per configuration runs ``--mem-steps`` steps alone and
  reports two peaks above its state after imports, both covering model, optimizer state,
  activations, gradients and DP bookkeeping:

  - ``peak_memory_ratio``: the most memory allocated at once (glibc's in-use bytes, read
    after every tensor operation of the steps). This is what the model and the algorithm
    need, the CPU counterpart of ``torch.cuda.max_memory_allocated``, and what the issue's
    reference figures for stock Opacus were measured with (docs/platform-notes.md: ghost x1.15,
    hooks x1.59 at batch 128; this script reads x1.09 and x1.48).
  - ``peak_rss_ratio``: the process's resident high-water mark (ru_maxrss). It adds what the
    allocator holds but does not use: heap fragmentation, which depends on glibc's settings
    and on the order of allocations.
* the allocator: every configuration, plain and Opacus' included, runs with the glibc settings
  SafeLM's trainer applies to all training (``safelm/memory.py``: freed memory is kept for
  the next step instead of being unmapped and page-faulted in again), so that the ratios
  compare algorithms, not allocators. ``SAFELM_KEEP_FREED_MEMORY=0`` in the environment runs
  every configuration with glibc's defaults instead.
* both are repeated ``--repeats`` rounds; the reported ratios are medians over rounds
  (time: median of the runs' paired ratios; memory: median peak over median plain peak).

Usage: python benchmarks/bench_dp.py [--steps 12] [--repeats 3] [--batches 32,128]
       [--modes plain,safelm,opacus-hooks,...] [--block-size 64] [--d-model 128]
(--block-size T and --d-model D change the demo shape; the other dimensions stay.)
Last line: {"batch_32": {"time_ratio": ..., "peak_memory_ratio": ...}, "batch_128": {...},
            "opacus": {"hooks": {"batch_32": {...}}, ...}}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

SHAPE = {"block_size": 64, "d_model": 128}  # the demo LM's; --block-size / --d-model change it
MODES = ["plain", "safelm", "opacus-hooks", "opacus-functorch", "opacus-ew", "opacus-ghost"]


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4  # pages of 4 KiB


def _setup(mode: str, B: int):
    """Model, optimizer, batches and a loss for one configuration (same init for all)."""
    import torch
    from opacus import PrivacyEngine

    from safelm.config import ModelConfig, PrivacyConfig
    from safelm.memory import keep_freed_memory
    from safelm.model import build_model
    from safelm.privacy import DifferentialPrivacy
    from safelm.trainer import batch_loss
    keep_freed_memory()  # what safelm's Trainer does for any training (see the docstring)
    torch.manual_seed(0)
    cfg = ModelConfig(dropout=0.0, tie_weights=mode != "opacus-ghost", **SHAPE)
    model = build_model(cfg, "lm")
    g = torch.Generator().manual_seed(1)
    data = torch.randint(3, cfg.vocab_size, (B * 4, cfg.block_size + 1), generator=g)
    batches = [(data[i:i + B, :-1].contiguous(), data[i:i + B, 1:].contiguous())
               for i in range(0, B * 4, B)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n = len(data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        data[:, :-1], data[:, 1:], torch.full((n,), cfg.block_size), torch.full((n,), -1)),
        batch_size=B)
    criterion = None
    if mode == "safelm":
        pcfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)
        dp = DifferentialPrivacy(pcfg, n_units=len(data), batch_size=B)
        model, opt, _ = dp.make_private(model, opt, loader)
    elif mode.startswith("opacus-"):
        kind = mode.split("-", 1)[1]
        engine = PrivacyEngine(accountant="rdp")
        kw = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                  max_grad_norm=1.0, grad_sample_mode=kind, poisson_sampling=False)
        if kind == "ghost":
            model, opt, criterion, _ = engine.make_private(
                criterion=torch.nn.CrossEntropyLoss(), **kw)
        else:
            model, opt, _ = engine.make_private(**kw)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        if criterion is not None:
            logits = model(x)
            loss = criterion(logits.flatten(0, 1), y.flatten(), shape=logits.shape)
        else:
            loss = batch_loss(model, (x, y, torch.full((len(x),), x.shape[1]),
                                      torch.full((len(x),), -1)), "lm")[0]
        loss.backward()
        opt.step()
    return step


def memory_worker(mode: str, B: int, steps: int) -> dict:
    """Peak allocated and peak resident memory above the post-import state, in a process of
    its own (see the module docstring); allocated is ``safelm.preflight.peak_allocated``
    (glibc's bytes in use after every aten operation: setup and steps)."""
    import gc
    import resource
    import warnings

    import opacus  # noqa: F401  (imports count in the baseline, not the peak)

    import safelm.model  # noqa: F401
    import safelm.privacy  # noqa: F401
    import safelm.trainer  # noqa: F401
    from safelm.preflight import glibc_allocated, peak_allocated
    warnings.filterwarnings("ignore")
    gc.collect()
    base = _rss_kb()
    peak_mb = None
    if glibc_allocated() is not None:
        with peak_allocated() as peak:
            step = _setup(mode, B)
            for i in range(steps):
                step(i)
        peak_mb = peak.bytes / 2**20
    else:
        step = _setup(mode, B)
        for i in range(steps):
            step(i)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"peak_mb": peak_mb, "rss_mb": rss / 1024}


def time_worker(mode: str, B: int, steps: int) -> dict:
    """Step times of ``plain`` and ``mode`` alternating in one process, paired per step.

    The machine is shared: load from other processes comes and goes on the scale of seconds,
    so each DP step is timed right next to a plain step on the same batch and the ratio of
    each pair is taken; the median of those ratios is what is reported.
    """
    import time
    import warnings
    warnings.filterwarnings("ignore")
    plain, other = _setup("plain", B), _setup(mode, B)
    t_plain, t_other, ratios = [], [], []
    for i in range(3 + steps):
        t0 = time.perf_counter()
        plain(i)
        t1 = time.perf_counter()
        other(i)
        t2 = time.perf_counter()
        if i >= 3:  # warm-up steps excluded
            t_plain.append(t1 - t0)
            t_other.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
    return {"plain_s": statistics.median(t_plain), "step_s": statistics.median(t_other),
            "time_ratio": statistics.median(ratios)}


def _run(kind: str, mode: str, B: int, steps: int) -> dict | None:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, mode, str(B), str(steps),
                          "--block-size", str(SHAPE["block_size"]),
                          "--d-model", str(SHAPE["d_model"])], capture_output=True, text=True)
    if out.returncode != 0:
        line = (out.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {mode} batch {B} ({kind}): failed ({line})", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed step pairs per run")
    ap.add_argument("--mem-steps", type=int, default=4, help="steps of a memory run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--block-size", type=int, default=SHAPE["block_size"],
                    help="context length T of the benchmarked model")
    ap.add_argument("--d-model", type=int, default=SHAPE["d_model"],
                    help="width d of the benchmarked model (a multiple of its 4 heads)")
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "MODE", "BATCH", "STEPS"),
                    help="internal")
    args = ap.parse_args()
    SHAPE.update(block_size=args.block_size, d_model=args.d_model)
    if args.worker:
        kind, mode, B, steps = args.worker
        fn = time_worker if kind == "time" else memory_worker
        print(json.dumps(fn(mode, int(B), int(steps))))
        return
    batches = [int(b) for b in args.batches.split(",")]
    modes = [m for m in args.modes.split(",") if m != "plain"]
    times: dict = {}
    mems: dict = {}  # (mode, B) -> [{"peak_mb", "rss_mb"}, ...]

    def mem_text(m: dict | None) -> str:
        if not m:
            return ""
        alloc = f"peak allocated {m['peak_mb']:7.1f} MB, " if m["peak_mb"] is not None else ""
        return alloc + f"peak RSS {m['rss_mb']:7.1f} MB"

    for r in range(args.repeats):
        for B in batches:
            m = _run("memory", "plain", B, args.mem_steps)
            if m:
                mems.setdefault(("plain", B), []).append(m)
                print(f"round {r + 1} batch {B:4d} {'plain':17s} {mem_text(m)}", flush=True)
            for mode in modes:
                t = _run("time", mode, B, args.steps)
                m = _run("memory", mode, B, args.mem_steps)
                if t:
                    times.setdefault((mode, B), []).append(t)
                if m:
                    mems.setdefault((mode, B), []).append(m)
                print(f"round {r + 1} batch {B:4d} {mode:17s} "
                      + (f"step {t['step_s'] * 1000:7.1f} ms vs plain {t['plain_s'] * 1000:7.1f}"
                         f" ms (paired x{t['time_ratio']:.2f})  " if t else "")
                      + mem_text(m), flush=True)

    def mem_ratio(mode: str, B: int, key: str) -> float | None:
        values = [m[key] for m in mems[(mode, B)]]
        plain = [m[key] for m in mems.get(("plain", B), [])]
        if not plain or None in values or None in plain:
            return None
        return round(statistics.median(values) / statistics.median(plain), 3)

    summary: dict = {"shape": dict(SHAPE), "opacus": {}}
    for B in batches:
        for mode in modes:
            if not times.get((mode, B)) or not mems.get((mode, B)):
                continue
            rss = mem_ratio(mode, B, "rss_mb")
            alloc = mem_ratio(mode, B, "peak_mb")
            ratio = {"time_ratio": round(statistics.median(
                        t["time_ratio"] for t in times[(mode, B)]), 3),
                     # allocated bytes where glibc can tell them, else resident memory
                     "peak_memory_ratio": alloc if alloc is not None else rss,
                     "peak_rss_ratio": rss}
            print(f"batch {B}: {mode:17s} time x{ratio['time_ratio']:.2f}  "
                  f"peak memory x{ratio['peak_memory_ratio']:.2f}  (peak RSS x{rss:.2f})")
            if mode == "safelm":
                summary[f"batch_{B}"] = ratio
            else:
                summary["opacus"].setdefault(mode.split("-", 1)[1], {})[f"batch_{B}"] = ratio
    demo = SHAPE == {"block_size": 64, "d_model": 128}
    print("targets at batch 128: " + ("time_ratio <= 1.2, peak_memory_ratio <= 1.1" if demo else
                                      "time_ratio <= 1.3, peak_memory_ratio <= 1.25"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
