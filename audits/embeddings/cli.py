"""``safelm audit embeddings``: options and handler (argparse-only imports)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Word Embedding Association Test (WEAT, Caliskan et al. 2017) on a "
                     "word-vector file (word2vec binary or text, GloVe text) or on a SafeLM "
                     "run's input embeddings: effect size, one-sided permutation p-value and "
                     "a word-bootstrap interval per test.")
    p.add_argument("--vectors", metavar="FILE", help="word2vec (.bin or text) or GloVe file")
    p.add_argument("--run", metavar="RUN_DIR", help="a SafeLM run (or release) dir: its "
                   "tok_emb.weight; a word's vector is the mean of its tokens'")
    p.add_argument("--tests", metavar="TESTS.json", help="your own tests: a list of {\"name\", "
                   "\"targets\": [[...], [...]], \"attributes\": [[...], [...]]} (default: "
                   "WEAT 1-10 of Caliskan et al. 2017)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    p.add_argument("--permutations", type=int, default=10_000, metavar="N",
                   help="random partitions when exact enumeration (up to 100,000) is too "
                   "many (default 10000)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap replicates for the interval (default 1000; 0: none)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (0.95)")
    p.add_argument("--contextual", action="store_true", help="with --run: SEAT-style "
                   "contextual vectors (each word in template sentences such as 'This is "
                   "WORD.', mean of the last hidden states) instead of the input embedding")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations and the "
                   "bootstrap (recorded; nothing here is secret)")


def run(args: argparse.Namespace) -> int:
    from .audit import EmbeddingSettings, embedding_audit
    from .report import short_method
    report = embedding_audit(args.out, vectors=args.vectors, run=args.run, tests=args.tests,
                             settings=EmbeddingSettings(
                                 permutations=args.permutations, bootstrap=args.bootstrap,
                                 confidence=args.confidence, seed=args.seed,
                                 contextual=args.contextual))
    for s in report["summary"]:
        print(s)
    print(short_method(report))
    print(f"report: {report['_paths']['html']}")
    return 0
