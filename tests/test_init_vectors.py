"""``model.init_vectors``: pretrained word vectors as the starting token embedding.

Oracle style: the vector files are written here in all three formats; the covered rows are
checked against a projection computed here another way (eigenvectors of the covariance, not
the SVD the code uses), coverage against a count over the vocabulary's token strings, and the
uncovered rows against the seed's random init.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from safelm.api import initial_model, prepare
from safelm.cli import main
from safelm.config import Config
from safelm.init_vectors import VECTORS_FILE, load, plan
from release_helpers import cli
from safelm.model import INIT_STD

SMALL = ["model.n_layer=1", "model.d_model=8", "model.n_head=2", "model.block_size=16",
         "model.vocab_size=300", "model.dropout=0.0", "train.task=classify"]
CLI_TINY = ["--set", "model.n_layer=1", "--set", "model.d_model=16", "--set", "model.n_head=2",
            "--set", "model.block_size=16", "--set", "model.vocab_size=300",
            "--set", "train.max_steps=2", "--set", "train.batch_size=8",
            "--set", "train.device=cpu", "--set", "train.progress=off"]

# The file's words: lower-case data words, "film" twice (the first row counts), "paris" only
# lower-cased (the token "Paris" falls back to it), "London" and "london" (exact wins), and
# words the data lacks.
FILE_WORDS = ["the", "film", "in", "was", "great", "awful", "film", "paris", "London",
              "london", "and", "zebra", "quixotic", "."]


def write_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        good = i % 2 == 0
        city, verdict = rng.choice(["Paris", "London"]), "great" if good else "awful"
        text = (f"{city}: the film was {verdict}" if i % 3 == 0 else
                f"the film in {city} was {verdict} and long")
        lines.append(f"{text},{'pos' if good else 'neg'}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def vectors_for(words: list[str], dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(len(words), dim)).astype(np.float32)


def write_vectors(path: Path, fmt: str, words: list[str], m: np.ndarray) -> Path:
    if fmt == "word2vec-binary":
        body = b"".join(w.encode() + b" " + struct.pack(f"<{m.shape[1]}f", *row) + b"\n"
                        for w, row in zip(words, m))
        path.write_bytes(f"{len(words)} {m.shape[1]}\n".encode() + body)
        return path
    rows = [w + " " + " ".join(repr(float(v)) for v in row) for w, row in zip(words, m)]
    head = [f"{len(words)} {m.shape[1]}"] if fmt == "word2vec-text" else []
    path.write_text("\n".join(head + rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "cities.csv")


@pytest.fixture(scope="module")
def prepared(data):
    cfg = Config.load(None, SMALL)
    return prepare(data, cfg)


def expected_coverage(vocab: dict[str, int], specials: set[int], words: list[str]
                      ) -> dict[int, str]:
    """Hand count over the token strings: token id -> the file word whose row it takes."""
    known = set(words)
    out = {}
    for token, i in vocab.items():
        if i in specials:
            continue
        word = token[1:] if token.startswith("Ġ") else token
        if word in known:
            out[i] = word
        elif word.lower() in known:
            out[i] = word.lower()
    return out


def oracle_rows(X: np.ndarray, d: int) -> tuple[np.ndarray, str]:
    """Centre; top-d eigenvectors of the scatter matrix (largest-|entry| positive) when the
    dimension exceeds d, else zero-pad; scale to RMS INIT_STD."""
    Xc = X.astype(np.float64) - X.astype(np.float64).mean(0)
    D = X.shape[1]
    if D > d:
        vals, vecs = np.linalg.eigh(Xc.T @ Xc)
        V = vecs[:, np.argsort(vals)[::-1][:d]]  # [D, d]
        V = V * np.sign(V[np.abs(V).argmax(0), np.arange(d)])
        P, method = Xc @ V, "pca"
    else:
        P, method = np.pad(Xc, ((0, 0), (0, d - D))), ("pad" if D < d else "identity")
    return P * (INIT_STD / np.sqrt(np.mean(P ** 2))), method


@pytest.mark.parametrize("fmt", ["word2vec-text", "glove-text", "word2vec-binary"])
@pytest.mark.parametrize("dim", [50, 8, 5])  # d_model is 8: PCA, identity, zero-pad
def test_covered_rows_match_an_independent_projection(tmp_path, prepared, fmt, dim):
    tok, cfg = prepared.tokenizer, prepared.cfg
    vocab = tok.hf.get_vocab()
    for t in ("Paris", "ĠParis", "ĠLondon", "Ġfilm", "the", "Ġgreat"):  # the premise
        assert t in vocab, t
    m = vectors_for(FILE_WORDS, dim)
    path = write_vectors(tmp_path / f"v.{fmt}", fmt, FILE_WORDS, m)
    init = plan(load(path), tok, cfg.model.d_model, INIT_STD)

    want = expected_coverage(vocab, {tok.pad_id, tok.bos_id, tok.eos_id}, FILE_WORDS)
    ids = sorted(want)
    assert init.ids.tolist() == ids
    first = {}
    for row, w in enumerate(FILE_WORDS):
        first.setdefault(w, row)
    inv = {i: t for t, i in vocab.items()}
    assert want[vocab["ĠParis"]] == "paris" and want[vocab["ĠLondon"]] == "London"
    rec = init.record
    assert rec["coverage"] == {"covered": len(ids), "vocab": tok.vocab_size,
                               "fraction": len(ids) / tok.vocab_size}
    lowered = sum(1 for i in ids if (inv[i][1:] if inv[i].startswith("Ġ") else inv[i])
                  != want[i])
    assert lowered >= 1 and rec["matched"] == {"exact": len(ids) - lowered,
                                               "lowercased": lowered}
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (rec["format"], rec["dim"], rec["d_model"], rec["words"]) == \
        (fmt, dim, 8, len(FILE_WORDS))

    rows, method = oracle_rows(m[[first[want[i]] for i in ids]], cfg.model.d_model)
    assert rec["method"] == method

    model = initial_model(cfg, vectors=init)  # the code path train_run takes
    plain = initial_model(cfg)
    emb, emb0 = model.tok_emb.weight.detach(), plain.tok_emb.weight.detach()
    np.testing.assert_allclose(emb[ids].numpy(), rows, atol=1e-6)
    assert np.sqrt(np.mean(emb[ids].numpy().astype(np.float64) ** 2)) == \
        pytest.approx(INIT_STD, rel=1e-5)
    others = [i for i in range(emb.shape[0]) if i not in want]
    assert torch.equal(emb[others], emb0[others])  # uncovered rows: the seed's init
    for name, p in plain.state_dict().items():  # nothing else changed
        if name != "tok_emb.weight":
            assert torch.equal(model.state_dict()[name], p), name
    # the same word with and without the space marker takes the same row
    np.testing.assert_array_equal(emb[vocab["Paris"]].numpy(), emb[vocab["ĠParis"]].numpy())


def test_non_text_tokens_and_specials_are_never_covered(tmp_path, prepared):
    tok = prepared.tokenizer
    words = ["<pad>", "<bos>", "<eos>", "Ġ", "Ġthe", "the", "film"]
    path = write_vectors(tmp_path / "v.txt", "glove-text", words, vectors_for(words, 4))
    init = plan(load(path), tok, 8, INIT_STD)
    vocab = tok.hf.get_vocab()
    assert "<pad>" in vocab and "Ġ" in vocab  # the premise: they are tokens
    assert init.ids.tolist() == sorted(i for t, i in vocab.items()
                                       if t in ("the", "Ġthe", "film", "Ġfilm"))
    # "Ġthe" in a file is a word spelled with that letter, not a space: "the" takes "the"
    row = init.rows[init.ids.tolist().index(vocab["the"])]
    assert np.array_equal(row, init.rows[init.ids.tolist().index(vocab["Ġthe"])])


run_cli = cli  # tests/release_helpers.py


@pytest.mark.slow
def test_train_cli_reports_and_records_coverage_then_resumes_without_the_file(
        tmp_path, data, capsys):
    m = vectors_for(FILE_WORDS, 20)
    vec = write_vectors(tmp_path / "vec.bin", "word2vec-binary", FILE_WORDS, m)
    out = tmp_path / "run"
    args = ["train", "--data", data, "--task", "classify", "--out", out, *CLI_TINY,
            "--set", f"model.init_vectors={vec}"]
    rc, stdout, err = run_cli(capsys, *args)
    assert rc == 0, err
    rec = json.loads((out / VECTORS_FILE).read_text())
    c = rec["coverage"]
    line = (f"init vectors: {c['covered']}/{c['vocab']} tokens covered "
            f"({100 * c['fraction']:.0f}%) from {vec} (D=20 -> PCA to 16)")
    assert line in err.splitlines()
    assert rec["method"] == "pca" and rec["format"] == "word2vec-binary" and c["covered"] > 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "model" and first["init_vectors"] == c
    assert json.loads((out / "config.json").read_text())["model"]["init_vectors"] == str(vec)
    # vectors apply only when a run starts: resuming needs neither the file nor reapplies it
    vec.unlink()
    rc, _, err = run_cli(capsys, "train", "--data", data, "--out", out, "--resume")
    assert rc == 0, err
    assert "init vectors:" not in err


def assert_refused(rc, err, out: Path, *needles):
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()


def test_bad_vectors_exit_2_and_write_nothing(tmp_path, data, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", data, "--task", "classify", "--out", out, *CLI_TINY]

    missing = tmp_path / "nope.txt"
    rc, _, err = run_cli(capsys, *base, "--set", f"model.init_vectors={missing}")
    assert_refused(rc, err, out, "model.init_vectors", "cannot read")

    ragged = tmp_path / "ragged.txt"
    ragged.write_text("the 1 2 3\nfilm 1 2\n", encoding="utf-8")
    rc, _, err = run_cli(capsys, *base, "--set", f"model.init_vectors={ragged}")
    assert_refused(rc, err, out, "model.init_vectors", "line 2")

    words = ["zebra", "quixotic"]
    foreign = write_vectors(tmp_path / "f.txt", "word2vec-text", words, vectors_for(words, 4))
    rc, _, err = run_cli(capsys, *base, "--set", f"model.init_vectors={foreign}")
    assert_refused(rc, err, out, "model.init_vectors", "no token", "drop model.init_vectors")

    one = write_vectors(tmp_path / "one.txt", "glove-text", ["the"], vectors_for(["the"], 4))
    rc, _, err = run_cli(capsys, *base, "--set", f"model.init_vectors={one}")
    assert_refused(rc, err, out, "model.init_vectors", "identical vectors")


def test_init_vectors_with_init_from_is_refused(tmp_path, data, capsys):
    good = write_vectors(tmp_path / "v.txt", "glove-text", FILE_WORDS,
                         vectors_for(FILE_WORDS, 4))
    out = tmp_path / "run"
    fake_init = tmp_path / "init"
    fake_init.mkdir()
    (fake_init / "config.json").write_text(Config().to_json())
    rc, _, err = run_cli(capsys, "train", "--data", data, "--task", "classify", "--out", out,
                         *CLI_TINY, "--set", f"model.init_vectors={good}",
                         "--init-from", fake_init)
    assert_refused(rc, err, out, "model.init_vectors", "train.init_from", "drop")


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_language_model_head_tied_to_the_initialized_rows(tmp_path, prepared, arch):
    cfg = Config.from_dict({**prepared.cfg.to_dict(),
                            "model": {**prepared.cfg.to_dict()["model"], "arch": arch},
                            "train": {**prepared.cfg.to_dict()["train"], "task": "lm"}})
    m = vectors_for(FILE_WORDS, 12)
    init = plan(load(write_vectors(tmp_path / "v.txt", "word2vec-text", FILE_WORDS, m)),
                prepared.tokenizer, cfg.model.d_model, INIT_STD)
    model = initial_model(cfg, vectors=init)
    assert model.head.weight is model.tok_emb.weight
    np.testing.assert_array_equal(model.head.weight.detach()[init.ids].numpy(), init.rows)


def test_federated_training_refuses_init_vectors():
    """Flower only takes run-config keys pyproject.toml declares, and it does not declare
    this one; a run config that has it anyway (an edited pyproject) is refused."""
    from federation.local import app_run_config
    from federation.settings import parse_run_config
    from safelm.errors import UserError
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    run_config = {**app_run_config(pyproject), "model.init_vectors": "v.txt"}
    with pytest.raises(UserError, match="model.init_vectors=v.txt: .*not supported in "
                                        "federated training"):
        parse_run_config(run_config)
