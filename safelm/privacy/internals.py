"""The one place SafeLM touches private names of torch and Opacus.

Supported versions: torch 2.13 and Opacus 1.6 (``SUPPORTED``; pinned in pyproject.toml). Every
use of a library's private attribute or function lives here, each behind a small function that
says what it relies on, so that an upgrade has one file to check. :func:`check` verifies every
assumption against the installed libraries and names what changed;
``tests/test_internals.py`` runs it, so a torch or Opacus upgrade that breaks one fails loudly
instead of silently changing DP-SGD.

What is relied on, and why:

* ``opacus.optimizers.optimizer._check_processed_flag`` / ``_mark_as_processed``: Opacus'
  guard that a gradient is noised once per step; :class:`LeanSteps` keeps the guard.
* ``DPOptimizer._is_last_step_skipped``: whether the last ``step()`` only accumulated (a
  physical batch inside a logical one, Opacus' virtual steps); the Trainer asks the privacy
  engine, which asks here.
* ``DPOptimizer._step_skip_queue``: Opacus' queue of ``signal_skip_step`` flags; a new pass of
  the physical-batch sampler clears flags left by an abandoned pass.
* ``DPOptimizer._adjusted_noise_multiplier``: set by Opacus' adaptive clipping; when present the
  noise step is Opacus' own.
* autograd's ``NativeLayerNormBackward0._saved_result1`` / ``_saved_result2``: the mean and
  reciprocal standard deviation ``native_layer_norm`` saved for its backward; the one-backward
  clipping reuses them instead of normalizing again (a fallback exists when they are absent).
* ``torch._foreach_div_``: one fused in-place division over a list of gradients.
* ``torch.utils._python_dispatch.TorchDispatchMode``: a hook around every aten operation;
  :func:`safelm.preflight.peak_allocated` reads the allocator after each (measurement only:
  tests and benchmarks, never a training path).
"""

from __future__ import annotations

from typing import Any

import opacus
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import DPOptimizer

SUPPORTED = {"torch": "2.13", "opacus": "1.6"}

try:  # Opacus' noise-once guard (private names; see check())
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
except ImportError:  # pragma: no cover - reported by check()
    _check_processed_flag = _mark_as_processed = None


def last_step_skipped(optimizer: Any) -> bool:
    """True when the optimizer's last ``step()`` only accumulated (Opacus virtual steps);
    False for any optimizer without that notion."""
    return bool(getattr(optimizer, "_is_last_step_skipped", False))


def clear_skip_signals(optimizer: DPOptimizer) -> None:
    """Drop ``signal_skip_step`` flags queued for a pass that was abandoned."""
    optimizer._step_skip_queue.clear()


def layer_norm_saved_stats(node: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, rstd) saved by ``native_layer_norm`` on its autograd node, or None."""
    if type(node).__name__ != "NativeLayerNormBackward0":
        return None
    try:
        return node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError):
        return None


def foreach_div_(tensors: list[torch.Tensor], divisor: float) -> None:
    torch._foreach_div_(tensors, divisor)


def dispatch_mode() -> type:
    """torch's ``TorchDispatchMode`` base class (subclass it and enter it as a context)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    return TorchDispatchMode


class LeanSteps(DPOptimizerFastGradientClipping):
    """Opacus' accumulate / add_noise / scale_grad for pre-clipped sums (from
    :class:`safelm.privacy.bk.BKGradSampleModule`), without their per-parameter copies (2.4 ms
    a step on the demo LM at batch 128). It overrides Opacus methods and keeps Opacus'
    noise-once guard, so it lives here, beside the private names it depends on.

    Same semantics: the first physical batch's clipped sum becomes ``summed_grad`` itself
    (Opacus deep-copies it; ``p.grad`` is then cleared, so that ``zero_grad`` cannot zero the
    sum through it), later ones are added; the Gaussian noise (std = noise multiplier x clip,
    Opacus' generator) is added in place; the mean-reduction scale is one fused division.
    Secure-mode noise and adaptive clipping's adjusted multiplier take Opacus' own path.
    """

    def accumulate(self):
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad, p.grad = p.grad, None
            else:
                p.summed_grad.add_(p.grad)

    def add_noise(self):
        if self.secure_mode or getattr(self, "_adjusted_noise_multiplier", None) is not None:
            return super().add_noise()
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std > 0:
                noise = torch.empty_like(p.summed_grad).normal_(0, std, generator=self.generator)
                p.summed_grad.add_(noise)
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self):
        if self.loss_reduction == "mean":
            foreach_div_([p.grad for p in self.params],
                         float(self.expected_batch_size * self.accumulated_iterations))


def check() -> list[str]:
    """Every assumption above, tested against the installed torch and Opacus; returns one
    line per broken assumption (empty: all hold)."""
    problems: list[str] = []
    versions = {"torch": torch.__version__, "opacus": opacus.__version__}
    for lib, want in SUPPORTED.items():
        if not versions[lib].startswith(want):
            problems.append(f"{lib} {versions[lib]} is installed; safelm.privacy.internals "
                            f"supports {lib} {want}.x: re-check every assumption in it")
    if _check_processed_flag is None or _mark_as_processed is None:
        problems.append("opacus.optimizers.optimizer no longer has _check_processed_flag / "
                        "_mark_as_processed (LeanSteps' noise-once guard)")
    else:
        t = torch.zeros(2)
        _mark_as_processed(t)
        try:
            _check_processed_flag(t)
            problems.append("_check_processed_flag no longer raises on a processed tensor")
        except ValueError:
            pass
    for name in ("accumulate", "add_noise", "scale_grad", "pre_step"):
        if not callable(getattr(DPOptimizerFastGradientClipping, name, None)):
            problems.append(f"DPOptimizerFastGradientClipping.{name} is gone (LeanSteps "
                            "overrides it)")
    # DPOptimizer's virtual-step attributes, on a real instance.
    p = torch.nn.Parameter(torch.zeros(2))
    opt = DPOptimizer(torch.optim.SGD([p], lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=1)
    for attr in ("_is_last_step_skipped", "_step_skip_queue"):
        if not hasattr(opt, attr):
            problems.append(f"DPOptimizer has no {attr} (virtual steps: last_step_skipped / "
                            "clear_skip_signals)")
    if hasattr(opt, "_step_skip_queue"):
        opt.signal_skip_step(do_skip=True)
        if list(opt._step_skip_queue) != [True]:
            problems.append("signal_skip_step no longer queues its flag in _step_skip_queue")
    # native_layer_norm's saved outputs, on a real autograd node.
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.nn.functional.layer_norm(x, (4,))
    stats = layer_norm_saved_stats(y.grad_fn)
    if stats is None:
        problems.append(f"autograd node {type(y.grad_fn).__name__} no longer exposes "
                        "_saved_result1/_saved_result2 (LayerNorm mean/rstd; bk falls back "
                        "to normalizing again, slower)")
    else:
        mean, rstd = stats
        want_mean = x.detach().mean(-1)
        want_rstd = (x.detach().var(-1, unbiased=False) + 1e-5).rsqrt()
        if not (torch.allclose(mean.reshape(-1), want_mean, atol=1e-6)
                and torch.allclose(rstd.reshape(-1), want_rstd, atol=1e-5)):
            problems.append("_saved_result1/_saved_result2 of NativeLayerNormBackward0 are no "
                            "longer (mean, rstd)")
    try:
        seen: list[str] = []

        class Probe(dispatch_mode()):  # type: ignore[misc]
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(str(func))
                return func(*args, **(kwargs or {}))
        with Probe():
            torch.ones(2).add(1)
        if not any("add" in f for f in seen):
            problems.append("TorchDispatchMode no longer sees aten operations "
                            "(preflight.peak_allocated)")
    except ImportError:
        problems.append("torch.utils._python_dispatch.TorchDispatchMode is gone "
                        "(preflight.peak_allocated)")
    if not callable(getattr(torch, "_foreach_div_", None)):
        problems.append("torch._foreach_div_ is gone (LeanSteps.scale_grad)")
    return problems
