"""Hugging Face interop (safelm/hf.py): tiny GPT-2 checkpoints built here with transformers
(random weights, save_pretrained; nothing downloaded) import with logits equal to
transformers' own, and SafeLM runs (imported LMs and trained classifiers) export to
checkpoints that transformers' Auto classes load with equal logits and token ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, write_cls_csv
from safelm import Config, train_run
from safelm.api import load_run
from safelm.cli import main

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
TEXT = ["once upon a time there was a fox", "the quick brown fox jumps over the lazy dog",
        "a story about a careful pig and a duck", "hello world, tokens and merges"] * 20


def gpt2_tokenizer(vocab: int):
    """A byte-level BPE with GPT-2's one special token, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def make_checkpoint(d: Path, *, activation="gelu_new", tie=True, eps=1e-5, vocab=320,
                    positions=24, tokenizer="json", seed=0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2,
                                  n_head=4, activation_function=activation,
                                  layer_norm_epsilon=eps, tie_word_embeddings=tie)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases, norms, attention and MLP activations, so
        for name, p in model.named_parameters():  # that any mix-up shows in the logits
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "c_fc" in name or "c_attn" in name or "c_proj" in name:
                p.mul_(40.0)
            elif "wte" in name:
                p.mul_(10.0)
    model.save_pretrained(d, safe_serialization=True)
    tok = gpt2_tokenizer(vocab)
    if tokenizer == "json":
        tok.save(str(d / "tokenizer.json"))
    else:  # vocab.json + merges.txt, as older GPT-2 checkpoints ship them
        tok.model.save(str(d))
    return model


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the checkpoints printed
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("activation,tie,eps,tokenizer", [
    ("gelu_new", True, 1e-5, "json"), ("gelu", False, 1e-6, "merges")])
def test_import_gives_transformers_logits(tmp_path, capsys, activation, tie, eps, tokenizer):
    src = tmp_path / "ckpt"
    ref = make_checkpoint(src, activation=activation, tie=tie, eps=eps, tokenizer=tokenizer)
    rc, out, err = cli(capsys, "import", "hf", src, "--out", tmp_path / "run")
    assert rc == 0, err
    run = load_run(tmp_path / "run", device="cpu")
    m = run.cfg.model
    assert (m.activation, m.tie_weights, m.ln_eps, m.block_size) == (activation, tie, eps, 24)
    ids = torch.randint(0, 320, (3, 24))
    with torch.no_grad():
        want = ref(ids).logits
        got = run.model(ids)
    assert (got - want).abs().max() < 1e-4
    # the tokenizer is the checkpoint's own: same ids as tokenizers' direct encoding
    assert run.tokenizer.encode("the lazy fox") == gpt2_tokenizer(320).encode("the lazy fox").ids
    assert run.tokenizer.bos_id == run.tokenizer.eos_id == run.tokenizer.pad_id


def test_the_wrong_activation_would_be_caught(tmp_path, capsys):
    """Control for the test above: reading gelu_new weights as exact gelu changes the logits
    by more than the 1e-4 tolerance, so the equality really checks the activation mapping."""
    src = tmp_path / "ckpt"
    ref = make_checkpoint(src, activation="gelu_new")
    assert cli(capsys, "import", "hf", src, "--out", tmp_path / "run")[0] == 0
    cfg = json.loads((tmp_path / "run/config.json").read_text())
    cfg["model"]["activation"] = "gelu"
    from safelm.model import build_model
    from safelm.rundir import load_weights
    wrong = build_model(Config.from_dict(cfg).model, "lm").eval()
    load_weights(wrong, tmp_path / "run/model.safetensors")
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        assert (wrong(ids) - ref(ids).logits).abs().max() > 1e-4


def test_round_trip_lm_import_export_transformers(tmp_path, capsys):
    src = tmp_path / "ckpt"
    make_checkpoint(src)
    assert cli(capsys, "import", "hf", src, "--out", tmp_path / "run", "--block-size", "16")[0] == 0
    rc, out, err = cli(capsys, "export", "hf", tmp_path / "run", "--out", tmp_path / "hf")
    assert rc == 0, err
    run = load_run(tmp_path / "run", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - run.model(ids)).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("once upon a time", "héllo, wörld 🙂"):
        assert hf_tok(text)["input_ids"] == run.tokenizer.encode(text)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cls")
    run = d / "run"
    train_run(write_cls_csv(d / "cls.csv"),
              Config.load(None, TINY + ["train.epochs=1", "train.task=classify",
                                        "model.activation=gelu_new"]), run)
    return run


def test_classifier_exports_to_sequence_classification(classifier, tmp_path, capsys):
    rc, _, err = cli(capsys, "export", "hf", classifier, "--out", tmp_path / "hf")
    assert rc == 0, err
    run = load_run(classifier, device="cpu")
    assert float(run.model.head.bias.abs().max()) > 0  # the bias fold is exercised
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    assert hf.config.id2label == dict(enumerate(run.cfg.data.labels))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok, T = run.tokenizer, run.cfg.model.block_size
    texts = ["a great and lovely film", "awful", "the service was terrible and slow today"]
    rows = [([tok.bos_id] + hf_tok(t)["input_ids"])[:T] for t in texts]
    assert rows[0][1:] == tok.encode(texts[0])
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in rows])
    with torch.no_grad():
        ours = run.model(ids, lengths)
        theirs = hf(ids, attention_mask=(torch.arange(T) < lengths[:, None]).long()).logits
    assert (ours - theirs).abs().max() < 1e-4, (ours, theirs)


def exit2(capsys, *args) -> str:
    rc, out, err = cli(capsys, *args)
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_checkpoints_exit_2_naming_the_problem(tmp_path, capsys):
    src = tmp_path / "ckpt"
    make_checkpoint(src)
    out = tmp_path / "run"
    # a hub id instead of a folder: nothing is downloaded
    assert "never downloads" in exit2(capsys, "import", "hf", "openai-community/gpt2",
                                      "--out", out)
    # only a pickle
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text((src / "config.json").read_text())
    (pkl / "pytorch_model.bin").write_bytes(b"not read")
    assert "safetensors" in exit2(capsys, "import", "hf", pkl, "--out", out)
    # another architecture
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "gpt2" in exit2(capsys, "import", "hf", other, "--out", out)
    # a context beyond n_positions
    assert "n_positions=24" in exit2(capsys, "import", "hf", src, "--out", out,
                                     "--block-size", "64")
    # a tokenizer larger than the model's vocabulary
    big = tmp_path / "big"
    make_checkpoint(big, vocab=300)
    gpt2_tokenizer(400).save(str(big / "tokenizer.json"))
    assert "vocab_size=300" in exit2(capsys, "import", "hf", big, "--out", out)
    # a tensor of the wrong shape
    bad = tmp_path / "bad"
    make_checkpoint(bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_embd"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    assert "wte.weight has shape" in exit2(capsys, "import", "hf", bad, "--out", out)
    # nothing half-written by any of these
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    # an existing non-empty --out is refused
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "not empty" in exit2(capsys, "import", "hf", src, "--out", out)
    assert (out / "keep.txt").read_text() == "x"


def test_lstm_export_is_refused(tmp_path, capsys, cls_csv):
    run = tmp_path / "lstm"
    train_run(cls_csv, Config.load(None, TINY + ["train.epochs=1", "train.task=classify",
                                                 "model.arch=lstm"]), run)
    assert "arch=transformer" in exit2(capsys, "export", "hf", run, "--out", tmp_path / "hf")


def test_without_transformers_the_error_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None; from safelm.cli import main; "
            f"raise SystemExit(main(['export', 'hf', {str(tmp_path)!r}, '--out', "
            f"{str(tmp_path / 'x')!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert "pip install 'safelm[hf]'" in res.stderr and "Traceback" not in res.stderr
