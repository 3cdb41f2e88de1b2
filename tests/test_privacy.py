"""DP-SGD: oracle tests for per-sample clipping, DP == plain training without noise or clip,
the budget, the ledger, empty Poisson batches, user-level DP, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from safelm import Config, train_run
from safelm.config import ModelConfig, PrivacyConfig
from safelm.data import BlockDataset, Encoded
from safelm.errors import UserError
from safelm.model import build_model
from safelm.privacy import DifferentialPrivacy, recompute_epsilon, resolve_mode
from safelm.privacy.bk import BKGradSampleModule
from safelm.trainer import Trainer, batch_loss
from conftest import TINY

V, T = 300, 10


def make_batch(B: int, task: str, seed: int = 0, vocab: int = V, block: int = T):
    g = torch.Generator().manual_seed(seed)
    V, T = vocab, block
    x = torch.randint(3, V, (B, T), generator=g)
    x[0] = 5  # repeated tokens exercise the embedding ghost norm
    y = torch.randint(3, V, (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    if task == "lm":
        y[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = -100
        labels = torch.full((B,), -1)
    else:
        labels = torch.randint(0, 3, (B,), generator=g)
    return x, y, lengths, labels


def reference_per_sample(model: nn.Module, batch, task: str) -> dict[str, torch.Tensor]:
    """Independent float64 per-sample gradients: torch.func vmap of grad of one row's loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, y, n, lab):
        f = lambda *a: functional_call(model, p, a)  # noqa: E731
        return batch_loss(f, (x[None], y[None], n[None], lab[None]), task)[0]
    return vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(params, *batch)


def model_cfg(arch: str, tie: bool) -> ModelConfig:
    return ModelConfig(arch=arch, n_layer=2, d_model=32, n_head=4, block_size=T, vocab_size=V,
                       dropout=0.0, tie_weights=tie, num_classes=3)


@pytest.mark.parametrize("task", ["lm", "classify"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_clipped_sum_equals_float64_per_sample_reference(task, tie, mode):
    torch.manual_seed(0)
    model = build_model(model_cfg("transformer", tie), task).double()
    batch = make_batch(6, task)
    ref = reference_per_sample(model, batch, task)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    C = float(norms.median())  # about half the samples get clipped
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    expected = {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in ref.items()}
    if mode == "bk":
        wrapped = BKGradSampleModule(model, C)
        batch_loss(wrapped, batch, task)[0].backward()
        got_norms = wrapped.clip_and_sum()
        torch.testing.assert_close(got_norms, norms, rtol=1e-12, atol=1e-12)
        got = {k: p.grad for k, p in model.named_parameters()}
    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                          max_grad_norm=C, expected_batch_size=6, loss_reduction="sum")
        batch_loss(wrapped, batch, task)[0].backward()
        opt.pre_step()
        got = {k: p.grad for k, p in model.named_parameters()}
    scale = max(float(e.abs().max()) for e in expected.values())
    for k in expected:
        assert float((got[k] - expected[k]).abs().max()) <= 1e-12 * scale, k


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_lstm_uses_hooks_and_matches_reference(task):
    torch.manual_seed(0)
    model = build_model(model_cfg("lstm", False), task).double()
    assert resolve_mode(model, "auto") == "hooks"
    batch = make_batch(5, task)
    ref = reference_per_sample(model, batch, task)
    from opacus import GradSampleModule
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    batch_loss(wrapped, batch, task)[0].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, ref[name], rtol=1e-8, atol=1e-10, msg=name)


def test_every_sample_is_clipped_to_the_bound():
    torch.manual_seed(1)
    model = build_model(model_cfg("transformer", True), "lm").double()
    batch = make_batch(8, "lm", seed=3)
    ref = reference_per_sample(model, batch, "lm")
    C = 0.05  # far below every norm: all clipped
    wrapped = BKGradSampleModule(model, C)
    batch_loss(wrapped, batch, "lm")[0].backward()
    norms = wrapped.clip_and_sum()
    assert (norms > C).all()
    clipped = [torch.sqrt(sum((g[i] * C / (norms[i] + 1e-6)).square().sum() for g in ref.values()))
               for i in range(8)]
    assert max(float(c) for c in clipped) <= C


def small_cfg(*extra: str, task: str = "classify") -> Config:
    return Config.load(None, TINY + [f"train.task={task}", "model.dropout=0.0", *extra])


def test_zero_noise_unbounded_clip_equals_plain_training_step_for_step(cls_csv, tmp_path):
    """With noise 0 and a huge clip, a DP step on the same batch is the plain step.

    In float64: the key bias's gradient is zero up to rounding (softmax ignores a shift of all
    scores), and AdamW divides it by its own size, so in float32 any summation order other than
    autograd's own turns rounding noise into 1e-6-sized parameter differences."""
    from safelm.api import prepare
    cfg = small_cfg("train.epochs=1")
    prep = prepare(cls_csv, cfg)
    torch.manual_seed(0)
    m_plain = build_model(cfg.model, "classify").double()
    m_dp = build_model(cfg.model, "classify").double()
    m_dp.load_state_dict(m_plain.state_dict())
    cfg.train.grad_clip = 0.0
    plain = Trainer(m_plain, cfg.train, prep.dataset("train"), num_classes=2)
    pcfg = PrivacyConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=1e9, delta=1e-5)
    n = len(prep.dataset("train"))
    dp = Trainer(m_dp, cfg.train, prep.dataset("train"), num_classes=2,
                 privacy=DifferentialPrivacy(pcfg, n_units=n, batch_size=8))
    B = dp.privacy.expected_batch_size
    enc = prep.encoded["train"]
    for step in range(5):
        idx = torch.arange(step * B, (step + 1) * B)
        batch = (enc.input_ids[idx], enc.targets[idx], enc.lengths[idx], enc.labels[idx])
        for tr in (plain, dp):
            loss, _ = batch_loss(tr.model, batch, "classify")
            tr.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            tr.optimizer.step()
        for (k, a), b in zip(m_plain.named_parameters(), m_dp.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step} {k}")


def test_ledger_recomputes_and_budget_is_never_exceeded(cls_csv, tmp_path):
    cfg = small_cfg("train.epochs=2", "privacy.enabled=true", "privacy.target_epsilon=2",
                    "privacy.delta=1e-3", "privacy.accountant=rdp")
    train_run(cls_csv, cfg, tmp_path / "r")
    ledger = json.loads((tmp_path / "r/privacy.json").read_text())
    assert {"epsilon", "delta", "accountant", "unit", "sampling", "max_grad_norm", "history",
            "target_epsilon"} <= set(ledger)
    assert ledger["unit"] == "example" and ledger["sampling"] == "poisson"
    assert ledger["epsilon"] <= 2.0
    assert recompute_epsilon(ledger) == pytest.approx(ledger["epsilon"], rel=1e-9)
    assert sum(h[2] for h in ledger["history"]) == ledger["steps"] > 0
    # Continue past the plan: the engine refuses the step that would cross the target.
    p = DifferentialPrivacy(cfg.privacy, n_units=100, batch_size=10, epochs=1)
    taken = 0
    while p.can_step():
        p.accountant.step(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate)
        taken += 1
        assert taken < 10_000
    assert taken >= p.steps_planned
    assert p.epsilon() <= 2.0 < p.epsilon(extra_steps=1)


def test_budget_stop_is_reported_and_resume_continues_the_ledger(cls_csv, tmp_path):
    cfg = small_cfg("train.epochs=2", "train.checkpoint_every=3", "privacy.enabled=true",
                    "privacy.noise_multiplier=1.0", "privacy.delta=1e-3")
    train_run(cls_csv, cfg, tmp_path / "full")
    full = json.loads((tmp_path / "full/privacy.json").read_text())
    # A resumed run's ledger continues from resume/ (same steps, same epsilon).
    import shutil
    shutil.copytree(tmp_path / "full", tmp_path / "again")
    state = json.loads((tmp_path / "again/resume/state.json").read_text())
    assert state["privacy"]["history"] == full["history"]
    train_run(cls_csv, None, tmp_path / "again", resume=True)
    again = json.loads((tmp_path / "again/privacy.json").read_text())
    assert again["steps"] == full["steps"] and again["epsilon"] == pytest.approx(full["epsilon"])


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_empty_poisson_batches_do_not_crash_and_are_accounted(tmp_path, arch):
    """4 examples, expected batch 1: about a third of the Poisson batches are empty."""
    cfg = model_cfg(arch, False)
    torch.manual_seed(0)
    model = build_model(cfg, "classify")
    x, y, lengths, labels = make_batch(4, "classify")
    enc = Encoded.from_tensors(x, torch.zeros(4, 0, dtype=torch.long), lengths, labels,
                               torch.arange(4))
    tcfg = Config.load(None, ["train.task=classify", "train.epochs=10", "train.batch_size=1",
                              "train.progress=off"]).train
    pcfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-3)
    dp = DifferentialPrivacy(pcfg, n_units=4, batch_size=1, epochs=10)
    tr = Trainer(model, tcfg, BlockDataset(enc), privacy=dp, num_classes=3)
    sizes = []
    orig = tr._to_device
    tr._to_device = lambda b: (sizes.append(b[0].shape[0]), orig(b))[1]
    before = [p.detach().clone() for p in model.parameters()]
    for epoch in range(10):
        tr.train_one_epoch(epoch)
    # empty batches happened: Binomial(40, 0.75^4 = 0.32) draws (secret, OS-seeded), mean 12.7;
    # P(fewer than 3) ~ 5e-5, where ">= 5" failed about once in 800 runs
    assert sizes.count(0) >= 3
    assert dp.steps == len(sizes) == 40  # every step accounted, empty ones too
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_user_level_removing_a_user_moves_the_noiseless_update_by_at_most_C():
    torch.manual_seed(0)
    model = build_model(model_cfg("transformer", True), "lm").double()
    R, C = 3, 0.5  # 4 users x 3 rows; user 2 has one real row and two padding rows
    x, y, lengths, labels = make_batch(12, "lm", seed=5)
    y[7:9] = -100
    labels[7:9] = -100

    def update(keep_users: list[int], per_user: bool = True) -> dict[str, torch.Tensor]:
        rows = torch.tensor([u * R + r for u in keep_users for r in range(R)])
        wrapped = BKGradSampleModule(model, C, rows_per_unit=R if per_user else None)
        for p in model.parameters():
            p.grad = None
        batch_loss(wrapped, (x[rows], y[rows], lengths[rows], labels[rows]), "lm")[0].backward()
        norms = wrapped.clip_and_sum()
        wrapped.remove_hooks()
        assert norms.shape == (len(keep_users) * (1 if per_user else R),)
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    def change(per_user: bool) -> list[float]:
        full = update([0, 1, 2, 3], per_user)
        out = []
        for gone in range(4):
            rest = update([u for u in range(4) if u != gone], per_user)
            out.append(math.sqrt(sum(float((full[k] - rest[k]).square().sum()) for k in full)))
        return out

    assert max(change(per_user=True)) <= C + 1e-9
    # Control: clipping each row on its own (example-level) lets a 3-row user move it past C.
    assert max(change(per_user=False)) > 1.5 * C


@pytest.mark.parametrize("setting,needle", [
    ("privacy.target_epsilon=0", "privacy.target_epsilon"),
    ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
    ("privacy.delta=0", "privacy.delta"),
    ("privacy.delta=1.5", "privacy.delta"),
    ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
    ("privacy.delta=0.5", "1/N"),
])
def test_bad_privacy_settings_exit_2(cls_csv, tmp_path, capsys, setting, needle):
    from safelm.cli import main
    args = ["train", "--data", str(cls_csv), "--task", "classify", "--out", str(tmp_path / "r"),
            "--set", "privacy.enabled=true"]
    if "target_epsilon" not in setting:
        args += ["--set", "privacy.target_epsilon=3"]
    for s in TINY + [setting]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (tmp_path / "r").exists()


def test_layer_opacus_cannot_handle_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    p = DifferentialPrivacy(PrivacyConfig(enabled=True, noise_multiplier=1.0), n_units=100,
                            batch_size=10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(100, 4)))
    with pytest.raises(UserError, match="Opacus cannot make private"):
        p.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
