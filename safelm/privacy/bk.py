"""Exact per-sample clipping in one backward pass ("book-keeping"), inside Opacus' machinery.

Why write this by hand: Opacus' stock modes materialize every per-sample gradient (hooks,
functorch, ew) or run a second backward pass (ghost clipping); on the project's Transformer
they cost 1.8-2.9x the time of non-private training (PLATFORM-NOTES.md). DP-SGD needs only
two things per step: each sample's total gradient norm (for its clip factor) and the sum of
the clipped gradients. Both follow from what one ordinary backward pass already has at each
layer: its input ``A`` and its output gradient ``G``.

* Norms, per layer, whichever is cheaper for its shape: the ghost-norm identity
  ``||G_i^T A_i||_F^2 = sum_{t,t'} (A_i A_i^T)_{tt'} (G_i G_i^T)_{tt'}`` (cost ~ T^2 (d_in +
  d_out)) or the materialized per-sample gradient (cost ~ T d_in d_out). Embeddings use the
  ghost identity with the Gram of one-hot rows (token equality). LayerNorm gradients are small
  and always materialized. A parameter shared by two modules (module-level weight tying) is
  materialized per contribution and summed, so the norm includes the cross term exactly.
* The clipped sum, per layer, is one GEMM over rescaled output gradients:
  ``sum_i c_i G_i^T A_i = (c * G)^T A``, which replaces the weight-gradient GEMM autograd
  would have done: parameters do not require grad during the forward pass, so autograd
  computes only activation gradients.

The result lands in ``p.grad`` as the *sum* of clipped per-sample gradients; an Opacus
``DPOptimizerFastGradientClipping`` then adds the Gaussian noise, scales, and calls the
accountant's step hook, so Opacus' noise and accounting stay in charge.

Supported parameter holders: ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, each called
once per forward pass (``supports(model)`` says whether a model qualifies; others use Opacus'
hooks mode).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.ddpoptimizer_fast_gradient_clipping import (
    DistributedDPOptimizerFastGradientClipping)

SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)


def supports(model: nn.Module) -> bool:
    """Every parameter lives directly in a Linear, Embedding or LayerNorm."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not isinstance(module, SUPPORTED):
            return False
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return False
    return True


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, ..., d] -> [B, T, d] (a 2-D input is one position)."""
    return x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])


class BKGradSampleModule(nn.Module):
    """Wraps a model; after ``loss.backward()``, :meth:`clip_and_sum` fills ``p.grad``."""

    def __init__(self, module: nn.Module, max_grad_norm: float, loss_reduction: str = "mean",
                 rows_per_unit: int | None = None):
        super().__init__()
        if not supports(module):
            raise ValueError("model has parameters outside Linear/Embedding/LayerNorm")
        self._module = module
        self.max_grad_norm = max_grad_norm
        self.loss_reduction = loss_reduction
        self._records: dict[nn.Module, list] = {}
        self._handles = [m.register_forward_hook(self._capture) for m in module.modules()
                         if isinstance(m, SUPPORTED) and list(m.parameters(recurse=False))]
        self._params = list(dict.fromkeys(module.parameters()))  # tied weights counted once
        self.last_norms: torch.Tensor | None = None  # per-sample norms of the last step
        # User-level DP: consecutive groups of `rows_per_unit` rows are one privacy unit, whose
        # clipped gradient is the gradient of the sum of its rows' losses.
        self.rows_per_unit = rows_per_unit
        self.n_units = 0

    def remove_hooks(self) -> None:
        """Detach from the model (e.g. before wrapping it again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- forward / backward capture -----------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._records = {}
        for p in self._params:  # autograd then computes activation gradients only
            p.requires_grad_(False)
        try:
            return self._module(*args, **kwargs)
        finally:
            for p in self._params:
                p.requires_grad_(True)

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return output
        if module in self._records:
            raise RuntimeError(f"{type(module).__name__} called twice in one forward pass; "
                               "use grad_sample_mode=hooks for this model")
        rec = [inputs[0].detach(), None]
        self._records[module] = rec
        if not output.requires_grad:  # first layer (an embedding): make it a leaf
            output.requires_grad_(True)

        def keep(g: torch.Tensor) -> None:
            rec[1] = g.detach()
        output.register_hook(keep)
        return output

    # ---- per-sample pieces --------------------------------------------------------------
    def _contributions(self, n: int) -> dict[nn.Parameter, list[tuple[str, nn.Module, Any]]]:
        """For each parameter: (kind, module, (A, G)) with G rescaled to the per-sample loss."""
        scale = float(n) if self.loss_reduction == "mean" else 1.0
        out: dict[nn.Parameter, list] = {}
        for module, (a, g) in self._records.items():
            if g is None:
                continue
            g = g * scale
            if self.rows_per_unit:  # user-level: a unit's rows become one long sequence
                a, g = self._by_unit(a), self._by_unit(g)
            for name, p in module.named_parameters(recurse=False):
                out.setdefault(p, []).append((name, module, (a, g)))
        return out

    def _by_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Rows grouped by unit: [U*R, T, d] -> [U, R*T, d]; [U*R, d] -> [U, R, d]."""
        keep = x.shape[2:] if x.dim() > 2 else x.shape[1:]
        return x.reshape(self.n_units, -1, *keep)

    @staticmethod
    def _linear_weight_norm2(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a, g = _flat(a), _flat(g)
        B, T, din = a.shape
        dout = g.shape[-1]
        if T == 1:  # rank one: ||g a^T|| = ||g|| ||a||
            return (a.square().sum((1, 2))) * (g.square().sum((1, 2)))
        if T * T * (din + dout) < T * din * dout:  # ghost norm
            return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))

    @staticmethod
    def _embedding_norm2(idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        idx = idx.reshape(idx.shape[0], -1)
        g = _flat(g)
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g.dtype)  # [B, T, T]
        return (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

    @staticmethod
    def _per_sample(kind: str, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                    p: nn.Parameter) -> torch.Tensor:
        """Materialized per-sample gradient [B, *p.shape] of one contribution."""
        if isinstance(module, nn.Embedding):
            idx = a.reshape(a.shape[0], -1)
            g = _flat(g)
            out = torch.zeros(g.shape[0], *p.shape, dtype=g.dtype, device=g.device)
            return out.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, g.shape[-1]), g)
        if isinstance(module, nn.LayerNorm):
            g = _flat(g)
            if kind == "bias":
                return g.sum(1)
            x_hat = F.layer_norm(_flat(a), module.normalized_shape, eps=module.eps)
            return (x_hat * g).sum(1)
        a, g = _flat(a), _flat(g)
        return g.sum(1) if kind == "bias" else torch.bmm(g.transpose(1, 2), a)

    def _norm2(self, p: nn.Parameter, contribs: list) -> torch.Tensor:
        if len(contribs) > 1:  # shared parameter: sum the materialized contributions
            total = sum(self._per_sample(k, m, a, g, p) for k, m, (a, g) in contribs)
            return total.flatten(1).square().sum(1)
        kind, module, (a, g) = contribs[0]
        if isinstance(module, nn.Embedding):
            return self._embedding_norm2(a, g)
        if isinstance(module, nn.Linear) and kind == "weight":
            return self._linear_weight_norm2(a, g)
        return self._per_sample(kind, module, a, g, p).flatten(1).square().sum(1)

    @staticmethod
    def _clipped_sum(kind: str, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                     c: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        """sum_i c_i * grad_i for one contribution, without per-sample tensors."""
        g = _flat(g) * c.view(-1, 1, 1)
        if isinstance(module, nn.Embedding):
            out = torch.zeros_like(p)
            return out.index_add_(0, a.reshape(-1), g.reshape(-1, g.shape[-1]).to(p.dtype))
        if kind == "bias":
            return g.sum((0, 1))
        if isinstance(module, nn.LayerNorm):
            x_hat = F.layer_norm(_flat(a), module.normalized_shape, eps=module.eps)
            return (x_hat * g).sum((0, 1))
        a = _flat(a)
        return g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])  # one GEMM

    # ---- the step -----------------------------------------------------------------------
    def clip_and_sum(self) -> torch.Tensor:
        """Per-sample norms -> clip factors -> p.grad = sum of clipped gradients."""
        n = next((a.shape[0] for a, _ in self._records.values()), 0)
        self.n_units = n // self.rows_per_unit if self.rows_per_unit else n
        contribs = self._contributions(n) if n else {}  # empty Poisson batch: noise only
        units = self.n_units
        if contribs:
            norm2 = sum(self._norm2(p, cs) for p, cs in contribs.items())
            norms = norm2.clamp(min=0).sqrt()
        else:
            norms = torch.zeros(units)
        c = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self._params:
            cs = contribs.get(p)
            if not cs:  # empty batch (or unused parameter): contributes zero
                p.grad = torch.zeros_like(p)
                continue
            p.grad = sum(self._clipped_sum(k, m, a, g, c.to(g.dtype), p)
                         for k, m, (a, g) in cs).reshape(p.shape).to(p.dtype)
        self.last_norms = norms.detach()
        self._records = {}
        return norms


class _ClipFirst:
    """Asks the BK module for the clipped sum before Opacus' pre-step (noise, scale, hook)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, module: BKGradSampleModule,
                 **kwargs: Any):
        super().__init__(optimizer, **kwargs)
        self.bk_module = module

    def pre_step(self, closure=None):
        self.bk_module.clip_and_sum()
        return super().pre_step(closure)


class BKDPOptimizer(_ClipFirst, DPOptimizerFastGradientClipping):
    """Opacus' optimizer for pre-clipped gradients, fed by :class:`BKGradSampleModule`."""


class BKDistributedDPOptimizer(_ClipFirst, DistributedDPOptimizerFastGradientClipping):
    """The same under torchrun: noise on rank 0 only, clipped sums all-reduced (Opacus)."""
