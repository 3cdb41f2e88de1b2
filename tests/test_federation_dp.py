"""Client-level DP: Flower's wrappers over PoissonFedAvg, and a ledger that recomputes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from opacus.accountants import RDPAccountant

from federation import task
from federation.local import LocalGrid, app_run_config, run_local
from federation.server import RunStore
from federation.settings import parse_run_config
from federation.strategies import ClientLedger, PoissonFedAvg, aggregate_metrics
from safelm.rundir import read_config
from safetensors.torch import load_file

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=4", "corpus-size=600",
        "client-threads=1"]
D = 20_000  # parameters in the synthetic updates


def _round(strategy, num_nodes: int, rng: np.random.Generator, scale: float = 1.0):
    """Configure a round on a node-only grid, answer with random updates, aggregate."""
    grid = LocalGrid(client_app=None, num_nodes=num_nodes, run_config={})  # type: ignore
    g = {"w": rng.normal(size=D).astype(np.float64)}
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(g["w"])}), _cfg(), grid))
    updates, replies = [], []
    for m in msgs:
        w = g["w"] + scale * rng.normal(size=D)
        updates.append(w - g["w"])
        replies.append(Message(RecordDict({"arrays": ArrayRecord({"w": Array(w.copy())}),
                                           "metrics": MetricRecord({"weight": 1.0})}),
                               reply_to=m))
    new, _ = strategy.aggregate_train(1, replies)
    return g["w"], updates, (None if new is None else new["w"].numpy()), len(msgs)


def _cfg():
    from flwr.app import ConfigRecord
    return ConfigRecord({})


def _base(q: float = 1.0, seed: int = 0) -> PoissonFedAvg:
    return PoissonFedAvg(sample_rate=q, seed=seed, weighted_by_key="weight",
                         train_metrics_aggr_fn=aggregate_metrics, min_available_nodes=1)


def _clip(u: np.ndarray, c: float) -> np.ndarray:
    return u * min(1.0, c / np.linalg.norm(u))


def test_no_noise_no_clip_is_the_uniform_mean():
    rng = np.random.default_rng(0)
    s = DifferentialPrivacyServerSideFixedClipping(_base(), 0.0, 1e9, 5)
    g, ups, new, n = _round(s, 5, rng)
    assert n == 5
    np.testing.assert_allclose(new, g + np.mean(ups, axis=0), rtol=0, atol=1e-12)


def test_clipping_and_fixed_denominator_under_poisson_sampling():
    rng = np.random.default_rng(1)
    q, n_nodes, c = 0.5, 8, 0.7
    s = DifferentialPrivacyServerSideFixedClipping(_base(q, seed=3), 0.0, c, q * n_nodes)
    g, ups, new, sampled = _round(s, n_nodes, rng)
    assert 0 < sampled < n_nodes  # Poisson: not a fixed-size sample
    want = g + sum(_clip(u, c) for u in ups) / (q * n_nodes)
    np.testing.assert_allclose(new, want, rtol=0, atol=1e-12)


def test_noise_has_the_accounted_standard_deviation():
    z, c, n = 1.3, 0.5, 4
    np.random.seed(0)
    s = DifferentialPrivacyServerSideFixedClipping(_base(), z, c, n)
    g, ups, new, _ = _round(s, n, np.random.default_rng(2))
    noiseless = g + np.mean([_clip(u, c) for u in ups], axis=0)
    assert np.std(new - noiseless) == pytest.approx(z * c / n, rel=0.03)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Tight (eps, delta) of a mu-GDP mechanism (Dong, Roth, Su 2019), by bisection."""
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    dlt = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)  # noqa: E731
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dlt(mid) > delta else (lo, mid)
    return hi


def test_ledger_is_rdp_of_its_history_and_bounds_the_exact_gaussian():
    led = ClientLedger(2.0, 1.0, 1e-5, "server-side fixed", 1.0)
    for _ in range(10):
        led.step()
    assert led.history == [[2.0, 1.0, 10]]
    exact = _exact_gaussian_epsilon(math.sqrt(10) / 2.0, 1e-5)  # 10 Gaussians, q = 1
    assert exact <= led.epsilon() <= 1.3 * exact


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_one_round_update_is_clipped_end_to_end(tmp_path, mode):
    """z = 0, q = 1: the global model moves by at most the clipping norm C in a round."""
    c = 0.05
    out = tmp_path / mode
    run_local(app_run_config(PYPROJECT, TINY + [f'out-dir="{out}"', f'dp="{mode}"',
                                                 "dp-noise=0.0", f"dp-clip={c}",
                                                 "num-server-rounds=1"]), 3)
    cfg = read_config(out)
    w0 = task.get_weights(task.new_model(cfg)).to_torch_state_dict()
    w1 = load_file(out / "model.safetensors")
    delta = torch.sqrt(sum(((w1[k] - w0[k]) ** 2).sum() for k in w0))
    assert 0.5 * c < float(delta) <= c * (1 + 1e-5)
    ledger = json.loads((out / "privacy.json").read_text())
    assert ledger["unit"] == "client" and ledger["epsilon"] is None  # z = 0: no guarantee


def test_privacy_json_recomputes_with_opacus(tmp_path):
    out = tmp_path / "dp"
    run_local(app_run_config(PYPROJECT, TINY + [f'out-dir="{out}"', 'dp="server-adaptive"',
                                                 "dp-target-epsilon=8.0", "dp-clip=0.5",
                                                 "fraction-train=0.75", "num-server-rounds=3"]),
              4)
    led = json.loads((out / "privacy.json").read_text())
    assert (led["unit"], led["sampling"], led["accountant"]) == ("client", "poisson", "rdp")
    (z, q, steps), = led["history"]
    assert (q, steps) == (0.75, 3) and z > 0
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in led["history"]]
    assert acc.get_epsilon(led["delta"]) == pytest.approx(led["epsilon"], rel=1e-12)
    assert 7.5 < led["epsilon"] <= 8.0 + 1e-6  # the target was met, not overshot
    assert led["clipping_norm_now"] != 0.5  # adaptive clipping moved the norm
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["epsilon"] for r in rounds] == sorted(r["epsilon"] for r in rounds)


def test_adaptive_wrapper_splits_the_noise_so_accounting_uses_the_total():
    """Flower's adaptive wrapper keeps the whole round a z-Gaussian (Andrew et al. 2021)."""
    z, sigma_b = 1.0, 1.0
    s = DifferentialPrivacyServerSideAdaptiveClipping(_base(), z, 4, clipped_count_stddev=sigma_b)
    z_delta = s.noise_multiplier
    assert (z_delta ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    cfg, fed = parse_run_config(app_run_config(PYPROJECT, ['dp="server-adaptive"']))
    assert fed.dp == "server-adaptive"


def test_sample_level_dp_composes_over_rounds_in_context_state_and_resume(tmp_path,
                                                                          monkeypatch):
    """privacy.enabled: each client's DP-SGD accountant lives in its context.state, so its
    epsilon covers all its rounds; the ledger recomputes; a server killed after round 1 and
    resumed (fresh nodes, empty context.state) continues each client's accountant from the
    server's copy and ends with the same ledger."""
    base = TINY + ["privacy.enabled=true", "privacy.target_epsilon=4.0", "local-epochs=1",
                   "corpus-size=400"]
    a, b = tmp_path / "a", tmp_path / "b"
    _, grid = run_local(app_run_config(PYPROJECT, base + [f'out-dir="{a}"',
                                                          "num-server-rounds=2"]), 2)
    led = json.loads((a / "privacy.json").read_text())
    assert (led["unit"], led["sampling"], led["target_epsilon"]) == ("example", "poisson", 4.0)
    acc_steps = []
    for pid, client in led["clients"].items():
        acc = RDPAccountant()
        acc.history = [tuple(h) for h in client["history"]]
        assert acc.get_epsilon(led["delta"]) == pytest.approx(client["epsilon"], rel=1e-9)
        assert client["epsilon"] <= 4.0 + 1e-9
        (z, q, steps), = client["history"]
        acc_steps.append(steps)
        assert steps == 2 * math.ceil(1 / q)  # both rounds' steps in one history
    assert led["epsilon"] == max(c["epsilon"] for c in led["clients"].values())
    for ctx in grid.contexts.values():  # the node kept its accountant across rounds
        state = json.loads(str(ctx.state["safelm-dp-accountant"]["state"]))
        assert sum(n for _, _, n in state["history"]) in acc_steps
    commit = RunStore.commit

    def crash_after_round_1(self, rnd, *args, **kwargs):
        commit(self, rnd, *args, **kwargs)
        if rnd == 1:
            raise KeyboardInterrupt("server killed")

    monkeypatch.setattr(RunStore, "commit", crash_after_round_1)
    with pytest.raises(KeyboardInterrupt):
        run_local(app_run_config(PYPROJECT, base + [f'out-dir="{b}"', "num-server-rounds=2"]), 2)
    monkeypatch.undo()
    run_local(app_run_config(PYPROJECT, base + [f'out-dir="{b}"', "num-server-rounds=2",
                                                "resume=true"]), 2)
    assert json.loads((b / "privacy.json").read_text())["clients"] == led["clients"]
