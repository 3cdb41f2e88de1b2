"""Warm start: ``safelm train --init-from RUN_DIR`` (``train.init_from``).

The new run takes the init run's tokenizer (reused, never retrained) and weights. Shape keys
come from the init run's config: a value given for one of them that differs exits 2 naming the
key and both values. ``model.block_size`` may be lowered (the first rows of the position
embedding are kept), never raised. LM -> LM continues training; LM -> classifier keeps the body
and starts a new head; classifier -> classifier keeps the head when the labels are the same.
With ``model.lora_rank`` > 0 the loaded weights become the frozen base of the adapters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch.nn as nn

from .config import Config, ModelConfig
from .errors import UserError

SHAPE_KEYS = ("arch", "n_layer", "n_head", "d_model", "vocab_size", "tie_weights", "activation",
              "ln_eps")


def apply_init_config(cfg: Config, init_cfg: Config, explicit: set[str] | None) -> None:
    """Take the shape keys from ``init_cfg``. ``explicit``: the ``model.*`` keys the user set
    (command line, config file); None: treat every value that differs from the default as set."""
    default = ModelConfig()
    src = cfg.train.init_from
    for key in SHAPE_KEYS:
        given, theirs = getattr(cfg.model, key), getattr(init_cfg.model, key)
        was_set = (f"model.{key}" in explicit) if explicit is not None \
            else given != getattr(default, key)
        if was_set and given != theirs:
            raise UserError(f"--init-from {src}: model.{key} is {theirs!r} in that run but "
                            f"{given!r} here; its weights fix the shape: drop the option")
        setattr(cfg.model, key, theirs)
    T, limit = cfg.model.block_size, init_cfg.model.block_size
    set_T = ("model.block_size" in explicit) if explicit is not None \
        else T != default.block_size
    if not set_T:
        cfg.model.block_size = limit
    elif T > limit:
        raise UserError(f"--init-from {src}: model.block_size={T} is beyond that run's "
                        f"{limit} (its position embeddings); use at most {limit}")
    if init_cfg.model.lora_rank:
        raise UserError(f"--init-from {src}: that run trained LoRA adapters; start from its "
                        "base run, or export and import it merged (safelm export hf, import hf)")


def init_record(init_dir: Path) -> dict[str, Any]:
    from .hashing import file_sha256
    return {"run": str(init_dir), "model_sha256": file_sha256(init_dir / "model.safetensors")}


def load_init_weights(model: nn.Module, init_model: nn.Module, cfg: Config,
                      init_cfg: Config) -> None:
    """Copy ``init_model``'s weights into ``model`` (built without LoRA): all of them for the
    same task, all but the head from an LM into a classifier (or for other labels)."""
    state = dict(init_model.state_dict())
    T = cfg.model.block_size
    if "pos_emb.weight" in state:
        state["pos_emb.weight"] = state["pos_emb.weight"][:T].clone()
    new_head = (cfg.train.task != init_cfg.train.task
                or list(cfg.data.labels) != list(init_cfg.data.labels))
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        if cfg.model.tie_weights and cfg.train.task == "lm":
            state["head.weight"] = state["tok_emb.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"head.weight", "head.bias"} if new_head else set()
    if unexpected or set(missing) - allowed:
        raise UserError(f"--init-from {cfg.train.init_from}: its weights do not fit this model "
                        f"(missing {sorted(set(missing) - allowed)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]})")


def base_model_config(cfg: ModelConfig) -> ModelConfig:
    """The model config without adapters (the shape the init weights load into)."""
    return dataclasses.replace(cfg, lora_rank=0)
