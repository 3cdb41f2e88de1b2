"""The embedding association audit: load the vectors (a word-vector file or a run's input
embeddings), look up each test's words, run WEAT, write the report.

A SafeLM run has a byte-level BPE vocabulary, so every word has tokens; a word's vector is the
mean of its tokens' rows of ``tok_emb.weight``, the word encoded with a leading space, the way
the tokenizer sees a word in mid-sentence (``add_prefix_space=False``, safelm/tokenizer.py).
Words split into several tokens are listed per test: their vectors are averages of sub-word
pieces and say less about the word than a whole-word row does.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from safelm.errors import UserError

from ..common import sha256_file, versions
from .weat import holm, weat

DEFAULT_TESTS = Path(__file__).with_name("weat_default.json")
SETS = ("X", "Y", "A", "B")
MIN_WORDS = 2


@dataclass
class EmbeddingSettings:
    permutations: int = 10_000
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    exact_limit: int = 100_000
    contextual: bool = False  # --run only: SEAT-style template sentences (contextual.py)

    def check(self) -> None:
        if not 0 < self.confidence < 1:
            raise UserError(f"--confidence {self.confidence}: give a level between 0 and 1, "
                            "e.g. 0.95")
        if self.permutations < 1:
            raise UserError(f"--permutations {self.permutations}: give at least 1 (e.g. 10000)")
        if self.bootstrap < 0:
            raise UserError(f"--bootstrap {self.bootstrap}: give 0 (no interval) or more")


# ---- TESTS.json -------------------------------------------------------------------------------
def _word_sets(t: dict[str, Any], key: str, where: str) -> list[list[str]]:
    v = t.get(key)
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(s, list) for s in v)):
        raise UserError(f"{where}: \"{key}\" must be a list of two word lists, like "
                        f"[[\"rose\", \"daisy\"], [\"ant\", \"flea\"]]; got {json.dumps(v)[:60]}")
    for s in v:
        bad = [w for w in s if not (isinstance(w, str) and w.strip())]
        if bad or not s:
            raise UserError(f"{where}: \"{key}\" has an empty list or a word that is not a "
                            f"non-empty string ({json.dumps(bad[:1] or s)[:40]}); fix that list")
    return [list(s) for s in v]


def load_tests(path: str | Path | None) -> tuple[str, list[dict[str, Any]]]:
    """(name, tests) of a TESTS.json: a list of {"name", "targets": [[...], [...]],
    "attributes": [[...], [...]]} (optional "target_names", "attribute_names", "note"), or an
    object {"source"?, "tests": [...]}. Default: the bundled WEAT 1-10 lists."""
    p = Path(path) if path else DEFAULT_TESTS
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--tests {p}: cannot read it ({e.strerror}); give a TESTS.json file") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--tests {p}: not valid JSON ({e}); fix the file") from None
    tests = doc.get("tests") if isinstance(doc, dict) else doc
    if not isinstance(tests, list) or not tests:
        raise UserError(f"--tests {p}: expected a non-empty list of tests (or an object with "
                        "\"tests\"), each {\"name\", \"targets\": [[...], [...]], "
                        "\"attributes\": [[...], [...]]}")
    out, seen = [], set()
    for i, t in enumerate(tests, 1):
        if not isinstance(t, dict):
            raise UserError(f"--tests {p}: test {i} is not an object with \"name\", "
                            "\"targets\" and \"attributes\"")
        name = t.get("name")
        where = f"--tests {p}: test {i}" + (f" ({name!r})" if isinstance(name, str) else "")
        if not (isinstance(name, str) and name.strip()):
            raise UserError(f"{where}: needs a \"name\" (a non-empty string)")
        if name in seen:
            raise UserError(f"{where}: the name {name!r} is used twice; give each test its own")
        seen.add(name)
        targets, attributes = _word_sets(t, "targets", where), _word_sets(t, "attributes", where)
        labels = {}
        for key, default in (("target_names", ["X", "Y"]), ("attribute_names", ["A", "B"])):
            v = t.get(key, default)
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) for s in v)):
                raise UserError(f"{where}: \"{key}\" must be two strings")
            labels[key] = v
        out.append({"name": name, "targets": targets, "attributes": attributes, **labels,
                    "note": t.get("note")})
    return (str(p) if path else "default (WEAT 1-10, Caliskan et al. 2017)"), out


# ---- where vectors come from ------------------------------------------------------------------
Lookup = Callable[[str], "tuple[np.ndarray | None, dict[str, Any]]"]


def file_lookup(path: str | Path) -> tuple[Lookup, dict[str, Any]]:
    """Exact word first, then its lower-case form (lower-cased files such as GloVe 6B)."""
    from safelm.vectors import detect_format, read_vectors
    words, M = read_vectors(path)
    index: dict[str, int] = {}
    for i, w in enumerate(words):
        index.setdefault(w, i)

    def look(word: str) -> tuple[np.ndarray | None, dict[str, Any]]:
        if word in index:
            return M[index[word]], {}
        if word.lower() in index:
            return M[index[word.lower()]], {"lowercased": True}
        return None, {}
    source = {"kind": "vectors", "path": str(path), "format": detect_format(path),
              "words": len(words), "dim": int(M.shape[1]),
              "vectors_sha256": sha256_file(path)}
    return look, source


def run_lookup(run_dir: str | Path, contextual: bool = False) -> tuple[Lookup, dict[str, Any]]:
    """Mean of the word's token rows of the run's input embedding (``tok_emb.weight``), or
    with ``contextual`` the mean over template sentences of their mean last hidden state."""
    from safelm.api import load_run, model_sha256
    run = load_run(run_dir, device="cpu")
    if contextual:
        return _contextual_lookup(run, model_sha256(run))
    emb = getattr(run.model, "tok_emb", None)
    if emb is None:
        raise UserError(f"--run {run_dir}: the model has no input embedding (tok_emb)")
    E = emb.weight.detach().float().cpu().numpy()
    tok = run.tokenizer

    def look(word: str) -> tuple[np.ndarray | None, dict[str, Any]]:
        ids = [i for i in tok.encode(" " + word) if i < len(E)]
        if not ids:
            return None, {}
        return E[ids].mean(axis=0), ({"tokens": len(ids)} if len(ids) > 1 else {})
    source = {"kind": "run", "path": str(run_dir), "words": tok.vocab_size,
              "dim": int(E.shape[1]), "word_vector": "mean of the word's token embeddings "
              "(tok_emb.weight), encoded with a leading space"}
    return look, source | {"model_sha256": model_sha256(run)}


def _contextual_lookup(run: Any, sha: str | None) -> tuple[Lookup, dict[str, Any]]:
    from .contextual import TEMPLATES, contextual_vector, sentence_encoder
    encode, cache = sentence_encoder(run), {}

    def look(word: str) -> tuple[np.ndarray | None, dict[str, Any]]:
        if word not in cache:
            cache[word] = contextual_vector(encode, word)
        return cache[word], {}
    return look, {"kind": "run", "path": str(run.path), "words": run.tokenizer.vocab_size,
                  "dim": int(run.cfg.model.d_model), "contextual": True,
                  "templates": list(TEMPLATES),
                  "word_vector": "SEAT-style: mean over the templates of each sentence's mean "
                                 "last hidden state (after ln_f, <bos> excluded)",
                  "model_sha256": sha}


# ---- the audit --------------------------------------------------------------------------------
def _resolve(words: list[str], look: Lookup) -> tuple[np.ndarray, list[str], dict[str, list]]:
    vecs, missing, notes = [], [], {"lowercased": [], "split": []}
    for w in words:
        v, info = look(w)
        if v is None:
            missing.append(w)
            continue
        vecs.append(v)
        if info.get("lowercased"):
            notes["lowercased"].append(w)
        if info.get("tokens"):
            notes["split"].append(w)
    M = np.array(vecs, dtype=np.float64) if vecs else np.zeros((0, 0))
    return M, missing, notes


def run_test(t: dict[str, Any], look: Lookup, st: EmbeddingSettings,
             rng: np.random.Generator) -> dict[str, Any]:
    sets = dict(zip(SETS, t["targets"] + t["attributes"]))
    mats, missing, lowered, split = {}, {}, {}, {}
    for k, words in sets.items():
        mats[k], missing[k], notes = _resolve(words, look)
        lowered[k], split[k] = notes["lowercased"], notes["split"]
    entry: dict[str, Any] = {
        "name": t["name"], "target_names": t["target_names"],
        "attribute_names": t["attribute_names"], "effect_size": None, "p_value": None,
        "ci": None, "n": {k: len(mats[k]) for k in SETS}, "missing": missing}
    if any(lowered.values()):
        entry["lowercased"] = lowered
    if any(split.values()):
        entry["split_words"] = split
    short = [f"{k} ({len(mats[k])} of {len(sets[k])})" for k in SETS if len(mats[k]) < MIN_WORDS]
    if short:
        entry["skipped"] = (f"fewer than {MIN_WORDS} words found in " + ", ".join(short))
        return entry
    r = weat(mats["X"], mats["Y"], mats["A"], mats["B"], n_perm=st.permutations,
             n_boot=st.bootstrap, confidence=st.confidence, rng=rng, exact_limit=st.exact_limit)
    entry.update(r)
    return entry


def embedding_audit(out: str | Path | None, *, vectors: str | Path | None = None,
                    run: str | Path | None = None, tests: str | Path | None = None,
                    settings: EmbeddingSettings | None = None) -> dict[str, Any]:
    """Run every test and (with ``out``) write report.json/md/html. Exactly one of
    ``vectors`` and ``run``."""
    st = settings or EmbeddingSettings()
    st.check()
    if (vectors is None) == (run is None):
        raise UserError("give exactly one of --vectors FILE (word2vec or GloVe) and --run "
                        "RUN_DIR (a SafeLM run's input embeddings)")
    if st.contextual and run is None:
        raise UserError("--contextual needs --run RUN_DIR (a word-vector file has no "
                        "sentences to encode); drop --contextual or give --run")
    test_source, test_list = load_tests(tests)  # before the (slow) vectors: fail fast
    look, source = (file_lookup(vectors) if vectors is not None
                    else run_lookup(run, st.contextual))
    # one stream per test, from the seed and the test's name: adding or reordering tests
    # leaves every other test's p-value and interval unchanged
    results = [run_test(t, look, st, np.random.default_rng([st.seed, zlib.crc32(
        t["name"].encode("utf-8"))])) for t in test_list]
    done = [r for r in results if not r.get("skipped")]
    for r, ph in zip(done, holm([r["p_value"] for r in done])):
        r["p_value_holm"] = ph
    report: dict[str, Any] = {
        "kind": "embeddings", "method": "WEAT (Caliskan, Bryson and Narayanan, Science 2017)",
        "embeddings": source, "tests_source": test_source, "tests": results,
        "settings": asdict(st),
        "assumptions": {
            "p_value": "one-sided permutation test over re-partitions of the target words "
                       "X u Y (attribute words fixed): valid when the target words are "
                       "exchangeable under the null of no differential association",
            "ci": "word-bootstrap percentile interval of the effect size: words resampled "
                  "with replacement within each of X, Y, A, B; it reflects the choice of "
                  "words, not the randomness of training the embedding",
            "multiplicity": "p_value is per test; p_value_holm is Holm-adjusted over the "
                            "report's tests that ran (family-wise error)"},
        "summary": summary_lines(results) + word_notes(results),
        "inputs": {"model_sha256": source.get("model_sha256"),
                   "vectors_sha256": source.get("vectors_sha256"),
                   "tests_sha256": sha256_file(tests) if tests else None},
        "versions": versions()}
    if out is not None:
        from .report import write_report
        report["_paths"] = write_report(report, out)
    return report


def word_notes(results: list[dict[str, Any]]) -> list[str]:
    """One line on words that are averages of sub-word tokens (runs) or matched in lower
    case (vector files), counted over distinct words."""
    out = []
    for key, what in (("split_words", "split into several tokens: their vectors are means of "
                       "sub-word pieces"), ("lowercased", "found only in lower case")):
        words = {w for r in results for v in r.get(key, {}).values() for w in v}
        if words:
            out.append(f"note: {len(words)} distinct word(s) {what}")
    return out


def summary_lines(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in results:
        if r.get("skipped"):
            out.append(f"{r['name']}: skipped, {r['skipped']}")
            continue
        ci, n = r["ci"], r["n"]
        out.append(f"{r['name']}: d = {r['effect_size']:+.2f}"
                   + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
                   + f", p = {r['p_value']:.3g} (Holm {r['p_value_holm']:.3g}), "
                   f"n = {n['X']}/{n['Y']}/{n['A']}/{n['B']}")
    return out
