"""The one-backward clipping's less travelled paths, and logical batches split into physical
ones (privacy.max_physical_batch_size): same noiseless clipped update, same accounting."""

from __future__ import annotations

import pytest
import torch

from safelm import Config
from safelm.config import ModelConfig, PrivacyConfig
from safelm.data import BlockDataset, Encoded
from safelm.errors import UserError
from safelm.model import build_model
from safelm.privacy import DifferentialPrivacy
from safelm.privacy.bk import BKGradSampleModule
from safelm.trainer import Trainer, batch_loss
from test_privacy import T, V, make_batch, reference_per_sample


def _clip_matches_reference(cfg: ModelConfig, batch, task: str, rows_per_unit,
                            before_clip=None) -> None:
    """One-backward norms and clipped sums of ``cfg``'s model equal the float64 vmap(grad)
    reference (median clip: half the units clipped); ``before_clip(model, wrapped)`` may
    inspect which path each parameter took."""
    torch.manual_seed(0)
    model = build_model(cfg, task).double()
    ref = reference_per_sample(model, batch, task)
    if rows_per_unit:  # a unit's gradient is the sum of its rows' gradients
        ref = {k: g.reshape(-1, rows_per_unit, *g.shape[1:]).sum(1) for k, g in ref.items()}
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    C = float(norms.median())
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    wrapped = BKGradSampleModule(model, C, rows_per_unit=rows_per_unit)
    batch_loss(wrapped, batch, task)[0].backward()
    if before_clip is not None:
        before_clip(model, wrapped)
    got_norms = wrapped.clip_and_sum()
    torch.testing.assert_close(got_norms, norms, rtol=1e-12, atol=1e-12)
    for k, p in model.named_parameters():
        expected = (ref[k] * factor.view(-1, *[1] * (ref[k].dim() - 1))).sum(0)
        torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-13, msg=k)


@pytest.mark.parametrize("task", ["lm", "classify"])
@pytest.mark.parametrize("rows_per_unit", [None, 2])
def test_materialized_norms_match_reference(task, rows_per_unit):
    """d_model 8 < T: materializing per-sample gradients is cheaper than the ghost norm for
    every Linear, so this exercises that path (the tests in test_privacy.py take the ghost
    path), with the tied head and embedding and with units of two rows."""
    cfg = ModelConfig(n_layer=1, d_model=8, n_head=2, block_size=T, vocab_size=V, dropout=0.0,
                      tie_weights=True, num_classes=3)
    _clip_matches_reference(cfg, make_batch(6, task, seed=2), task, rows_per_unit)


@pytest.mark.parametrize("task", ["lm", "classify"])
@pytest.mark.parametrize("rows_per_unit", [None, 2])
def test_materialized_tied_embedding_and_head_match_reference(task, rows_per_unit):
    """A small vocabulary at a long context (V 20, T 16, d 8): the tied embedding/head weight
    and every Linear are materialized per unit (the planted path: they land among the
    per-unit gradients, not the kept (A, G) pairs), the tied weight's two contributions
    summed without a cross term; norms and clipped sums equal the float64 reference."""
    cfg = ModelConfig(n_layer=1, d_model=8, n_head=2, block_size=16, vocab_size=20,
                      dropout=0.0, tie_weights=True, num_classes=3)

    def took_the_materialized_path(model, wrapped):
        names = {p: k for k, p in model.named_parameters()}
        assert model.tok_emb.weight in wrapped._small
        # nothing else took the ghost path (a classifier's head reads one position)
        assert {names[p] for p in wrapped._kept} == (set() if task == "lm" else {"head.weight"})
    _clip_matches_reference(cfg, make_batch(6, task, seed=5, vocab=20, block=16), task,
                            rows_per_unit, took_the_materialized_path)


def _trainer(arch: str, physical: int, n: int = 40, batch_size: int = 8, noise: float = 0.0,
             clip: float = 0.05, epochs: int = 1, users=None, rows: int = 1):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, n_layer=1, d_model=16, n_head=2, block_size=T,
                                    vocab_size=V, dropout=0.0, num_classes=3), "classify")
    model = model.double()
    x, y, lengths, labels = make_batch(n, "classify", seed=4)
    enc = Encoded.from_tensors(x, torch.zeros(n, 0, dtype=torch.long), lengths, labels,
                               torch.arange(n))
    tcfg = Config.load(None, ["train.task=classify", f"train.epochs={epochs}",
                              f"train.batch_size={batch_size}", "train.progress=off"]).train
    pcfg = PrivacyConfig(enabled=True, noise_multiplier=noise, max_grad_norm=clip, delta=1e-3,
                         max_physical_batch_size=physical, reproducible=True,
                         unit="user" if users is not None else "example")
    n_units = len(users) if users is not None else n
    dp = DifferentialPrivacy(pcfg, n_units=n_units, batch_size=batch_size, epochs=epochs,
                             users=users, rows_per_unit=rows)
    tr = Trainer(model, tcfg, BlockDataset(enc), privacy=dp, num_classes=3)
    sizes: list[int] = []
    orig = tr._to_device
    tr._to_device = lambda b: (sizes.append(b[0].shape[0]), orig(b))[1]
    return tr, dp, model, sizes


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_physical_batches_give_the_unsplit_update_and_count_logical_steps(arch):
    """Noise 0, clip small enough that every sample is clipped: splitting each Poisson batch
    into physical batches of 3 rows changes neither the parameters nor the accountant."""
    runs = {}
    for physical in (0, 3):
        tr, dp, model, sizes = _trainer(arch, physical, epochs=2)
        for epoch in range(2):
            tr.train_one_epoch(epoch)
        runs[physical] = (tr, dp, model, sizes)
    (tr0, dp0, m0, s0), (tr3, dp3, m3, s3) = runs[0], runs[3]
    assert max(s3) <= 3 < max(s0) and sum(s3) == sum(s0)  # same rows, smaller pieces
    assert len(s3) > len(s0)
    assert dp3.steps == dp0.steps == tr3.global_step == tr0.global_step == len(s0)
    assert dp3.accountant.history == dp0.accountant.history
    assert dp3.epsilon() == dp0.epsilon()
    for (k, a), b in zip(m0.named_parameters(), m3.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)


def test_empty_batches_under_splitting_take_one_noise_step():
    """4 examples, expected batch 1, physical batches of 1: empty Poisson batches still make
    one (noise-only) step each, and two-row batches are one step of two pieces."""
    tr, dp, model, sizes = _trainer("transformer", 1, n=4, batch_size=1, noise=1.0, epochs=10)
    before = [p.detach().clone() for p in model.parameters()]
    for epoch in range(10):
        tr.train_one_epoch(epoch)
    assert sizes.count(0) >= 5 and max(sizes) == 1
    assert dp.steps == tr.global_step == 40  # logical steps only
    assert len(sizes) > 40  # some logical batches came in several pieces
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_user_level_splits_on_user_boundaries():
    """Users of up to 3 rows, physical batches of at most 7 rows: 2 users (6 rows) a piece,
    and the update equals the unsplit one."""
    users = [[3 * u + r for r in range(3 if u % 2 else 2)] for u in range(12)]
    runs = {}
    for physical in (0, 7):
        tr, dp, model, sizes = _trainer("transformer", physical, n=36, batch_size=18,
                                        users=users, rows=3)
        tr.train_one_epoch(0)
        runs[physical] = (dp, model, sizes)
    (dp0, m0, s0), (dp7, m7, s7) = runs[0], runs[7]
    assert all(s % 3 == 0 and s <= 6 for s in s7) and sum(s7) == sum(s0) and max(s0) > 7
    assert dp7.accountant.history == dp0.accountant.history
    for (k, a), b in zip(m0.named_parameters(), m7.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)
    with pytest.raises(UserError, match="max_physical_batch_size"):
        _trainer("transformer", 2, n=36, batch_size=18, users=users, rows=3)


@pytest.mark.parametrize("physical_batches", [1, 3])
def test_lean_noise_steps_equal_opacus_own(physical_batches):
    """BK's optimizer accumulates, noises and scales without Opacus' copies (internals.LeanSteps):
    from the same generator state it must give Opacus' own update bit for bit, over one and
    over several accumulated physical batches."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from safelm.privacy.internals import LeanSteps
    grads = [[torch.randn(5, 3, generator=torch.Generator().manual_seed(10 * b + i))
              for i in range(2)] for b in range(physical_batches)]
    updates = []
    for cls in (DPOptimizerFastGradientClipping, LeanSteps):
        params = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in range(2)]
        opt = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.3, max_grad_norm=0.7,
                  expected_batch_size=4, generator=torch.Generator().manual_seed(3))
        for b in range(physical_batches):
            for p, g in zip(params, grads[b]):
                p.grad = g.clone()
            opt.accumulate()
        opt.add_noise()
        opt.scale_grad()
        updates.append([p.grad.clone() for p in params])
    for ours, theirs in zip(updates[1], updates[0]):
        assert torch.equal(ours, theirs)
    # and the noise is there: the update is not just the scaled sum
    plain = sum(g[0] for g in grads) / 4
    assert not torch.allclose(updates[1][0], plain)


def test_layer_norm_without_saved_statistics_normalizes_again(monkeypatch):
    """LayerNorm's per-sample gradients come from the mean and rstd autograd saved; where
    those cannot be read the hook normalizes again. Both paths give the same clipped sums."""
    import safelm.privacy.bk as bk
    x = torch.randn(2, 3, 4, requires_grad=True)
    assert bk._saved_stats(torch.nn.LayerNorm(4)(x), x.detach(), 1) is not None  # the fast path
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2, block_size=T, vocab_size=V, dropout=0.0,
                      tie_weights=True)
    batch = make_batch(5, "lm", seed=4)
    grads = []
    for saved in (True, False):
        if not saved:
            monkeypatch.setattr(bk, "_saved_stats", lambda *args: None)
        model = build_model(cfg, "lm").double()
        torch.manual_seed(1)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        wrapped = BKGradSampleModule(model, 0.5)
        batch_loss(wrapped, batch, "lm")[0].backward()
        wrapped.clip_and_sum()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-12, atol=1e-14, msg=k)


def test_per_unit_gradients_are_normed_and_summed_in_either_layout():
    """Oracle: einsum's per-unit gradients G_u^T A_u. When d_in < d_out the gradient is kept
    as the transposed view of the faster A^T G product (planted: not copied into
    [U, d_out, d_in] order); its norms and clipped sum are still exact, as is the sum of any
    other layout (a tied weight's two contributions may differ in layout)."""
    from safelm.privacy.bk import _dot, _per_unit_grad, _unit_weighted_sum
    g64 = torch.Generator().manual_seed(3)
    U, S = 5, 7
    c = torch.rand(U, generator=g64, dtype=torch.float64)
    for d_in, d_out in ((3, 11), (11, 3), (4, 4)):
        a = torch.randn(U, S, d_in, generator=g64, dtype=torch.float64)
        g = torch.randn(U, S, d_out, generator=g64, dtype=torch.float64)
        ref = torch.einsum("usi,uso->uoi", a, g)
        ps = _per_unit_grad(a, g)
        torch.testing.assert_close(ps, ref, rtol=1e-12, atol=1e-12)
        assert ps.is_contiguous() == (d_in >= d_out)  # the transposed view is never copied
        torch.testing.assert_close(_dot(ps, ps), ref.square().sum((1, 2)), rtol=1e-12, atol=0)
        summed = _unit_weighted_sum(c, ps)
        assert summed.is_contiguous() and summed.shape == (d_out, d_in)
        torch.testing.assert_close(summed, torch.einsum("u,uoi->oi", c, ref), rtol=1e-12,
                                   atol=1e-12)
    odd = torch.randn(6, U, 8, generator=g64, dtype=torch.float64).permute(1, 2, 0)[:, ::2]
    torch.testing.assert_close(_unit_weighted_sum(c, odd), torch.einsum("u,uij->ij", c, odd))
    # a tied weight: the embedding's contiguous [U, V, d] plus the head's transposed view
    emb = torch.randn(U, 9, 4, generator=g64, dtype=torch.float64)
    head = _per_unit_grad(torch.randn(U, S, 4, generator=g64, dtype=torch.float64),
                          torch.randn(U, S, 9, generator=g64, dtype=torch.float64))
    tied = emb + head
    torch.testing.assert_close(_unit_weighted_sum(c, tied), torch.einsum("u,uij->ij", c, tied))
    torch.testing.assert_close(_unit_weighted_sum(c, tied),
                               _unit_weighted_sum(c, emb) + _unit_weighted_sum(c, head))
