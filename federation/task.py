"""The task bridge: what a Flower node needs from SafeLM, and nothing Flower-specific.

The ClientApp and ServerApp are thin adapters around these functions:

* data: the bundled corpus (generated in-process, deterministic) or ``data-path``, read, split
  and tokenized by SafeLM's own functions; each client keeps its partition only;
* the tokenizer and resolved config are made ONCE, on the server, from the training split of
  the public bundled text (or the server's ``data-path``), and shipped to clients in the
  round's ConfigRecord. Why: every client's embedding row ``i`` must mean the same token, so
  all clients need the same vocabulary, and the server is the one party that exists before
  any client does. Training it per client would need a federated tokenizer protocol; training
  it on the clients' private text would leak it. A real deployment gives the server public or
  proxy text via ``data-path`` (clients read their own via node-config ``data-path``).
* weights travel unwrapped (no Opacus ``_module.`` prefix) and without tied aliases, as an
  ArrayRecord;
* local training is SafeLM's :meth:`Trainer.train_one_epoch`, local evaluation its
  :meth:`Trainer.evaluate` plus per-group counts (:mod:`federation.fairness`).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from flwr.app import ArrayRecord
from tokenizers import Tokenizer as HFTokenizer

from safelm import Tokenizer
from safelm.api import Run, load_run, prepare, score_encoded
from safelm.config import Config
from safelm.corpus import story_corpus, write_sentiment_csv
from safelm.data import BlockDataset, Encoded, encode_rows, read_splits
from safelm.errors import UserError
from safelm.hashing import file_sha256
from safelm.lora import apply_lora
from safelm.model import build_model
from safelm.rundir import unwrap
from safelm.trainer import Trainer, evaluate_model, pick_device
from safelm.warmstart import apply_init_config, base_model_config, load_init_weights

from . import fairness, partition
from .settings import FedSettings


# ---- data ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _bundled_file(dataset: str, size: int, seed: int) -> str:
    """The bundled corpus written once per process to a private temp file (SafeLM's readers
    take paths, and going through them keeps data checks identical to ``safelm train``)."""
    folder = tempfile.mkdtemp(prefix="safelm-fl-")
    if dataset == "sentiment":
        path = os.path.join(folder, "sentiment.csv")
        write_sentiment_csv(path, n=size, seed=seed)
    else:
        path = os.path.join(folder, "stories.txt")
        Path(path).write_text("\n\n".join(story_corpus(size, seed=seed)) + "\n",
                              encoding="utf-8")
    return path


def data_path(fed: FedSettings, node_config: Mapping[str, Any] | None = None) -> str:
    """The file a node reads: node-config ``data-path``, run-config ``data-path`` or the
    bundled corpus."""
    node_path = str((node_config or {}).get("data-path", "") or "")
    path = node_path or fed.data_path
    if path:
        if not Path(path).is_file():
            raise UserError(f"data-path {path!r} does not exist on this node; give a file "
                            "every node can read, or leave data-path empty for the bundled "
                            "corpus")
        return path
    return _bundled_file(fed.dataset, fed.corpus_size, fed.corpus_seed)


@dataclass
class ServerData:
    """What the server owns: resolved config, tokenizer, the test split, the pool layout."""

    cfg: Config
    tokenizer: Tokenizer
    test_rows: pd.DataFrame
    test_enc: Encoded
    pool: pd.DataFrame | None  # train + val rows, the rows dealt to clients


def server_data(cfg: Config, fed: FedSettings) -> ServerData:
    """Train the tokenizer on the training split and resolve vocab, labels and classes."""
    path = data_path(fed)
    if cfg.model.init_vectors:
        raise UserError(f"model.init_vectors={cfg.model.init_vectors}: pretrained word vectors "
                        "are not supported in federated training yet; drop model.init_vectors "
                        "(or pretrain a run with it and pass train.init_from)")
    init = None
    if cfg.train.init_from:  # fine-tuning: the pretrained run's tokenizer and shape
        init = _init_run(cfg.train.init_from)
        # The app's [tool.flwr.app.config.model] table always sets the shape keys, so they
        # cannot tell a user's choice from a default: the pretrained run's shape wins.
        apply_init_config(cfg, init.cfg, set())
    # trains the tokenizer on the train split (unless pretrained), resolves cfg
    prep = prepare(path, cfg, init.tokenizer if init else None)
    cfg.validate()
    pool = pd.concat([prep.splits["train"], prep.splits["val"]], ignore_index=True)
    return ServerData(cfg, prep.tokenizer, prep.splits["test"], prep.encoded["test"], pool)


def partition_rows(cfg: Config, fed: FedSettings, pool: pd.DataFrame,
                   num_partitions: int) -> np.ndarray:
    """The client of every pool row (identical on every node: rows and seed alone)."""
    column = fed.partition_col
    if not column and fed.partitioning == "dirichlet-group":
        if not cfg.data.group_cols:
            raise UserError("partitioning=dirichlet-group needs a group column: set "
                            "partition-col or data.group_cols")
        column = cfg.data.group_cols[0]
    if fed.partitioning == "natural" and not column:
        column = "user"
    return partition.assign(pool, fed.partitioning, num_partitions, fed.partition_seed,
                            alpha=fed.alpha, column=column)


@dataclass
class ClientData:
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    train_set: BlockDataset
    val_enc: Encoded


@functools.lru_cache(maxsize=8)
def _client_data_cached(key: str, cfg_json: str, tok_json: str) -> ClientData:
    spec = json.loads(key)
    cfg = Config.from_dict(json.loads(cfg_json))
    tok = tokenizer_from_json(tok_json)
    train, val = _client_rows(spec, cfg)
    T, task, labels = cfg.model.block_size, cfg.train.task, cfg.data.labels
    return ClientData(train, val, BlockDataset(encode_rows(train, tok, T, task, labels)),
                      encode_rows(val, tok, T, task, labels))


def _client_rows(spec: dict[str, Any], cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """This client's train and validation rows. The file is read in two streaming passes
    (:func:`safelm.data.read_splits`), so only this client's rows' text is ever in memory (a
    simulated client on a shared file holds 1/N of it): the rows' metadata decides the split
    and the partition exactly as the server decides them (pool = train rows, then val rows,
    in file order)."""
    def mine(meta: dict[str, pd.DataFrame]) -> dict[str, np.ndarray]:
        if spec["own_file"]:  # node-local data: all of it is this client's
            return {"train": np.ones(len(meta["train"]), bool),
                    "val": np.ones(len(meta["val"]), bool)}
        pool = pd.concat([meta["train"], meta["val"]], ignore_index=True)
        fed = FedSettings.from_values(spec["fed"])
        owned = partition_rows(cfg, fed, pool, spec["n"]) == spec["pid"]
        return {"train": owned[:len(meta["train"])], "val": owned[len(meta["train"]):]}

    splits = read_splits(spec["path"], cfg.data, cfg.train.task, cfg.train.seed, select=mine)
    return splits["train"], splits["val"]


def client_data(cfg: Config, tok_json: str, fed: FedSettings, partition_id: int,
                num_partitions: int, node_config: Mapping[str, Any]) -> ClientData:
    """This client's train and validation rows, tokenized (cached per process)."""
    if not 0 <= partition_id < num_partitions:
        raise UserError(f"node-config partition-id={partition_id} must be in "
                        f"[0, num-partitions={num_partitions})")
    own = bool(node_config.get("data-path"))
    key = json.dumps({"path": data_path(fed, node_config), "own_file": own,
                      "pid": partition_id, "n": num_partitions, "fed": fed.values},
                     sort_keys=True)
    return _client_data_cached(key, cfg.to_json(), tok_json)


# ---- tokenizer and config on the wire -----------------------------------------------------
def tokenizer_to_json(tok: Tokenizer) -> str:
    return tok.hf.to_str()


@functools.lru_cache(maxsize=4)
def tokenizer_from_json(text: str) -> Tokenizer:
    return Tokenizer(HFTokenizer.from_str(text))


def config_from_json(text: str) -> Config:
    return Config.from_dict(json.loads(text))


# ---- weights ------------------------------------------------------------------------------
def new_model(cfg: Config) -> nn.Module:
    """The global model's architecture; initial weights depend on train.seed alone, or, with
    ``train.init_from``, come from that run (every node must see the same run dir: its sha256
    travels in the round config), with fresh LoRA adapters when ``model.lora_rank`` > 0."""
    torch.manual_seed(cfg.train.seed)
    if not cfg.train.init_from:
        return build_model(cfg.model, cfg.train.task)
    model = build_model(base_model_config(cfg.model), cfg.train.task)
    init = _init_run(cfg.train.init_from)
    load_init_weights(model, init.model, cfg, init.cfg)
    if cfg.model.lora_rank:
        apply_lora(model, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets,
                   cfg.train.task)
    return model


@functools.lru_cache(maxsize=2)
def _init_run(path: str) -> Run:
    """The pretrained run every client starts from (loaded once per process)."""
    return load_run(path, device="cpu")


def check_init(cfg: Config, expected_sha256: str) -> None:
    """A node's copy of ``train.init_from`` must be the server's (same weights' sha256)."""
    if not cfg.train.init_from:
        return
    have = file_sha256(Path(cfg.train.init_from) / "model.safetensors")
    if have != expected_sha256:
        raise UserError(f"train.init_from={cfg.train.init_from}: this node's weights (sha256 "
                        f"{have[:12]}...) are not the server's ({expected_sha256[:12]}...); give "
                        "every node the same pretrained run")


def frozen_names(model: nn.Module) -> set[str]:
    """Parameters that do not train (a LoRA run's base): never sent, never aggregated."""
    return {n for n, p in unwrap(model).named_parameters() if not p.requires_grad}


def array_bytes(arrays: ArrayRecord) -> int:
    return sum(t.numel() * t.element_size() for t in arrays.to_torch_state_dict().values())


def _aliases(model: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (tied weights)."""
    seen, alias = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        ptr = (t.data_ptr(), tuple(t.shape))
        if ptr in seen:
            alias.add(name)
        seen.add(ptr)
    return alias


def get_weights(model: nn.Module) -> ArrayRecord:
    """Unwrapped weights, each tied tensor once (so clipping and noise count it once)."""
    model = unwrap(model)
    skip = _aliases(model) | frozen_names(model)  # LoRA: only adapters (and a head) travel
    sd = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items()
                     if k not in skip)
    return ArrayRecord(torch_state_dict=sd)


def set_weights(model: nn.Module, arrays: ArrayRecord) -> None:
    model = unwrap(model)
    missing, unexpected = model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    if unexpected or set(missing) - _aliases(model) - frozen_names(model):
        raise UserError(f"global weights do not fit this model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); server and clients disagree on config")


# ---- local training and evaluation --------------------------------------------------------
def client_seed(base: int, partition_id: int, server_round: int) -> int:
    """Distinct, reproducible data order and dropout per (client, round)."""
    return int(np.random.SeedSequence([base, partition_id, server_round]).generate_state(1)[0]
               % (2**31 - 1))


def _proximal_hooks(model: nn.Module, mu: float) -> list[Any]:
    """FedProx without touching the loop: d/dw (mu/2)||w - w_g||^2 = mu (w - w_g), added to
    each parameter's gradient by a tensor hook (runs once per backward on the summed grad)."""
    handles = []
    for p in model.parameters():
        if p.requires_grad:
            anchor = p.detach().clone()
            handles.append(p.register_hook(lambda g, p=p, a=anchor: g + mu * (p.detach() - a)))
    return handles


def client_privacy(cfg: Config, tok: Tokenizer, data: ClientData, *, epochs: int, rounds: int,
                   seed: int, state: dict[str, Any] | None) -> Any:
    """SafeLM's DP-SGD engine for this client (``privacy.enabled``), resumed from ``state``.

    Planned over ALL rounds (``epochs * rounds`` epochs), so ``privacy.target_epsilon`` is the
    client's budget for the whole federation, not per round; the engine stops local training
    once one more step would exceed it. ``state`` carries the accountant from earlier rounds
    (kept in the node's ``context.state``), so epsilon composes across rounds.
    """
    from safelm.api import Prepared
    from safelm.privacy import make_privacy

    plan = Config.from_dict(cfg.to_dict())
    plan.train.epochs, plan.train.seed, plan.train.max_steps = epochs * rounds, seed, 0
    prep = Prepared(plan, tok, {"train": data.train_rows}, {"train": data.train_set.enc})
    privacy = make_privacy(plan, prep)
    if state:
        privacy.load_state_dict(state)
    return privacy


def train_local(model: nn.Module, cfg: Config, data: ClientData, *, epochs: int,
                server_round: int, seed: int, proximal_mu: float = 0.0,
                privacy: Any = None) -> dict[str, float]:
    """``epochs`` passes of SafeLM's Trainer over this client's training rows (private
    look-alikes of model, optimizer and loader when ``privacy`` is given)."""
    if privacy is not None and proximal_mu > 0:
        raise UserError("FedProx (proximal-mu > 0) with privacy.enabled: the proximal term "
                        "would bypass per-sample clipping; use strategy=fedavg with DP-SGD")
    c = Config.from_dict(cfg.to_dict())
    c.train.epochs, c.train.seed, c.train.max_steps = epochs, seed, 0
    trainer = Trainer(model, c.train, data.train_set, None, privacy=privacy,
                      num_classes=c.model.num_classes)
    handles = _proximal_hooks(trainer.model, proximal_mu) if proximal_mu > 0 else []
    stats: dict[str, float] = {"train_loss": float("nan"), "seconds": 0.0}
    seconds = 0.0
    try:
        for e in range(epochs):
            stats = trainer.train_one_epoch((server_round - 1) * epochs + e)
            seconds += stats["seconds"]
    finally:
        for h in handles:
            h.remove()
    return {"train_loss": stats["train_loss"], "seconds": seconds,
            "steps": float(trainer.global_step)}


def evaluate(model: nn.Module, cfg: Config, tok: Tokenizer, rows: pd.DataFrame,
             enc: Encoded) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Trainer.evaluate metrics and per-group counts of ``rows`` (see :mod:`fairness`)."""
    ds = BlockDataset(enc)
    if len(ds) == 0:
        return {}, {}
    device = pick_device(cfg.train.device)
    model.to(device)
    metrics = evaluate_model(model, ds, cfg.train.task, cfg.train.eval_batch_size,
                             cfg.model.num_classes, device)
    model.eval()
    s = score_encoded(Run(cfg, tok, model, Path(".")), enc, len(rows),
                      batch_size=cfg.train.eval_batch_size)
    kw: dict[str, Any] = {"nll": s["nll"], "n_tokens": s["n_tokens"]}
    if cfg.train.task == "classify":
        index = {name: i for i, name in enumerate(cfg.data.labels)}
        kw.update(y_true=rows["label"].map(index).to_numpy(), y_pred=s["probs"].argmax(1))
    counts = fairness.group_counts(rows, cfg.data.group_cols, cfg.train.task, **kw)
    return metrics, counts


def configure_threads(fed: FedSettings, node_config: Mapping[str, Any]) -> int:
    """Torch threads = this client's CPU allotment, so co-located clients don't oversubscribe.

    Order: run-config client-threads, node-config num-threads, the Ray actor's assigned CPUs
    (simulation), OMP_NUM_THREADS, else torch's default.
    """
    n = fed.client_threads or int(node_config.get("num-threads", 0) or 0)
    if not n:
        try:
            import ray
            if ray.is_initialized():
                n = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
        except Exception:  # not in a Ray worker: fall through
            n = 0
    if not n and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = int(os.environ["OMP_NUM_THREADS"])
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
