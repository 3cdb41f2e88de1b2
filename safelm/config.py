"""One typed configuration tree: ``model`` / ``data`` / ``train`` / ``privacy``.

Every value a run uses lives here, so that ``config.json`` in a run dir is the whole recipe.
Values come from the defaults below, then a TOML file (``--config``), then ``--set
section.key=value`` overrides; each is parsed by the field's declared type and checked by
:meth:`Config.validate`, so a typo fails fast with the key's name instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class ModelConfig:
    arch: str = "transformer"  # transformer | lstm
    n_layer: int = 4  # Transformer blocks, or stacked LSTM layers
    n_head: int = 4  # attention heads; must divide d_model
    d_model: int = 128  # residual stream width (LSTM: embedding and hidden size)
    block_size: int = 64  # longest token sequence the model sees
    vocab_size: int = 512  # BPE vocabulary to train; resolved to the tokenizer's real size
    dropout: float = 0.1
    tie_weights: bool = True  # LM head shares the token embedding (module-level tying only)
    num_classes: int = 0  # classification: resolved from the training labels
    activation: str = "gelu"  # MLP: gelu (exact, erf) | gelu_new (tanh approximation, GPT-2)
    ln_eps: float = 1e-5  # LayerNorm epsilon
    # LoRA (safelm/lora.py): rank r of the adapters (0: off; base weights then train as usual)
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_targets: list[str] = field(default_factory=lambda: ["attn"])  # attn and/or mlp
    # Pretrained word vectors (safelm/init_vectors.py): a word2vec (binary/text) or GloVe file
    # whose words initialize the matching token embedding rows of a new run ("": random init)
    init_vectors: str = ""


@dataclass
class DataConfig:
    format: str = "auto"  # auto | csv | jsonl | txt (auto: from the file extension)
    text_col: str = "text"
    # Tabular rows as text: non-empty builds each row's text as "a: v | b: v" from these
    # columns, in this order (safelm/tabular.py), and data.text_col is not read
    text_cols: list[str] = field(default_factory=list)
    label_col: str = "label"
    user_col: str = ""  # empty: no users; set it to split by user (and for user-level DP)
    group_cols: list[str] = field(default_factory=list)  # demographic columns carried to predictions
    id_col: str = "example_id"  # generated as row numbers when the column is absent
    split_col: str = "split"  # if present, values train/val/test decide the split
    val_frac: float = 0.1
    test_frac: float = 0.1
    text_mode: str = "auto"  # .txt only: lines (one example a line) | running (blank-line paragraphs)
    empty_group: str = "unknown"  # unknown: empty group values become "unknown" | error
    labels: list[str] = field(default_factory=list)  # classification: resolved, sorted label names
    # Token files (safelm/tokencache.py): "" = $SAFELM_CACHE_DIR or ~/.cache/safelm/tokens;
    # "none" = a temporary dir removed at exit. They hold the training data in token form.
    cache_dir: str = ""
    tokenizer_sample: int = 20_000_000  # BPE trains on at most this many training characters


@dataclass
class TrainConfig:
    task: str = "lm"  # lm | classify
    epochs: int = 3
    max_steps: int = 0  # 0: no cap; otherwise stop after this many optimizer steps
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50  # linear warm-up, then cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clip for non-private training; 0 disables
    seed: int = 0
    checkpoint_every: int = 200  # optimizer steps between resume checkpoints (and every epoch end)
    log_every: int = 10  # optimizer steps between metrics.jsonl step records
    eval_batch_size: int = 64
    # Evaluate on at most this many blocks of each split (0: all): a fixed random subset,
    # the same at every evaluation, for corpora whose val/test splits take long to score
    eval_blocks: int = 0
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    # fp32 | bf16: the training forward pass under torch.autocast(bfloat16); weights, optimizer
    # state and (under DP) per-sample norms and the clipped sum stay fp32; evaluation is fp32
    precision: str = "fp32"
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    progress: str = "auto"  # auto (bar on a terminal only) | on | off
    # Live views of metrics.jsonl (safelm/monitor.py): TensorBoard event files in
    # RUN_DIR/tensorboard/ (pip install 'safelm[monitor]'); a local MLflow store,
    # RUN_DIR/mlflow.db (pip install 'safelm[mlflow]')
    tensorboard: bool = False
    mlflow: bool = False
    # In-training fairness mitigation (safelm/reweighting.py): none | groups (each group's
    # examples weigh the same in total) | groups_labels (reweighing: group independent of label)
    reweight: str = "none"
    reweight_cols: list[str] = field(default_factory=list)  # empty: every data.group_cols
    # Refuse a configuration whose estimated step memory exceeds what the device has
    # available (safelm/preflight.py); false skips the estimate
    memory_check: bool = True
    init_from: str = ""  # warm start: a run dir whose weights and tokenizer this run starts from


@dataclass
class PrivacyConfig:
    enabled: bool = False
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"  # prv | rdp (gdp is not offered: it underestimates epsilon)
    unit: str = "example"  # example | user (needs data.user_col)
    grad_sample_mode: str = "auto"  # auto | bk | hooks | functorch | ew
    max_physical_batch_size: int = 0  # 0: whole logical batches; else split (same accounting)
    max_examples_per_user: int = 8  # unit=user: rows taken from each sampled user per step
    # DP noise and Poisson sampling draw from a secret seed taken from the OS (never written
    # outside resume/); true brings back noise seeded from train.seed, for tests and debugging
    # only: anyone with the config can then replay the noise (privacy.json says "seeded").
    reproducible: bool = False
    # Privacy audit (safelm/canaries.py): random secrets inserted into an LM's training split,
    # each ``canary_repeats`` times, so `safelm audit privacy` can measure their exposure.
    # Works with and without DP; 0 inserts nothing.
    canaries: int = 0
    canary_repeats: int = 10
    # "" (unset: all) | all (every canary inserted, secrets from train.seed) | bernoulli (each
    # inserted by a fair coin from OS entropy: the one-run audit, `safelm audit privacy --one-run`)
    canary_inclusion: str = ""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
}


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, tree: dict[str, Any], *, source: str = "config") -> Config:
        cfg = cls()
        cfg.update(tree, source=source)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
        """Defaults, then a TOML or JSON file, then ``section.key=value`` overrides; validated."""
        cfg = cls()
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist; pass an existing .toml file")
            try:
                if p.suffix == ".json":
                    tree = json.loads(p.read_text(encoding="utf-8"))
                else:
                    tree = tomllib.loads(p.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot parse config file {p}: {e}") from None
            cfg.update(tree, source=str(p))
        for item in overrides or []:
            cfg.set(item)
        cfg.validate()
        return cfg

    def update(self, tree: dict[str, Any], *, source: str = "config") -> None:
        for section, values in tree.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section {section!r} in {source}; "
                                  f"known: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} in {source} must be a table")
            for key, value in values.items():
                self._assign(section, key, value, from_text=False)

    def set(self, item: str) -> None:
        """Apply one ``section.key=value`` override (the value is parsed by the field's type)."""
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r} must look like section.key=value, e.g. train.lr=0.001")
        dotted, value = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        self._assign(section, key, value.strip(), from_text=True)

    def _assign(self, section: str, key: str, value: Any, *, from_text: bool) -> None:
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(SECTIONS)}")
        obj = getattr(self, section)
        names = [f.name for f in dataclasses.fields(obj)]
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {section}.{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {section}.{key}{hint}")
        hint_type = typing.get_type_hints(type(obj))[key]
        setattr(obj, key, _coerce(f"{section}.{key}", value, hint_type, from_text))

    # ---- checks ---------------------------------------------------------------------------
    def validate(self) -> Config:
        m, d, t, p = self.model, self.data, self.train, self.privacy
        _choice("model.arch", m.arch, ("transformer", "lstm"))
        _choice("model.activation", m.activation, ("gelu", "gelu_new"))
        if m.lora_rank < 0 or (m.lora_rank and not m.lora_alpha > 0):
            raise ConfigError(f"model.lora_rank={m.lora_rank} must be >= 0 (0: no LoRA) and "
                              f"model.lora_alpha={m.lora_alpha} > 0")
        bad = [t for t in m.lora_targets if t not in ("attn", "mlp")]
        if m.lora_rank and (bad or not m.lora_targets):
            raise ConfigError(f"model.lora_targets={','.join(m.lora_targets)} must name attn "
                              "and/or mlp, e.g. --set model.lora_targets=attn,mlp")
        if m.lora_rank and m.arch != "transformer":
            raise ConfigError("model.lora_rank needs model.arch=transformer (adapters go on "
                              "its attention and MLP projections); set model.lora_rank=0")
        if m.lora_rank and self.train.init_from == "":
            raise ConfigError(f"model.lora_rank={m.lora_rank} trains adapters on frozen base "
                              "weights, which must come from a pretrained run: add "
                              "--init-from RUN_DIR")
        if m.init_vectors and self.train.init_from:
            raise ConfigError(f"model.init_vectors={m.init_vectors} with train.init_from="
                              f"{self.train.init_from}: the init run's embeddings are already "
                              "trained; drop model.init_vectors (or --init-from)")
        if not 0.0 < m.ln_eps < 1.0:
            raise ConfigError(f"model.ln_eps={m.ln_eps} must be in (0, 1), e.g. 1e-5")
        _choice("data.format", d.format, ("auto", "csv", "jsonl", "txt"))
        _choice("data.text_mode", d.text_mode, ("auto", "lines", "running"))
        _choice("data.empty_group", d.empty_group, ("unknown", "error"))
        if t.eval_blocks < 0:
            raise ConfigError(f"train.eval_blocks={t.eval_blocks} must be >= 0 (0: all blocks)")
        if d.tokenizer_sample < 1:
            raise ConfigError(f"data.tokenizer_sample={d.tokenizer_sample} must be >= 1 "
                              "(characters of training text the tokenizer learns from)")
        if any(not c.strip() for c in d.text_cols):
            raise ConfigError("data.text_cols has an empty column name; list the columns, "
                              "e.g. --text-cols age,job,income")
        dup = sorted({c for c in d.text_cols if d.text_cols.count(c) > 1})
        if dup:
            raise ConfigError(f"data.text_cols names {dup[0]!r} twice; list each column once")
        _choice("train.task", t.task, ("lm", "classify"))
        _choice("train.device", t.device, ("auto", "cpu", "cuda"))
        _choice("train.precision", t.precision, ("fp32", "bf16"))
        _choice("train.progress", t.progress, ("auto", "on", "off"))
        _choice("privacy.accountant", p.accountant, ("prv", "rdp"))
        _choice("privacy.unit", p.unit, ("example", "user"))
        _choice("privacy.grad_sample_mode", p.grad_sample_mode,
                ("auto", "bk", "hooks", "functorch", "ew"))
        positive = {
            "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.d_model": m.d_model,
            "model.block_size": m.block_size, "train.batch_size": t.batch_size,
            "train.lr": t.lr, "train.eval_batch_size": t.eval_batch_size,
            "train.checkpoint_every": t.checkpoint_every, "train.log_every": t.log_every,
        }
        for key, value in positive.items():
            if not value > 0 or not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be > 0")
        nonneg = {"train.epochs": t.epochs, "train.max_steps": t.max_steps,
                  "train.warmup_steps": t.warmup_steps, "train.weight_decay": t.weight_decay,
                  "train.grad_clip": t.grad_clip, "train.num_threads": t.num_threads}
        for key, value in nonneg.items():
            if not value >= 0 or not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be >= 0")
        if t.epochs == 0 and t.max_steps == 0:
            raise ConfigError("train.epochs=0 and train.max_steps=0: set at least one of them > 0")
        self._validate_reweight()
        if m.vocab_size < 259:
            raise ConfigError(f"model.vocab_size={m.vocab_size} must be >= 259 "
                              "(256 byte symbols plus 3 special tokens)")
        if m.d_model % m.n_head:
            raise ConfigError(f"model.d_model={m.d_model} is not divisible by "
                              f"model.n_head={m.n_head}; pick a head count that divides it")
        if not 0.0 <= m.dropout < 1.0:  # (NaN fails these range checks too)
            raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
        if not 0.0 <= t.lr_min_ratio <= 1.0:
            raise ConfigError(f"train.lr_min_ratio={t.lr_min_ratio} must be in [0, 1]")
        for key in ("val_frac", "test_frac"):
            v = getattr(d, key)
            if not 0.0 <= v < 0.5:
                raise ConfigError(f"data.{key}={v} must be in [0, 0.5)")
        self._validate_canaries()
        return self

    def _validate_canaries(self) -> None:
        p = self.privacy
        if p.canaries < 0:
            raise ConfigError(f"privacy.canaries={p.canaries} must be >= 0 (0: none)")
        if p.canary_repeats < 1:
            raise ConfigError(f"privacy.canary_repeats={p.canary_repeats} must be >= 1")
        _choice("privacy.canary_inclusion", p.canary_inclusion, ("", "all", "bernoulli"))
        if p.canary_inclusion and not p.canaries:
            raise ConfigError(f"privacy.canary_inclusion={p.canary_inclusion} needs canaries: "
                              "set privacy.canaries=M (e.g. 1000 for the one-run audit) or "
                              "drop privacy.canary_inclusion")
        if p.canaries and self.train.task != "lm":
            raise ConfigError(f"privacy.canaries={p.canaries} needs train.task=lm (canaries are "
                              "secret sequences in language-model training text); set it to 0")

    def _validate_reweight(self) -> None:
        t, d = self.train, self.data
        _choice("train.reweight", t.reweight, ("none", "groups", "groups_labels"))
        if t.reweight == "none":
            return
        cols = t.reweight_cols or d.group_cols
        if not cols:
            raise ConfigError(f"train.reweight={t.reweight} needs group columns: set "
                              "data.group_cols (or train.reweight_cols)")
        unknown = [c for c in cols if c not in d.group_cols]
        if unknown:
            raise ConfigError(f"train.reweight_cols: {unknown[0]!r} is not in data.group_cols "
                              f"({', '.join(d.group_cols) or 'empty'}); add it there")
        if t.reweight == "groups_labels" and t.task != "classify":
            raise ConfigError("train.reweight=groups_labels needs labels (train.task=classify); "
                              "use train.reweight=groups for language models")
        if self.privacy.enabled:
            raise ConfigError(f"train.reweight={t.reweight} with privacy.enabled: the weights "
                              "come from the private data's group counts, which DP-SGD does "
                              "not protect; train without one of them")

    # ---- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _coerce(key: str, value: Any, hint: Any, from_text: bool) -> Any:
    """Parse ``value`` as the field type ``hint``; raise ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # `float | None`
        inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
        if value is None or (from_text and str(value).lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, inner, from_text)
    if origin is list:
        if from_text and isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list):
            items = value
        else:
            raise ConfigError(f"{key} must be a list of names (comma-separated with --set)")
        return [str(v) for v in items]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except ValueError:
        pass
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}={value!r} is not a valid {name}")
