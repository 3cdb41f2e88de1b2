"""Models: shapes, causality, padding invariance, Opacus compatibility, tying, attention oracle."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator

from safelm.config import ModelConfig
from safelm.model import (CausalSelfAttention, LSTMModel, Transformer, build_model,
                          count_parameters, last_token, positions)

V, T, C, H, L, K = 300, 12, 32, 4, 2, 3
ARCHS = ("transformer", "lstm")
TASKS = ("lm", "classify")


def mcfg(arch="transformer", **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=V, block_size=T, d_model=C, n_head=H, n_layer=L,
                dropout=0.0, num_classes=K)
    base.update(kw)
    return ModelConfig(**base)


def make(arch, task, seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(mcfg(arch, **kw), task)
    # larger random weights than the 0.02 init, so that every dependency is clearly visible
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def rand_ids(B, n=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, n), generator=g)


# ---- shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes(arch):
    lm, cl = make(arch, "lm"), make(arch, "classify")
    for B, n in ((1, 1), (3, 5), (4, T)):
        x = rand_ids(B, n)
        out = lm(x)
        assert out.shape == (B, n, V) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        lengths = torch.full((B,), n)
        assert cl(x, lengths).shape == (B, K)
    assert isinstance(lm, Transformer if arch == "transformer" else LSTMModel)


def test_classify_needs_two_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_model(mcfg(num_classes=1), "classify")
    build_model(mcfg(num_classes=0), "lm")  # control: irrelevant for an LM


def test_transformer_rejects_longer_than_block_size():
    with pytest.raises(AssertionError, match="block_size"):
        make("transformer", "lm")(rand_ids(1, T + 1))


# ---- causality oracle ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_lm_causality(arch):
    model = make(arch, "lm")
    x = rand_ids(2, T)
    with torch.no_grad():
        base = model(x)
        for t in (1, 2, 5, 8, T - 1):
            y = x.clone()
            y[:, t:] = rand_ids(2, T - t, seed=100 + t)  # change every position >= t
            assert (y[:, t:] != x[:, t:]).any()
            out = model(y)
            assert (out[:, :t] - base[:, :t]).abs().max().item() < 1e-6, f"future leaks at t={t}"
            # control: positions >= t do see the change
            assert (out[:, t:] - base[:, t:]).abs().max().item() > 1e-3
            # control: changing only position t-1 changes the logits at t
            z = x.clone()
            z[:, t - 1] = (x[:, t - 1] - 3 + 1) % (V - 3) + 3
            out_z = model(z)
            assert (out_z[:, t] - base[:, t]).abs().max().item() > 1e-3
            if t > 1:
                assert (out_z[:, :t - 1] - base[:, :t - 1]).abs().max().item() < 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_causality_in_train_mode_without_dropout(arch):
    model = make(arch, "lm").train()  # dropout=0, so train mode must be deterministic and causal
    x = rand_ids(2, T)
    y = x.clone()
    y[:, 6:] = 3
    with torch.no_grad():
        assert (model(y)[:, :6] - model(x)[:, :6]).abs().max().item() < 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_classify_ignores_padding_after_lengths(arch):
    model = make(arch, "classify")
    x = rand_ids(3, T)
    lengths = torch.tensor([4, 7, T])
    with torch.no_grad():
        base = model(x, lengths)
        padded = x.clone()
        for b, n in enumerate(lengths.tolist()):
            padded[b, n:] = 0  # pad id
        assert (model(padded, lengths) - base).abs().max().item() < 1e-6
        garbage = x.clone()
        for b, n in enumerate(lengths.tolist()):
            garbage[b, n:] = rand_ids(1, T - n, seed=7 + b)
        assert (model(garbage, lengths) - base).abs().max().item() < 1e-6
        # oracle: pooling reads the last real token, so the same row truncated gives the same
        for b, n in enumerate(lengths.tolist()):
            alone = model(x[b:b + 1, :n], torch.tensor([n]))
            assert (alone - base[b]).abs().max().item() < 1e-5
        # control: changing a real token (the last one, and the first one) changes the output
        for pos in ("first", "last"):
            real = x.clone()
            for b, n in enumerate(lengths.tolist()):
                i = 0 if pos == "first" else n - 1
                real[b, i] = (x[b, i] - 3 + 1) % (V - 3) + 3
            diff = (model(real, lengths) - base).abs().amax(1)
            assert (diff > 1e-4).all(), pos
        # control: a different length reads a different token
        assert (model(x, lengths - 1) - base).abs().max().item() > 1e-4


def test_last_token_oracle():
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    out = last_token(h, torch.tensor([2, 5]))
    assert torch.equal(out, torch.stack([h[0, 1], h[1, 4]]))


# ---- Opacus -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, task, tie", list(itertools.product(ARCHS, TASKS, (True, False))))
def test_opacus_validator_accepts(arch, task, tie):
    model = build_model(mcfg(arch, tie_weights=tie, dropout=0.1), task)
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize("arch, task", list(itertools.product(ARCHS, TASKS)))
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_match_oracle(arch, task):
    """Opacus' per-sample gradients equal gradients computed one example at a time (tied
    weights included, which is where functional tying would go silently wrong)."""
    from opacus import GradSampleModule
    torch.manual_seed(0)
    model = build_model(mcfg(arch, n_layer=1, tie_weights=True), task).double()
    B, n = 3, 6
    x = rand_ids(B, n, seed=4)
    lengths = torch.tensor([6, 3, 5])
    y = rand_ids(B, n, seed=5) if task == "lm" else torch.tensor([0, 2, 1])

    def loss_of(m, xb, lb, yb):
        if task == "lm":
            return F.cross_entropy(m(xb).flatten(0, 1), yb.flatten(), reduction="sum")
        return F.cross_entropy(m(xb, lb), yb, reduction="sum")

    expected = []
    for i in range(B):
        model.zero_grad()
        loss_of(model, x[i:i + 1], lengths[i:i + 1], y[i:i + 1]).backward()
        expected.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad()
    gsm = GradSampleModule(model, loss_reduction="sum")
    loss_of(gsm, x, lengths, y).backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, name
        for i in range(B):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-6,
                                       atol=1e-9, msg=lambda m: f"{name}[{i}]: {m}")
    gsm._close()


# ---- weight tying -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_weight_tying(arch):
    tied = build_model(mcfg(arch, tie_weights=True), "lm")
    untied = build_model(mcfg(arch, tie_weights=False), "lm")
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    # a tied model has exactly V*C fewer distinct parameters
    assert count_parameters(untied) - count_parameters(tied) == V * C
    # classification heads are never tied (different shapes)
    cl = build_model(mcfg(arch, tie_weights=True), "classify")
    assert cl.head.weight is not cl.tok_emb.weight and cl.head.weight.shape == (K, C)


# ---- attention oracle ----------------------------------------------------------------------------
def test_attention_matches_hand_computation():
    torch.manual_seed(0)
    cfg = mcfg(dropout=0.3)  # dropout must be off in eval mode
    attn = CausalSelfAttention(cfg).double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.5)
    B, n, d = 2, 7, C // H
    x = torch.randn(B, n, C, dtype=torch.float64)
    with torch.no_grad():
        got = attn(x)
    W = {name: (lin.weight.detach(), lin.bias.detach())
         for name, lin in (("q", attn.q), ("k", attn.k), ("v", attn.v), ("p", attn.proj))}
    out = torch.zeros(B, n, C, dtype=torch.float64)
    for b in range(B):
        q = x[b] @ W["q"][0].T + W["q"][1]
        k = x[b] @ W["k"][0].T + W["k"][1]
        v = x[b] @ W["v"][0].T + W["v"][1]
        heads = []
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            scores = q[:, sl] @ k[:, sl].T / math.sqrt(d)
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
            scores = scores.masked_fill(mask, float("-inf"))
            w = torch.exp(scores - scores.max(-1, keepdim=True).values)
            w = w / w.sum(-1, keepdim=True)
            heads.append(w @ v[:, sl])
        out[b] = torch.cat(heads, dim=-1) @ W["p"][0].T + W["p"][1]
    assert (got - out).abs().max().item() < 1e-10
    # control: a non-causal computation differs (so the oracle can tell)
    with torch.no_grad():
        q = attn.q(x).view(B, n, H, d).transpose(1, 2)
        k = attn.k(x).view(B, n, H, d).transpose(1, 2)
        v = attn.v(x).view(B, n, H, d).transpose(1, 2)
        full = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        full = attn.proj(full.transpose(1, 2).reshape(B, n, C))
    assert (full - got).abs().max().item() > 1e-3


def test_attention_dropout_active_only_in_training():
    torch.manual_seed(0)
    attn = CausalSelfAttention(mcfg(dropout=0.5))
    x = torch.randn(2, 6, C)
    with torch.no_grad():
        attn.eval()
        assert torch.equal(attn(x), attn(x))
        attn.train()
        assert not torch.equal(attn(x), attn(x))


# ---- positions -----------------------------------------------------------------------------------
def test_positions():
    idx = torch.zeros(3, 5, dtype=torch.long)
    pos = positions(idx)
    assert pos.shape == (3, 5) and pos.dtype == torch.long
    assert pos.is_contiguous()
    assert pos.stride() == (5, 1)  # a real [B, T] tensor, not an expanded view (stride 0)
    assert torch.equal(pos, torch.arange(5).repeat(3, 1))
    # rows do not share storage
    pos[0, 0] = 99
    assert pos[1, 0] == 0


# ---- parameter count -----------------------------------------------------------------------------
def transformer_params(cfg: ModelConfig, task: str) -> int:
    c, v = cfg.d_model, cfg.vocab_size
    emb = v * c + cfg.block_size * c
    attn = 4 * (c * c + c)
    mlp = (c * 4 * c + 4 * c) + (4 * c * c + c)
    block = 2 * (2 * c) + attn + mlp
    if task == "lm":
        head = 0 if cfg.tie_weights else v * c
    else:
        head = c * cfg.num_classes + cfg.num_classes
    return emb + cfg.n_layer * block + 2 * c + head


def lstm_params(cfg: ModelConfig, task: str) -> int:
    c, v = cfg.d_model, cfg.vocab_size
    lstm = cfg.n_layer * 4 * (c * c + c + c * c + c)  # W_ih, b_ih, W_hh, b_hh per layer
    head = (0 if cfg.tie_weights else v * c) if task == "lm" else c * cfg.num_classes + cfg.num_classes
    return v * c + lstm + 2 * c + head


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("tie", (True, False))
@pytest.mark.parametrize("shape", [dict(n_layer=1, d_model=32, n_head=2, block_size=16),
                                   dict(n_layer=3, d_model=48, n_head=4, block_size=20,
                                        vocab_size=333, num_classes=5)])
def test_parameter_count(task, tie, shape):
    cfg = mcfg(tie_weights=tie, **shape)
    assert count_parameters(Transformer(cfg, task)) == transformer_params(cfg, task)
    assert count_parameters(LSTMModel(cfg, task)) == lstm_params(cfg, task)
    # control: one more layer is counted
    bigger = mcfg(tie_weights=tie, **{**shape, "n_layer": shape["n_layer"] + 1})
    assert count_parameters(Transformer(bigger, task)) != transformer_params(cfg, task)
