"""The clip-rule registry of the one-backward clipping (safelm/privacy/bk.py): a new layer
type is one registered function, exact against an independent float64 vmap(grad) reference;
frozen parameters are left out of clipping; an unregistered trainable layer is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from safelm.privacy import bk
from safelm.privacy.bk import BKGradSampleModule, register_clip_rule


class Scale(nn.Module):
    """y = x * w (an RMSNorm-like gain): per-sample grad of w = sum over positions of x * g."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.5 + 1.0)

    def forward(self, x):
        return x * self.weight


class RawLinear(nn.Module):
    """A bias-free projection through F.linear on its own Parameter (not an nn.Linear)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.3)

    def forward(self, x):
        return F.linear(x, self.weight)


class Unregistered(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x + self.shift


@pytest.fixture
def rules():
    """Register the two test rules for one test only."""
    @register_clip_rule(Scale)
    def scale_rule(b, module, a, g):
        if b.trainable(module.weight):
            b.add_per_unit_grad(module.weight, b.per_unit(a * g, 1).sum(1))

    @register_clip_rule(RawLinear)
    def raw_rule(b, module, a, g):
        if b.trainable(module.weight):
            b.add_gemm_pair(module.weight, b.per_unit(a, 1), b.per_unit(g, 1))
    yield
    for t in (Scale, RawLinear):
        bk.CLIP_RULES.pop(t, None)


class Net(nn.Module):
    def __init__(self, frozen_first: bool = False):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.first = nn.Linear(8, 8)
        self.scale = Scale(8)
        self.raw = RawLinear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        if frozen_first:
            self.first.weight.requires_grad_(False)
            self.emb.weight.requires_grad_(False)

    def forward(self, idx):
        h = torch.tanh(self.first(self.emb(idx)))
        return self.head(self.ln(self.raw(self.scale(h)))).mean(1)


def loss_fn(model, idx, y):
    return F.cross_entropy(model(idx), y)


def reference(model, idx, y, C):
    """float64 per-sample gradients of the trainable parameters, clipped to C and summed."""
    train = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def one(p, i, t):
        return loss_fn(lambda a: functional_call(model, {**p, **frozen}, (a,)), i[None], t[None])
    per = vmap(grad(one), in_dims=(None, 0, 0))(train, idx, y)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per.values()))
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    return norms, {k: (g * c.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per.items()}


@pytest.mark.parametrize("frozen_first", [False, True])
def test_registered_rules_are_exact_against_vmap_grad(rules, frozen_first):
    torch.manual_seed(0)
    model = Net(frozen_first).double()
    idx, y = torch.randint(0, 20, (7, 5)), torch.randint(0, 3, (7,))
    norms, want = reference(model, idx, y, C=0.2)
    assert bk.supports(model)
    wrapped = BKGradSampleModule(model, 0.2)
    (loss_fn(wrapped, idx, y) * 1.0).backward()
    got_norms = wrapped.clip_and_sum()
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        if name in want:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-12)
        else:  # frozen: no gradient, still frozen after the forward pass
            assert p.grad is None and not p.requires_grad, name
    assert (norms > 0.2).any(), "the test must clip some samples"


def test_an_unregistered_trainable_layer_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), Unregistered(4))
    assert not bk.supports(model)
    assert "no clip rule for Unregistered" in bk.unsupported_layers(model)[0]
    with pytest.raises(ValueError, match="Unregistered"):
        BKGradSampleModule(model, 1.0)
    model[1].shift.requires_grad_(False)  # control: frozen, so nothing to clip there
    assert bk.supports(model)
