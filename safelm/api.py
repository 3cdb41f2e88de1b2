"""The public API behind the command line: train a run, load it, predict, generate.

``federation`` and ``audits`` use SafeLM through this module (and ``safelm.__init__``) only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import rundir
from .canaries import CANARIES_FILE, bernoulli_draw, insert_canaries
from .config import Config
from .data import BlockDataset, Encoded, encode_rows, iter_prediction_rows, metadata_split
from .distributed import init_from_env
from .errors import UserError
from .hashing import file_sha256, predictions_meta, replace_with_meta, write_meta_tmp
from .model import build_model
from .reweighting import row_weights
from .tokenizer import Tokenizer
from .trainer import Trainer, pick_device

DATA_INFO = "data.json"


@dataclass
class Prepared:
    """Everything a Trainer needs, built from a data file and a config."""

    cfg: Config
    tokenizer: Tokenizer
    splits: dict[str, pd.DataFrame]
    encoded: dict[str, Encoded]
    canaries: dict[str, Any] | None = None  # the canaries.json record when privacy.canaries > 0
    record: dict[str, Any] | None = None  # for data.json: token cache and tokenizer sample

    def dataset(self, split: str) -> BlockDataset:
        return BlockDataset(self.encoded[split])


def prepare(data_path: str | Path, cfg: Config, tokenizer: Tokenizer | None = None,
            canary_record: dict[str, Any] | None = None,
            data_sha256: str | None = None) -> Prepared:
    """Read, split, tokenize (training a tokenizer on a bounded sample of the train split if
    none is given) and resolve the data-dependent config fields (vocab size, labels, number
    of classes). The file is streamed into memory-mapped token files (safelm/tokencache.py),
    so a corpus larger than memory trains; ``splits`` holds the rows' metadata, not text.

    ``canary_record``: for ``privacy.canary_inclusion=bernoulli``, the secrets and coins to use
    (a resumed run's ``canaries.json``, or one draw shared by all torchrun ranks); None draws
    new ones from the OS."""
    from .tokencache import prepare_streamed
    task, given = cfg.train.task, tokenizer is not None
    streamed, tokenizer = prepare_streamed(
        data_path, cfg, tokenizer, data_sha256=data_sha256,
        train_tokenizer=lambda texts: Tokenizer.train(texts, cfg.model.vocab_size))
    if given:  # a given tokenizer (resume, warm start) may be smaller than a padded vocabulary
        cfg.model.vocab_size = max(cfg.model.vocab_size, tokenizer.vocab_size)
    else:
        cfg.model.vocab_size = tokenizer.vocab_size
    splits, encoded = streamed.splits, streamed.encoded
    canaries = None
    if cfg.privacy.canaries:  # after the tokenizer, so it cannot learn them (safelm/canaries.py)
        n_train = len(splits["train"])  # encoded in memory: never in the token cache
        extra, canaries = insert_canaries(
            splits["train"].head(0).assign(text=pd.Series(dtype=str)), cfg.privacy.canaries,
            cfg.privacy.canary_repeats, cfg.train.seed,
            inclusion=cfg.privacy.canary_inclusion or "all", previous=canary_record)
        splits["train"] = pd.concat([splits["train"], extra.drop(columns="text")],
                                    ignore_index=True)
        encoded["train"] = encoded["train"].extend(
            encode_rows(extra, tokenizer, cfg.model.block_size, task, cfg.data.labels), n_train)
    if task == "classify":
        if len(cfg.data.labels) < 2:
            raise UserError(f"{data_path}: the training split has only the label "
                            f"{cfg.data.labels}; classification needs at least two classes")
        cfg.model.num_classes = len(cfg.data.labels)
    if cfg.train.reweight != "none":  # fairness mitigation: weights from the train split only
        w = row_weights(splits["train"], cfg.train.reweight_cols or cfg.data.group_cols,
                        cfg.train.reweight)
        enc = encoded["train"]
        enc.weights = torch.tensor(w, dtype=torch.float32)[enc.example]
    return Prepared(cfg, tokenizer, splits, encoded, canaries, streamed.record)


def train_run(data_path: str | Path, cfg: Config, out: str | Path, *,
              resume: bool = False, privacy: Any = None) -> dict[str, Any]:
    """Train into run dir ``out`` (or continue it with ``resume``); returns final metrics.

    A new run refuses an existing non-empty ``out`` so that nothing already trained is
    overwritten; every check on data and config happens before the dir is created.
    """
    out = Path(out)
    ddp = init_from_env()  # under torchrun: join the group; rank 0 alone writes the run dir
    sha = file_sha256(data_path) if Path(data_path).is_file() else None
    init = vectors = None
    if resume:
        cfg = rundir.read_config(out)
    from .monitor import check_available
    check_available(cfg.train.tensorboard, cfg.train.mlflow)  # before anything is written
    if resume:
        info = json.loads((out / DATA_INFO).read_text())
        if sha != info["sha256"]:
            raise UserError(f"{data_path} is not the file this run was trained on (sha256 "
                            "differs); resume with the same --data")
        prep = prepare(data_path, cfg, Tokenizer.load(out / rundir.TOKENIZER),
                       _read_canary_record(out, cfg), data_sha256=sha)
    else:
        if ddp.main and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"{out} already exists and is not empty; pass --resume to continue "
                            "that run or choose a new --out")
        if cfg.train.init_from:  # warm start (safelm/warmstart.py): its tokenizer and weights
            from .warmstart import apply_init_config
            init = load_run(cfg.train.init_from, device="cpu")  # checks its checksums
            apply_init_config(cfg, init.cfg, None)
        from .preflight import check_fits
        check_fits(cfg, pick_device(cfg.train.device))  # before the data is read
        vfile = None
        if cfg.model.init_vectors:  # read (and refuse a bad file) before the tokenizer trains
            from . import init_vectors
            vfile = init_vectors.load(cfg.model.init_vectors)
        prep = prepare(data_path, cfg, init.tokenizer if init else None,
                       canary_record=_shared_canary_draw(cfg, ddp), data_sha256=sha)
        cfg.validate()
        if vfile is not None:
            from .model import INIT_STD
            vectors = init_vectors.plan(vfile, prep.tokenizer, cfg.model.d_model, INIT_STD)
            del vfile
    model = initial_model(cfg, None if resume else init, vectors)
    from .lora import count_trainable
    trainable, total = count_trainable(model)
    if privacy is None and cfg.privacy.enabled:
        from .privacy import make_privacy  # imported lazily: Opacus start-up is slow
        privacy = make_privacy(cfg, prep)
    if not resume and ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        prep.tokenizer.save(out / rundir.TOKENIZER)
        rundir.atomic_write_text(out / rundir.CONFIG, cfg.to_json() + "\n")
        rundir.atomic_write_json(out / DATA_INFO, {
            "path": str(data_path), "sha256": sha,
            "rows": {k: len(v) for k, v in prep.splits.items()},
            "blocks": {k: len(e) for k, e in prep.encoded.items()}, **(prep.record or {})})
        if prep.canaries:  # the secrets the privacy audit looks for (never part of a release)
            rundir.atomic_write_json(out / CANARIES_FILE, prep.canaries)
        if init is not None:
            from .warmstart import init_record
            rundir.atomic_write_json(out / "init.json", init_record(Path(cfg.train.init_from)))
        if vectors is not None:
            from .init_vectors import VECTORS_FILE
            rundir.atomic_write_json(out / VECTORS_FILE, vectors.record)
    trainer = Trainer(model, cfg.train, prep.dataset("train"), prep.dataset("val"),
                      run_dir=out if ddp.main else None, privacy=privacy,
                      num_classes=cfg.model.num_classes)
    if ddp.main and prep.record:
        from .tokencache import summary
        print(summary(prep.record), file=sys.stderr)
    if not resume:
        coverage = {"init_vectors": vectors.record["coverage"]} if vectors is not None else {}
        trainer.log({"kind": "model", "step": 0, "parameters": total,
                     "trainable_parameters": trainable, **coverage})
        if vectors is not None and ddp.main:
            print(vectors.summary(), file=sys.stderr)
        if trainable < total and ddp.main:
            print(f"model: {total:,} parameters, {trainable:,} trainable "
                  f"(LoRA rank {cfg.model.lora_rank}, {', '.join(cfg.model.lora_targets)})",
                  file=sys.stderr)
    try:
        final = _fit_and_test(trainer, prep, privacy, cfg, out, resume, ddp.main)
    finally:
        trainer.close_monitors()
    final["trainable_parameters"] = trainable
    return final


def initial_model(cfg: Config, init: Any = None, vectors: Any = None) -> nn.Module:
    """The model a new run starts from (a resumed one restores its checkpoint over it):
    the seed's random init, then the warm start's weights (``init``, a :class:`Run`) or the
    pretrained word vectors' rows (``vectors``, a ``safelm.init_vectors.VectorInit``)."""
    torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed alone
    if init is not None:
        from .warmstart import base_model_config, load_init_weights
        model = build_model(base_model_config(cfg.model), cfg.train.task)
        load_init_weights(model, init.model, cfg, init.cfg)
        if cfg.model.lora_rank:
            from .lora import apply_lora
            apply_lora(model, cfg.model.lora_rank, cfg.model.lora_alpha,
                       cfg.model.lora_targets, cfg.train.task)
        return model
    model = build_model(cfg.model, cfg.train.task)
    if vectors is not None:
        from .init_vectors import apply
        apply(model, vectors)
    return model


def _fit_and_test(trainer: Any, prep: Any, privacy: Any, cfg: Config, out: Path,
                  resume: bool, main: bool) -> dict[str, Any]:
    if resume and not main:
        trainer.run_dir = out  # every rank restores the same state; only rank 0 writes
        start = trainer.restore(write=False)
        trainer.run_dir = None
        final = trainer.fit(resume_from=start)
    else:
        final = trainer.fit(resume=resume)
    if privacy is not None:
        final.update({"epsilon": privacy.epsilon(), "delta": cfg.privacy.delta})
    test = trainer.evaluate(prep.dataset("test"))
    final.update({f"test_{k}": v for k, v in test.items()})
    if test:
        trainer.log({"kind": "test", "step": trainer.global_step, **final})
    return final


def _read_canary_record(out: Path, cfg: Config) -> dict[str, Any] | None:
    """A resumed bernoulli run's secrets and coins: they must be the ones it started with."""
    if cfg.privacy.canary_inclusion != "bernoulli":
        return None
    p = out / CANARIES_FILE
    if not p.is_file():
        raise UserError(f"{out}: {CANARIES_FILE} is missing, so the canaries this run trained "
                        "on are unknown; it cannot be resumed (train a new run)")
    return json.loads(p.read_text(encoding="utf-8"))


def _shared_canary_draw(cfg: Config, ddp: Any) -> dict[str, Any] | None:
    """Under torchrun every rank must insert the same canaries: rank 0 draws (OS entropy) and
    broadcasts; nothing is written before the run dir is."""
    if cfg.privacy.canary_inclusion != "bernoulli" or not ddp.active:
        return None
    import torch.distributed as dist
    box = [bernoulli_draw(cfg.privacy.canaries) if ddp.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- loading a run ------------------------------------------------------------------------
@dataclass
class Run:
    cfg: Config
    tokenizer: Tokenizer
    model: nn.Module
    path: Path


def load_run(run_dir: str | Path, device: str = "auto") -> Run:
    """Config, tokenizer and weights of a run dir or release dir (safetensors and JSON only:
    nothing is unpickled). A file whose sha256 differs from the dir's ``checksums.json`` or
    ``release.json``/``release.sha256`` is refused (UserError); run dirs written before
    checksums existed have no listing and load unchecked."""
    p = Path(run_dir)
    if p.is_dir():
        rundir.verify_checksums(p)
    cfg = rundir.read_config(p)
    for name in (rundir.TOKENIZER, rundir.WEIGHTS):
        if not (p / name).is_file():
            raise UserError(f"{p}: missing {name}; the run has not finished its first "
                            "checkpoint")
    tok = Tokenizer.load(p / rundir.TOKENIZER)
    model = build_model(cfg.model, cfg.train.task)
    rundir.load_weights(model, p / rundir.WEIGHTS)
    if cfg.model.lora_rank:  # the run dir keeps the adapters; use the merged weights
        from .lora import merge_lora
        merge_lora(model)
    model.to(pick_device(device)).eval()
    return Run(cfg, tok, model, p)


@torch.no_grad()
def score_encoded(run: Run, enc: Encoded, n_rows: int, batch_size: int = 64) -> dict[str, Any]:
    """Per-row NLL (mean per token for LM, label cross-entropy for classification), token
    counts, and class probabilities."""
    task, device = run.cfg.train.task, next(run.model.parameters()).device
    nll_sum = torch.zeros(n_rows, dtype=torch.float64)
    n_tok = torch.zeros(n_rows, dtype=torch.long)
    probs = []
    for i in range(0, len(enc), batch_size):
        sl = slice(i, i + batch_size)
        b = enc.take(sl)
        x, lengths = b.input_ids.to(device), b.lengths.to(device)
        ex = enc.example[sl]
        if task == "lm":
            y = b.targets.to(device)
            logits = run.model(x)
            tok_nll = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100,
                                      reduction="none")  # [B, T]
            nll_sum.index_add_(0, ex, tok_nll.sum(1).double().cpu())
            n_tok.index_add_(0, ex, lengths.cpu())
        else:
            p = F.softmax(run.model(x, lengths).float(), dim=-1).cpu()
            probs.append(p)
            n_tok[ex] = lengths.cpu()
    if task == "lm":
        return {"nll": (nll_sum / n_tok.clamp(min=1)).numpy(), "n_tokens": n_tok.numpy()}
    p = torch.cat(probs) if probs else torch.zeros(0, run.cfg.model.num_classes)
    labels = enc.labels
    nll = -torch.log(p.gather(1, labels.clamp(min=0).view(-1, 1)).squeeze(1).clamp(min=1e-12))
    nll[labels < 0] = float("nan")
    return {"probs": p.numpy(), "nll": nll.double().numpy(), "n_tokens": n_tok.numpy()}


def predictions_table(run: Run, data_path: str | Path, *, split: str = "all",
                      data_overrides: dict[str, Any] | None = None,
                      **chunking: int) -> pd.DataFrame:
    """The predictions table of docs/design.md for the rows of ``data_path``.

    ``split`` keeps only the rows the run's seeded split put in train, val or test (the same
    split as training, since it depends only on the data and the seed).

    The file is read, tokenized and scored piece by piece (``chunking``: ``chunk_bytes`` /
    ``chunk_rows`` of :func:`safelm.data.iter_tables`), so only one piece's text and tokens
    are in memory beside the table being built (a row of a few numbers per example): a file
    larger than memory can be scored. A split other than ``all`` reads the file twice, first
    for the ids, users and split column that decide each row's split.
    """
    cfg = Config.from_dict(run.cfg.to_dict())
    for key, value in (data_overrides or {}).items():
        setattr(cfg.data, key, value)
    assign = None
    if split != "all":
        _, assign = metadata_split((r for r, _ in iter_prediction_rows(
            data_path, cfg.data, cfg.train.task, **chunking)), cfg.data, cfg.train.seed)
        if not (assign == split).any():
            raise UserError(f"{data_path}: the {split} split is empty for this run's seed")
    parts, at = [], 0
    for rows, has_labels in iter_prediction_rows(data_path, cfg.data, cfg.train.task,
                                                 **chunking):
        if assign is not None:
            keep = assign[at:at + len(rows)] == split
            at += len(rows)
            rows = rows[keep].reset_index(drop=True)
            if len(rows) == 0:
                continue
        parts.append(_predict_rows(run, cfg, rows, has_labels, data_path))
    table = pd.concat(parts, ignore_index=True)
    # Which weights made this table: write_csv records it in the <file>.meta.json sidecar.
    table.attrs["model_sha256"] = model_sha256(run)
    table.attrs["split"] = split
    return table


def _predict_rows(run: Run, cfg: Config, rows: pd.DataFrame, has_labels: bool,
                  data_path: str | Path) -> pd.DataFrame:
    """The predictions table's rows for one piece of normalized rows."""
    task, labels = cfg.train.task, cfg.data.labels
    if has_labels:
        known = rows["label"].isin(labels)
        if not known.all():
            bad = sorted(set(rows.loc[~known, "label"]))[:5]
            raise UserError(f"{data_path}: labels {bad} were not in this run's training "
                            f"labels ({', '.join(labels)})")
    enc_rows = rows.assign(label=labels[0]) if task == "classify" and not has_labels else rows
    enc = encode_rows(enc_rows, run.tokenizer, cfg.model.block_size, task, labels)
    if task == "classify" and not has_labels:
        enc.labels[:] = -1
    s = score_encoded(run, enc, len(rows))
    table = pd.DataFrame({"example_id": rows["example_id"]})
    if task == "classify":
        table["y_true"] = rows["label"].values if has_labels else ""
        table["y_pred"] = [labels[i] for i in s["probs"].argmax(1)]
        if len(labels) == 2:
            table["score"] = s["probs"][:, 1]  # probability of labels[1] (the sorted second)
        else:
            for i, name in enumerate(labels):
                table[f"score_{name}"] = s["probs"][:, i]
    else:
        table["y_true"], table["y_pred"], table["score"] = "", "", np.nan
    table["nll"] = s["nll"]
    table["n_tokens"] = s["n_tokens"]
    for col in cfg.data.group_cols:
        table[col] = rows[col].values
    return table


def model_sha256(run: Run) -> str | None:
    """sha256 of the run's ``model.safetensors``: the identity every audit report records.

    ``load_run`` already refused weights that differ from the dir's listing, so this is the
    hash of the weights the loaded model holds. A Run assembled in memory (no weights file:
    a federated client scoring its model between rounds) has none: None, an unbound table."""
    path = run.path / rundir.WEIGHTS
    return file_sha256(path) if path.is_file() else None


def write_csv(table: pd.DataFrame, out: str | Path) -> None:
    """Write ``table`` to ``out`` atomically. A table from :func:`predictions_table` also gets
    the sidecar ``<out>.meta.json`` with the weights' sha256 (docs/design.md, "Files"); any
    other table removes a stale sidecar left there by an earlier one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    table.to_csv(tmp, index=False)
    meta_tmp = None
    model = table.attrs.get("model_sha256")
    if isinstance(model, str):
        meta_tmp = write_meta_tmp(out, predictions_meta(
            file_sha256(tmp), model, rows=len(table), split=table.attrs.get("split")))
    replace_with_meta(tmp, out, meta_tmp)


# ---- generation ---------------------------------------------------------------------------
@torch.no_grad()
def generate(run: Run, prompt: str, *, max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0) -> str:
    """Sample a continuation of ``prompt`` (temperature 0: greedy; top_k 0: full vocabulary)."""
    if run.cfg.train.task != "lm":
        raise UserError(f"{run.path} is a classification run; generate needs a run trained "
                        "with --task lm")
    if temperature < 0 or top_k < 0 or max_new_tokens < 0:
        raise UserError("--temperature, --top-k and --max-new-tokens must be >= 0")
    device = next(run.model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    tok, T = run.tokenizer, run.cfg.model.block_size
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)], device=device)
    start = ids.shape[1]
    for _ in range(max_new_tokens):
        logits = run.model(ids[:, -T:])[:, -1, :].float()  # [1, V]
        logits[:, sorted({tok.pad_id, tok.bos_id} - {tok.eos_id})] = float("-inf")
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits[logits < kth] = float("-inf")
            nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=g)
        if int(nxt) == tok.eos_id:
            break
        ids = torch.cat([ids, nxt], dim=1)
    return prompt + tok.decode(ids[0, start:].tolist())

