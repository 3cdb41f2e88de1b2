"""The task bridge: weights on the wire, FedProx through the one Trainer, attacks, counts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from federation import fairness, task
from federation.local import app_run_config
from federation.settings import parse_run_config
from federation.testing.faults import poison
from safelm.api import Run, predictions_table
from safelm.config import Config
from safelm.data import Batch
from safelm.trainer import batch_loss

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "corpus-size=600",
        "client-threads=1", "model.dropout=0.0"]


@pytest.fixture(scope="module")
def setup():
    cfg, fed = parse_run_config(app_run_config(PYPROJECT, TINY))
    data = task.server_data(cfg, fed)
    return data, fed


def test_weights_round_trip_once_per_tied_tensor():
    cfg = Config.load(None, ["model.n_layer=1", "model.d_model=32", "model.n_head=2",
                             "model.vocab_size=300"])
    model = task.new_model(cfg)  # LM: head.weight is tok_emb.weight
    arrays = task.get_weights(model)
    assert "head.weight" not in arrays and "tok_emb.weight" in arrays
    other = task.new_model(Config.from_dict({**cfg.to_dict(), "train": {"seed": 7}}))
    assert not torch.equal(other.tok_emb.weight, model.tok_emb.weight)
    task.set_weights(other, arrays)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert other.head.weight is other.tok_emb.weight  # tying survived


def test_fedprox_hook_equals_the_proximal_loss_gradient(setup):
    data, fed = setup
    cfg = data.cfg
    model = task.new_model(cfg)
    cd = task.client_data(cfg, task.tokenizer_to_json(data.tokenizer), fed, 0, 3, {})
    batch = next(iter(torch.utils.data.DataLoader(cd.train_set, batch_size=8,
                                                  collate_fn=Batch.collate)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # move away from the anchor so the proximal term is not zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mu = 0.3
    # oracle: autograd of loss + mu/2 ||w - w_g||^2
    model.zero_grad()
    loss, _ = batch_loss(model, batch, "classify")
    prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
    (loss + mu / 2 * prox).backward()
    want = [p.grad.clone() for p in model.parameters()]
    # the hook path: plain loss, proximal gradient added by tensor hooks
    model.zero_grad()
    with torch.no_grad():
        saved = [p.detach().clone() for p in model.parameters()]
        for p, a in zip(model.parameters(), anchor):
            p.copy_(a)
    handles = task._proximal_hooks(model, mu)  # anchors = current (global) weights
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    loss, _ = batch_loss(model, batch, "classify")
    loss.backward()
    for h in handles:
        h.remove()
    for w, p in zip(want, model.parameters()):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


def test_poison_signflip_and_scale():
    cfg = Config.load(None, ["model.n_layer=1", "model.d_model=16", "model.n_head=2",
                             "model.vocab_size=300"])
    g = task.get_weights(task.new_model(cfg))
    w_model = task.new_model(cfg)
    with torch.no_grad():
        for p in w_model.parameters():
            p.add_(1.0)
    w = task.get_weights(w_model)
    for attack, factor in (("signflip", -3.0), ("scale", 3.0)):
        out = poison(g, w, attack, 3.0).to_torch_state_dict()
        gs, ws = g.to_torch_state_dict(), w.to_torch_state_dict()
        for k in ws:
            torch.testing.assert_close(out[k] - gs[k], factor * (ws[k] - gs[k]))


def test_group_counts_reproduce_the_central_predictions_table(setup, tmp_path):
    """Summing two clients' counts gives exactly the per-group accuracy of the global
    model's predictions table on the union of their rows (the fairness oracle)."""
    data, fed = setup
    cfg, tok = data.cfg, data.tokenizer
    model = task.new_model(cfg)
    tj = task.tokenizer_to_json(tok)
    parts, rows = [], []
    for pid in range(2):
        cd = task.client_data(cfg, tj, fed, pid, 2, {})
        metrics, counts = task.evaluate(model, cfg, tok, cd.val_rows, cd.val_enc)
        assert set(metrics) == {"loss", "accuracy", "macro_f1"}
        parts.append(counts)
        rows.append(cd.val_rows)
    got = {(m["column"], m["group"]): m for m in
           fairness.group_metrics(fairness.add_counts(parts), "classify")}
    union = pd.concat(rows, ignore_index=True)
    f = tmp_path / "union.csv"
    union.to_csv(f, index=False)
    model.eval()
    table = predictions_table(Run(cfg, tok, model, tmp_path), f)
    table["correct"] = table["y_true"] == table["y_pred"]
    table["pos"] = table["y_pred"] == cfg.data.labels[1]
    for col in cfg.data.group_cols:
        for value, g in table.groupby(col):
            m = got[(col, value)]
            assert m["n"] == len(g)
            assert m["accuracy"] == pytest.approx(g["correct"].mean(), abs=1e-12)
            assert m["selection_rate"] == pytest.approx(g["pos"].mean(), abs=1e-12)
            assert m["nll"] == pytest.approx(g["nll"].mean(), rel=1e-6)
    gaps = fairness.disparities(list(got.values()))
    assert gaps["gender"]["accuracy_difference"] == pytest.approx(
        table.groupby("gender")["correct"].mean().pipe(lambda s: s.max() - s.min()))


def _fresh_python(code: str) -> list[str]:
    """What ``code`` prints, run in a new interpreter (imports start from nothing)."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()


def test_flower_apps_load_without_opacus():
    """Every Flower process (ServerApp, each Ray actor) imports these modules at start-up;
    Opacus adds ~1 s there and only DP runs and the LSTM need it, which import it when used.
    A control: building the LSTM does import it."""
    assert _fresh_python("import sys, federation.server_app, federation.client_app, "
                         "safelm.model; print('opacus' in sys.modules); "
                         "from safelm.config import ModelConfig; "
                         "safelm.model.build_model(ModelConfig(arch='lstm'), 'lm'); "
                         "print('opacus' in sys.modules)") == ["False", "True"]


def test_flower_app_modules_load_without_torch():
    """Flower's simulation process loads both app modules (under one import lock) before it
    starts Ray; torch imported there held Ray back by its import time. The apps import torch
    when they run. A control: running federation.server's module does import it."""
    assert _fresh_python("import sys, federation.server_app, federation.client_app; "
                         "print('torch' in sys.modules); import federation.server; "
                         "print('torch' in sys.modules)") == ["False", "True"]


def test_evaluation_needs_no_optimizer_and_matches_the_trainer():
    """task.evaluate (the server's central evaluation) gives Trainer.evaluate's numbers
    without building a Trainer, whose AdamW would import torch._dynamo (~0.8 s)."""
    assert _fresh_python("""
import sys
from pathlib import Path
from federation.local import app_run_config
from federation.settings import parse_run_config
from federation import task
from safelm.data import BlockDataset
from safelm.trainer import Trainer
rc = app_run_config(Path('pyproject.toml'), ['corpus-size=400', 'model.n_layer=1',
                                            'model.d_model=32', 'model.n_head=4'])
cfg, fed = parse_run_config(rc)
data = task.server_data(cfg, fed)
model = task.new_model(data.cfg)
got, _ = task.evaluate(model, data.cfg, data.tokenizer, data.test_rows, data.test_enc)
print('torch._dynamo' in sys.modules)
ds = BlockDataset(data.test_enc)
want = Trainer(model, data.cfg.train, ds, ds, num_classes=data.cfg.model.num_classes).evaluate(ds)
print('torch._dynamo' in sys.modules)
print(got == want and set(got) == {'loss', 'accuracy', 'macro_f1'})
""") == ["False", "True", "True"]


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet-group", "natural"])
def test_client_rows_read_in_pieces_equal_the_whole_read(setup, partitioning, monkeypatch,
                                                         tmp_path):
    """Oracle: the old whole-file computation (load_rows, split_rows, the pool of train then
    val rows, partition_rows). The client's rows, read in two streaming passes of 7-row
    pieces, are the same rows in the same order, for every client; each file row lands in at
    most one client, and every pool row in one."""
    import functools

    from safelm.data import load_rows, read_splits, split_rows
    data, fed = setup
    cfg = Config.from_dict(data.cfg.to_dict())
    path = task.data_path(fed)
    csv = tmp_path / "d.csv"
    pd.read_csv(path, dtype=str, keep_default_na=False).to_csv(csv, index=False)
    if partitioning == "natural":
        cfg.data.user_col = "user" if "user" in pd.read_csv(csv, nrows=1).columns else None
        if cfg.data.user_col is None:
            pytest.skip("the bundled corpus has no user column")
    fed = type(fed).from_values({**fed.values, "partitioning": partitioning})
    monkeypatch.setattr(task, "read_splits", functools.partial(read_splits, chunk_rows=7))
    rows = load_rows(csv, cfg.data, cfg.train.task)
    splits = split_rows(rows, cfg.data, cfg.train.seed)
    pool = pd.concat([splits["train"].assign(_split="train"),
                      splits["val"].assign(_split="val")], ignore_index=True)
    owner = task.partition_rows(cfg, fed, pool, 3)
    seen = []
    for pid in range(3):
        spec = {"path": str(csv), "own_file": False, "pid": pid, "n": 3, "fed": fed.values}
        train, val = task._client_rows(spec, cfg)
        mine = pool[owner == pid]
        for got, name in ((train, "train"), (val, "val")):
            want = mine[mine["_split"] == name].drop(columns="_split").reset_index(drop=True)
            pd.testing.assert_frame_equal(got, want)
            seen += list(got["example_id"])
    assert sorted(seen) == sorted(pool["example_id"])  # a partition of the pool
    spec = {"path": str(csv), "own_file": True, "pid": 0, "n": 3, "fed": fed.values}
    train, val = task._client_rows(spec, cfg)
    pd.testing.assert_frame_equal(train, splits["train"])
    pd.testing.assert_frame_equal(val, splits["val"])
