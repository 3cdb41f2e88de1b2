"""The ``safelm`` command.

User mistakes (bad options, unreadable data, a missing run dir) end with one line
``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError
from .plugins import load_plugins

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one ``error:`` line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}; see '{self.prog} --help'\n")
        raise SystemExit(EXIT_USAGE)


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data columns")
    text = g.add_mutually_exclusive_group()
    text.add_argument("--text-col", help="column with the text (default: text)")
    text.add_argument("--text-cols", metavar="A,B,...", help="tabular rows: build each text as "
                      "'A: value | B: value' from these columns, in this order (predict: "
                      "default the run's)")
    g.add_argument("--label-col", help="column with the class label (default: label)")
    g.add_argument("--user-col", help="column naming the user/author; enables user-level "
                   "splits (default: none)")
    g.add_argument("--group-cols", help="comma-separated demographic columns carried into "
                   "predictions, e.g. gender,age_group (default: none)")


def _data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for opt, key in (("text_col", "text_col"), ("label_col", "label_col"),
                     ("user_col", "user_col")):
        if getattr(args, opt, None) is not None:
            out[key] = getattr(args, opt)
    if getattr(args, "text_col", None) is not None:
        out["text_cols"] = []  # an explicit single text column replaces a config's text_cols
    if getattr(args, "text_cols", None) is not None:
        out["text_cols"] = [c.strip() for c in args.text_cols.split(",") if c.strip()]
        if not out["text_cols"]:
            raise UserError("--text-cols is empty; list the columns, e.g. --text-cols age,job")
        dup = sorted({c for c in out["text_cols"] if out["text_cols"].count(c) > 1})
        if dup:
            raise UserError(f"--text-cols names {dup[0]!r} twice; list each column once")
    if getattr(args, "group_cols", None) is not None:
        out["group_cols"] = [c.strip() for c in args.group_cols.split(",") if c.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safelm", description="Train, privatize, federate and audit "
                     "Transformer language models and text classifiers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a language model or classifier into a run dir",
                       description="Train into RUN_DIR (model.safetensors, config.json, "
                       "tokenizer.json, metrics.jsonl, resume/).")
    t.add_argument("--data", required=True, help="CSV, JSONL or text file")
    t.add_argument("--task", choices=("lm", "classify"), help="default: train.task (lm)")
    t.add_argument("--out", required=True, help="run dir to create (must not exist)")
    t.add_argument("--config", help="TOML file with [model] [data] [train] [privacy] tables")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=5 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from "
                   "its last checkpoint, with its own config")
    t.add_argument("--init-from", metavar="RUN_DIR", help="start from this run's weights and "
                   "tokenizer (a trained or imported run); its model shape is kept")
    _data_options(t)

    p = sub.add_parser("predict", help="write the predictions table (CSV) for a data file")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                   help="only rows the run's seeded split put here (default: all rows)")
    _data_options(p)

    g = sub.add_parser("generate", help="sample text from a language-model run")
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1)

    d = sub.add_parser("demo", help="train on the bundled corpus and show what was learned")
    d.add_argument("--out", default="safelm-demo", help="folder for the demo's runs "
                   "(default: ./safelm-demo)")
    d.add_argument("--quick", action="store_true", help="a much smaller run (for tests)")

    c = sub.add_parser("corpus", help="write a bundled corpus to a file")
    c.add_argument("name", choices=("sentiment", "sentiment-nobias", "stories"))
    c.add_argument("--out", required=True)
    c.add_argument("--n", type=int, help="rows (sentiment) or stories (stories)")
    c.add_argument("--bias", type=float, default=0.8,
                   help="planted bias strength for 'sentiment': the share of old women's "
                   "positive training labels flipped to negative (default 0.8)")
    c.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("import", help="convert a Hugging Face GPT-2 checkpoint into a run dir",
                       description="Convert a local Hugging Face GPT-2-family checkpoint "
                       "(config.json, model.safetensors, tokenizer.json or vocab.json + "
                       "merges.txt) into a SafeLM run dir. Nothing is downloaded or unpickled.")
    i.add_argument("format", choices=("hf",))
    i.add_argument("src", help="local checkpoint folder")
    i.add_argument("--out", required=True, help="run dir to create (must not exist)")
    i.add_argument("--block-size", type=int, help="context length (default: n_positions)")

    e = sub.add_parser("export", help="write a run as a Hugging Face transformers checkpoint",
                       description="Write RUN_DIR as a transformers checkpoint (GPT2LMHeadModel "
                       "or GPT2ForSequenceClassification, safetensors) with its tokenizer.")
    e.add_argument("format", choices=("hf",))
    e.add_argument("run_dir")
    e.add_argument("--out", required=True, help="folder to create (must not exist)")
    for plugin in load_plugins():
        if hasattr(plugin, "register"):
            COMMANDS.update(plugin.register(sub))
    return parser


def _check_resume_options(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """``--resume`` with the run's original options is fine (the habit of re-running the same
    command); an option that differs from the run's ``config.json`` is refused, naming the key
    and both values, since a resumed run continues with its own config."""
    import tomllib

    from .config import Config
    from .rundir import read_config
    sets = [*(args.set or [])]
    if args.init_from:  # before the rest: model.lora_rank needs train.init_from to validate
        sets.append(f"train.init_from={args.init_from}")
    saved, given = read_config(args.out), Config.load(args.config, sets)
    keys: list[tuple[str, str]] = []
    if args.init_from:
        if Path(saved.train.init_from or "-").resolve() != Path(args.init_from).resolve():
            raise UserError(f"--resume: train.init_from is {saved.train.init_from!r} in "
                            f"{args.out}/config.json but {args.init_from!r} on this command "
                            "line; a resumed run keeps its config: drop the option, or train "
                            "a new run with another --out")
    if args.config:
        text = Path(args.config).read_text(encoding="utf-8")
        tree = json.loads(text) if args.config.endswith(".json") else tomllib.loads(text)
        keys += [(sec, k) for sec, body in tree.items() if isinstance(body, dict) for k in body]
    keys += [tuple(item.split("=", 1)[0].strip().split(".", 1)) for item in args.set or []]
    if args.task:
        given.train.task = args.task
        keys.append(("train", "task"))
    for key, value in overrides.items():
        setattr(given.data, key, value)
        keys.append(("data", key))
    for sec, key in keys:
        old, new = getattr(getattr(saved, sec), key), getattr(getattr(given, sec), key)
        if (sec, key) == ("model", "vocab_size") and new >= old:
            continue  # the saved size is what BPE reached, at most the one asked for
        if old != new:
            raise UserError(f"--resume: {sec}.{key} is {old!r} in {args.out}/config.json but "
                            f"{new!r} on this command line; a resumed run keeps its config: "
                            "drop the option, or train a new run with another --out")


def _apply_init(args: argparse.Namespace, cfg: Any) -> None:
    """--init-from: the init run's shape keys; a conflicting --set/--config key exits 2."""
    import tomllib

    from .rundir import read_config
    from .warmstart import apply_init_config
    init = Path(args.init_from)
    if not (init / "config.json").is_file():
        raise UserError(f"--init-from {init}: not a run dir (no config.json); pass the --out "
                        "of 'safelm train' or 'safelm import hf'")
    explicit = {item.split("=", 1)[0].strip() for item in args.set or []}
    if args.config:
        text = Path(args.config).read_text(encoding="utf-8")
        tree = json.loads(text) if args.config.endswith(".json") else tomllib.loads(text)
        explicit |= {f"{sec}.{k}" for sec, body in tree.items() if isinstance(body, dict)
                     for k in body}
    apply_init_config(cfg, read_config(init), explicit)


def cmd_train(args: argparse.Namespace) -> int:
    from .api import train_run
    from .config import Config
    overrides = _data_overrides(args)
    if args.resume:
        if args.config or args.set or overrides or args.task or args.init_from:
            _check_resume_options(args, overrides)
        cfg = None
    else:
        cfg = Config.load(args.config, args.set) if not args.init_from else \
            Config.load(args.config, [*args.set, f"train.init_from={args.init_from}"])
        if args.task:
            cfg.train.task = args.task
        for key, value in overrides.items():
            setattr(cfg.data, key, value)
        if args.init_from:
            _apply_init(args, cfg)
        cfg.validate()
    final = train_run(args.data, cfg, args.out, resume=args.resume)
    if final.get("stopped"):
        print(f"note: {final['stopped']}", file=sys.stderr)
    print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v
                      for k, v in final.items()}))
    print(f"run dir: {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .api import load_run, predictions_table, write_csv
    run = load_run(args.run_dir)
    table = predictions_table(run, args.data, split=args.split,
                              data_overrides=_data_overrides(args))
    write_csv(table, args.out)
    print(f"wrote {len(table)} predictions to {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .api import generate, load_run
    run = load_run(args.run_dir)
    for i in range(max(1, args.num_samples)):
        print(generate(run, args.prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, seed=args.seed + i))
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from . import corpus
    if args.name == "stories":
        corpus.write_story_text(args.out, **({"n_stories": args.n} if args.n else {}),
                                seed=args.seed)
    else:
        bias = 0.0 if args.name == "sentiment-nobias" else args.bias
        if not 0.0 <= bias <= 1.0:
            raise UserError(f"--bias={bias} must be in [0, 1]")
        corpus.write_sentiment_csv(args.out, **({"n": args.n} if args.n else {}),
                                   seed=args.seed, bias=bias)
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    result = run_demo(Path(args.out), quick=args.quick)
    if result["failed"]:
        for line in result["failed"]:
            print(f"demo: FAILED {line}", file=sys.stderr)
        return 1
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .hf import import_hf
    cfg = import_hf(args.src, args.out, block_size=args.block_size)
    m = cfg.model
    print(f"imported {args.src}: GPT-2 {m.n_layer} layers, d_model {m.d_model}, {m.n_head} "
          f"heads, vocabulary {m.vocab_size}, context {m.block_size}, activation "
          f"{m.activation} -> run dir {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .hf import export_hf
    out = export_hf(args.run_dir, args.out)
    print(f"exported {args.run_dir} -> {out} (load with transformers: "
          "AutoModelForCausalLM / AutoModelForSequenceClassification.from_pretrained, "
          "AutoTokenizer.from_pretrained)")
    return 0


COMMANDS: dict[str, Any] = {"import": cmd_import, "export": cmd_export, "train": cmd_train, "predict": cmd_predict, "generate": cmd_generate,
            "demo": cmd_demo, "corpus": cmd_corpus}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the last checkpoint is kept (continue with --resume)\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
