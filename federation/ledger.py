"""Privacy ledgers of a federated run (``privacy.json`` in the global run dir, docs/design.md format).

Two kinds, one per DP flavour (a run uses at most one; see settings):

* :class:`ClientLedger` -- client-level DP (Flower's DP strategy wrappers on the server): the
  unit is a whole client; each round is one Poisson-subsampled Gaussian mechanism with noise
  multiplier z at client sampling rate q, so ``history`` is ``[[z, q, rounds]]``.
* :class:`SampleLedger` -- sample-level DP-SGD on every client (``privacy.enabled=true``,
  SafeLM's own ``safelm.privacy`` engine inside the client's Trainer): each client's accountant
  lives in its ``context.state`` across rounds and reports its cumulative history; the run's
  epsilon is the maximum over clients (each client's data is protected by its own guarantee,
  and the released global model is post-processing of all of them), and ``clients`` holds each
  history so every number can be recomputed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClientLedger:
    """Client-level privacy spent so far: one [z, q, rounds] entry per constant (z, q)."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    clipping: str
    max_grad_norm: float
    target_epsilon: float | None = None
    history: list[list[float]] = field(default_factory=list)
    noise_source: str = "os_entropy"  # or "seeded" (privacy.reproducible=true)

    def step(self) -> None:
        z, q = self.noise_multiplier, self.sample_rate
        if self.history and self.history[-1][:2] == [z, q]:
            self.history[-1][2] += 1
        else:
            self.history.append([z, q, 1])

    def epsilon(self) -> float | None:
        """RDP epsilon at ``delta`` (None when z = 0: no guarantee)."""
        if not self.history:
            return 0.0
        if self.noise_multiplier <= 0:
            return None
        from opacus.accountants import RDPAccountant
        acc = RDPAccountant()
        acc.history = [(z, q, int(s)) for z, q, s in self.history]
        return float(acc.get_epsilon(self.delta))

    def to_json(self, clipping_norm_now: float | None = None) -> dict[str, Any]:
        """The docs/design.md ledger; ``history`` recomputes epsilon with any RDP accountant."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "accountant": "rdp",
                "unit": "client", "sampling": "poisson", "max_grad_norm": self.max_grad_norm,
                "history": self.history, "target_epsilon": self.target_epsilon,
                "mechanism": f"DP-FedAvg, Flower {self.clipping} clipping",
                "noise_source": self.noise_source,
                "clipping_norm_now": clipping_norm_now,
                "covers": "the global model only; federated evaluation metrics and group "
                          "counts are not privatized (fraction-evaluate=0 releases none)"}


@dataclass
class SampleLedger:
    """Per-client sample-level DP accountants, as reported by the clients."""

    delta: float
    accountant: str
    unit: str
    max_grad_norm: float
    target_epsilon: float | None = None
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    noise_source: str = "os_entropy"  # or "seeded" (privacy.reproducible=true on every client)

    def update(self, partition_id: int, state: dict[str, Any]) -> None:
        """Keep a client's newest accountant state (the one with the most steps)."""
        key = str(partition_id)
        old = self.clients.get(key)
        if old is None or _steps(state) >= _steps(old):
            self.clients[key] = state

    def states_json(self) -> str:
        """Every client's accountant, for clients whose own state was lost (resume, restart)."""
        return json.dumps({k: {"history": v["history"], "noise_multiplier": v["noise_multiplier"],
                               "sample_rate": v["sample_rate"]} for k, v in self.clients.items()})

    def epsilon(self) -> float | None:
        eps = [c.get("epsilon") for c in self.clients.values()]
        if not eps:
            return 0.0
        return None if any(e is None for e in eps) else max(eps)

    def to_json(self) -> dict[str, Any]:
        worst = max(self.clients.items(), key=lambda kv: kv[1].get("epsilon") or math.inf,
                    default=(None, {"history": []}))
        return {"epsilon": self.epsilon(), "delta": self.delta, "accountant": self.accountant,
                "unit": self.unit, "sampling": "poisson", "max_grad_norm": self.max_grad_norm,
                "history": worst[1]["history"], "target_epsilon": self.target_epsilon,
                "mechanism": "DP-SGD on each client (safelm.privacy), composed over its rounds",
                "noise_source": self.noise_source,
                "epsilon_is": "the maximum over clients; history is that client's",
                "worst_client": worst[0],
                "clients": {k: {"epsilon": v.get("epsilon"), "history": v["history"]}
                            for k, v in sorted(self.clients.items(), key=lambda kv: int(kv[0]))},
                "covers": "each client's training examples (or users); federated evaluation "
                          "metrics and group counts are not privatized"}


def _steps(state: dict[str, Any]) -> int:
    return sum(int(n) for _, _, n in state.get("history", []))
