"""Hugging Face GPT-2 checkpoints in and out: ``safelm import hf`` and ``safelm export hf``.

SafeLM's Transformer is GPT-2's architecture (pre-LayerNorm blocks, learned positions, causal
attention scaled by 1/sqrt(head_dim), a 4x GELU MLP, a head tied to the token embedding), laid
out differently, so a checkpoint converts exactly, in both directions, by renaming tensors:

* GPT-2 stores its projections as ``Conv1D`` with weights ``[in, out]`` (``y = x W + b``); an
  ``nn.Linear`` stores ``[out, in]``: every projection weight is transposed;
* GPT-2 fuses Q, K and V into ``c_attn`` (``[d, 3d]``, in the order q, k, v); SafeLM keeps them
  as three Linears (the one-backward DP clipping shares their input Gram): split / concatenated;
* ``activation_function`` ``gelu_new`` (the tanh approximation, GPT-2's own) or ``gelu``
  becomes ``model.activation``; ``layer_norm_epsilon`` becomes ``model.ln_eps``;
  ``n_positions`` becomes ``model.block_size`` (or less, with ``--block-size``);
* the LM head is tied to ``wte`` (``tie_word_embeddings``) or kept as its own weight;
* GPT-2's sequence classifier has a bias-free ``score`` layer, SafeLM's classifier head has a
  bias: on export the bias is folded exactly into ``ln_f``'s bias, which in
  ``GPT2ForSequenceClassification`` feeds only ``score`` (solve ``W delta = b``; refused if the
  residual is not ~0, i.e. more classes than model width).

Tokenizers: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (built with HF
``tokenizers`` as byte-level BPE). GPT-2 has one special token, ``<|endoftext|>``, which SafeLM
then uses as bos, eos and pad (safelm/tokenizer.py).

Nothing is unpickled (a directory with only ``pytorch_model.bin`` is refused) and nothing is
downloaded (a hub id is refused). Writing is crash-safe: everything is built in a temporary
directory beside ``--out`` and renamed into place. Needs ``transformers`` (``pip install
'safelm[hf]'``) for export; import reads safetensors and JSON directly but checks for it too, so
that one extra serves both.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from . import rundir
from .config import Config
from .errors import UserError
from .model import build_model
from .tokenizer import Tokenizer

INSTALL_HINT = "pip install 'safelm[hf]'"
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(f"Hugging Face import/export needs the transformers library: "
                        f"{INSTALL_HINT}") from None
    return transformers


def _fresh_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; give a new folder")


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty (checked by _fresh_out)
    tmp.rename(out)


# ---- import ----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None


def _hf_config(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        hint = (" (it looks like a Hugging Face Hub id; SafeLM never downloads: fetch the "
                "checkpoint elsewhere, e.g. `huggingface-cli download ID --local-dir DIR`, "
                "then pass DIR)" if "/" in str(src) and not src.exists() else "")
        raise UserError(f"{src}: not a local checkpoint directory{hint}")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{src}: missing config.json; give a Hugging Face checkpoint folder "
                        "(config.json, model.safetensors, tokenizer.json or vocab.json + "
                        "merges.txt)")
    hf = _read_json(cfg_path)
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{cfg_path}: model_type={hf.get('model_type')!r} is not supported; "
                        "SafeLM imports GPT-2-family checkpoints (model_type gpt2: "
                        "GPT2LMHeadModel, GPT2Model)")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise UserError(f"{cfg_path}: activation_function={act!r} is not supported; "
                        f"supported: {', '.join(ACTIVATIONS)}")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if bool(hf.get(key, ok)) != ok:
            raise UserError(f"{cfg_path}: {key}={hf.get(key)} is not supported (SafeLM's "
                            f"attention needs {key}={ok})")
    d = int(hf["n_embd"])
    if hf.get("n_inner") not in (None, 4 * d):
        raise UserError(f"{cfg_path}: n_inner={hf['n_inner']} is not supported; SafeLM's MLP "
                        f"is 4 x n_embd = {4 * d}")
    return hf


def _hf_tokenizer(src: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if (src / "tokenizer.json").is_file():
        try:
            hf = HFTokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise UserError(f"{src / 'tokenizer.json'}: not a tokenizers file ({e})") from None
    elif (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        try:
            hf = HFTokenizer(models.BPE.from_file(str(src / "vocab.json"),
                                                  str(src / "merges.txt")))
        except Exception as e:
            raise UserError(f"{src}: vocab.json/merges.txt do not form a BPE tokenizer "
                            f"({e})") from None
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
    else:
        raise UserError(f"{src}: no tokenizer; give tokenizer.json, or vocab.json + merges.txt")
    try:
        return Tokenizer(hf)
    except ValueError as e:
        raise UserError(f"{src}: {e}") from None


def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    path = src / "model.safetensors"
    if not path.is_file():
        if (src / "pytorch_model.bin").is_file():
            raise UserError(f"{src}: only pytorch_model.bin, which SafeLM does not unpickle "
                            "(it can run code); convert it to safetensors first, e.g. "
                            "`model = GPT2LMHeadModel.from_pretrained(DIR); "
                            "model.save_pretrained(DIR, safe_serialization=True)` in a trusted "
                            "environment")
        raise UserError(f"{src}: missing model.safetensors")
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    # GPT2LMHeadModel prefixes its body with "transformer."; GPT2Model does not.
    return {k[len("transformer."):] if k.startswith("transformer.") else k: v
            for k, v in sd.items()}


def _take(sd: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], src: Path
          ) -> torch.Tensor:
    if key not in sd:
        raise UserError(f"{src / 'model.safetensors'}: missing tensor {key}")
    t = sd[key]
    if tuple(t.shape) != shape:
        raise UserError(f"{src / 'model.safetensors'}: {key} has shape {tuple(t.shape)}, "
                        f"config.json implies {shape}")
    return t.float()


def import_hf(src: str | Path, out: str | Path, block_size: int | None = None) -> Config:
    """Convert a local GPT-2-family checkpoint into a SafeLM LM run dir at ``out``."""
    require_transformers()
    src, out = Path(src), Path(out)
    hf = _hf_config(src)
    _fresh_out(out)
    sd = _hf_weights(src)
    tok = _hf_tokenizer(src)
    d, L, H = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
    V, P = int(hf["vocab_size"]), int(hf["n_positions"])
    if tok.vocab_size > V:
        raise UserError(f"{src}: the tokenizer has {tok.vocab_size} tokens but config.json "
                        f"vocab_size={V}; they must come from the same checkpoint")
    T = P if block_size is None else block_size
    if not 1 <= T <= P:
        raise UserError(f"--block-size {T} must be in [1, n_positions={P}] of {src}/config.json")
    tie = bool(hf.get("tie_word_embeddings", True))
    cfg = Config()
    m = cfg.model
    m.arch, m.n_layer, m.n_head, m.d_model, m.block_size = "transformer", L, H, d, T
    m.vocab_size, m.tie_weights, m.num_classes = V, tie, 0
    m.dropout = float(hf.get("resid_pdrop", 0.1))
    m.activation = ACTIVATIONS[hf.get("activation_function", "gelu_new")]
    m.ln_eps = float(hf.get("layer_norm_epsilon", 1e-5))
    cfg.train.task = "lm"
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"{src}/config.json does not fit SafeLM: {e}") from None
    ours: dict[str, torch.Tensor] = {
        "tok_emb.weight": _take(sd, "wte.weight", (V, d), src),
        "pos_emb.weight": _take(sd, "wpe.weight", (P, d), src)[:T].clone(),
        "ln_f.weight": _take(sd, "ln_f.weight", (d,), src),
        "ln_f.bias": _take(sd, "ln_f.bias", (d,), src)}
    for i in range(L):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln_hf, ln in (("ln_1", "ln1"), ("ln_2", "ln2")):
            ours[f"{b}{ln}.weight"] = _take(sd, f"{h}{ln_hf}.weight", (d,), src)
            ours[f"{b}{ln}.bias"] = _take(sd, f"{h}{ln_hf}.bias", (d,), src)
        w = _take(sd, f"{h}attn.c_attn.weight", (d, 3 * d), src)  # Conv1D [in, out]
        bias = _take(sd, f"{h}attn.c_attn.bias", (3 * d,), src)
        for j, name in enumerate(("q", "k", "v")):
            ours[f"{b}attn.{name}.weight"] = w[:, j * d:(j + 1) * d].t().contiguous()
            ours[f"{b}attn.{name}.bias"] = bias[j * d:(j + 1) * d].clone()
        for hf_name, name, shape in (("attn.c_proj", "attn.proj", (d, d)),
                                     ("mlp.c_fc", "mlp.fc", (d, 4 * d)),
                                     ("mlp.c_proj", "mlp.proj", (4 * d, d))):
            ours[f"{b}{name}.weight"] = _take(sd, f"{h}{hf_name}.weight", shape,
                                              src).t().contiguous()
            ours[f"{b}{name}.bias"] = _take(sd, f"{h}{hf_name}.bias", (shape[1],), src)
    if tie:
        ours["head.weight"] = ours["tok_emb.weight"]
    else:
        ours["head.weight"] = _take(sd, "lm_head.weight", (V, d), src)
    model = build_model(m, "lm")
    model.load_state_dict(ours, strict=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent.resolve()))
    try:
        rundir.save_weights(model, tmp / rundir.WEIGHTS)
        rundir.atomic_write_text(tmp / rundir.CONFIG, cfg.to_json() + "\n")
        tok.save(tmp / rundir.TOKENIZER)
        rundir.atomic_write_json(tmp / "imported.json", {
            "source": str(src.resolve()), "format": "huggingface-gpt2",
            "config_sha256": _sha(src / "config.json"),
            "weights_sha256": _sha(src / "model.safetensors")})
        rundir.write_checksums(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def _sha(path: Path) -> str:
    from .hashing import file_sha256
    return file_sha256(path)


# ---- export ----------------------------------------------------------------------------------
def _fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, ln_bias: torch.Tensor
                    ) -> torch.Tensor:
    """ln_f.bias + delta with ``weight @ delta == bias`` (exact up to rounding), so that a
    bias-free ``score`` gives the same logits; refused when no such delta exists."""
    w, b = weight.double(), bias.double()
    delta = torch.linalg.lstsq(w, b.unsqueeze(1)).solution.squeeze(1)  # min-norm solution
    residual = float((w @ delta - b).abs().max())
    if residual > 1e-6 * max(1.0, float(b.abs().max())):
        raise UserError(f"cannot export this classifier to GPT2ForSequenceClassification: its "
                        f"head bias is not reachable through ln_f (residual {residual:.2e}; "
                        "more classes than model width?)")
    return (ln_bias.double() + delta).to(ln_bias.dtype)


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """Write ``out``: a transformers checkpoint (GPT2LMHeadModel or
    GPT2ForSequenceClassification, safetensors) with a fast tokenizer, logits equal to SafeLM's."""
    transformers = require_transformers()
    from .api import load_run

    run_dir, out = Path(run_dir), Path(out)
    run = load_run(run_dir, device="cpu")
    cfg, m, task = run.cfg, run.cfg.model, run.cfg.train.task
    if m.arch != "transformer":
        raise UserError(f"{run_dir}: model.arch={m.arch}; export supports arch=transformer "
                        "(GPT-2's architecture)")
    _fresh_out(out)
    d, L = m.d_model, m.n_layer
    sd = {k: v.detach().float().cpu() for k, v in run.model.state_dict().items()}
    tok = run.tokenizer
    hf_cfg = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=d, n_layer=L,
        n_head=m.n_head, activation_function="gelu_new" if m.activation == "gelu_new" else "gelu",
        layer_norm_epsilon=m.ln_eps, resid_pdrop=m.dropout, embd_pdrop=m.dropout,
        attn_pdrop=m.dropout, tie_word_embeddings=bool(m.tie_weights) if task == "lm" else False,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    body: dict[str, torch.Tensor] = {
        "wte.weight": sd["tok_emb.weight"], "wpe.weight": sd["pos_emb.weight"],
        "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    for i in range(L):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln_hf, ln in (("ln_1", "ln1"), ("ln_2", "ln2")):
            body[f"{h}{ln_hf}.weight"] = sd[f"{b}{ln}.weight"]
            body[f"{h}{ln_hf}.bias"] = sd[f"{b}{ln}.bias"]
        body[f"{h}attn.c_attn.weight"] = torch.cat(
            [sd[f"{b}attn.{n}.weight"].t() for n in ("q", "k", "v")], dim=1).contiguous()
        body[f"{h}attn.c_attn.bias"] = torch.cat([sd[f"{b}attn.{n}.bias"] for n in "qkv"])
        for hf_name, name in (("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                              ("mlp.c_proj", "mlp.proj")):
            body[f"{h}{hf_name}.weight"] = sd[f"{b}{name}.weight"].t().contiguous()
            body[f"{h}{hf_name}.bias"] = sd[f"{b}{name}.bias"]
    full = {f"transformer.{k}": v for k, v in body.items()}
    if task == "lm":
        hf_cfg.architectures = ["GPT2LMHeadModel"]
        full["lm_head.weight"] = sd["head.weight"]
        model = transformers.GPT2LMHeadModel(hf_cfg)
    else:
        labels = list(cfg.data.labels) or [str(i) for i in range(m.num_classes)]
        hf_cfg.architectures = ["GPT2ForSequenceClassification"]
        hf_cfg.num_labels = m.num_classes
        hf_cfg.id2label = {i: lab for i, lab in enumerate(labels)}
        hf_cfg.label2id = {lab: i for i, lab in enumerate(labels)}
        full["score.weight"] = sd["head.weight"]
        full["transformer.ln_f.bias"] = _fold_head_bias(sd["head.weight"], sd["head.bias"],
                                                        sd["ln_f.bias"])
        model = transformers.GPT2ForSequenceClassification(hf_cfg)
    missing, unexpected = model.load_state_dict(full, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and m.tie_weights)]
    if missing or unexpected:  # a transformers version with other names: fail loudly
        raise RuntimeError(f"transformers {transformers.__version__} GPT-2 layout differs: "
                           f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.eval()
    transformers.utils.logging.disable_progress_bar()  # one line of output, not a bar
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.hf, bos_token=tok.hf.id_to_token(tok.bos_id),
        eos_token=tok.hf.id_to_token(tok.eos_id), pad_token=tok.hf.id_to_token(tok.pad_id))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent.resolve()))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        (tmp / "safelm.json").write_text(json.dumps({
            "source_run": run_dir.resolve().name, "task": task, "safelm_config": cfg.to_dict(),
            "note": "SafeLM inputs start with the bos token: encode as [bos_token_id] + "
                    "tokenizer(text).input_ids"}, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["export_hf", "import_hf", "require_transformers"]
