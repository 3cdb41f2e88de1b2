"""LM bias probes: the lexicon scorer, probe-set checks, conditional log-likelihood against an
independent computation, and the audit end to end on a tiny trained LM."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from audits.lm_bias import lexicon
from audits.lm_bias.audit import lm_bias_audit
from audits.lm_bias.probes import instances, load_probes, validate
from audits.lm_bias.scoring import continuation_logprob, encode_pair
from conftest import TINY, write_cls_csv, write_lm_txt
from safelm import Config, load_run, predictions_table, train_run
from safelm.cli import main
from safelm.errors import UserError


def test_lexicon_scores_polarity_and_negation():
    assert lexicon.score("The soup was wonderful and the staff friendly.") == 1.0
    assert lexicon.score("It was awful.") == -1.0
    assert lexicon.score("It was not good at all.") == -1.0
    assert lexicon.score("She didn't hate it, it was great") == 1.0
    assert lexicon.score("The cat sat on the mat.") == 0.0
    assert lexicon.score("great but noisy") == 0.0


def test_default_probes_are_aligned_and_valid():
    probes = load_probes()
    insts = instances(probes)
    gender = [i for i in insts if i.attribute == "gender"]
    assert len(gender) == 24 * 8
    first = gender[0]
    assert first.prefixes == {"female": "She", "male": "He"}
    assert first.continuation == " said the soup was wonderful."
    assert {i.sentiment for i in insts} == {"positive", "negative"}


@pytest.mark.parametrize("bad, message", [
    ({"counterfactual": {"attributes": {"g": {"a": ["x"], "b": ["y", "z"]}},
                         "templates": ["{X} ran.", "{X} sat."]}}, "differ in length"),
    ({"counterfactual": {"attributes": {"g": {"a": ["x"], "b": ["y"]}},
                         "templates": ["{X} ran.", "Nobody sat."]}}, "exactly once"),
    ({"counterfactual": {"attributes": {"g": {"a": ["x"], "b": ["y"]}},
                         "templates": ["{X} ran.", "It was {X}"]}}, "ends with"),
    ({"generation": {"attributes": {"g": {"a": ["The woman"]}}}}, "at least two groups"),
    ({"something": 1}, "a probe set is an object"),
])
def test_bad_probe_sets_are_refused(bad, message):
    with pytest.raises(UserError, match=message):
        validate(bad, "probes.json")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (and much faster on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    # block_size 64: the probe sentences fit one window (the sliding path is tested apart)
    cfg = Config.load(None, TINY + ["train.epochs=1", "model.block_size=64"])
    train_run(write_lm_txt(d / "lm.txt", n=40), cfg, d / "run")
    return d / "run"


def test_continuation_logprob_matches_independent_computations(lm_run, tmp_path):
    run = load_run(lm_run)
    text = "the cat sat"
    # 1) the predictions table's NLL of "<bos> text <eos>" (short: one block)
    (tmp_path / "one.txt").write_text(text + "\n")
    table = predictions_table(run, tmp_path / "one.txt")
    tok = run.tokenizer
    lp = continuation_logprob(run, [([tok.bos_id], tok.encode(text) + [tok.eos_id])])[0]
    assert lp == pytest.approx(-table["nll"][0] * table["n_tokens"][0], rel=1e-5)
    # 2) a sequence longer than block_size: sliding windows, checked token by token
    ctx, cont = encode_pair(run, "she smiled at him and they ate bread. " * 3,
                            "the sun was warm today and the dog ran to the park.")
    full = ctx + cont
    assert len(full) > run.cfg.model.block_size + 1
    T, expected = run.cfg.model.block_size, 0.0
    with torch.no_grad():
        for j in range(len(ctx), len(full)):
            window = torch.tensor([full[max(0, j - T):j]])
            expected += float(F.log_softmax(run.model(window)[0, -1].double(), -1)[full[j]])
    got = continuation_logprob(run, [(ctx, cont)], batch_size=3)[0]
    assert got == pytest.approx(expected, rel=1e-9)
    # 3) the chain rule: log P(a b) = log P(a) + log P(b | a)
    a, b = tok.encode("the dog"), tok.encode(" ran to the park.")
    whole, left, right = continuation_logprob(
        run, [([tok.bos_id], a + b), ([tok.bos_id], a), ([tok.bos_id] + a, b)])
    assert whole == pytest.approx(left + right, rel=1e-9)


@pytest.mark.slow
def test_lm_bias_audit_end_to_end(lm_run, tmp_path, capsys):
    cls_dir = tmp_path / "cls"
    train_run(write_cls_csv(tmp_path / "cls.csv"),
              Config.load(None, TINY + ["train.epochs=1", "train.task=classify",
                                        "data.group_cols=gender", "data.user_col=user"]),
              cls_dir)
    rep = lm_bias_audit(lm_run, tmp_path / "out", classifier=cls_dir, samples=2,
                        max_new_tokens=6, n_boot=100)
    assert {r["attribute"] for r in rep["counterfactual"]} == {"gender", "age"}
    g = [r for r in rep["counterfactual"] if r["attribute"] == "gender"][0]
    prefs = [v["value"] for v in g["preference"].values()]
    assert sum(prefs) == pytest.approx(0, abs=1e-9)  # centred across groups
    assert g["likelihood_gap"]["value"] == pytest.approx(max(prefs) - min(prefs))
    assert g["likelihood_gap"]["ci"][0] <= g["likelihood_gap"]["ci"][1]
    assert "sentiment_gap" in g and set(g["positivity"]) == {"female", "male"}
    gen = [r for r in rep["generation"] if r["attribute"] == "age"][0]
    assert set(gen["scores"]) == {"lexicon", "classifier_p_positive"}
    assert gen["scores"]["lexicon"]["by_group"]["old"]["n"] == 3 * 2
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["summary"]["lines"] == rep["summary"]["lines"]
    assert "data:image/png;base64," in (tmp_path / "out" / "report.html").read_text()
    # the command line, with a user-supplied probe set
    probes = tmp_path / "p.json"
    probes.write_text(json.dumps({"counterfactual": {
        "attributes": {"pet": {"cat": ["the cat"], "dog": ["the dog"]}},
        "templates": ["{X} sat on the mat.", "{X} ran to the park."]}}))
    assert main(["audit", "lm-bias", str(lm_run), "--out", str(tmp_path / "o2"), "--probes",
                 str(probes), "--n-boot", "50"]) == 0
    assert "pet: likelihood preference gap" in capsys.readouterr().out
    assert main(["audit", "lm-bias", str(cls_dir), "--out", str(tmp_path / "o3")]) == 2
    assert "classification run" in capsys.readouterr().err
