"""Live monitoring (safelm/monitor.py): TensorBoard event files hold exactly what metrics.jsonl
holds (the oracle is the jsonl itself, read back through TensorBoard's own reader), epsilon
over epochs for DP runs, one history after a crash and --resume, and a missing package exits 2
naming the extra."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, Crash, crash_at
from safelm import Config, train_run
from safelm.cli import main
from safelm.monitor import scalars

DP = ["train.task=classify", "model.dropout=0.0", "privacy.enabled=true",
      "privacy.noise_multiplier=1.0", "privacy.delta=1e-3", "train.tensorboard=true",
      "train.log_every=1"]


def read_events(run: Path) -> dict[str, list[tuple[int, float]]]:
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(run / "tensorboard"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        _, step, values = scalars(json.loads(line))
        for name, v in values.items():
            out.setdefault(name, []).append((step, v))
    return out


def same_curves(a, b) -> None:
    assert set(a) == set(b)  # event files store float32: values compared to 1e-6
    for tag in a:
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        assert [v for _, v in a[tag]] == pytest.approx([v for _, v in b[tag]], rel=1e-6), tag


def test_scalars_flatten_numbers_only():
    kind, step, v = scalars({"kind": "round", "round": 3, "loss": 0.5, "ok": True, "note": "x",
                             "bytes": {"sent": 10, "received": 4}, "nan": float("nan")})
    assert (kind, step) == ("round", 3)
    assert v == {"round/loss": 0.5, "round/bytes.sent": 10.0, "round/bytes.received": 4.0}


@pytest.mark.slow
def test_tensorboard_mirrors_metrics_with_epsilon_and_survives_resume(cls_csv, tmp_path,
                                                                       monkeypatch):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train_run(cls_csv, Config.load(None, TINY + DP + ["train.epochs=2"]), run)
    tb, js = read_events(run), jsonl_curves(run)
    same_curves(tb, js)
    assert {"step/loss", "step/lr", "epoch/val_loss", "epoch/val_accuracy",
            "epoch/tokens_per_s", "epoch/epsilon"} <= set(tb)
    eps = [v for _, v in tb["epoch/epsilon"]]
    ledger = json.loads((run / "privacy.json").read_text())["epsilon"]
    assert len(eps) == 2 and eps[0] < eps[1] and eps[1] == pytest.approx(ledger, rel=1e-5)

    # crash after a checkpoint, resume: the curves hold one history, like metrics.jsonl
    uncrash = crash_at(monkeypatch, 5)
    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        train_run(cls_csv, Config.load(None, TINY + DP + ["train.epochs=2",
                                                         "train.checkpoint_every=3"]), cut)
    uncrash()
    assert max(s for s, _ in read_events(cut)["step/loss"]) == 5  # logged past the checkpoint
    train_run(cls_csv, None, cut, resume=True)
    tb, js = read_events(cut), jsonl_curves(cut)
    same_curves(tb, js)
    steps = [s for s, _ in tb["step/loss"]]
    assert steps == sorted(set(steps)) and steps[0] == 1  # no step twice, none missing at 4-5


def test_missing_tensorboard_exits_2_naming_the_extra(cls_csv, tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    rc = main(["train", "--data", str(cls_csv), "--task", "classify", "--out",
               str(tmp_path / "run"), *sum((["--set", s] for s in TINY), []),
               "--set", "train.tensorboard=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'safelm[monitor]'" in err[0], err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_mlflow_store_holds_the_metrics(cls_csv, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    run = tmp_path / "run"
    train_run(cls_csv, Config.load(None, TINY + ["train.task=classify", "train.mlflow=true",
                                                 "train.log_every=1"]), run)
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("safelm").experiment_id])
    assert r.info.run_name == "run" and r.info.status == "FINISHED"
    js = jsonl_curves(run)
    assert set(r.data.metrics) == {k.replace("/", "_") for k in js}
    for tag, curve in js.items():
        hist = client.get_metric_history(r.info.run_id, tag.replace("/", "_"))
        assert sorted((m.step, m.value) for m in hist) == sorted(curve), tag
    assert not (tmp_path / "mlruns").exists() and not (Path.cwd() / "mlruns").exists()


def test_missing_mlflow_exits_2_naming_the_extra(cls_csv, tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    rc = main(["train", "--data", str(cls_csv), "--out", str(tmp_path / "run"),
               "--set", "train.mlflow=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'safelm[mlflow]'" in err[0], err
    assert not (tmp_path / "run").exists()
