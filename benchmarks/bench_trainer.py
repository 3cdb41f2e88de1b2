"""Trainer throughput against a bare PyTorch loop, side by side in one run.

Both train the demo's language model (4 layers, d_model 128, block 64, vocab 512) on the same
blocks of the bundled stories with the same batch size; rounds alternate (trainer, bare,
trainer, bare, ...) so machine noise hits both alike, and the median tokens/s of each is
compared. The trainer runs its real epoch code: progress bar logic, metrics.jsonl logging and
resume checkpoints into a run dir (every ``--checkpoint-every`` steps). The bare loop is
``zero_grad / forward / cross_entropy / backward / step`` and nothing else.

Usage: python benchmarks/bench_trainer.py [--steps 40] [--rounds 3] [--batch-size 32]
Last line: {"batch_32": {"tokens_per_s_ratio": ..., "trainer_tokens_per_s": ..., ...}}
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from safelm import BlockDataset, Config, Tokenizer, Trainer, build_model, encode_rows
from safelm.corpus import story_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    args = ap.parse_args()
    B = args.batch_size

    cfg = Config.load(None, ["model.dropout=0.0", f"train.batch_size={B}", "train.progress=off",
                             f"train.checkpoint_every={args.checkpoint_every}",
                             "train.epochs=1000"])
    import pandas as pd
    rows = pd.DataFrame({"text": story_corpus(800)})
    tok = Tokenizer.train(rows["text"], cfg.model.vocab_size)
    cfg.model.vocab_size = tok.vocab_size
    enc = encode_rows(rows, tok, cfg.model.block_size, "lm")
    n = args.steps * B
    enc.input_ids, enc.targets = enc.input_ids[:n], enc.targets[:n]
    enc.lengths, enc.labels, enc.example = enc.lengths[:n], enc.labels[:n], enc.example[:n]
    dataset = BlockDataset(enc)
    tokens_per_round = int(enc.lengths.sum())

    torch.manual_seed(0)
    model_t = build_model(cfg.model, "lm")
    model_b = build_model(cfg.model, "lm")
    model_b.load_state_dict(model_t.state_dict())
    run_dir = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    trainer = Trainer(model_t, cfg.train, dataset, run_dir=run_dir)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=cfg.train.lr)

    def bare_round() -> float:
        model_b.train()
        perm = torch.randperm(n)
        t0 = time.perf_counter()
        for i in range(0, n, B):
            idx = perm[i:i + B]
            x, y = enc.input_ids[idx], enc.targets[idx]
            loss = F.cross_entropy(model_b(x).flatten(0, 1), y.flatten(), ignore_index=-100)
            opt_b.zero_grad(set_to_none=True)
            loss.backward()
            opt_b.step()
        return tokens_per_round / (time.perf_counter() - t0)

    def trainer_round(epoch: int) -> float:
        t0 = time.perf_counter()
        trainer.train_one_epoch(epoch, on_step=trainer._on_step)
        return tokens_per_round / (time.perf_counter() - t0)

    bare_round(), trainer_round(0)  # warm-up (allocator, kernels)
    t_rates, b_rates = [], []
    for r in range(args.rounds):
        t_rates.append(trainer_round(r + 1))
        b_rates.append(bare_round())
        print(f"round {r + 1}: trainer {t_rates[-1]:.0f} tok/s, bare loop {b_rates[-1]:.0f} tok/s")
    t_med, b_med = statistics.median(t_rates), statistics.median(b_rates)
    print(f"median: trainer {t_med:.0f} tok/s, bare {b_med:.0f} tok/s, ratio {t_med / b_med:.3f} "
          f"(target >= 0.9); threads={torch.get_num_threads()}")
    print(json.dumps({f"batch_{B}": {"tokens_per_s_ratio": round(t_med / b_med, 3),
                                     "trainer_tokens_per_s": round(t_med),
                                     "bare_tokens_per_s": round(b_med)}}))


if __name__ == "__main__":
    main()
