"""The real ServerApp and ClientApp over an in-process grid: run dir, resume, faults, attacks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from federation.local import app_run_config, run_local
from safelm import rundir
from safelm.api import load_run, predictions_table
from safelm.cli import main as safelm_main
from safelm.errors import UserError
from test_monitor import jsonl_curves, read_events, same_curves

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=4", "corpus-size=600",
        "client-threads=1", "num-server-rounds=2"]


def rc(out: Path, *extra: str) -> dict:
    return app_run_config(PYPROJECT, TINY + [f'out-dir="{out}"', *extra])


def rounds(out: Path) -> list[dict]:
    return [r for r in rundir.read_metrics(out) if r["kind"] == "round"]


def test_global_run_dir_is_a_safelm_run(tmp_path):
    out = tmp_path / "fl"
    res, grid = run_local(rc(out, "partitioning=\"dirichlet-group\"", "alpha=0.3"), 3)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl",
                 "partitions.csv", "partitions.png", "federation.json"):
        assert (out / name).is_file(), name
    recs = rundir.read_metrics(out)
    assert recs[0]["kind"] == "eval" and [r["round"] for r in recs[1:]] == [1, 2]
    last = recs[-1]
    assert [c["partition-id"] for c in last["clients"]] == [0, 1, 2]
    assert all("val_accuracy" in c and "train_loss" in c for c in last["clients"])
    assert {g["column"] for g in last["groups"]["federated"]} == {"gender", "age_group"}
    # per-group counts cover exactly the clients' validation rows
    assert sum(g["n"] for g in last["groups"]["federated"] if g["column"] == "gender") == sum(
        c["val_examples"] for c in last["clients"])
    assert "accuracy_difference" in last["disparities"]["central"]["gender"]
    parts = pd.read_csv(out / "partitions.csv")
    assert len(parts) == 3 and parts["rows"].sum() > 0
    # dirichlet over gender at alpha 0.3: clients differ in their gender mix
    share = parts["gender=female"] / parts["rows"]
    assert share.max() - share.min() > 0.1
    # usable by safelm: load_run, predictions table, and the CLI's predict
    run = load_run(out)
    data = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a wonderful film", "an awful hotel"], "label": ["positive",
                  "negative"], "gender": ["female", "male"], "age_group": ["old", "young"],
                  "user": ["x", "y"]}).to_csv(data, index=False)
    assert len(predictions_table(run, data)) == 2
    assert safelm_main(["predict", str(out), "--data", str(data), "--out",
                        str(tmp_path / "p.csv")]) == 0
    assert res["test_accuracy"] == last["test"]["test_accuracy"]
    # a second run into the same dir is refused, the dir untouched
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="resume=true"):
        run_local(rc(out), 3)
    assert (out / "model.safetensors").read_bytes() == before


def test_resume_continues_exactly(tmp_path):
    """3 rounds straight == 2 rounds, then resume to 3 (FedAdam: server moments restored)."""
    extra = ['strategy="fedadam"', "server-lr=0.02", "fraction-train=0.67"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_local(rc(a, "num-server-rounds=3", *extra), 3)
    tb = ["train.tensorboard=true"]  # the server's views follow the same resume
    run_local(rc(b, "num-server-rounds=2", *extra, *tb), 3)
    run_local(rc(b, "num-server-rounds=3", "resume=true", *extra, *tb), 3)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra, rb = rounds(a), rounds(b)
    assert [r["round"] for r in rb] == [1, 2, 3]
    assert [c["partition-id"] for c in ra[2]["clients"]] == [
        c["partition-id"] for c in rb[2]["clients"]]
    assert ra[2]["test"] == rb[2]["test"]
    if importlib.util.find_spec("tensorboard"):
        events = read_events(b)
        same_curves(events, jsonl_curves(b))
        assert [s for s, _ in events["round/test.test_accuracy"]] == [1, 2, 3]


def test_failing_and_vanishing_clients_do_not_stop_the_federation(tmp_path):
    out = tmp_path / "f"
    run_local(rc(out, "num-server-rounds=3", 'fail-clients="1"', 'fail-rounds="1"'), 3,
              vanish={2: {2}})
    r1, r2, r3 = rounds(out)
    assert (r1["replies"], r1["failures"], r1["aggregated"]) == (2, 1, True)
    assert "injected failure" in r1["failed"][0]["reason"]
    assert (r2["replies"], r2["missing"], r2["aggregated"]) == (2, 2, True)  # train + eval
    assert (r3["replies"], r3["failures"], r3["missing"]) == (3, 0, 0)
    # too few replies: the round keeps the previous global model (oracle: same test loss)
    out2 = tmp_path / "g"
    run_local(rc(out2, "num-server-rounds=1", "min-replies=3", 'fail-clients="0"'), 3)
    start = rundir.read_metrics(out2)[0]["test"]
    (r,) = rounds(out2)
    assert not r["aggregated"] and r["test"] == start


def test_hostile_client_hurts_fedavg_and_robust_strategies_contain_it(tmp_path):
    attack = ['attack="signflip"', 'attack-clients="0"', "attack-scale=30", "local-epochs=2",
              "corpus-size=1000", "num-server-rounds=3"]
    loss = {}
    for name, extra in {"honest": ['strategy="fedavg"', "local-epochs=2", "corpus-size=1000",
                                   "num-server-rounds=3"],
                        "fedavg": ['strategy="fedavg"', *attack],
                        "median": ['strategy="median"', *attack],
                        "trimmed-mean": ['strategy="trimmed-mean"', *attack],
                        "multi-krum": ['strategy="multi-krum"', "krum-select=3", *attack]
                        }.items():
        res, _ = run_local(rc(tmp_path / name, *extra), 5)
        loss[name] = res["test_loss"]
    assert loss["honest"] < 0.68, loss  # honest FedAvg learns (chance: ln 2 = 0.693)
    assert loss["fedavg"] > 2.0 * loss["honest"], loss  # the attack works on FedAvg
    for robust in ("median", "trimmed-mean", "multi-krum"):
        assert loss[robust] < 1.4 * loss["honest"], (robust, loss)
        assert loss[robust] < 0.5 * loss["fedavg"], (robust, loss)
    print(json.dumps(loss))


def test_demo_step_quick_prints_per_round_metrics(tmp_path, capsys):
    from federation.plugin import DEMO_ORDER, demo_step
    from safelm.corpus import write_sentiment_csv

    data = tmp_path / "data" / "sentiment.csv"
    write_sentiment_csv(data, n=600, bias=0.8)
    ctx = {"out": tmp_path, "quick": True, "data": {"sentiment": data}}
    demo_step(ctx)
    printed = capsys.readouterr().out
    assert "round 1/2" in printed and "round 2/2" in printed and "acc gap[gender]" in printed
    assert load_run(ctx["federated_run"]).cfg.train.task == "classify"
    assert isinstance(DEMO_ORDER, int)
