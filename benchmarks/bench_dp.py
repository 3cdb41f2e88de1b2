"""DP-SGD step time and peak memory against non-private training, side by side in one run.

Model: the demo language model (4 layers, d_model 128, 4 heads, block 64, vocab 512, tied
embedding), AdamW, physical batches of 32 and 128 full blocks. Configurations:

* ``plain``: non-private (the baseline of every ratio);
* ``safelm``: SafeLM's DP path as `safelm train` uses it (grad_sample_mode=auto, which picks the
  exact one-backward "book-keeping" clipping for this model), noise multiplier 1, clip 1;
* ``opacus-hooks``, ``opacus-functorch``, ``opacus-ew``: stock Opacus ``make_private``;
* ``opacus-ghost``: stock ghost clipping (it refuses tied weights, so untied, loss via its
  wrapped criterion).

Each configuration runs in a fresh subprocess (so peak memory is its own): after imports the
resident set size is the zero point; the model, optimizer state, activations and gradients of
``--steps`` timed steps (after 3 warm-up steps) all count towards the peak (ru_maxrss).
Configurations alternate over ``--repeats`` rounds and medians are reported.

Usage: python benchmarks/bench_dp.py [--steps 12] [--repeats 2] [--batches 32,128]
Last line: {"batch_32": {"time_ratio": ..., "peak_memory_ratio": ...}, "batch_128": {...},
            "opacus": {"hooks": {"batch_32": {...}}, ...}}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

MODES = ["plain", "safelm", "opacus-hooks", "opacus-functorch", "opacus-ew", "opacus-ghost"]


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4  # pages of 4 KiB


def worker(mode: str, B: int, steps: int) -> dict:
    import gc
    import resource
    import time
    import warnings

    import torch
    import torch.nn.functional as F
    from opacus import PrivacyEngine

    from safelm.config import ModelConfig, PrivacyConfig
    from safelm.model import build_model
    from safelm.privacy import DifferentialPrivacy
    from safelm.trainer import batch_loss
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    gc.collect()
    base = _rss_kb()
    cfg = ModelConfig(dropout=0.0, tie_weights=mode != "opacus-ghost")
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

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        if criterion is not None:
            logits = model(x)
            loss = criterion(logits.flatten(0, 1), y.flatten(), shape=logits.shape)
        else:
            loss = batch_loss(model, (x, y, torch.full((len(x),), x.shape[1]),
                                      torch.full((len(x),), -1)), "lm")[0]
        loss.backward()
        opt.step()

    times = []
    for i in range(3 + steps):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        step(x, y)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    del F
    return {"step_s": statistics.median(times), "peak_mb": peak / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "BATCH", "STEPS"), help="internal")
    args = ap.parse_args()
    if args.worker:
        mode, B, steps = args.worker
        print(json.dumps(worker(mode, int(B), int(steps))))
        return
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    results: dict = {}
    for r in range(args.repeats):
        for B in batches:
            for mode in modes:
                out = subprocess.run([sys.executable, __file__, "--worker", mode, str(B),
                                      str(args.steps)], capture_output=True, text=True)
                if out.returncode != 0:
                    line = (out.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"  {mode} batch {B}: failed ({line})")
                    results.setdefault((mode, B), [])
                    continue
                m = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((mode, B), []).append(m)
                print(f"round {r + 1} batch {B:4d} {mode:17s} step {m['step_s'] * 1000:7.1f} ms  "
                      f"peak {m['peak_mb']:7.1f} MB", flush=True)
    summary: dict = {"opacus": {}}
    for B in batches:
        base = results[("plain", B)]
        t0 = statistics.median(m["step_s"] for m in base)
        m0 = statistics.median(m["peak_mb"] for m in base)
        for mode in modes[1:]:
            runs = results.get((mode, B)) or []
            if not runs:
                continue
            ratio = {"time_ratio": round(statistics.median(m["step_s"] for m in runs) / t0, 3),
                     "peak_memory_ratio": round(
                         statistics.median(m["peak_mb"] for m in runs) / m0, 3)}
            print(f"batch {B}: {mode:17s} time x{ratio['time_ratio']:.2f}  "
                  f"peak memory x{ratio['peak_memory_ratio']:.2f}")
            if mode == "safelm":
                summary[f"batch_{B}"] = ratio
            else:
                summary["opacus"].setdefault(mode.split("-", 1)[1], {})[f"batch_{B}"] = ratio
    print("targets at batch 128: time_ratio <= 1.3, peak_memory_ratio <= 1.25")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
