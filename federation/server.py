"""The server: :func:`run_server` (the ServerApp's body), its round loop and its run dir.

``run_server`` sets up data, tokenizer, strategy and run dir, then runs the rounds; data and
model live in :mod:`federation.task`, strategies in :mod:`federation.strategies`.

Why a loop of our own instead of ``Strategy.start``: ``start`` numbers rounds from 1 on every
call and exposes neither the per-client replies nor a per-round hook besides central
evaluation. Resuming at round r+1, recording each client's metrics and failures, summing
per-group counts, and saving the global model every round all need those. The loop calls the
strategy's own ``configure_*`` / ``aggregate_*`` exactly as ``start`` does, so any Flower
strategy (and DP wrapper) works unchanged.

Fault behaviour: a client whose ClientApp raises comes back as an error reply, and one that
vanishes or is slower than ``round-timeout`` is simply absent; the round aggregates the
replies that did arrive when there are at least ``min-replies`` of them, and otherwise keeps
the previous global model. Either way the round is logged (``failures``) and the run goes on.
(Under client-level DP, Flower's wrappers skip aggregation when any sampled client failed.)

Run dir (``out-dir``, docs/design.md layout, rewritten every round): ``model.safetensors``,
``config.json``, ``tokenizer.json``, ``metrics.jsonl`` (one ``round`` record per round),
``privacy.json`` (DP), plus ``federation.json`` (the run-config), ``partitions.csv`` (and
``partitions.png``, drawn when the run ends) and ``fl_state.json`` + ``fl_strategy.safetensors``
(resume). ``fl_state.json`` is written last and atomically: it is the commit point of a round.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy
from safetensors.numpy import load_file, save_file

from safelm import Tokenizer
from safelm import monitor, rundir
from safelm.api import prepare
from safelm.config import Config
from safelm.errors import UserError
from safelm.hashing import file_sha256

from . import fairness, partition, task
from .ledger import ClientLedger, SampleLedger
from .settings import FedSettings, parse_run_config
from .strategies import build_strategy, clipping_norm, load_state, state_of

log = logging.getLogger("flwr")
STATE, STRATEGY, FED, PRIVACY = ("fl_state.json", "fl_strategy.safetensors", "federation.json",
                                 "privacy.json")


class RunStore:
    """The global run dir: created fresh, or reopened for resume."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out).resolve()
        self.sinks: list[Any] = []  # TensorBoard / MLflow views of metrics.jsonl

    def open_monitors(self, cfg: Config, purge_step: int | None) -> None:
        """After create/reopen: each logged record also goes to the asked-for views (on
        resume, the rounds past the last commit are purged from TensorBoard too)."""
        self.sinks = monitor.open_sinks(self.out, tensorboard=cfg.train.tensorboard,
                                        mlflow=cfg.train.mlflow, purge_step=purge_step)

    def close_monitors(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def create(self, cfg: Config, tok: Tokenizer, run_config: dict[str, Any]) -> None:
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise UserError(f"out-dir {self.out} already exists and is not empty; pass "
                            "resume=true to continue it or choose another out-dir")
        self.out.mkdir(parents=True, exist_ok=True)
        tok.save(self.out / rundir.TOKENIZER)
        rundir.atomic_write_text(self.out / rundir.CONFIG, cfg.to_json() + "\n")
        rundir.atomic_write_json(self.out / FED, run_config)

    def reopen(self) -> tuple[Config, Tokenizer, dict[str, Any]]:
        if not (self.out / STATE).is_file():
            raise UserError(f"resume=true but {self.out} has no {STATE}; start a new run "
                            "(resume=false) or point out-dir at a federated run dir")
        cfg = rundir.read_config(self.out)
        tok = Tokenizer.load(self.out / rundir.TOKENIZER)
        state = json.loads((self.out / STATE).read_text())
        kept = [r for r in rundir.read_metrics(self.out) if r.get("round", 0) <= state["round"]]
        rundir.atomic_write_text(self.out / rundir.METRICS,
                                 "".join(json.dumps(r) + "\n" for r in kept))
        return cfg, tok, state

    def strategy_arrays(self) -> dict[str, np.ndarray]:
        p = self.out / STRATEGY
        return load_file(str(p)) if p.is_file() else {}

    def log(self, record: dict[str, Any]) -> None:
        with open(self.out / rundir.METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def commit(self, rnd: int, cfg: Config, arrays: ArrayRecord, strategy: Strategy,
               ledger: ClientLedger | SampleLedger | None) -> None:
        """Weights, ledger, strategy state, then the state file (the commit point)."""
        model = task.new_model(cfg)
        task.set_weights(model, arrays)
        rundir.save_weights(model, self.out / rundir.WEIGHTS)
        if isinstance(ledger, ClientLedger):
            rundir.atomic_write_json(self.out / PRIVACY,
                                     ledger.to_json(clipping_norm(strategy)))
        elif isinstance(ledger, SampleLedger):
            rundir.atomic_write_json(self.out / PRIVACY, ledger.to_json())
        rundir.write_checksums(self.out)  # load_run refuses these files if they change later
        sstate, sarrays = state_of(strategy)
        tmp = self.out / (STRATEGY + ".tmp")
        save_file(sarrays or {"_": np.zeros(1)}, str(tmp))
        tmp.replace(self.out / STRATEGY)
        rstate = random.getstate()
        npstate = np.random.get_state()
        rundir.atomic_write_json(self.out / STATE, {
            "round": rnd, "strategy": sstate,
            "ledger_history": ledger.history if isinstance(ledger, ClientLedger) else None,
            "sample_ledger": ledger.clients if isinstance(ledger, SampleLedger) else None,
            "random": [rstate[0], list(rstate[1]), rstate[2]],
            "np_random": [npstate[0], npstate[1].tolist(), *npstate[2:]]})

    @staticmethod
    def restore_rngs(state: dict[str, Any]) -> None:
        v, ints, gauss = state["random"]
        random.setstate((v, tuple(ints), gauss))
        name, keys, *rest = state["np_random"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def noise_source(cfg: Any) -> str:
    return "seeded" if cfg.privacy.reproducible else "os_entropy"


def seed_server_rngs(cfg: Any, private: bool = True) -> int:
    """Seed the server's randomness; return the seed of the strategy's client sampling.

    Client-level DP rests on two secrets of the server: Flower's Gaussian noise (drawn from
    numpy's global generator by its DP wrappers) and the Poisson choice of clients (the
    amplification by subsampling in the ledger). Both come from the operating system's entropy
    unless ``privacy.reproducible=true``, which seeds them from ``train.seed`` (then anyone with
    the run-config can replay them; the ledger says ``noise_source: "seeded"``). Their states
    are saved in ``fl_state.json`` / ``fl_strategy.safetensors`` for resume: files as
    sensitive as the data, never part of a release. A run without any DP (``private``
    false) protects nothing with them and keeps them seeded, so it replays exactly.
    """
    if cfg.privacy.reproducible or not private:
        random.seed(cfg.train.seed)  # Flower's node sampling
        np.random.seed(cfg.train.seed)  # Flower's DP noise
        return int(cfg.train.seed)
    random.seed()  # os.urandom
    np.random.seed()  # the OS's entropy
    return secrets.randbits(63)


def _client_rows(replies: list[Message]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-client metrics of successful replies, and the failures (node, reason)."""
    ok, failed = [], []
    for msg in replies:
        if msg.has_error():
            failed.append({"node": int(msg.metadata.src_node_id),
                           "reason": str(msg.error.reason)[-300:]})
            continue
        rec = next(iter(msg.content.metric_records.values()), {})
        ok.append({"node": int(msg.metadata.src_node_id),
                   **{k: v for k, v in rec.items() if not isinstance(v, list)}})
    return sorted(ok, key=lambda r: r.get("partition-id", -1)), failed


def _ordered(replies: Iterable[Message]) -> list[Message]:
    """Replies by partition id, errors last. They arrive in completion order, and float sums
    depend on order: sorting makes a run reproducible from its seeds."""
    def key(msg: Message) -> tuple[int, int]:
        if msg.has_error():
            return (1, 0)
        rec = next(iter(msg.content.metric_records.values()), {})
        return (0, int(rec.get("partition-id", 0)))
    return sorted(replies, key=key)


def _collect_accountants(ledger: SampleLedger, replies: list[Message],
                         rows: list[dict[str, Any]]) -> None:
    """Sample-level DP: each client's cumulative accountant, into the ledger and its row."""
    by_node = {r["node"]: r for r in rows}
    for msg in replies:
        if msg.has_error() or "privacy" not in msg.content:
            continue
        state = json.loads(str(msg.content["privacy"]["state"]))
        row = by_node[int(msg.metadata.src_node_id)]
        ledger.update(int(row["partition-id"]), state)
        row["epsilon"] = state.get("epsilon")


def _safe_aggregate(fn: Callable[[], Any], what: str, rnd: int) -> Any:
    try:
        return fn()
    except (AggregationError, InconsistentMessageReplies) as e:
        log.warning("round %d: %s failed (%s); keeping the previous global model", rnd, what, e)
        return None


def run_rounds(grid: Grid, store: RunStore, strategy: Strategy,
               ledger: ClientLedger | SampleLedger | None,
               cfg: Config, arrays: ArrayRecord, *, first: int, last: int,
               config: dict[str, Any], central: Callable[[ArrayRecord], dict[str, Any]],
               timeout: float, min_replies: int) -> ArrayRecord:
    """Rounds ``first..last``; each ends with central evaluation, a log record and a commit."""
    for rnd in range(first, last + 1):
        t0, wall0 = time.perf_counter(), time.time()
        if isinstance(ledger, SampleLedger):  # clients that lost their accountant get it back
            config["dp-states"] = ledger.states_json()
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(config)), grid))
        replies = _ordered(grid.send_and_receive(msgs, timeout=timeout)) if msgs else []
        train_ok, train_failed = _client_rows(replies)
        if isinstance(ledger, SampleLedger):
            _collect_accountants(ledger, replies, train_ok)
        aggregated, train_metrics = False, None
        if len(train_ok) >= min_replies:
            res = _safe_aggregate(lambda: strategy.aggregate_train(rnd, replies), "aggregation",
                                  rnd)
            if res is not None and res[0] is not None:
                arrays, train_metrics, aggregated = _like(res[0], arrays), res[1], True
        if isinstance(ledger, ClientLedger):
            ledger.step()  # the round's sampling and release happened, aggregated or not
        emsgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(config)), grid))
        ereplies = _ordered(grid.send_and_receive(emsgs, timeout=timeout)) if emsgs else []
        eval_ok, eval_failed = _client_rows(ereplies)
        fed_eval = _safe_aggregate(lambda: strategy.aggregate_evaluate(rnd, ereplies),
                                   "evaluation aggregation", rnd) if eval_ok else None
        counts = fairness.add_counts(dict(m.content["groups"]) for m in ereplies
                                     if not m.has_error() and "groups" in m.content)
        fed_groups = fairness.group_metrics(counts, cfg.train.task)
        sent = task.array_bytes(arrays) * (len(msgs) + len(emsgs))
        received = sum(task.array_bytes(m.content["arrays"]) for m in replies
                       if not m.has_error() and "arrays" in m.content)
        record = {"kind": "round", "round": rnd, "step": rnd, "sampled": len(msgs),
                  "bytes": {"model_arrays": task.array_bytes(arrays), "sent": sent,
                            "received": received},
                  "replies": len(train_ok), "failures": len(train_failed) + len(eval_failed),
                  "missing": len(msgs) - len(replies) + len(emsgs) - len(ereplies),
                  "aggregated": aggregated,
                  "train": dict(train_metrics or {}), "federated_eval": dict(fed_eval or {}),
                  "test": central(arrays), "clients": _merge(train_ok, eval_ok),
                  "failed": train_failed + eval_failed,
                  "groups": {"federated": fed_groups},
                  "disparities": {"federated": fairness.disparities(fed_groups)}}
        central_groups = record["test"].pop("_groups", None)
        if central_groups is not None:
            record["groups"]["central"] = central_groups
            record["disparities"]["central"] = fairness.disparities(central_groups)
        if ledger is not None:
            record["epsilon"] = ledger.epsilon()
            record["clipping_norm"] = clipping_norm(strategy)
        record["seconds"] = time.perf_counter() - t0
        record["t_start"], record["t_end"] = wall0, time.time()  # wall clock (benchmarks)
        store.log(record)
        store.commit(rnd, cfg, arrays, strategy, ledger)
        log.info("%s", summary_line(record, last))
    return arrays


def _like(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """``new`` in ``old``'s dtypes. Server optimizers (FedAdam) compute in float64; the global
    model is the float32 one clients and the run dir hold, so the server keeps that too (and a
    resumed run, which reloads float32 weights, continues bit for bit)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(a.numpy().astype(old[k].numpy().dtype,
                                                                        copy=False)))
                        for k, a in new.items()})


def _merge(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by: dict[Any, dict[str, Any]] = {}
    for r in train:
        by.setdefault(r.get("partition-id"), {}).update(
            {k: v for k, v in r.items() if k != "weight"})
    for r in evals:
        by.setdefault(r.get("partition-id"), {}).update(
            {k: v for k, v in r.items() if k.startswith("val_") or k == "partition-id"},
            val_examples=r.get("num-examples", 0))
    return [by[k] for k in sorted(by, key=lambda x: -1 if x is None else x)]


def summary_line(record: dict[str, Any], last: int) -> str:
    """One human line per round (what `flwr run --stream` and the demo print)."""
    def f(d: dict[str, Any], k: str) -> str:
        v = d.get(k)
        return f"{v:.3f}" if isinstance(v, float) else "-"
    t, e, c = record["train"], record["federated_eval"], record["test"]
    parts = [f"round {record['round']}/{last}", f"train_loss {f(t, 'train_loss')}",
             f"fed val_loss {f(e, 'val_loss')}"]
    if "val_accuracy" in e:
        parts.append(f"fed val_acc {f(e, 'val_accuracy')}")
    parts.append(f"test_loss {f(c, 'test_loss')}")
    for k in ("test_accuracy", "test_perplexity"):
        if k in c:
            parts.append(f"{k} {f(c, k)}")
    gaps = record["disparities"].get("federated", {})
    for col, g in gaps.items():
        if "accuracy_difference" in g:
            parts.append(f"acc gap[{col}] {g['accuracy_difference']:.3f}")
    parts.append(f"{record['replies']}/{record['sampled']} replies, "
                 f"{record['failures']} failures")
    if "bytes" in record:
        parts.append(f"{record['bytes']['model_arrays'] / 1e3:.1f} kB per model message")
    if record.get("epsilon") is not None:
        parts.append(f"eps {record['epsilon']:.2f}")
    parts.append(f"{record['seconds']:.1f}s")
    return " | ".join(parts)


def wait_for_nodes(grid: Grid, need: int, timeout: float) -> list[int]:
    """Node ids once ``need`` are connected (a UserError after ``timeout`` seconds)."""
    t0 = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < need:
        if time.monotonic() - t0 > timeout:
            raise UserError(f"only {len(nodes)} of min-nodes={need} clients connected within "
                            f"{timeout:.0f} s; start more SuperNodes or lower min-nodes")
        time.sleep(0.5)
    return nodes


def write_partitions(data: task.ServerData, fed: FedSettings, n: int, store: RunStore
                     ) -> Callable[[], None]:
    """partitions.csv now; returns the function that draws partitions.png.

    Rows, labels and group mix per client, as every client computes them. The table is
    written at once; the plot (matplotlib's import and rendering: about a second of CPU) is
    drawn when the run ends (``run_server`` calls it, also after a failure): at start-up it
    took that CPU from the Ray actors still starting, and during the rounds from training.
    """
    client = task.partition_rows(data.cfg, fed, data.pool, n)
    cols = (["label"] if data.cfg.train.task == "classify" else []) + list(
        data.cfg.data.group_cols)
    table = partition.partition_table(client, data.pool, cols, n)
    partition.write_partition_table(table, store.out)

    def plot() -> None:
        try:
            partition.plot_partitions(table, store.out, title=f"{fed.partitioning}, {n} clients")
        except Exception as e:  # a report must not fail the federation; say so in the log
            log.warning("partitions.png not written: %s", e)
    return plot


def run_server(grid: Grid, context: Context) -> dict[str, Any]:
    """The ServerApp body; returns the last round's central test metrics."""
    t0 = time.perf_counter()
    cfg, fed = parse_run_config(context.run_config)
    if fed.server_threads > 0:
        torch.set_num_threads(fed.server_threads)
    store = RunStore(fed.out_dir)
    log.info("SafeLM federated run -> %s", store.out)
    monitor.check_available(cfg.train.tensorboard, cfg.train.mlflow)  # before any write
    first, state = 1, None
    if fed.resume:
        cfg, tok, state = store.reopen()
        prep = prepare(task.data_path(fed), cfg, tok)
        data = task.ServerData(cfg, tok, prep.splits["test"], prep.encoded["test"], None)
        first = state["round"] + 1
    else:
        data = task.server_data(cfg, fed)
        cfg, tok = data.cfg, data.tokenizer
        store.create(cfg, tok, dict(context.run_config))
    store.open_monitors(cfg, state["round"] + 1 if state is not None else None)
    try:
        return _serve(grid, cfg, fed, tok, data, store, state, first, t0)
    finally:
        store.close_monitors()


def _serve(grid: Grid, cfg: Config, fed: Any, tok: Tokenizer, data: Any, store: RunStore,
           state: dict[str, Any] | None, first: int, t0: float) -> dict[str, Any]:
    setup = {"data_s": time.perf_counter() - t0}
    nodes = wait_for_nodes(grid, fed.min_nodes, fed.round_timeout)
    setup["wait_nodes_s"] = time.perf_counter() - t0 - sum(setup.values())
    strategy, ledger, extra = build_strategy(
        fed, len(nodes), seed_server_rngs(cfg, fed.dp != "none" or cfg.privacy.enabled))
    if ledger is not None:
        ledger.noise_source = noise_source(cfg)
    if cfg.privacy.enabled:
        p = cfg.privacy
        ledger = SampleLedger(p.delta, p.accountant, p.unit, p.max_grad_norm, p.target_epsilon,
                              noise_source=noise_source(cfg))
    if state is not None:
        RunStore.restore_rngs(state)
        load_state(strategy, state["strategy"], store.strategy_arrays())
        if isinstance(ledger, ClientLedger) and state.get("ledger_history"):
            ledger.history = state["ledger_history"]
        if isinstance(ledger, SampleLedger) and state.get("sample_ledger"):
            ledger.clients = state["sample_ledger"]
        model = task.new_model(cfg)
        rundir.load_weights(model, store.out / rundir.WEIGHTS)
        arrays = task.get_weights(model)
    else:
        arrays = task.get_weights(task.new_model(cfg))
    config = {"safelm-config": cfg.to_json(), "tokenizer": task.tokenizer_to_json(tok),
              "local-epochs": fed.local_epochs, **extra}
    if cfg.train.init_from:  # every node starts from the same pretrained weights
        config["init-sha256"] = file_sha256(Path(cfg.train.init_from) / rundir.WEIGHTS)

    last_test: dict[str, Any] = {}

    def central(arr: ArrayRecord) -> dict[str, Any]:
        model = task.new_model(cfg)
        task.set_weights(model, arr)
        metrics, counts = task.evaluate(model, cfg, tok, data.test_rows, data.test_enc)
        out: dict[str, Any] = {f"test_{k}": v for k, v in metrics.items()}
        if counts:
            out["_groups"] = fairness.group_metrics(counts, cfg.train.task)
        last_test.clear()
        last_test.update({k: v for k, v in out.items() if not k.startswith("_")})
        return out

    if first == 1:
        start = central(arrays)
        start.pop("_groups", None)
        setup["initial_eval_s"] = time.perf_counter() - t0 - sum(setup.values())
        store.log({"kind": "eval", "round": 0, "step": 0, "test": start, "setup": setup})
    plot = write_partitions(data, fed, len(nodes), store) if data.pool is not None else None
    try:
        if first <= fed.num_server_rounds:
            run_rounds(grid, store, strategy, ledger, cfg, arrays, first=first,
                       last=fed.num_server_rounds, config=config, central=central,
                       timeout=fed.round_timeout, min_replies=fed.min_replies)
        else:
            log.info("nothing to do: %s already has %d rounds", store.out, first - 1)
    finally:
        if plot is not None:
            plot()
    log.info("global run dir: %s (safelm predict %s --data FILE --out preds.csv)", store.out,
             store.out)
    return last_test
