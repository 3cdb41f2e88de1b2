"""The ServerApp: set up data, tokenizer, strategy and run dir, then run the rounds.

Thin on purpose: data and model live in :mod:`federation.task`, strategies in
:mod:`federation.strategies`, the loop and run dir in :mod:`federation.server`.
``run_server(grid, context)`` is the whole app, so tests drive it with an in-process grid
(:mod:`federation.local`) and ``flwr run .`` drives it through Flower's runtime.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from safelm import rundir
from safelm.api import prepare
from safelm.errors import UserError

from . import fairness, partition, task
from .ledger import ClientLedger, SampleLedger
from .server import RunStore, run_rounds
from .settings import FedSettings, parse_run_config
from .strategies import build_strategy, load_state

app = ServerApp()
log = logging.getLogger("flwr")


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
                     ) -> threading.Thread:
    """partitions.csv/.png: rows, labels and group mix per client, as every client computes.

    The table is computed here; the files (matplotlib's import and rendering take about a
    second) are written by a thread while the clients train round 1, when this process only
    waits for replies, so training does not wait for a report. ``run_server`` joins it.
    """
    client = task.partition_rows(data.cfg, fed, data.pool, n)
    cols = (["label"] if data.cfg.train.task == "classify" else []) + list(
        data.cfg.data.group_cols)
    table = partition.partition_table(client, data.pool, cols, n)

    def write() -> None:
        try:
            partition.write_partition_report(table, store.out,
                                             title=f"{fed.partitioning}, {n} clients")
        except Exception as e:  # a report must not stop the federation; say so in the log
            log.warning("partitions report not written: %s", e)
    thread = threading.Thread(target=write, name="partitions-report", daemon=True)
    thread.start()
    return thread


def run_server(grid: Grid, context: Context) -> dict[str, Any]:
    """The ServerApp body; returns the last round's central test metrics."""
    t0 = time.perf_counter()
    cfg, fed = parse_run_config(context.run_config)
    if fed.server_threads > 0:
        torch.set_num_threads(fed.server_threads)
    store = RunStore(fed.out_dir)
    log.info("SafeLM federated run -> %s", store.out)
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
    setup = {"data_s": time.perf_counter() - t0}
    nodes = wait_for_nodes(grid, fed.min_nodes, fed.round_timeout)
    setup["wait_nodes_s"] = time.perf_counter() - t0 - sum(setup.values())
    random.seed(cfg.train.seed)  # Flower's node sampling
    np.random.seed(cfg.train.seed)  # Flower's DP noise
    strategy, ledger, extra = build_strategy(fed, len(nodes), cfg.train.seed)
    if cfg.privacy.enabled:
        p = cfg.privacy
        ledger = SampleLedger(p.delta, p.accountant, p.unit, p.max_grad_norm, p.target_epsilon)
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
    # After the initial evaluation, which it would slow (GIL), and while round 1 trains; a
    # daemon thread: if the run fails it dies with the process, and its files are atomic.
    report = write_partitions(data, fed, len(nodes), store) if data.pool is not None else None
    if first <= fed.num_server_rounds:
        run_rounds(grid, store, strategy, ledger, cfg, arrays, first=first,
                   last=fed.num_server_rounds, config=config, central=central,
                   timeout=fed.round_timeout, min_replies=fed.min_replies)
    else:
        log.info("nothing to do: %s already has %d rounds", store.out, first - 1)
    if report is not None:
        report.join()
    log.info("global run dir: %s (safelm predict %s --data FILE --out preds.csv)", store.out,
             store.out)
    return last_test


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context)
