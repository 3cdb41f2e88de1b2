"""The GPU path: training, DP (one-backward clipping and Opacus' hooks), bf16, predict and a
federated client's round on CUDA. Marked ``cuda``; every test skips without a CUDA device
(CI has none)."""

from __future__ import annotations

import json

import pytest
import torch

from safelm import Config, load_run, train_run
from safelm.api import predictions_table
from safelm.config import ModelConfig
from safelm.model import build_model
from safelm.privacy.bk import BKGradSampleModule
from safelm.trainer import batch_loss
from conftest import TINY
from test_privacy import T, V, make_batch, reference_per_sample

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

DP = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3",
      "train.task=classify", "train.device=cuda", "train.epochs=1"]


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_bk_clipping_on_cuda_matches_the_float64_cpu_reference(task):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2, block_size=T, vocab_size=V,
                      dropout=0.0, tie_weights=True, num_classes=3)
    model = build_model(cfg, task).double()
    batch = make_batch(6, task, seed=2)
    ref = reference_per_sample(model, batch, task)
    norms_ref = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    C = float(norms_ref.median())
    factor = (C / (norms_ref + 1e-6)).clamp(max=1.0)
    model = model.cuda()
    wrapped = BKGradSampleModule(model, C)
    batch_loss(wrapped, tuple(t.cuda() for t in batch), task)[0].backward()
    norms = wrapped.clip_and_sum()
    assert norms.is_cuda
    torch.testing.assert_close(norms.cpu(), norms_ref, rtol=1e-10, atol=1e-12)
    for k, p in model.named_parameters():
        want = (ref[k] * factor.view(-1, *[1] * (ref[k].dim() - 1))).sum(0)
        torch.testing.assert_close(p.grad.cpu(), want, rtol=1e-8, atol=1e-11, msg=k)


@pytest.mark.parametrize("extra", [[], ["privacy.grad_sample_mode=hooks"],
                                   ["train.precision=bf16"]])
def test_dp_training_and_predict_run_on_cuda(cls_csv, tmp_path, extra):
    final = train_run(cls_csv, Config.load(None, TINY + DP + extra), tmp_path / "run")
    assert torch.isfinite(torch.tensor(final["train_loss"]))
    ledger = json.loads((tmp_path / "run/privacy.json").read_text())
    assert ledger["steps"] > 0
    run = load_run(tmp_path / "run", device="cuda")
    assert next(run.model.parameters()).is_cuda
    table = predictions_table(run, cls_csv)
    assert len(table) == 120 and table["y_pred"].notna().all()


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_a_federated_client_round_runs_on_cuda(dp):
    client_round("cuda", dp)


def client_round(device: str, dp: bool) -> None:
    """One client's round as federation/client_app.py runs it, on ``device``: weights in from
    the wire (CPU arrays), local training (sample-level DP-SGD too), weights out to CPU
    arrays, then the server's central evaluation on ``device``."""
    from pathlib import Path

    from federation import task
    from federation.local import app_run_config
    from federation.settings import parse_run_config
    settings = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "corpus-size=600",
                "client-threads=1", f'train.device="{device}"']
    if dp:
        settings += ["privacy.enabled=true", "privacy.noise_multiplier=1.0",
                     "privacy.delta=1e-3"]
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    cfg, fed = parse_run_config(app_run_config(pyproject, settings))
    server = task.server_data(cfg, fed)
    cfg = server.cfg
    start = task.get_weights(task.new_model(cfg))  # what the server sends
    tok_json = task.tokenizer_to_json(server.tokenizer)
    data = task.client_data(cfg, tok_json, fed, 0, 2, {})
    model = task.new_model(cfg)
    task.set_weights(model, start)
    privacy = task.client_privacy(cfg, server.tokenizer, data, epochs=1, rounds=1, seed=3,
                                  state=None) \
        if dp else None
    stats = task.train_local(model, cfg, data, epochs=1, server_round=1, seed=3,
                             privacy=privacy)
    assert stats["steps"] > 0 and torch.isfinite(torch.tensor(stats["train_loss"]))
    assert next(model.parameters()).device.type == device
    if dp:
        assert 0 < privacy.epsilon() < float("inf")
    arrays = task.get_weights(model)  # back on the wire: CPU arrays
    fresh = task.new_model(cfg)
    task.set_weights(fresh, arrays)
    moved = any(not torch.equal(a, b) for a, b in zip(
        fresh.state_dict().values(), task.new_model(cfg).state_dict().values()))
    assert moved  # the CUDA training's update reached the CPU copy
    metrics, _ = task.evaluate(fresh, cfg, server.tokenizer, server.test_rows, server.test_enc)
    assert next(fresh.parameters()).device.type == device and metrics["loss"] > 0
