"""The one-run audit end to end: an LM that memorized its bernoulli canaries gets a clear bound
and a false claim below it fails (exit 1); a DP run passes and its release carries the bound but
never the inclusion record; resume reads the canaries back; bad input exits 2 with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY
from test_privacy_audit_e2e import lm_csv

from audits.privacy.audit import PrivacySettings, privacy_audit
from safelm.api import train_run
from safelm.cli import main
from safelm.config import Config
from safelm.errors import UserError

pytestmark = pytest.mark.slow

ONE_RUN = TINY + ["train.epochs=20", "train.lr=5e-3", "model.dropout=0.0",
                  "privacy.canaries=64", "privacy.canary_repeats=2",
                  "privacy.canary_inclusion=bernoulli"]


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """A non-private LM trained long enough on 64 bernoulli canaries (2 rows each) to memorize
    the included ones."""
    d = tmp_path_factory.mktemp("onerun")
    data = lm_csv(d / "lm.csv")
    train_run(data, Config.load(None, ONE_RUN), d / "run")
    return data, d / "run"


def test_memorized_canaries_give_a_clear_bound_and_refute_a_false_claim(memorized, tmp_path,
                                                                        capsys):
    _, run = memorized
    args = ["audit", "privacy", str(run), "--one-run", "--candidates", "100"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0  # not DP: nothing to refute
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    o = rep["one_run"]
    assert {"epsilon_lower_bound", "confidence", "m", "guesses", "correct", "delta"} <= set(o)
    assert o["m"] == 64 and o["confidence"] == 0.95 and o["epsilon_lower_bound"] > 1.0
    assert rep["empirical_epsilon"] == o["epsilon_lower_bound"] and rep["passed"] is True
    rec = json.loads((run / "canaries.json").read_text())
    assert o["n_included"] == sum(rec["included"])
    for ext in ("md", "html"):
        assert "One-run audit" in (tmp_path / "a" / f"report.{ext}").read_text()
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "b"), "--claimed-epsilon", "0.1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("privacy audit FAILED: one-run epsilon")
    assert json.loads((tmp_path / "b" / "report.json").read_text())["passed"] is False


def test_dp_run_passes_and_its_release_keeps_the_inclusion_record_out(memorized, tmp_path):
    from audits.release.build import ReleaseOptions, release
    from audits.release.verify import verify_release
    data, _ = memorized
    cfg = Config.load(None, ONE_RUN + ["train.epochs=6", "privacy.enabled=true",
                                       "privacy.target_epsilon=2", "train.batch_size=16"])
    final = train_run(data, cfg, tmp_path / "dp")
    rep = privacy_audit(tmp_path / "dp", out=tmp_path / "rep", log=lambda s: None,
                        settings=PrivacySettings(one_run=True, n_candidates=100))
    o = rep["one_run"]
    assert o["claim"]["group_size"] == 2 and o["claimed_epsilon"] == pytest.approx(
        2 * final["epsilon"])  # a 2-row canary under example-level DP: group privacy
    assert rep["passed"] and o["epsilon_lower_bound"] <= o["claimed_epsilon"]
    release(tmp_path / "dp", tmp_path / "rel",
            ReleaseOptions(privacy_audit=rep["_paths"]["json"]))
    gates = {g.name: g for g in verify_release(tmp_path / "rel")}
    assert gates["empirical_le_claimed"].ok
    emp = json.loads((tmp_path / "rel" / "release.json").read_text())["empirical_privacy_audit"]
    assert emp["empirical_epsilon"] == o["epsilon_lower_bound"]
    assert emp["one_run"]["group_size"] == 2 and emp["one_run"]["m"] == 64
    rec = json.loads((tmp_path / "dp" / "canaries.json").read_text())
    released = {p.name for p in (tmp_path / "rel").rglob("*")}
    assert "canaries.json" not in released
    blob = "".join(p.read_text(errors="ignore") for p in (tmp_path / "rel").rglob("*")
                   if p.is_file())
    assert not any(s in blob for s in rec["secrets"]) and "\"included\"" not in blob


def test_resume_reads_the_canaries_back(memorized, tmp_path):
    data, run = memorized
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "canaries.json").read_bytes()
    train_run(data, None, copy, resume=True)  # finished: restores, trains nothing more
    assert (copy / "canaries.json").read_bytes() == before
    (copy / "canaries.json").unlink()
    with pytest.raises(UserError, match="cannot be resumed"):
        train_run(data, None, copy, resume=True)


def test_bad_inputs_exit_2_naming_the_fix(memorized, tmp_path, capsys):
    data, _ = memorized
    plain = tmp_path / "plain"
    train_run(data, Config.load(None, TINY + ["train.max_steps=2"]), plain)
    cases = {
        "privacy.canary_inclusion=bernoulli": ["audit", "privacy", str(plain), "--one-run",
                                               "--out", str(tmp_path / "r")],
        "--one-run": ["audit", "privacy", str(plain), "--out", str(tmp_path / "r")],
        "needs canaries: set privacy.canaries=M": [
            "train", "--data", str(data), "--task", "lm", "--out", str(tmp_path / "t"),
            "--set", "privacy.canary_inclusion=bernoulli"],
    }
    for needle, args in cases.items():
        capsys.readouterr()
        code = main(args)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (needle, err)
        assert needle in lines[0] and "Traceback" not in err, (needle, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()
