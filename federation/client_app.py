"""The ClientApp: a thin adapter from Flower messages to :mod:`federation.task`.

Train: load the global weights, run ``local-epochs`` of SafeLM's Trainer on this node's
partition (``partition-id`` / ``num-partitions`` from node config), reply with the unwrapped
weights and ``weight`` (its example count, or 1 under client-level DP, which needs a uniform
average). Evaluate: reply with Trainer.evaluate's metrics and per-group COUNTS in a separate
ConfigRecord ``groups`` (sums only; see :mod:`federation.fairness`).

The server ships the resolved SafeLM config and the tokenizer in every round's ConfigRecord
(``safelm-config``, ``tokenizer``), so a client needs only its data and node config.

Sample-level DP (``privacy.enabled=true``): the client's Trainer runs SafeLM's DP-SGD engine;
its accountant is kept in ``context.state`` between rounds (so epsilon composes over all the
client's rounds) and reported in a ConfigRecord ``privacy`` for the server's ledger.

Client-side DP clipping (``dp=client-fixed|client-adaptive``) is Flower's own
``fixedclipping_mod`` / ``adaptiveclipping_mod``, attached to ``train`` only (attached to the
whole app, evaluation fails); :func:`dp_clipping_mod` picks one from the round's config so the
same app serves every mode.

Fault injection and hostile clients (run-config ``attack*``, ``fail-*``) are not here: they
live in :mod:`federation.testing` (a mod around these handlers), which the FAB does not ship.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from .settings import FedSettings, parse_run_config

if TYPE_CHECKING:
    from torch import nn

    from safelm.config import Config

    from . import task

# torch, safelm and :mod:`federation.task` are imported by the handlers, not here. Flower's
# simulation process imports this module (to check that the ClientApp loads) before it starts
# Ray, and the ServerApp thread is importing the same libraries then: at module level here the
# import held back Ray's start by about as long as torch takes to import (~1.5 s). Each Ray
# actor pays the import once, on its first message, before a client's clock starts.
app = ClientApp()
ACCOUNTANT = "safelm-dp-accountant"


def dp_clipping_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's client-side clipping mod named by config ``dp-clipping`` (or none)."""
    mode = msg.content["config"].get("dp-clipping", "") if "config" in msg.content else ""
    if mode == "fixed":
        return fixedclipping_mod(msg, ctx, call_next)
    if mode == "adaptive":
        return adaptiveclipping_mod(msg, ctx, call_next)
    return call_next(msg, ctx)


def _setup(msg: Message, context: Context
           ) -> tuple[Config, FedSettings, ConfigRecord, int, int, task.ClientData, nn.Module]:
    from . import task

    _, fed = parse_run_config(context.run_config)
    conf = msg.content["config"]
    cfg = task.config_from_json(str(conf["safelm-config"]))
    task.check_init(cfg, str(conf.get("init-sha256", "")))
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    threads = task.configure_threads(fed, context.node_config)
    data = task.client_data(cfg, str(conf["tokenizer"]), fed, pid, n, context.node_config)
    model = task.new_model(cfg)
    task.set_weights(model, msg.content["arrays"])
    return cfg, fed, conf, pid, threads, data, model


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    from . import task  # the import is start-up, not this round's work: clock after it

    t0, started_at = time.perf_counter(), time.time()
    cfg, fed, conf, pid, threads, data, model = _setup(msg, context)
    rnd = int(conf["server-round"])
    seed = task.client_seed(cfg.train.seed, pid, rnd)
    privacy = None
    if cfg.privacy.enabled:  # sample-level DP-SGD; the accountant persists in context.state
        tok = task.tokenizer_from_json(str(conf["tokenizer"]))
        privacy = task.client_privacy(cfg, tok, data, epochs=fed.local_epochs,
                                      rounds=fed.num_server_rounds, seed=seed,
                                      state=_accountant(context, conf, pid))
    stats = task.train_local(model, cfg, data, epochs=fed.local_epochs, server_round=rnd,
                             seed=seed, proximal_mu=float(conf.get("proximal-mu", 0.0)),
                             privacy=privacy)
    arrays = task.get_weights(model)
    n = len(data.train_set)
    metrics = MetricRecord({
        "weight": 1.0 if conf.get("weighting", "examples") == "uniform" else float(n),
        "num-examples": n, "partition-id": pid, "train_loss": stats["train_loss"],
        "train_seconds": stats["seconds"], "seconds": time.perf_counter() - t0,
        "started_at": started_at, "threads": threads})
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    if privacy is not None:
        state = privacy.state_dict()
        context.state[ACCOUNTANT] = ConfigRecord({"state": json.dumps(state)})
        eps = privacy.epsilon()
        content["privacy"] = ConfigRecord({"state": json.dumps(
            {**state, "epsilon": eps if math.isfinite(eps) else None})})
    return Message(content, reply_to=msg)


def _accountant(context: Context, conf: ConfigRecord, pid: int) -> dict | None:
    """This client's accountant: its own from context.state, or the server's copy when that
    has more steps (a restarted SuperNode or a resumed run loses context.state)."""
    mine = (json.loads(str(context.state[ACCOUNTANT]["state"]))
            if ACCOUNTANT in context.state else None)
    theirs = json.loads(str(conf.get("dp-states", "{}"))).get(str(pid))
    steps = [sum(int(n) for _, _, n in s["history"]) if s else -1 for s in (mine, theirs)]
    return theirs if steps[1] > steps[0] else mine


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from . import task

    cfg, fed, conf, pid, threads, data, model = _setup(msg, context)
    tok = task.tokenizer_from_json(str(conf["tokenizer"]))
    metrics, counts = task.evaluate(model, cfg, tok, data.val_rows, data.val_enc)
    n = len(data.val_rows)
    # Same keys from every client (Flower refuses to average mismatched records); a client
    # without validation rows sends zeros with weight 0.
    names = ("loss", "accuracy", "macro_f1") if cfg.train.task == "classify" else (
        "loss", "perplexity")
    record = MetricRecord({"weight": float(n), "num-examples": n, "partition-id": pid,
                           **{f"val_{k}": float(metrics.get(k, 0.0)) for k in names}})
    groups = ConfigRecord({k: [float(x) for x in v] for k, v in counts.items()})
    return Message(RecordDict({"metrics": record, "groups": groups}), reply_to=msg)
