"""A corpus bigger than comfort: tokenizing ~300 MB into token files and training on them.

What it does:

1. writes a plain-text corpus of about ``--mb`` MB (default 300): paragraphs of 4 stories
   each, drawn with a fixed seed from 50,000 of the bundled synthetic stories
   (``safelm.corpus.story_corpus``), separated by blank lines, the LM format of the demo;
2. runs ``safelm train --task lm`` on it with a 1-layer model, ``train.max_steps=20`` and
   ``train.eval_blocks=2000`` (validation and test scored on 2,000 blocks each) in a fresh
   process, with an empty token cache: streaming read, BPE on the bounded sample,
   parallel batch encoding into memory-mapped token files, then the first training steps;
3. runs the same command again into a new run dir: the token files are reused;
4. runs it once more with DP-SGD (``privacy.enabled=true``, noise multiplier 1, unit
   ``example``: Poisson sampling over the examples, each of several blocks) over the same
   token files;
5. with ``--predict``: runs ``safelm predict`` of the first run's model over the whole corpus
   (every paragraph scored; the file is read, tokenized and scored piece by piece).

For each run it prints wall time and the process's peak resident memory (``ru_maxrss`` of
that child alone, from ``os.wait4``), and for the first the tokenize time and tokens per
second recorded in the run's ``data.json``. Target: peak RSS under 2 GB for tokenizing plus
the first steps. (Before token files, this command peaked at 20.4 GB and took 4 min 44 s on
a 300 MB corpus: the loader held the whole file and every token as Python objects.)

Usage: python benchmarks/bench_data.py [--mb 300] [--dir DIR] [--keep] [--predict]
Last line: {"corpus_mb": ..., "first": {"wall_s", "peak_rss_gb", "tokenize_s",
            "tokens_per_s", "tokens", "reused"}, "second": {...}, "dp": {...},
            ["predict": {"wall_s", "peak_rss_gb", "rows"},] "peak_rss_target_gb": 2}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from safelm.corpus import story_corpus

MODEL = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.block_size=64",
         "train.max_steps=20", "train.batch_size=32", "train.progress=off",
         "train.eval_blocks=2000"]


def write_corpus(path: Path, mb: int, seed: int = 0) -> int:
    stories = np.array(story_corpus(50_000, seed=seed), dtype=object)
    rng = np.random.default_rng(seed)
    size, target = 0, mb * 1_000_000
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            picks = rng.integers(0, len(stories), size=(2_000, 4))
            text = "".join(" ".join(stories[row]) + "\n\n" for row in picks)
            f.write(text)
            size += len(text.encode())
    return size


def run(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in GB of this child alone, exit status)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"error: {' '.join(cmd[2:4])} failed ({code}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024 ** 2, code  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--dir", default="", help="work dir (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus, runs and cache")
    ap.add_argument("--predict", action="store_true",
                    help="also score the whole corpus with `safelm predict` (minutes)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, cache = work / "corpus.txt", work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    size = write_corpus(corpus, args.mb)
    print(f"corpus: {size / 1e6:.0f} MB written in {time.perf_counter() - t0:.0f} s", flush=True)
    exe = [sys.executable, "-m", "safelm.cli", "train", "--task", "lm", "--data", str(corpus),
           *[a for kv in MODEL + [f"data.cache_dir={cache}"] for a in ("--set", kv)]]
    result: dict = {"corpus_mb": round(size / 1e6, 1), "peak_rss_target_gb": 2}
    dp = ["--set", "privacy.enabled=true", "--set", "privacy.noise_multiplier=1.0",
          "--set", "privacy.delta=1e-6"]
    for name in ("first", "second", "dp"):
        out = work / f"run_{name}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, _ = run(exe + ["--out", str(out)] + (dp if name == "dp" else []))
        tc = json.loads((out / "data.json").read_text())["token_cache"]
        rec = {"wall_s": round(wall, 1), "peak_rss_gb": round(rss, 2), "reused": tc["reused"],
               "tokens": sum(tc["tokens"].values())}
        if name == "first":
            rec.update(tokenize_s=tc["tokenize_seconds"], tokens_per_s=tc["tokens_per_second"])
        result[name] = rec
        print(f"{name} run: {wall:.0f} s, peak RSS {rss:.2f} GB, token files "
              f"{'reused' if tc['reused'] else 'built'}" + (
                  f" ({rec['tokens']:,} tokens in {tc['tokenize_seconds']:.0f} s, "
                  f"{tc['tokens_per_second']:,} tokens/s)" if name == "first" else ""),
              flush=True)
    if args.predict:
        preds = work / "predictions.csv"
        wall, rss, _ = run([sys.executable, "-m", "safelm.cli", "predict", str(work / "run_first"),
                            "--data", str(corpus), "--out", str(preds)])
        with open(preds, "rb") as f:
            rows = sum(1 for _ in f) - 1
        result["predict"] = {"wall_s": round(wall, 1), "peak_rss_gb": round(rss, 2), "rows": rows}
        print(f"predict: {rows:,} rows scored in {wall:.0f} s, peak RSS {rss:.2f} GB", flush=True)
    if not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
