"""``safelm explain RUN --data FILE [--rows ids] --out DIR``: options and handler.

Import-light (argparse only at module level): ``safelm --help`` imports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = ("Per-token attributions of a classifier run's predictions: integrated "
               "gradients through Captum (baseline: the text tokens replaced by <pad>), with "
               "each head's attention from the last token beside them, and a faithfulness "
               "test (deleting the top-k attributed tokens vs k random ones). Writes "
               "explanations.json, report.json, report.md and a self-contained report.html "
               "into --out. Needs captum: pip install 'safelm[explain]'.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("run_dir", metavar="RUN", help="a classifier run dir (or release dir)")
    p.add_argument("--data", required=True, metavar="FILE", help="CSV, JSONL or text file")
    p.add_argument("--rows", metavar="ID[,ID...]", help="example ids to explain (default: the "
                   "first --max-rows rows)")
    p.add_argument("--max-rows", type=int, default=50, help="rows when --rows is not given "
                   "(default 50)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    p.add_argument("--target", metavar="LABEL", help="explain this class (default: each row's "
                   "predicted class)")
    p.add_argument("--text-col", help="column with the text (default: the run's)")
    p.add_argument("--id-col", help="column with the example ids (default: the run's)")
    p.add_argument("--k", type=int, default=3, help="tokens deleted per row in the "
                   "faithfulness test (default 3)")
    p.add_argument("--draws", type=int, default=20, help="random deletions per row (default 20)")
    p.add_argument("--steps", type=int, default=64, help="integration steps to start from; "
                   "doubled until the convergence delta is small (default 64, at most 1024)")
    p.add_argument("--baseline-word", metavar="WORD", help="baseline: every text token "
                   "replaced by this word (one token) instead of <pad>; use when f(baseline) "
                   "comes out close to f(x) (the report counts such rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random deletions")
    p.add_argument("--no-attention", action="store_true", help="skip the attention maps")


def load_rows(run: Any, data: str | Path, ids: list[str] | None, max_rows: int,
              text_col: str | None = None, id_col: str | None = None) -> list[dict[str, Any]]:
    """The rows to explain ({id, text, and every other column of the run's rows}), in the
    order of ``ids`` (every one must exist) or the file's first ``max_rows``."""
    from safelm import Config, UserError
    from safelm.data import load_rows as read
    cfg = Config.from_dict(run.cfg.to_dict())
    if text_col:
        cfg.data.text_col, cfg.data.text_cols = text_col, []
    if id_col:
        cfg.data.id_col = id_col
    df = read(data, cfg.data, "lm")
    if ids is not None:
        known = set(df["example_id"])
        missing = [i for i in ids if i not in known]
        if missing:
            raise UserError(f"--rows: {len(missing)} id(s) not in {data} (column "
                            f"{cfg.data.id_col!r}): {', '.join(missing[:5])}; pass ids from "
                            "that column")
        df = df.set_index("example_id", drop=False).loc[ids]
    else:
        if max_rows < 1:
            raise UserError("--max-rows must be at least 1")
        df = df.head(max_rows)
    return [{"id": r["example_id"], **{k: v for k, v in r.items() if k != "example_id"}}
            for r in df.to_dict("records")]


def run(args: argparse.Namespace) -> int:
    from safelm import UserError
    from safelm.explain import require_captum
    require_captum()
    if args.k < 1 or args.draws < 1 or args.steps < 2:
        raise UserError("--k and --draws must be at least 1 and --steps at least 2")
    ids = None
    if args.rows is not None:
        ids = [s.strip() for s in args.rows.split(",") if s.strip()]
        if not ids:
            raise UserError("--rows is empty; list example ids, e.g. --rows e1,e7")
    from .compute import ExplainSettings
    from .pipeline import explain
    settings = ExplainSettings(n_steps=args.steps, k=args.k, draws=args.draws, seed=args.seed,
                               attention=not args.no_attention,
                               baseline_word=args.baseline_word)
    rep = explain(args.run_dir, args.data, args.out, ids=ids, max_rows=args.max_rows,
                  target=args.target, settings=settings, text_col=args.text_col,
                  id_col=args.id_col)
    from .report import faithfulness_lines
    print(f"explained {rep['summary']['rows']} rows; largest convergence delta "
          f"{rep['summary']['max_convergence_delta']:.4f}")
    from .report import baseline_line
    print(baseline_line(rep["summary"]))
    for line in faithfulness_lines(rep["faithfulness"]):
        print(line)
    print(f"report: {rep['_paths']['html']}")
    return 0
