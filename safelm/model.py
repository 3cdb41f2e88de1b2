"""The models: a decoder-only Transformer (GPT-style, pre-LayerNorm) and an LSTM baseline.

Both take ``idx`` [B, T] token ids and return logits: [B, T, vocab] for language modelling,
[B, n_classes] for classification (read off the hidden state of each row's last real token,
which under causal attention has seen the whole text and no padding).

Written for DP-SGD through Opacus, which computes per-sample gradients with module hooks:
every parameter lives in a standard module (Linear, Embedding, LayerNorm, DPLSTM); weight tying
is done at module level (``lm_head.weight = tok_emb.weight``), never with ``F.linear(h,
tok_emb.weight)``, which Opacus silently gets wrong; position ids are batch-first and
contiguous ([B, T], not [T] or an ``expand()``-ed view), which every grad-sample mode needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, "Attention Is All You Need" section 3.2.

    Q, K and V are full-width projections split into ``n_head`` heads, so each head has its
    own slice of parameters; scores are scaled by 1/sqrt(head_dim) inside
    ``scaled_dot_product_attention``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (lin(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=1.0 / math.sqrt(self.head_dim))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-join heads: [B, T, C]
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C -> GELU -> C (``model.activation``: exact
    GELU, or GPT-2's tanh approximation ``gelu_new``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def positions(idx: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T], batch-first and contiguous (Opacus needs exactly this)."""
    B, T = idx.shape
    return torch.arange(T, device=idx.device).unsqueeze(0).expand(B, T).contiguous()


def last_token(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """h[b, lengths[b] - 1] for each row b: [B, T, C] -> [B, C]."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, h.shape[-1])
    return h.gather(1, index).squeeze(1)


class Transformer(nn.Module):
    """Decoder-only Transformer with learned position embeddings and an LM or class head."""

    def __init__(self, cfg: ModelConfig, task: str = "lm"):
        super().__init__()
        self.cfg, self.task = cfg, task
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        if task == "lm":
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_weights:
                self.head.weight = self.tok_emb.weight  # module-level tying (see module doc)
        else:
            self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        assert T <= self.cfg.block_size, f"sequence length {T} > block_size {self.cfg.block_size}"
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions(idx)))  # [B, T, C]
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)  # eps: model.ln_eps
        if self.task == "lm":
            return self.head(h)  # [B, T, vocab]
        return self.head(last_token(h, lengths))  # [B, n_classes]


class LSTMModel(nn.Module):
    """LSTM baseline with the same interface; Opacus' DPLSTM so per-sample gradients work."""

    def __init__(self, cfg: ModelConfig, task: str = "lm"):
        super().__init__()
        self.cfg, self.task = cfg, task
        # Imported here: Opacus costs ~1 s of import time (its accountants pull in SciPy and
        # torch.distributed.tensor), which every Transformer-only process, e.g. each Flower
        # client and server process, would otherwise pay at start-up.
        from opacus.layers import DPLSTM

        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = DPLSTM(cfg.d_model, cfg.d_model, num_layers=cfg.n_layer, batch_first=True,
                           dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        if task == "lm":
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_weights:
                self.head.weight = self.tok_emb.weight
        else:
            self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.drop(self.tok_emb(idx))  # [B, T, C]
        h, _ = self.lstm(x)  # [B, T, C]; causal by construction
        h = self.ln_f(h)
        if self.task == "lm":
            return self.head(h)
        return self.head(last_token(h, lengths))


INIT_STD = 0.02  # std of the random init of Linear and Embedding weights (GPT-2's)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)


def build_model(cfg: ModelConfig, task: str) -> nn.Module:
    """The model named by ``cfg.arch`` for ``task`` (lm | classify), with LoRA adapters
    (frozen base) when ``cfg.lora_rank`` > 0."""
    if task == "classify" and cfg.num_classes < 2:
        raise ValueError("classification needs model.num_classes >= 2")
    model = (Transformer if cfg.arch == "transformer" else LSTMModel)(cfg, task)
    if cfg.lora_rank:
        from .lora import apply_lora
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, task)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
