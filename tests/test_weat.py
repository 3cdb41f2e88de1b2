"""Embedding association audit (WEAT): the statistics against a hand computation, a planted
association found, a null not flagged, the p-value's calibration and the interval's coverage
measured, the vector reader on every format and every bad file, the audit on a tiny run, and
bad command lines (exit 2, one line)."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from audits.embeddings.audit import load_tests
from audits.embeddings.weat import associations, effect_size, holm, weat
from safelm.cli import main
from safelm.errors import UserError
from safelm.vectors import detect_format, read_vectors
from release_helpers import cli, one_error_line


assert_one_line_error = one_error_line


# ---- (1) the statistics against plain Python -------------------------------------------------
def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) *
                                                        sum(b * b for b in v))


def _s(w, A, B):
    return statistics.fmean(_cos(w, a) for a in A) - statistics.fmean(_cos(w, b) for b in B)


def test_effect_size_and_exact_p_match_a_hand_computation():
    X = [[1.0, 0.2, 0.0], [0.9, 0.1, 0.3], [0.3, 0.8, 0.1]]
    Y = [[0.1, 1.0, 0.2], [0.0, 0.7, 0.9], [0.6, 0.2, 0.5]]
    A = [[1.0, 0.0, 0.1], [0.8, 0.3, 0.0]]
    B = [[0.0, 1.0, 0.0], [0.1, 0.5, 0.9]]
    s = {tuple(w): _s(w, A, B) for w in X + Y}
    sx, sy = [s[tuple(w)] for w in X], [s[tuple(w)] for w in Y]
    d = (statistics.fmean(sx) - statistics.fmean(sy)) / statistics.stdev(sx + sy)
    obs = sum(sx) - sum(sy)
    words = X + Y
    stats = []
    for part in itertools.combinations(range(6), 3):
        xs = [s[tuple(words[i])] for i in part]
        ys = [s[tuple(words[i])] for i in range(6) if i not in part]
        stats.append(sum(xs) - sum(ys))
    p = sum(t >= obs - 1e-12 for t in stats) / len(stats)
    r = weat(np.array(X), np.array(Y), np.array(A), np.array(B), n_boot=0)
    assert r["effect_size"] == pytest.approx(d, rel=1e-12)
    assert r["p_value"] == pytest.approx(p)
    assert r["permutation"] == {"method": "exact", "partitions": 20, "total_partitions": 20}
    assert effect_size(np.array(X), np.array(Y), np.array(A), np.array(B)) == \
        pytest.approx(d, rel=1e-12)
    assert associations(np.array(X), np.array(A), np.array(B)) == pytest.approx(sx)
    # random partitions (exact enumeration switched off): the +1-corrected estimate of p
    rr = weat(np.array(X), np.array(Y), np.array(A), np.array(B), n_boot=0, n_perm=20_000,
              exact_limit=0, rng=np.random.default_rng(1))
    assert rr["permutation"]["method"] == "random"
    assert rr["p_value"] == pytest.approx(p, abs=0.01) and rr["p_value"] >= 1 / 20_001


def test_holm_adjustment():
    # m = 3: sorted 0.01, 0.02, 0.04 -> 0.03, 0.04, 0.04 (monotone), capped at 1
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _planted(rng, n=8, dim=20, signal=1.0, noise=1.0):
    a0, b0 = rng.normal(size=dim), rng.normal(size=dim)
    g = lambda c, k: signal * c + noise * rng.normal(size=(k, dim))  # noqa: E731
    return g(a0, n), g(b0, n), g(a0, n), g(b0, n)


# ---- (2) planted association, (3) null control ----------------------------------------------
def test_planted_association_is_found():
    X, Y, A, B = _planted(np.random.default_rng(0))
    r = weat(X, Y, A, B, n_boot=500)
    assert r["effect_size"] > 1 and r["p_value"] < 0.01
    assert r["ci"][0] > 0 and r["ci"][0] < r["effect_size"] < r["ci"][1]
    # swapping the target sets flips the sign of d
    assert weat(Y, X, A, B, n_boot=0)["effect_size"] == pytest.approx(-r["effect_size"])


def test_random_vectors_are_not_flagged():
    """One fixed draw (any one draw flags with probability 0.05 at that level: the rate is
    the calibration test's business)."""
    rng = np.random.default_rng(0)
    X, Y, A, B = (rng.normal(size=(8, 20)) for _ in range(4))
    r = weat(X, Y, A, B, n_boot=300)
    assert r["p_value"] > 0.05 and r["ci"][0] < 0 < r["ci"][1]


# ---- (4) calibration and coverage (measured; the numbers go to docs/audits.md) --------------
def _tolerance(n: int, alpha: float = 0.05) -> float:
    return alpha + 2.33 * math.sqrt(alpha * (1 - alpha) / n)  # one-sided binomial, ~1%


def test_p_value_calibration_under_the_null(capsys):
    rng = np.random.default_rng(20)
    sims, exact, rand = 1000, [], []
    for _ in range(sims):
        X, Y, A, B = (rng.normal(size=(6, 10)) for _ in range(4))
        exact.append(weat(X, Y, A, B, n_boot=0, rng=rng)["p_value"])
        rand.append(weat(X, Y, A, B, n_boot=0, n_perm=199, exact_limit=0, rng=rng)["p_value"])
    rate_e, rate_r = np.mean(np.array(exact) <= 0.05), np.mean(np.array(rand) <= 0.05)
    with capsys.disabled():
        print(f"\nWEAT null calibration: {sims} simulations, rejection rate at 0.05: exact "
              f"{rate_e:.3f}, random (199 partitions) {rate_r:.3f}; tolerance "
              f"{_tolerance(sims):.3f}")
    assert rate_e <= _tolerance(sims) and rate_r <= _tolerance(sims)


@pytest.mark.slow
def test_bootstrap_interval_coverage_of_a_planted_effect(capsys):
    """Coverage of the population effect size by the word-bootstrap interval with 8 words per
    set: measured and reported, asserted only loosely. With 8 attribute words each s(w)
    carries the attribute sample's noise, so small-sample d is biased toward 0 and percentile
    intervals of it miss more often than nominal (measured: 88/100 at 95%)."""
    rng = np.random.default_rng(5)
    dim, signal = 20, 0.35
    a0, b0 = rng.normal(size=dim), rng.normal(size=dim)

    def draw(k):
        return [signal * c + rng.normal(size=(k, dim)) for c in (a0, b0, a0, b0)]
    X, Y, A, B = draw(4000)[:2] + draw(600)[2:]
    true_d = effect_size(X, Y, A, B)  # the population value, from a large sample
    sims, hits, ds = 100, 0, []
    for _ in range(sims):
        r = weat(*draw(8), n_boot=400, confidence=0.95, rng=rng)
        ds.append(r["effect_size"])
        hits += r["ci"][0] <= true_d <= r["ci"][1]
    with capsys.disabled():
        print(f"\nWEAT bootstrap coverage: true d {true_d:.2f}, mean estimate "
              f"{np.mean(ds):.2f}, 95% interval covered it in {hits}/{sims}")
    assert hits / sims >= 0.6


# ---- (5) the reader ---------------------------------------------------------------------------
WORDS = ["rose", "daisy", "ant", "flea", "love", "war"]


def _matrix():
    return np.random.default_rng(0).normal(size=(len(WORDS), 4)).astype(np.float32)


def write_text(path: Path, header: bool, M=None, words=WORDS) -> Path:
    M = _matrix() if M is None else M
    lines = [f"{len(words)} {M.shape[1]}"] if header else []
    lines += [w + " " + " ".join(repr(float(x)) for x in v) for w, v in zip(words, M)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_binary(path: Path, newline: bool = True, M=None, header: str | None = None) -> Path:
    M = _matrix() if M is None else M
    with open(path, "wb") as f:
        f.write((header or f"{len(WORDS)} {M.shape[1]}").encode() + b"\n")
        for w, v in zip(WORDS, M):
            f.write(w.encode() + b" " + v.astype("<f4").tobytes() + (b"\n" if newline else b""))
    return path


@pytest.mark.parametrize("kind", ["glove", "w2v-text", "w2v-bin", "w2v-bin-no-newline"])
def test_reader_reads_every_format(tmp_path, kind):
    M = _matrix()
    p = {"glove": lambda: write_text(tmp_path / "v.txt", False),
         "w2v-text": lambda: write_text(tmp_path / "v.txt", True),
         "w2v-bin": lambda: write_binary(tmp_path / "v.bin"),
         "w2v-bin-no-newline": lambda: write_binary(tmp_path / "v.bin", newline=False)}[kind]()
    words, got = read_vectors(p)
    assert words == WORDS and got.dtype == np.float32 and got.shape == (6, 4)
    np.testing.assert_array_equal(got, M)  # repr() round-trips float32 exactly
    assert detect_format(p) == {"glove": "glove-text", "w2v-text": "word2vec-text"}.get(
        kind, "word2vec-binary")


def _bad_files(tmp: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    good = tmp / "good.txt"
    write_text(good, False)
    lines = good.read_text().splitlines()
    ragged = tmp / "ragged.txt"
    ragged.write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0]] + lines[4:]) + "\n")
    count = tmp / "count.txt"
    count.write_text("7 4\n" + "\n".join(lines) + "\n")
    dim = tmp / "dim.txt"
    dim.write_text("6 5\n" + "\n".join(lines) + "\n")
    nan = tmp / "word.txt"
    nan.write_text("\n".join(lines[:1] + ["daisy 1 2 x 4"] + lines[2:]) + "\n")
    trunc = write_binary(tmp / "trunc.bin")
    trunc.write_bytes(trunc.read_bytes()[:-7])
    extra = write_binary(tmp / "extra.bin", header="5 4")
    wide = write_binary(tmp / "wide.bin", header="6 5")
    empty = tmp / "empty.txt"
    empty.write_text("")
    return {"missing": (tmp / "nope.txt", ("nope.txt", "cannot read")),
            "directory": (tmp, ("cannot read",)),
            "empty": (empty, ("empty",)),
            "ragged": (ragged, ("ragged.txt line 4", "3 values", "says 4")),
            "header-count": (count, ("count.txt", "7 words", "6 rows", "fix the header")),
            "header-dim": (dim, ("dim.txt line 2", "4 values", "header says 5")),
            "not-a-number": (nan, ("word.txt line 2", "'x'")),
            "truncated": (trunc, ("trunc.bin", "truncated", "row 6")),
            "header-disagrees": (extra, ("extra.bin", "disagrees", "fix the header")),
            "binary-header-dim": (wide, ("wide.bin", "6 words of 5 values", "dimension"))}


BAD = ["missing", "directory", "empty", "ragged", "header-count", "header-dim", "not-a-number",
       "truncated", "header-disagrees", "binary-header-dim"]


@pytest.mark.parametrize("case", BAD)
def test_bad_vector_files_exit_2_with_one_line(tmp_path, capsys, case):
    path, needles = _bad_files(tmp_path)[case]
    with pytest.raises(UserError):
        read_vectors(path)
    out = tmp_path / "report"
    rc, _, err = cli(capsys, "audit", "embeddings", "--vectors", path, "--out", out)
    assert_one_line_error(rc, err, *needles)
    assert not (out / "report.json").exists()  # nothing written on failure


# ---- (6) the audit on a word-vector file, then on a tiny trained run -------------------------
def test_audit_on_a_vector_file_writes_the_report(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X, Y, A, B = _planted(rng, n=5, dim=8)
    words = [f"x{i}" for i in range(5)] + [f"y{i}" for i in range(5)] + \
        [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)] + ["Only"]
    M = np.vstack([X, Y, A, B, rng.normal(size=(1, 8))]).astype(np.float32)
    vec = write_text(tmp_path / "v.txt", True, M, words)
    tests = [{"name": "planted", "targets": [words[:5] + ["zzz"], words[5:10]],
              "attributes": [words[10:15], words[15:20]]},
             {"name": "too-few", "targets": [["x0", "nope"], ["y0", "y1"]],
              "attributes": [["a0", "a1"], ["b0", "b1"]]},
             {"name": "lower", "targets": [["X0", "X1"], ["y0", "y1"]],
              "attributes": [["a0", "a1"], ["b0", "only"]]}]
    (tmp_path / "t.json").write_text(json.dumps(tests))
    out = tmp_path / "rep"
    rc, stdout, _ = cli(capsys, "audit", "embeddings", "--vectors", vec, "--tests",
                        tmp_path / "t.json", "--out", out, "--bootstrap", "200", "--seed", "7")
    assert rc == 0 and "planted: d = +" in stdout
    rep = json.loads((out / "report.json").read_text())
    planted, few, lower = rep["tests"]
    assert planted["n"] == {"X": 5, "Y": 5, "A": 5, "B": 5}
    assert planted["missing"] == {"X": ["zzz"], "Y": [], "A": [], "B": []}
    assert planted["effect_size"] == pytest.approx(
        effect_size(M[:5], M[5:10], M[10:15], M[15:20]), rel=1e-5)
    assert planted["p_value"] < 0.01 and len(planted["ci"]) == 2
    assert "fewer than 2 words" in few["skipped"] and "X (1 of 2)" in few["skipped"]
    assert few["effect_size"] is None and few["missing"]["X"] == ["nope"]
    assert lower["lowercased"]["X"] == ["X0", "X1"] and lower["missing"]["B"] == ["only"]
    assert rep["settings"]["seed"] == 7 and rep["settings"]["bootstrap"] == 200
    assert "exchangeable" in rep["assumptions"]["p_value"]
    assert "percentile" in rep["assumptions"]["ci"]
    assert rep["inputs"]["vectors_sha256"] and rep["embeddings"]["format"] == "word2vec-text"
    assert "Embedding association" in (out / "report.html").read_text()
    assert "| planted |" in (out / "report.md").read_text()
    # one random stream per test: the planted test alone gives the same interval
    from audits.embeddings.audit import EmbeddingSettings, embedding_audit
    (tmp_path / "one.json").write_text(json.dumps(tests[:1]))
    alone = embedding_audit(None, vectors=vec, tests=tmp_path / "one.json",
                            settings=EmbeddingSettings(bootstrap=200, seed=7))
    assert alone["tests"][0]["ci"] == pytest.approx(planted["ci"])


def test_default_tests_are_the_papers_ten():
    name, tests = load_tests(None)
    assert len(tests) == 10 and "Caliskan" in name
    by = {t["name"]: t for t in tests}
    assert [len(s) for s in by["weat1-flowers-insects"]["targets"]] == [25, 25]
    assert "tarantula" in by["weat1-flowers-insects"]["targets"][1]
    assert by["weat6-names-career-family"]["attributes"][0][0] == "executive"
    assert by["weat9-disease-permanence"]["targets"][0] == ["sad", "hopeless", "gloomy",
                                                            "tearful", "miserable", "depressed"]


@pytest.mark.slow
def test_audit_on_a_tiny_run(tmp_path, capsys, one_thread):
    import torch
    from conftest import TINY, write_lm_txt
    from safelm import Config, load_run, model_sha256, train_run
    cfg = Config.load(None, TINY + ["train.epochs=1", "train.device=cpu"])
    train_run(write_lm_txt(tmp_path / "lm.txt", n=30), cfg, tmp_path / "run")
    tests = [{"name": "pets-food", "targets": [["cat", "dog"], ["bread", "soup"]],
              "attributes": [["mat", "park"], ["warm", "sun"]]}]
    (tmp_path / "t.json").write_text(json.dumps(tests))
    out = tmp_path / "rep"
    rc, stdout, _ = cli(capsys, "audit", "embeddings", "--run", tmp_path / "run", "--tests",
                        tmp_path / "t.json", "--out", out, "--bootstrap", "100")
    assert rc == 0, stdout
    rep = json.loads((out / "report.json").read_text())
    (t,) = rep["tests"]
    run = load_run(tmp_path / "run", device="cpu")
    assert rep["inputs"]["model_sha256"] == model_sha256(run)
    E = run.model.tok_emb.weight.detach().numpy().astype(np.float64)
    vec = {w: E[run.tokenizer.encode(" " + w)].mean(axis=0)  # mid-sentence form
           for s in tests[0]["targets"] + tests[0]["attributes"] for w in s}
    m = lambda ws: np.array([vec[w] for w in ws])  # noqa: E731
    assert t["effect_size"] == pytest.approx(effect_size(
        m(["cat", "dog"]), m(["bread", "soup"]), m(["mat", "park"]), m(["warm", "sun"])),
        rel=1e-5)
    assert t["n"] == {"X": 2, "Y": 2, "A": 2, "B": 2} and t["permutation"]["partitions"] == 6
    assert rep["embeddings"]["kind"] == "run"
    assert t["p_value_holm"] == t["p_value"]  # one test: nothing to adjust

    # SEAT-style contextual vectors, checked against the model's layers run by hand
    from audits.embeddings.contextual import TEMPLATES
    rc, _, _ = cli(capsys, "audit", "embeddings", "--run", tmp_path / "run", "--tests",
                   tmp_path / "t.json", "--out", out, "--bootstrap", "0", "--contextual")
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["embeddings"]["contextual"] and rep["tests"][0]["ci"] is None
    mdl, tok = run.model, run.tokenizer

    def hidden(text):
        ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
        x = mdl.tok_emb(ids) + mdl.pos_emb(torch.arange(ids.shape[1])[None])
        for block in mdl.blocks:
            x = block(x)
        return mdl.ln_f(x)[0, 1:].double().mean(0).numpy()
    with torch.no_grad():
        cvec = {w: np.mean([hidden(t.format(w=w)) for t in TEMPLATES], axis=0) for w in vec}
    m = lambda ws: np.array([cvec[w] for w in ws])  # noqa: E731
    assert rep["tests"][0]["effect_size"] == pytest.approx(effect_size(
        m(["cat", "dog"]), m(["bread", "soup"]), m(["mat", "park"]), m(["warm", "sun"])),
        rel=1e-5)


# ---- (7) bad command lines -------------------------------------------------------------------
@pytest.mark.parametrize("tests, needles", [
    ({"name": "t"}, ("expected a non-empty list",)),
    ([], ("expected a non-empty list",)),
    ([{"name": "t", "targets": [["a"]], "attributes": [["b"], ["c"]]}],
     ("test 1 ('t')", "\"targets\" must be a list of two word lists")),
    ([{"name": "t", "targets": [["a"], ["b"]], "attributes": "ab"}],
     ("\"attributes\" must be a list of two word lists",)),
    ([{"targets": [["a"], ["b"]], "attributes": [["c"], ["d"]]}], ("needs a \"name\"",)),
    ([{"name": "t", "targets": [["a", 3], ["b"]], "attributes": [["c"], ["d"]]}],
     ("not a non-empty string",)),
    ([{"name": "t", "targets": [["a"], ["b"]], "attributes": [["c"], ["d"]]}] * 2,
     ("used twice",)),
    ("not json", ("not valid JSON",)),
])
def test_bad_tests_file_exits_2(tmp_path, capsys, tests, needles):
    vec = write_text(tmp_path / "v.txt", False)
    t = tmp_path / "t.json"
    t.write_text(tests if isinstance(tests, str) else json.dumps(tests))
    rc, _, err = cli(capsys, "audit", "embeddings", "--vectors", vec, "--tests", t, "--out",
                     tmp_path / "o")
    assert_one_line_error(rc, err, "t.json", *needles)


@pytest.mark.parametrize("which", ["neither", "both"])
def test_exactly_one_source(tmp_path, capsys, which):
    vec = write_text(tmp_path / "v.txt", False)
    args = [] if which == "neither" else ["--vectors", vec, "--run", tmp_path]
    rc, _, err = cli(capsys, "audit", "embeddings", *args, "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "exactly one of --vectors", "--run")


def test_contextual_needs_a_run(tmp_path, capsys):
    vec = write_text(tmp_path / "v.txt", False)
    rc, _, err = cli(capsys, "audit", "embeddings", "--vectors", vec, "--contextual", "--out",
                     tmp_path / "o")
    assert_one_line_error(rc, err, "--contextual needs --run")


@pytest.mark.parametrize("opt, value", [("--confidence", "1.5"), ("--permutations", "0"),
                                         ("--bootstrap", "-1")])
def test_bad_settings_exit_2(tmp_path, capsys, opt, value):
    vec = write_text(tmp_path / "v.txt", False)
    rc, _, err = cli(capsys, "audit", "embeddings", "--vectors", vec, "--out", tmp_path / "o",
                     opt, value)
    assert_one_line_error(rc, err, opt)
