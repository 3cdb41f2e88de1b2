"""Exact per-sample clipping in one backward pass ("book-keeping"), inside Opacus' machinery.

Why write this by hand: Opacus' stock modes materialize every per-sample gradient (hooks,
functorch, ew) or run a second backward pass (ghost clipping); on the project's Transformer
they cost 1.8-2.9x the time of non-private training (docs/platform-notes.md). DP-SGD needs only
two things per step: each sample's total gradient norm (for its clip factor) and the sum of
the clipped gradients. Both follow from what one ordinary backward pass already has at each
layer: its input ``A`` and its output gradient ``G``.

How the work is arranged, and why:

* Norms are computed *while the backward pass runs*, in a hook on each layer's output, as
  soon as that layer's ``G`` arrives. Per layer, whichever is cheaper for its shape: the
  ghost-norm identity ``||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>`` (cost ~ T^2 (d_in +
  d_out); layers fed the same input, like Q, K and V, share one ``A A^T``) or the
  materialized per-sample gradient (cost ~ T d_in d_out). Embeddings use the ghost identity
  with the Gram of one-hot rows (token equality).
* Only what the final clipped sum needs is kept until the clip factors are known: ``A``
  and ``G`` of Linear weights and Embeddings, or, for a Linear weight whose per-sample
  gradient was materialized (long contexts: S > d), that gradient itself, whose clipped sum
  is then a weighted sum over samples instead of a GEMM over all positions (Opacus' ``ew``
  mode does the same). ``A`` is the tensor the forward pass made
  anyway (no copy). Biases and LayerNorm parameters are small, so their per-sample gradients
  ([B, d]) are formed in the hook and the layer's ``G`` (and a LayerNorm's input) is dropped
  at once, as ordinary backpropagation would drop it.
* A parameter shared by two modules (module-level weight tying: LM head = token embedding)
  has as per-sample gradient the *sum* of both contributions, so its norm needs the cross
  term ``2 <P_1, P_2>``; it is computed in ghost form (for the tied head and embedding:
  ``sum_{s,t} G_head[s, idx_t] (A_head G_emb^T)[s, t]``, no [B, V, d] tensor).
* The clipped sum, per layer, is one GEMM over rescaled rows: ``sum_i c_i G_i^T A_i =
  G^T (c * A)`` (the narrower of ``A`` and ``G`` is rescaled; a rescaled input shared by
  several layers is rescaled once). It replaces the weight-gradient GEMM autograd would have
  done: parameters do not require grad during the forward pass, so autograd computes only
  activation gradients.
* Mean-reduced losses: the per-sample gradient is ``n`` times what the backward pass sees;
  the factor is applied to the norms and clip factors (scalars), never by copying ``G``.

The result lands in ``p.grad`` as the *sum* of clipped per-sample gradients; an Opacus
``DPOptimizerFastGradientClipping`` then accumulates it over physical batches, adds the
Gaussian noise once per logical step, scales, and calls the accountant's step hook, so
Opacus' noise and accounting stay in charge.

Which layers: a registry of clip rules keyed by exact module type (:data:`CLIP_RULES`, like
Opacus' grad samplers), with rules for ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm``;
:func:`register_clip_rule` adds one for a new layer type. Each layer with trainable parameters
must be called once per forward pass; frozen parameters are skipped (``supports(model)`` says
whether a model qualifies; others use Opacus' hooks mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.optimizers.ddpoptimizer_fast_gradient_clipping import (
    DistributedDPOptimizerFastGradientClipping)

from .internals import LeanSteps, layer_norm_saved_stats

@dataclass(frozen=True)
class ClipRule:
    """How the one-backward clipping handles the parameters of one layer type.

    ``on_grad(bk, module, a, g)`` runs inside the backward pass when the layer's output
    gradient ``g`` arrives (``a``: the layer's first forward input, detached). It adds the
    layer's per-unit gradients through :meth:`BKGradSampleModule.add_per_unit_grad` (small
    parameters: biases, norms) or :meth:`BKGradSampleModule.add_gemm_pair` (weights whose
    per-unit gradient is ``G_u^T A_u``), skipping parameters for which
    :meth:`BKGradSampleModule.trainable` is False (frozen, e.g. a LoRA base weight).
    ``on_forward(bk, module, a, output)``, optional, runs in the forward hook (to note what
    the backward needs). ``unsupported(module)``, optional, returns why a module of this type
    cannot be handled (then :func:`supports` is False and Opacus' hooks mode is used).
    """

    on_grad: Callable[[Any, nn.Module, torch.Tensor, torch.Tensor], None]
    on_forward: Callable[[Any, nn.Module, torch.Tensor, torch.Tensor], None] | None = None
    unsupported: Callable[[nn.Module], str | None] | None = None


CLIP_RULES: dict[type, ClipRule] = {}  # exact module type -> rule (like Opacus' GRAD_SAMPLERS)


def register_clip_rule(*types: type, on_forward=None, unsupported=None):
    """Decorator: ``fn(bk, module, a, g)`` becomes the ``on_grad`` rule for these exact module
    types. A new layer type (RMSNorm, a custom adapter) is one registered function."""
    def deco(fn):
        for t in types:
            CLIP_RULES[t] = ClipRule(fn, on_forward, unsupported)
        return fn
    return deco


def _trainable_own(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def unsupported_layers(model: nn.Module) -> list[str]:
    """Why each module with trainable parameters cannot be clipped here (empty: all can)."""
    why = []
    for name, module in model.named_modules():
        if not _trainable_own(module):
            continue
        rule = CLIP_RULES.get(type(module))
        if rule is None:
            why.append(f"{name or 'model'}: no clip rule for {type(module).__name__} "
                       "(register one with safelm.privacy.bk.register_clip_rule)")
        elif rule.unsupported is not None and (reason := rule.unsupported(module)):
            why.append(f"{name or 'model'}: {reason}")
    return why


def supports(model: nn.Module) -> bool:
    """Every module holding trainable parameters has a registered clip rule that accepts it."""
    return not unsupported_layers(model)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product of two [U, ...] tensors. A squared norm (``y is x``: the
    materialized per-sample gradients, [U, d_in d_out]) is one pass with ``vector_norm``,
    which ``vecdot`` (multiply, then sum) is not, and it reads a transposed per-unit gradient
    (see :func:`_per_unit_grad`) in place; ``vecdot`` stays for the rest, where it was
    measured faster at the demo shape (``einsum`` there: x1.54 instead of x1.39 per step)."""
    if y is x:
        return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim()))).square()
    return torch.linalg.vecdot(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1))


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 if it is a half-precision float (bf16/fp16), else unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _per_unit_grad(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each unit's weight gradient ``g_u^T a_u``, [U, d_out, d_in], possibly as the
    transposed view of a contiguous [U, d_in, d_out]. The product with the fewer result rows
    runs ~2x faster on CPU (MKL, U 32, S 256, d 128 -> 512: 13 vs 29 ms), so A^T G is formed
    when d_in < d_out, and it is not copied into [U, d_out, d_in] order: its norm
    (:func:`_dot`) and the weighted sum over units (:func:`_unit_weighted_sum`) read either
    layout, so only the summed [d_out, d_in] gradient is transposed (U times less copying; at
    T 512, d 256, batch 128 the copy was 130 MB per MLP layer and step)."""
    if a.shape[-1] < g.shape[-1]:
        return torch.bmm(a.transpose(1, 2), g).transpose(1, 2)
    return torch.bmm(g.transpose(1, 2), a)


def _unit_weighted_sum(c: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """sum_u c_u ps_u, contiguous: one GEMV over ``ps`` [U, ...] in whichever of the two
    layouts :func:`_per_unit_grad` gives (a transposed view is summed as stored, then the
    small result is transposed), any other layout copied first."""
    U = ps.shape[0]
    if ps.dim() == 3 and not ps.is_contiguous() and ps.transpose(1, 2).is_contiguous():
        t = ps.transpose(1, 2)
        return (c @ t.reshape(U, -1)).reshape(t.shape[1:]).t().contiguous()
    return (c @ ps.reshape(U, -1)).reshape(ps.shape[1:])


def _embedding_per_unit(ids: torch.Tensor, g: torch.Tensor, V: int) -> torch.Tensor:
    """Each unit's embedding-table gradient, [U, V, d]: its rows of ``g`` added at its ids."""
    U, S, d = g.shape
    out = torch.zeros(U * V, d, dtype=g.dtype, device=g.device)
    rows = (ids + torch.arange(U, device=ids.device).view(-1, 1) * V).reshape(-1)
    return out.index_add_(0, rows, g.reshape(-1, d)).view(U, V, d)


def _key(t: torch.Tensor) -> tuple:
    """Identity of an activation: layers fed the same tensor (Q, K, V) share its Gram."""
    return t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype


class _GradTap(torch.autograd.Function):
    """Identity on a tensor that does not require grad, made to require it through ``tap``.

    The first layer's output (an embedding's) has no autograd history while parameters do not
    require grad, yet its output gradient is what the embedding's clipping needs. Making the
    output itself a leaf would let autograd's AccumulateGrad keep it (and store its gradient)
    until the step ends, 4 MB each in the demo LM; through this node, which saves nothing, the
    output is freed as soon as the forward pass is done with it. ``tap`` is a scalar leaf that
    never receives a gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return None, None


def _saved_stats(output: torch.Tensor, a: torch.Tensor, k: int) -> tuple | None:
    """(mean, rstd) that ``native_layer_norm`` saved for its backward, shaped to broadcast
    against its input; None when unavailable (then the hook normalizes again)."""
    saved = layer_norm_saved_stats(output.grad_fn)
    if saved is None:
        return None
    stat_shape = tuple(a.shape[:a.dim() - k]) + (1,) * k
    mean, rstd = saved
    if mean.numel() != a.numel() // max(1, math.prod(a.shape[a.dim() - k:])):
        return None
    return mean.reshape(stat_shape), rstd.reshape(stat_shape)


@dataclass
class _Kept:
    """One contribution to a Linear weight or Embedding, kept for the clipped-sum GEMM.

    ``a``: [U, S, d_in] inputs (Embedding: [U, S] token ids); ``g``: [U, S, d_out] output
    gradients, with U privacy units of S positions each (a user's rows form one sequence).
    """
    kind: str  # "linear" | "embedding"
    a: torch.Tensor
    g: torch.Tensor
    key: tuple | None = None


class BKGradSampleModule(nn.Module):
    """Wraps a model; after ``loss.backward()``, :meth:`clip_and_sum` fills ``p.grad``."""

    def __init__(self, module: nn.Module, max_grad_norm: float, loss_reduction: str = "mean",
                 rows_per_unit: int | None = None):
        super().__init__()
        why = unsupported_layers(module)
        if why:
            raise ValueError(f"one-backward clipping cannot handle {why[0]}")
        self._module = module
        self.max_grad_norm = max_grad_norm
        self.loss_reduction = loss_reduction
        self._handles = [m.register_forward_hook(self._capture) for m in module.modules()
                         if _trainable_own(m)]
        # Trainable parameters only (tied weights counted once); frozen ones are left alone.
        self._params = list(dict.fromkeys(p for p in module.parameters() if p.requires_grad))
        self._trainable = set(self._params)
        owners: dict[nn.Parameter, int] = {}
        for m in module.modules():
            for p in _trainable_own(m):
                owners[p] = owners.get(p, 0) + 1
        self._shared = {p for p, k in owners.items() if k > 1}  # tied: cross terms needed
        self.last_norms: torch.Tensor | None = None  # per-sample norms of the last step
        # User-level DP: consecutive groups of `rows_per_unit` rows are one privacy unit, whose
        # clipped gradient is the gradient of the sum of its rows' losses.
        self.rows_per_unit = rows_per_unit
        self.n_units = 0
        self._tap = torch.zeros((), requires_grad=True)  # see _GradTap
        self._reset()

    def _reset(self) -> None:
        self._rows = 0  # rows in the batch of the last forward pass
        self._inputs: dict[nn.Module, torch.Tensor] = {}  # forward inputs awaiting their G
        self._uses: dict[tuple, int] = {}  # Linear layers fed each distinct input
        self._pending: dict[tuple, int] = {}  # ... of which G has not arrived yet
        self._grams: dict[tuple, torch.Tensor] = {}  # shared A A^T, until its last user
        # Sum of G G^T over the ghost-norm layers fed one shared input: its norm share is one
        # dot product with A A^T when the last of those layers' G has arrived.
        self._ggsum: dict[tuple, torch.Tensor] = {}
        self._emb_grams: dict[tuple, torch.Tensor] = {}  # g g^T of an embedding output grad
        self._norm2: torch.Tensor | None = None  # per-unit ||grad||^2 so far (unscaled)
        self._small: dict[nn.Parameter, torch.Tensor] = {}  # per-unit grads [U, *p.shape]
        self._kept: dict[nn.Parameter, list[_Kept]] = {}
        self._ln_stats: dict[nn.Module, tuple | None] = {}  # LayerNorm (mean, rstd) saved
        self._casts: dict[tuple, torch.Tensor] = {}  # fp32 copies of half-precision inputs
        # Each Linear/Embedding weight's uses in this forward pass (module, input): whether
        # its per-unit gradient is materialized is decided over all of them (see _materialized)
        self._plan: dict[nn.Parameter, list[tuple[nn.Module, torch.Tensor]]] = {}
        self._decided: dict[nn.Parameter, bool] = {}

    def remove_hooks(self) -> None:
        """Detach from the model (e.g. before wrapping it again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- forward / backward capture -----------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._reset()
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
        if module in self._inputs:
            raise RuntimeError(f"{type(module).__name__} called twice in one forward pass; "
                               "use grad_sample_mode=hooks for this model")
        a = inputs[0].detach()  # same storage as the forward's tensor: no copy
        if a.dtype in (torch.bfloat16, torch.float16):
            # Mixed precision (train.precision=bf16): norms, Grams and the clipped sum are
            # computed in fp32, from one fp32 copy per input (Q, K and V still share it)
            k = _key(a)
            a = self._casts.get(k)
            if a is None:
                a = self._casts[k] = inputs[0].detach().float()
        self._rows = a.shape[0]
        self._inputs[module] = a
        if type(module) in (nn.Linear, nn.Embedding) and self.trainable(module.weight):
            self._plan.setdefault(module.weight, []).append((module, a))
        rule = CLIP_RULES[type(module)]
        if rule.on_forward is not None:
            rule.on_forward(self, module, a, output)
        if not output.requires_grad:  # first layer (an embedding): see _GradTap
            output = _GradTap.apply(output, self._tap)
        output.register_hook(partial(self._on_grad, module))
        return output

    def _on_grad(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor | None:
        """A layer's output gradient arrived: its norm share now, keep only what the GEMM needs.

        A non-contiguous ``g`` (the LM head's, a transposed view of the loss gradient) is made
        contiguous once here and handed back to autograd as the gradient to use: the layer's
        own input-gradient GEMM would otherwise copy it, and the Gram and clipped-sum GEMMs
        below once more.
        """
        a = self._inputs.pop(module, None)
        if a is None or a.shape[0] == 0:  # empty Poisson batch: nothing to clip
            return None
        with torch.no_grad():
            g = g.detach()
            new = None
            if not g.is_contiguous():
                g = new = g.contiguous()
            g = _fp32(g)  # bf16 autocast: see _capture; autograd keeps its own gradient
            CLIP_RULES[type(module)].on_grad(self, module, a, g)
        return new

    # ---- what clip rules use ------------------------------------------------------------
    def trainable(self, p: nn.Parameter | None) -> bool:
        """Whether ``p`` is clipped and updated (False for None and frozen parameters)."""
        return p is not None and p in self._trainable

    def per_unit(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        """[n, ..., *feature] -> [U, S, *feature]: one row per privacy unit (see _units)."""
        return self._units(x, tail)

    def add_per_unit_grad(self, p: nn.Parameter, grad: torch.Tensor) -> None:
        """Add ``grad`` [U, *p.shape], each unit's gradient of ``p`` (summed over calls)."""
        self._add_small(p, grad)

    def add_gemm_pair(self, p: nn.Parameter, a: torch.Tensor, g: torch.Tensor) -> None:
        """A weight whose per-unit gradient is ``g_u^T a_u`` (``a`` [U, S, d_in], ``g``
        [U, S, d_out]): its norm in ghost or materialized form, its clipped sum as one GEMM."""
        key = ("pair", len(self._uses))  # its own input: no Gram shared with other layers
        self._uses[key] = 1
        self._add_kept(p, _Kept("linear", a, g, key))

    def _units(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        """[n, ..., *feature] -> [U, S, *feature] (``tail`` feature dims): one row per unit."""
        n = x.shape[0]
        units = n // self.rows_per_unit if self.rows_per_unit else n
        return x.reshape(units, -1, *x.shape[x.dim() - tail:])

    # ---- per-layer work inside the backward pass -----------------------------------------
    def _note_input(self, module: nn.Linear, a: torch.Tensor) -> None:
        """Forward: one more trainable Linear weight fed ``a`` (Q, K, V share its Gram)."""
        if self.trainable(module.weight):
            key = _key(a)
            self._uses[key] = self._uses.get(key, 0) + 1
            self._pending[key] = self._uses[key]

    def _linear(self, module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> None:
        G = self._units(g, 1)
        if self.trainable(module.bias):
            self._add_small(module.bias, G.sum(1))
        if not self.trainable(module.weight):
            return
        key = _key(a)
        self._add_kept(module.weight, _Kept("linear", self._units(a, 1), G, key))
        self._pending[key] -= 1
        if self._pending[key] == 0:  # last layer fed this input: its ghost share, then drop
            gram, ggsum = self._grams.pop(key, None), self._ggsum.pop(key, None)
            if ggsum is not None:
                self._add_norm2(_dot(gram, ggsum))

    def _layer_norm(self, module: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor) -> None:
        k = len(module.normalized_shape)
        if self.trainable(module.bias):
            self._add_small(module.bias, self._units(g, k).sum(1))
        if self.trainable(module.weight):
            stats = self._ln_stats.pop(module, None)
            if stats is None:  # no saved statistics: normalize again
                x_hat_g = F.layer_norm(a, module.normalized_shape, eps=module.eps).mul_(g)
            else:  # (a - mean) * rstd * g, in one buffer, bit for bit what layer_norm gives
                mean, rstd = stats
                x_hat_g = torch.sub(a, mean).mul_(rstd).mul_(g)
            self._add_small(module.weight, self._units(x_hat_g, k).sum(1))

    def _add_small(self, p: nn.Parameter, per_unit: torch.Tensor) -> None:
        have = self._small.get(p)
        self._small[p] = per_unit if have is None else have + per_unit

    def _add_norm2(self, norm2: torch.Tensor) -> None:
        self._norm2 = norm2 if self._norm2 is None else self._norm2 + norm2

    def _add_kept(self, p: nn.Parameter, c: _Kept) -> None:
        if self._materialized(p, c):
            # Long contexts (S > d): keep the per-unit gradient itself, as Opacus' ew mode
            # does, instead of A and G. The clipped sum is then a weighted sum over units
            # (U d_in d_out) rather than a GEMM over all U*S rows (S times more work), and A
            # and G are released now; at S > d the gradient is also the smaller of the two.
            # A tied weight's contributions are summed there: its norm needs no cross term.
            self._add_small(p, _per_unit_grad(c.a, c.g) if c.kind == "linear"
                            else _embedding_per_unit(c.a, c.g, p.shape[0]))
            return
        norm2 = self._self_norm2(c)  # None: deferred to the shared input's last user
        for other in self._kept.get(p, []):  # shared parameter: cross terms
            cross = 2 * self._cross(other, c)
            norm2 = cross if norm2 is None else norm2 + cross
        if norm2 is not None:
            self._add_norm2(norm2)
        self._kept.setdefault(p, []).append(c)

    def _self_norm2(self, c: _Kept) -> torch.Tensor | None:
        """||per-unit gradient of this contribution||^2, [U] (None: added later, see below)."""
        if c.kind == "embedding":
            same = (c.a.unsqueeze(2) == c.a.unsqueeze(1)).to(c.g.dtype)  # [U, S, S]
            # Token and position embeddings summed in the forward pass receive the very same
            # gradient tensor: its Gram is formed once.
            gkey = _key(c.g)
            gram = self._emb_grams.get(gkey)
            if gram is None:
                gram = self._emb_grams[gkey] = torch.bmm(c.g, c.g.transpose(1, 2))
            return _dot(same, gram)
        A, G = c.a, c.g
        _, S, d_in = A.shape
        d_out = G.shape[-1]
        if S == 1:  # rank one: ||g a^T|| = ||g|| ||a||
            return _dot(A, A) * _dot(G, G)
        share = self._uses.get(c.key, 1)
        if not self._materialize(c):  # ghost norm
            gram = self._grams.get(c.key)
            if gram is None:
                gram = torch.bmm(A, A.transpose(1, 2))
                if share > 1:
                    self._grams[c.key] = gram
            if share == 1:
                return _dot(gram, torch.bmm(G, G.transpose(1, 2)))
            # Q, K, V: <AA^T, G_q G_q^T> + <AA^T, G_k G_k^T> + ... = <AA^T, sum G G^T>, the
            # sum accumulated in place by baddbmm (one [U, S, S] buffer, one dot at the end).
            acc = self._ggsum.get(c.key)
            if acc is None:
                self._ggsum[c.key] = torch.bmm(G, G.transpose(1, 2))
            else:
                acc.baddbmm_(G, G.transpose(1, 2))
            return None
        per_sample = _per_unit_grad(A, G)
        return _dot(per_sample, per_sample)

    def _materialized(self, p: nn.Parameter, c: _Kept) -> bool:
        """Whether ``p``'s per-unit gradient is formed and kept (all its contributions), or
        its contributions are kept as (A, G) for ghost norms and one GEMM. Decided once per
        step for every use of ``p`` together, so a tied weight is all one or all the other."""
        got = self._decided.get(p)
        if got is None:
            plan = self._plan.get(p)
            if plan is None:  # a contribution from a custom rule (add_gemm_pair): alone
                return c.kind == "linear" and p not in self._shared and self._materialize(c)
            got = self._decided[p] = all(self._cheaper_to_materialize(m, a) for m, a in plan)
        return got

    def _cheaper_to_materialize(self, module: nn.Module, a: torch.Tensor) -> bool:
        if isinstance(module, nn.Embedding):
            # Per unit: a [V, d] gradient (zero-filled, filled by index_add, then normed and
            # summed: ~3 V d) against the one-hot Gram and G G^T (~S^2 d); and only when the
            # [U, V, d] tensor is at most 4x the [U, S, d] output gradient it replaces (a
            # GPT-2 vocabulary of 50,257 stays ghost at any context).
            S, V = self._units(a, 0).shape[1], module.num_embeddings
            return 3 * V <= S * S and V <= 4 * S
        S, d_in = self._units(a, 1).shape[1:]
        return self._cheaper(S, d_in, module.out_features, self._uses.get(_key(a), 1))

    def _materialize(self, c: _Kept) -> bool:
        """Whether this Linear contribution's norm comes from its materialized gradient."""
        _, S, d_in = c.a.shape
        return self._cheaper(S, d_in, c.g.shape[-1], self._uses.get(c.key, 1))

    @staticmethod
    def _cheaper(S: int, d_in: int, d_out: int, share: int) -> bool:
        """Per-unit gradient G^T A (cost ~ S d_in d_out) rather than the ghost norm (cost ~
        S^2 (d_out + d_in / share), the input's Gram shared by the ``share`` layers it feeds)
        only when clearly cheaper: batched G^T A with a transposed operand runs far below
        GEMM speed on CPU. This is fastDP's per-layer choice (2T^2 vs p d)."""
        return S > 1 and S * S * (d_out + d_in / share) > S * d_in * d_out

    @staticmethod
    def _cross(c1: _Kept, c2: _Kept) -> torch.Tensor:
        """<P_1, P_2> per unit for two contributions to one parameter, in ghost form."""
        if c1.kind == "linear" and c2.kind == "linear":  # <G1^T A1, G2^T A2>
            return _dot(torch.bmm(c1.a, c2.a.transpose(1, 2)),
                        torch.bmm(c1.g, c2.g.transpose(1, 2)))
        if c1.kind == "embedding" and c2.kind == "embedding":
            same = (c1.a.unsqueeze(2) == c2.a.unsqueeze(1)).to(c1.g.dtype)
            return _dot(same, torch.bmm(c1.g, c2.g.transpose(1, 2)))
        lin, emb = (c1, c2) if c1.kind == "linear" else (c2, c1)
        # Linear weight [V, d] (per unit G^T A), Embedding rows idx_t get g_t: the inner
        # product is sum_t <(G^T A)[idx_t], g_t> = sum_{s,t} G[s, idx_t] <A_s, g_t>.
        U, S, T = lin.a.shape[0], lin.a.shape[1], emb.a.shape[1]
        at_ids = lin.g.gather(2, emb.a.unsqueeze(1).expand(U, S, T))  # [U, S, T]
        return _dot(at_ids, torch.bmm(lin.a, emb.g.transpose(1, 2)))

    # ---- the step -----------------------------------------------------------------------
    def clip_and_sum(self) -> torch.Tensor:
        """Per-sample norms -> clip factors -> p.grad = sum of clipped gradients."""
        for key, ggsum in self._ggsum.items():  # a layer whose output went unused
            self._add_norm2(_dot(self._grams[key], ggsum))
        self._ggsum.clear()
        self._grams.clear()
        self._emb_grams.clear()
        n = self._rows
        units = n // self.rows_per_unit if self.rows_per_unit else n
        self.n_units = units
        scale = float(n) if self.loss_reduction == "mean" else 1.0
        norm2 = self._norm2 if self._norm2 is not None else torch.zeros(
            units, device=self._params[0].device if self._params else None)
        for ps in self._small.values():
            norm2 = norm2 + _dot(ps, ps)
        norms = norm2.clamp(min=0).sqrt() * scale
        c = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * scale  # times n: see doc
        scaled: dict[tuple, torch.Tensor] = {}  # c * A, for inputs shared by several layers
        left = dict(self._uses)
        for p in self._params:
            grad = None
            ps = self._small.pop(p, None)
            if ps is not None:
                grad = _unit_weighted_sum(c.to(ps.dtype), ps).reshape(p.shape)
            for kept in self._kept.pop(p, []):
                grad = self._clipped(kept, c, p, grad, scaled, left)
            p.grad = torch.zeros_like(p) if grad is None else grad.to(p.dtype)
        self.last_norms = norms.detach()
        self._reset()
        return norms

    @staticmethod
    def _clipped(kept: _Kept, c: torch.Tensor, p: nn.Parameter, out: torch.Tensor | None,
                 scaled: dict, left: dict) -> torch.Tensor:
        """out + sum_i c_i * grad_i of one contribution, without per-sample tensors."""
        a, g = kept.a, kept.g
        c = c.to(g.dtype).view(-1, 1, 1)
        if kept.kind == "embedding":
            if out is None:
                out = torch.zeros(p.shape, dtype=g.dtype, device=g.device)
            gkey = ("embedding",) + _key(g)  # token and position embeddings share their g
            g_c = scaled.get(gkey)
            if g_c is None:
                g_c = scaled[gkey] = (g * c).reshape(-1, g.shape[-1])
            return out.index_add_(0, a.reshape(-1), g_c)
        d_in, d_out = a.shape[-1], g.shape[-1]
        if d_in <= d_out or kept.key in scaled:  # rescale the (narrower or shared) input
            a_c = scaled.get(kept.key)
            if a_c is None:
                a_c = a * c
            left[kept.key] -= 1
            if left[kept.key] > 0:
                scaled[kept.key] = a_c
            else:
                scaled.pop(kept.key, None)
            lhs, rhs = g.reshape(-1, d_out), a_c.reshape(-1, d_in)
        else:
            lhs, rhs = (g * c).reshape(-1, d_out), a.reshape(-1, d_in)
        # One GEMM over all U*S rows, arranged so that its result has the fewer rows: on CPU
        # [d_in, N] x [N, d_out] runs ~10% faster than [d_out, N] x [N, d_in] when d_in <= d_out
        # (measured with MKL at N = 8192, d = 128/512), and the other way round otherwise.
        if d_in <= d_out:
            if out is None:
                return (rhs.t() @ lhs).t().contiguous()
            out.t().addmm_(rhs.t(), lhs)
            return out
        if out is None:
            return lhs.t() @ rhs
        return out.addmm_(lhs.t(), rhs)


class _ClipFirst:
    """Asks the BK module for the clipped sum before Opacus' pre-step (accumulate over
    physical batches; on the last one of a logical batch: noise, scale, accountant hook)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, module: BKGradSampleModule,
                 **kwargs: Any):
        super().__init__(optimizer, **kwargs)
        self.bk_module = module

    def pre_step(self, closure=None):
        self.bk_module.clip_and_sum()
        return super().pre_step(closure)


class BKDPOptimizer(_ClipFirst, LeanSteps):
    """Opacus' optimizer for pre-clipped gradients, fed by :class:`BKGradSampleModule`."""


class BKDistributedDPOptimizer(_ClipFirst, DistributedDPOptimizerFastGradientClipping,
                               LeanSteps):
    """The same under torchrun: noise on rank 0 only, clipped sums all-reduced (Opacus)."""


# ---- the built-in rules ------------------------------------------------------------------
@register_clip_rule(nn.Linear, on_forward=lambda bk, m, a, out: bk._note_input(m, a))
def _linear_rule(bk: BKGradSampleModule, module: nn.Linear, a: torch.Tensor,
                 g: torch.Tensor) -> None:
    bk._linear(module, a, g)


def _embedding_unsupported(module: nn.Embedding) -> str | None:
    if module.padding_idx is not None:
        return "Embedding with padding_idx (its row gets no gradient; not modelled here)"
    return None


@register_clip_rule(nn.Embedding, unsupported=_embedding_unsupported)
def _embedding_rule(bk: BKGradSampleModule, module: nn.Embedding, a: torch.Tensor,
                    g: torch.Tensor) -> None:
    if bk.trainable(module.weight):
        bk._add_kept(module.weight, _Kept("embedding", bk._units(a, 0), bk._units(g, 1)))


def _layer_norm_forward(bk: BKGradSampleModule, module: nn.LayerNorm, a: torch.Tensor,
                        output: torch.Tensor) -> None:
    bk._ln_stats[module] = _saved_stats(output, a, len(module.normalized_shape))


@register_clip_rule(nn.LayerNorm, on_forward=_layer_norm_forward)
def _layer_norm_rule(bk: BKGradSampleModule, module: nn.LayerNorm, a: torch.Tensor,
                     g: torch.Tensor) -> None:
    bk._layer_norm(module, a, g)
