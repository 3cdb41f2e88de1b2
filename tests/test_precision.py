"""train.precision=bf16: an autocast forward pass whose DP bookkeeping stays in fp32.

Runs on the CPU (torch's CPU autocast supports bfloat16), so CI checks it without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from safelm import Config, train_run
from safelm.config import ModelConfig
from safelm.errors import ConfigError, UserError
from safelm.model import build_model
from safelm.privacy.bk import BKGradSampleModule
from safelm.trainer import batch_loss
from conftest import TINY
from test_privacy import T, V, make_batch, reference_per_sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_bf16_dp_keeps_norms_and_clipped_sum_in_fp32_close_to_the_exact_ones(task):
    """Under bf16 autocast the layers really compute in bf16 (their outputs are bf16: the
    planted low precision), yet every tensor the clipping keeps, the norms and the clipped
    sum are fp32, and the norms are within bf16's rounding (2%) of the exact float64
    per-sample norms of the same weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2, block_size=T, vocab_size=V,
                      dropout=0.0, tie_weights=True, num_classes=3)
    model = build_model(cfg, task)
    exact = build_model(cfg, task).double()
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    batch = make_batch(6, task, seed=2)
    ref = reference_per_sample(exact, batch, task)
    ref_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    out_dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    wrapped = BKGradSampleModule(model, 1e6)  # no clipping: the sum is the plain gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = batch_loss(wrapped, batch, task)[0]
    loss.backward()
    for h in hooks:
        h.remove()
    assert set(out_dtypes) == {torch.bfloat16}
    kept = [t for cs in wrapped._kept.values() for c in cs for t in (c.a, c.g)
            if t.is_floating_point()] + list(wrapped._small.values())
    assert kept and {t.dtype for t in kept} == {torch.float32}
    norms = wrapped.clip_and_sum()
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), ref_norms, rtol=0.02, atol=0.0)
    names = [n for n, _ in model.named_parameters()]
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    got = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    want = torch.cat([ref[n].sum(0).flatten() for n in names])  # the whole gradient vector
    assert float((got - want).norm() / want.norm()) < 0.05


def test_bf16_training_runs_and_is_recorded(cls_csv, tmp_path):
    """A seeded bf16 run trains (finite, falling loss) and differs from the same fp32 run
    (the autocast really ran); the config says bf16; weights stay fp32."""
    from safetensors.torch import load_file
    extra = ["train.task=classify", "train.epochs=2", "model.dropout=0.0"]
    runs = {}
    for precision in ("fp32", "bf16"):
        train_run(cls_csv, Config.load(None, TINY + extra + [f"train.precision={precision}"]),
                  tmp_path / precision)
        runs[precision] = load_file(str(tmp_path / precision / "model.safetensors"))
    steps = [json.loads(line)["loss"] for line in (tmp_path / "bf16/metrics.jsonl")
             .read_text().splitlines() if '"kind": "step"' in line]
    assert all(map(torch.isfinite, torch.tensor(steps)))
    assert sum(steps[-4:]) < sum(steps[:4])
    assert any(not torch.equal(runs["fp32"][k], runs["bf16"][k]) for k in runs["fp32"])
    assert json.loads((tmp_path / "bf16/config.json").read_text())["train"]["precision"] == "bf16"
    assert {t.dtype for t in runs["bf16"].values()} == {torch.float32}


def test_bf16_refuses_opacus_modes_and_bad_values(cls_csv, tmp_path):
    with pytest.raises(ConfigError, match="train.precision"):
        Config.load(None, TINY + ["train.precision=fp16"]).validate()
    c = Config.load(None, TINY + ["train.task=classify", "privacy.enabled=true",
                                  "privacy.noise_multiplier=1.0", "privacy.delta=1e-3",
                                  "privacy.grad_sample_mode=hooks", "train.precision=bf16"])
    with pytest.raises(UserError, match="train.precision=bf16 under DP"):
        train_run(cls_csv, c, tmp_path / "run")
