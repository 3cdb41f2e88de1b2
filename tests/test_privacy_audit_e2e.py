"""Privacy audit end to end on tiny trained models: a planted effect (an overfit model) is found
by the descriptive attacks, a no-effect control is not; the one-run audit gives a clear bound on
a model that memorized its canaries, refutes a false claim (exit 1) and passes a DP run; a planted
canary is exposed without DP and hidden with it; bad input exits 2 with one line."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY

from audits.privacy.audit import PrivacySettings, privacy_audit
from safelm.api import train_run
from safelm.cli import main
from safelm.config import Config

pytestmark = pytest.mark.slow

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "vo", "ra", "ne")
         for b in ("b", "d", "g", "l", "m", "n", "p", "r", "s", "t")]


def random_label_csv(path: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Unique random texts with random labels: a model can only memorize them, so a member's
    loss is low and a non-member's is chance; the split column fixes who is a member."""
    rng = random.Random(seed)
    texts: set[str] = set()
    while len(texts) < n_train + n_test + 10:
        texts.add(" ".join(rng.choice(WORDS) for _ in range(6)))
    split = ["train"] * n_train + ["val"] * 10 + ["test"] * n_test
    pd.DataFrame({"example_id": [f"r{i}" for i in range(len(split))], "text": sorted(texts),
                  "label": [rng.choice(["pos", "neg"]) for _ in split],
                  "split": split}).to_csv(path, index=False)
    return path


def write_split_files(data: Path, out: Path) -> tuple[Path, Path]:
    df = pd.read_csv(data)
    m, n = out / "members.csv", out / "non_members.csv"
    df[df["split"] == "train"].to_csv(m, index=False)
    df[df["split"] == "test"].to_csv(n, index=False)
    return m, n


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A non-private classifier trained far past the point of memorizing 100 random labels."""
    d = tmp_path_factory.mktemp("overfit")
    data = random_label_csv(d / "data.csv", n_train=100, n_test=100)
    cfg = Config.load(None, TINY + ["train.task=classify", "train.epochs=25", "train.lr=5e-3",
                                    "model.dropout=0.0", "train.weight_decay=0.0"])
    train_run(data, cfg, d / "run")
    members, non_members = write_split_files(data, d)
    return d / "run", members, non_members


def test_overfit_model_is_found_by_both_attacks(overfit, tmp_path, monkeypatch):
    run, members, non_members = overfit
    import safelm.api
    seen: list[set[str]] = []  # the texts each reference model trained on
    real = safelm.api.train_run

    def spy(data, cfg, out, **kw):
        seen.append(set(pd.read_csv(data)["text"]))
        return real(data, cfg, out, **kw)

    monkeypatch.setattr(safelm.api, "train_run", spy)
    rep = privacy_audit(run, members, non_members, tmp_path / "rep",
                        settings=PrivacySettings(reference_models=2, n_boot=300),
                        log=lambda s: None)
    by = {a["name"]: a for a in rep["attacks"]}
    assert by["loss"]["auc"]["value"] > 0.8 and by["loss"]["auc"]["ci"][0] > 0.65
    assert by["reference"]["auc"]["value"] > 0.7 and by["reference"]["auc"]["ci"][0] > 0.55
    # descriptive only: no epsilon bound and no verdict from members vs non-members
    assert rep["empirical_epsilon"] is None and rep["passed"] is None and rep["one_run"] is None
    assert rep["claimed_epsilon"] is None and not rep["run"]["dp"]
    assert rep["reference_models"]["n"] == 2
    assert all(m["rows"] == 50 for m in rep["reference_models"]["models"])
    member_texts, other = set(pd.read_csv(members)["text"]), set(pd.read_csv(non_members)["text"])
    assert len(seen) == 2 and not (seen[0] | seen[1]) & member_texts  # members never seen
    assert seen[0] | seen[1] == other and not seen[0] & seen[1]  # complementary halves
    on_disk = json.loads(Path(rep["_paths"]["json"]).read_text())
    for key in ("attacks", "empirical_epsilon", "claimed_epsilon", "delta", "passed", "inputs",
                "versions", "one_run", "membership_inference"):
        assert key in on_disk
    a = on_disk["attacks"][0]
    assert set(a["tpr_at_fpr"]) == {"0.01", "0.001"} and len(a["auc"]["ci"]) == 2
    assert "empirical_epsilon" not in a
    html = Path(rep["_paths"]["html"]).read_text()
    assert "data:image/png;base64," in html and "<link" not in html and "<script" not in html
    assert "Privacy audit" in Path(rep["_paths"]["md"]).read_text()


def test_control_members_from_the_same_unseen_distribution(overfit, tmp_path):
    run, _, non_members = overfit
    df = pd.read_csv(non_members)  # rows the model never saw, split at random into two
    fake = df.sample(frac=0.5, random_state=0)
    fake.to_csv(tmp_path / "fake.csv", index=False)
    df.drop(fake.index).to_csv(tmp_path / "rest.csv", index=False)
    rep = privacy_audit(run, tmp_path / "fake.csv", tmp_path / "rest.csv", None,
                        settings=PrivacySettings(reference_models=0, n_boot=500),
                        log=lambda s: None)
    lo, hi = rep["attacks"][0]["auc"]["ci"]
    assert lo < 0.5 < hi and abs(rep["attacks"][0]["auc"]["value"] - 0.5) < 0.15


# ---- canaries ------------------------------------------------------------------------------
def lm_csv(path: Path, seed: int = 0) -> Path:
    """Short paragraphs, each with a random 6-digit "room number": the model learns digits in
    general, so a canary can only stand out by being memorized."""
    rng = random.Random(seed)
    sents = ["the cat sat on the mat.", "a dog ran to the park.", "she smiled at him.",
             "they ate bread and soup."]
    rows = []
    for i in range(50):
        code = " ".join(str(rng.randrange(10)) for _ in range(6))
        rows.append({"text": " ".join(rng.choice(sents) for _ in range(2))
                     + f" my room number is {code}.",
                     "split": "train" if i < 30 else "val" if i < 35 else "test"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


CANARY_SETTINGS = TINY + ["train.epochs=20", "train.lr=5e-3", "model.dropout=0.0",
                          "privacy.canaries=6", "privacy.canary_repeats=2"]


@pytest.mark.parametrize("dp", [False, True], ids=["non-private", "dp-eps8"])
def test_canary_exposed_without_dp_and_hidden_with_it(tmp_path, dp):
    data = lm_csv(tmp_path / "lm.csv")
    extra = ["privacy.enabled=true", "privacy.target_epsilon=8", "train.batch_size=16"] if dp \
        else []
    final = train_run(data, Config.load(None, CANARY_SETTINGS + extra), tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "canaries.json").read_text())
    assert rec["repeats"] == 2 and len(rec["secrets"]) == 6
    members, non_members = write_split_files(data, tmp_path)
    rep = privacy_audit(tmp_path / "run", members, non_members, tmp_path / "rep",
                        settings=PrivacySettings(reference_models=0, n_boot=100, min_rows=10,
                                                 n_candidates=1000), log=lambda s: None)
    c = rep["canaries"]
    assert c["n_candidates"] == 1000 and len(c["canaries"]) == 6
    if dp:
        assert final["epsilon"] <= 8.0 and rep["claimed_epsilon"] == pytest.approx(
            final["epsilon"]) and rep["passed"] is None  # no --one-run: no verdict
        # chance is 1.44 bits on average; a model that learned no secret stays near it
        assert c["median_exposure"] < 3.5 and c["mean_exposure"] < 4.5
    else:
        assert c["median_exposure"] > 7.0 and c["mean_exposure"] > 6.5  # of 9.97 possible
    assert "Canary exposure" in Path(rep["_paths"]["html"]).read_text()


# ---- bad input -------------------------------------------------------------------------------
def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["audit", "privacy", *args])
    return code, capsys.readouterr().err


def test_bad_inputs_exit_2_with_one_line(overfit, tmp_path, capsys):
    run, members, non_members = overfit
    base = ["--out", str(tmp_path / "rep"), "--reference-models", "0"]
    few = tmp_path / "few.csv"
    pd.read_csv(non_members).head(5).to_csv(few, index=False)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json"):  # everything but the weights
        shutil.copy(run / name, no_weights / name)
    cases = {
        "no such file": [str(run), "--members", str(tmp_path / "nope.csv"), "--non-members",
                         str(non_members)],
        "no column 'body'": [str(run), "--members", str(members), "--non-members",
                             str(non_members), "--text-col", "body"],
        "missing model.safetensors": [str(no_weights), "--members", str(members),
                                      "--non-members", str(non_members)],
        "are the same data": [str(run), "--members", str(members), "--non-members",
                              str(members)],
        "needs at least 20": [str(run), "--members", str(members), "--non-members", str(few)],
        "even number": [str(run), "--members", str(members), "--non-members",
                        str(non_members), "--reference-models", "3"],
    }
    for needle, args in cases.items():
        code, err = _cli(capsys, *base, *args)  # a case may override a base option
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (needle, err)
        assert needle in lines[0], (needle, err)
        assert "Traceback" not in err
    assert not (tmp_path / "rep" / "report.json").exists()  # nothing written by a failure


def test_help_lists_the_audit_without_importing_torch():
    code = ("import sys; import audits.plugin; from audits.privacy import cli; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from safelm.cli import main; main(['audit', 'privacy', '--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--non-members" in out.stdout and "--reference-models" in out.stdout
