"""Aggregation strategies by name, client-level DP, and the client-level privacy ledger.

Every named strategy is Flower's own (``flwr.serverapp.strategy``): FedAvg, FedProx, FedAdam,
FedTrimmedAvg, Krum, MultiKrum, FedMedian; client-level DP is Flower's
``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``. One thing is written by
hand, :class:`PoissonFedAvg`, because the wrappers' guarantee needs a mechanism Flower's FedAvg
is not: FedAvg samples a fixed-size set without replacement and divides by the replies' total
weight, while the RDP accountant (Opacus ``RDPAccountant``, the Poisson-subsampled Gaussian)
needs each client included independently with probability q and a FIXED denominator q*N
(DP-FedAvg, McMahan et al. 2018, "Learning differentially private recurrent language models").
With that, Flower's noise ``z * C / (q N)`` makes each round a Gaussian mechanism with noise
multiplier z on a sensitivity-C sum, sampled at rate q: exactly what the ledger records.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from .ledger import ClientLedger
from .settings import FedSettings

SUMMED = {"num-examples"}
DROPPED = {"partition-id", "threads", "norm_bit", "started_at"}  # ids, flags, wall clock


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of client metrics; counts summed; ids and flags dropped."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = np.array([float(m[weight_key]) for m in metrics])
    if weights.sum() <= 0:
        weights = np.ones(len(metrics))
    out = MetricRecord()
    for key in metrics[0].keys() if metrics else []:
        if key == weight_key or key in DROPPED or isinstance(metrics[0][key], (list, bool)):
            continue
        values = np.array([float(m[key]) for m in metrics])
        out[key] = (float(values.sum()) if key in SUMMED
                    else float((values * weights).sum() / weights.sum()))
    return out


class PoissonFedAvg(FedAvg):
    """FedAvg with Poisson client sampling and the fixed denominator q*N (see module doc).

    Each connected node is sampled independently with probability ``sample_rate`` from a
    seeded generator; the new global model is ``g + sum_i (w_i - g) / (q N)``. With q = 1 and
    every client replying this is the plain uniform average.
    """

    def __init__(self, sample_rate: float, seed: int, **kwargs: Any) -> None:
        super().__init__(fraction_train=sample_rate, **kwargs)
        self.sample_rate = sample_rate
        self.rng = np.random.default_rng(seed)
        self.current: ArrayRecord | None = None
        self.expected = 1.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = sorted(grid.get_node_ids())
        chosen = [n for n in nodes if self.rng.random() < self.sample_rate]
        self.current, self.expected = arrays, self.sample_rate * len(nodes)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self.current is None:
            return None, None
        g = {k: a.numpy() for k, a in self.current.items()}
        total = {k: np.zeros_like(v) for k, v in g.items()}
        for msg in valid:
            rec = next(iter(msg.content.array_records.values()))
            for k, a in rec.items():
                total[k] += a.numpy() - g[k]
        new = ArrayRecord({k: Array(np.asarray(g[k] + total[k] / self.expected)) for k in g})
        return new, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


def noise_for_target(fed: FedSettings) -> float:
    """The z that spends ``dp-target-epsilon`` over all rounds at rate q (RDP)."""
    from opacus.accountants.utils import get_noise_multiplier
    return float(get_noise_multiplier(target_epsilon=fed.dp_target_epsilon,
                                      target_delta=fed.dp_delta,
                                      sample_rate=fed.fraction_train,
                                      steps=fed.num_server_rounds, accountant="rdp"))


def build_strategy(fed: FedSettings, num_nodes: int, seed: int
                   ) -> tuple[Strategy, ClientLedger | None, dict[str, Any]]:
    """The strategy named by run-config, its ledger under DP, and extra train-config keys."""
    common: dict[str, Any] = dict(
        fraction_evaluate=fed.fraction_evaluate, min_train_nodes=fed.min_nodes,
        min_evaluate_nodes=fed.min_nodes, min_available_nodes=fed.min_nodes,
        weighted_by_key="weight", train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics)
    extra: dict[str, Any] = {"weighting": "examples"}
    if fed.strategy == "fedprox":
        extra["proximal-mu"] = fed.proximal_mu
    if fed.dp != "none":
        return _dp_strategy(fed, num_nodes, seed, common, extra)
    common["fraction_train"] = fed.fraction_train
    s = fed.strategy
    if s == "fedavg":
        return FedAvg(**common), None, extra
    if s == "fedprox":
        return FedProx(proximal_mu=fed.proximal_mu, **common), None, extra
    if s == "fedadam":
        return FedAdam(eta=fed.server_lr, tau=fed.server_tau, **common), None, extra
    if s == "trimmed-mean":
        return FedTrimmedAvg(beta=fed.trim_beta, **common), None, extra
    if s == "krum":
        return Krum(num_malicious_nodes=fed.num_malicious, **common), None, extra
    if s == "multi-krum":
        return MultiKrum(num_malicious_nodes=fed.num_malicious,
                         num_nodes_to_select=fed.krum_select, **common), None, extra
    return FedMedian(**common), None, extra


def _dp_strategy(fed: FedSettings, num_nodes: int, seed: int, common: dict[str, Any],
                 extra: dict[str, Any]) -> tuple[Strategy, ClientLedger, dict[str, Any]]:
    q = fed.fraction_train
    z = noise_for_target(fed) if fed.dp_target_epsilon > 0 else fed.dp_noise
    base = PoissonFedAvg(sample_rate=q, seed=seed, **common)
    m = q * num_nodes  # the expected sample, the fixed denominator
    extra["weighting"] = "uniform"
    kind = fed.dp.split("-")[1]
    if kind == "fixed":
        cls = (DifferentialPrivacyServerSideFixedClipping if fed.dp.startswith("server")
               else DifferentialPrivacyClientSideFixedClipping)
        strategy: Strategy = cls(base, z, fed.dp_clip, m)  # type: ignore[arg-type]
    else:
        cls = (DifferentialPrivacyServerSideAdaptiveClipping if fed.dp.startswith("server")
               else DifferentialPrivacyClientSideAdaptiveClipping)
        # Flower splits z between the update and the clipped count (Andrew et al. 2021), so
        # the whole round is still one Gaussian mechanism with multiplier z for accounting.
        stddev = fed.dp_count_stddev or max(m / 20, z)
        strategy = cls(base, z, m, initial_clipping_norm=fed.dp_clip,  # type: ignore[arg-type]
                       target_clipped_quantile=fed.dp_clip_quantile,
                       clip_norm_lr=fed.dp_clip_lr, clipped_count_stddev=stddev)
    if fed.dp.startswith("client"):
        extra["dp-clipping"] = kind
    ledger = ClientLedger(z, q, fed.dp_delta, fed.dp.replace("-", "-side ", 1), fed.dp_clip,
                          fed.dp_target_epsilon or None)
    return strategy, ledger, extra


def inner(strategy: Strategy) -> Strategy:
    """The strategy inside a DP wrapper (or itself)."""
    return getattr(strategy, "strategy", strategy)


def clipping_norm(strategy: Strategy) -> float | None:
    return getattr(strategy, "clipping_norm", None)


def state_of(strategy: Strategy) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What a resumed server needs to continue exactly: JSON state and named arrays."""
    s, state, arrays = inner(strategy), {}, {}
    if isinstance(s, PoissonFedAvg):
        state["rng"] = s.rng.bit_generator.state
    if clipping_norm(strategy) is not None:
        state["clipping_norm"] = clipping_norm(strategy)
    for moment in ("m_t", "v_t"):
        for k, v in (getattr(s, moment, None) or {}).items():
            arrays[f"{moment}/{k}"] = np.ascontiguousarray(v)
    return state, arrays


def load_state(strategy: Strategy, state: dict[str, Any], arrays: dict[str, np.ndarray]
               ) -> None:
    s = inner(strategy)
    if isinstance(s, PoissonFedAvg) and "rng" in state:
        s.rng.bit_generator.state = state["rng"]
    if "clipping_norm" in state and hasattr(strategy, "clipping_norm"):
        strategy.clipping_norm = float(state["clipping_norm"])  # type: ignore[attr-defined]
    for moment in ("m_t", "v_t"):
        got = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(moment + "/")}
        if got:
            setattr(s, moment, got)
