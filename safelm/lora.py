"""LoRA (Hu et al., ICLR 2022) for SafeLM's Transformer, built so DP-SGD clips it exactly.

Why our own layer and not the ``peft`` library: peft wraps layers in classes of its own whose
forward does work outside standard modules, and Opacus issue #820 reports peft >= 0.14 silently
breaking Opacus' per-sample-gradient hooks. Here an adapter is two plain ``nn.Linear`` layers,
``lora_A`` (d_in -> r, no bias) and ``lora_B`` (r -> d_out, no bias, zero-initialized, so a new
adapter starts as the identity change), beside the frozen base ``nn.Linear``:

    y = base(x) + (alpha / r) * lora_B(lora_A(x))

Per-sample clipping then needs nothing new: the one-backward clipping (``safelm/privacy/bk.py``)
and Opacus' hooks both treat ``lora_A`` and ``lora_B`` as the Linears they are, and skip frozen
parameters; the oracle tests compare against a float64 ``vmap(grad)`` over the trainable
parameters only. ``model.lora_targets``: ``attn`` (q, k, v, proj) and/or ``mlp`` (fc, proj).
Only the adapters train, plus a classifier's head.

The run dir keeps the adapters (``model.safetensors`` holds ``...q.base.weight``,
``...q.lora_A.weight``, ``...q.lora_B.weight``); :func:`merge_lora` folds them into plain
Linears (``W + (alpha / r) B A``) for predict, export and release.
"""

from __future__ import annotations

import torch
import torch.nn as nn

TARGETS = {"attn": ("q", "k", "v", "proj"), "mlp": ("fc", "proj")}


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False,
                                device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False,
                                device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)  # as nn.Linear (and LoRA)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear with the same function: weight W + scale * B A, same bias."""
        out = nn.Linear(self.base.in_features, self.base.out_features,
                        bias=self.base.bias is not None, device=self.base.weight.device,
                        dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.weight.double() @ self.lora_A.weight.double()) * self.scale
            out.weight.copy_((self.base.weight.double() + delta).to(out.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _targets(model: nn.Module, targets: list[str]):
    for block in getattr(model, "blocks", []):
        for part, names in TARGETS.items():
            if part not in targets:
                continue
            parent = block.attn if part == "attn" else block.mlp
            for name in names:
                yield parent, name


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], task: str
               ) -> nn.Module:
    """Wrap the target Linears of every block in :class:`LoRALinear`; freeze everything
    else except a classifier's head. Returns ``model`` (changed in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name in _targets(model, targets):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    if task == "classify":
        for p in model.head.parameters():
            p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` with its merged plain Linear (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), tied weights counted once."""
    params = list(dict.fromkeys(model.parameters()))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
