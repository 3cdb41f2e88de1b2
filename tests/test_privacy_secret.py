"""Secret DP randomness: noise and Poisson sampling come from the OS, not from train.seed.

Null and planted cases: two DP runs of one config must differ (the noise is not replayable),
and with the recorded opt-out ``privacy.reproducible=true`` they must be bit-identical (the
mechanism that differs is the seed, nothing else). The secret seed lives in resume/ only, an
interrupted run resumed from it continues the same stream, and the federated server's noise
and client sampling follow the same rule.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safelm import Config, train_run
from safelm.config import PrivacyConfig
from safelm.privacy import DifferentialPrivacy
from conftest import TINY, Crash, crash_at

DP = ["train.task=classify", "model.dropout=0.0", "train.epochs=1", "privacy.enabled=true",
      "privacy.noise_multiplier=1.0", "privacy.delta=1e-3"]


def cfg(*extra: str) -> Config:
    return Config.load(None, TINY + DP + list(extra))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def same(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_runs_of_one_config_draw_different_noise(cls_csv, tmp_path):
    for name in ("a", "b"):
        train_run(cls_csv, cfg(), tmp_path / name)
    assert not same(tmp_path / "a", tmp_path / "b")
    for name in ("a", "b"):
        ledger = json.loads((tmp_path / name / "privacy.json").read_text())
        assert ledger["noise_source"] == "os_entropy"
    saved = json.loads((tmp_path / "a/config.json").read_text())
    assert saved["privacy"]["reproducible"] is False


def test_reproducible_opt_out_is_bit_identical_and_recorded(cls_csv, tmp_path):
    for name in ("a", "b"):
        train_run(cls_csv, cfg("privacy.reproducible=true"), tmp_path / name)
    assert same(tmp_path / "a", tmp_path / "b")
    ledger = json.loads((tmp_path / "a/privacy.json").read_text())
    assert ledger["noise_source"] == "seeded"
    # the release says so in plain words, and the gate fails it
    from audits.release.build import release
    from audits.release.policy import Policy
    from audits.release.verify import verify_release
    release(tmp_path / "a", tmp_path / "rel")
    assert "SEEDED from train.seed" in (tmp_path / "rel/MODEL_CARD.md").read_text()
    gates = {g.name: g.ok for g in verify_release(tmp_path / "rel",
                                                  Policy(require_secret_noise=True))}
    assert gates["require_secret_noise"] is False


def test_poisson_draws_are_secret_unless_reproducible():
    def first_batches(reproducible: bool) -> list[list[int]]:
        p = DifferentialPrivacy(PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-4,
                                              reproducible=reproducible),
                                n_units=1000, batch_size=100, seed=7)
        from safelm.privacy import PoissonBatchSampler
        s = PoissonBatchSampler(num_samples=1000, sample_rate=p.sample_rate, steps=3,
                                seed=p.seed)
        return list(s)
    assert first_batches(False) != first_batches(False)
    assert first_batches(True) == first_batches(True)


def _files_outside_resume(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and "resume" not in p.parts]


def test_secret_seed_is_written_to_resume_only_and_never_released(cls_csv, tmp_path):
    from audits.release.build import release
    run = tmp_path / "run"
    train_run(cls_csv, cfg(), run)
    state = torch.load(run / "resume/state.pt", weights_only=True)["privacy_rng"]
    seed = int(state["seed"])
    assert state["source"] == "os_entropy" and seed.bit_length() > 40
    release(run, tmp_path / "rel")
    from audits.release.policy import Policy
    from audits.release.verify import verify_release
    gates = {g.name: g.ok for g in verify_release(tmp_path / "rel",
                                                  Policy(require_secret_noise=True))}
    assert gates["require_secret_noise"] is True and all(gates.values()), gates
    assert "operating system's entropy" in (tmp_path / "rel/MODEL_CARD.md").read_text()
    needles = [str(seed).encode(), seed.to_bytes(8, "little"), hex(seed).encode()]
    for root in (run, tmp_path / "rel"):
        for f in _files_outside_resume(root):
            data = f.read_bytes()
            assert not any(n in data for n in needles), f"secret seed found in {f}"
    assert not (tmp_path / "rel/resume").exists()
    # the control: the needle search finds the seed where it is written
    assert str(seed).encode() in (run / "resume/state.pt").read_bytes() or \
        seed.to_bytes(8, "little") in (run / "resume/state.pt").read_bytes()


def _two_resumes_of_one_crash(data, tmp_path, monkeypatch, keep_secret: bool) -> bool:
    """Crash a DP run at step 5 (after the step-3 checkpoint), resume two copies of it;
    whether they end bit-identical."""
    import safelm.privacy.engine as eng
    uncrash = crash_at(monkeypatch, 5)
    with pytest.raises(Crash):
        train_run(data, cfg("train.epochs=3", "train.checkpoint_every=3"), tmp_path / "cut")
    uncrash()
    if not keep_secret:  # the control: resume forgets the stored secret (a fresh OS draw)
        monkeypatch.setattr(eng.DifferentialPrivacy, "load_rng_state", lambda self, st: None)
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")
    for name in ("cut", "cut2"):
        train_run(data, None, tmp_path / name, resume=True)
    la = json.loads((tmp_path / "cut/privacy.json").read_text())
    lb = json.loads((tmp_path / "cut2/privacy.json").read_text())
    assert la["history"] == lb["history"] and la["steps"] > 5
    return same(tmp_path / "cut", tmp_path / "cut2")


def test_resume_continues_the_secret_stream(cls_csv, tmp_path, monkeypatch):
    """Two resumes of one interrupted run end bit-identical: the secret seed and the noise
    generator's state come back from resume/ (not from a fresh OS draw)."""
    assert _two_resumes_of_one_crash(cls_csv, tmp_path, monkeypatch, keep_secret=True)


def test_resume_without_the_secret_state_would_diverge(cls_csv, tmp_path, monkeypatch):
    """The control of the test above: had resume drawn a fresh secret, the two resumes would
    differ, so the equality above is evidence that the stored stream was continued."""
    assert not _two_resumes_of_one_crash(cls_csv, tmp_path, monkeypatch, keep_secret=False)


def test_federated_server_randomness_is_secret_unless_reproducible():
    from federation.server import noise_source, seed_server_rngs
    c = Config.load(None, [])
    draws = []
    for _ in range(2):
        seed = seed_server_rngs(c)
        draws.append((seed, float(np.random.normal())))
    assert draws[0] != draws[1] and noise_source(c) == "os_entropy"
    c.privacy.reproducible = True
    draws = []
    for _ in range(2):
        seed = seed_server_rngs(c)
        draws.append((seed, float(np.random.normal())))
    assert draws[0] == draws[1] and noise_source(c) == "seeded"
    c.privacy.reproducible = False  # a run without DP stays seeded: nothing to protect
    assert seed_server_rngs(c, private=False) == seed_server_rngs(c, private=False)


def test_federated_client_dp_engine_ignores_the_published_client_seed():
    """A client's DP engine gets task.client_seed(train.seed, pid, round) (public); its noise
    and sampling seed must not be that number unless reproducible."""
    pc = PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-4)
    a = DifferentialPrivacy(pc, n_units=500, batch_size=50, seed=123)
    b = DifferentialPrivacy(pc, n_units=500, batch_size=50, seed=123)
    assert a.seed != b.seed and 123 not in (a.seed, b.seed)
    pc.reproducible = True
    assert DifferentialPrivacy(pc, n_units=500, batch_size=50, seed=123).seed == 123


@pytest.mark.slow
def test_target_epsilon_reached_early_stops_and_resume_trains_no_further(cls_csv, tmp_path):
    """Noise calibrated for fewer steps than the run plans: the budget runs out mid-training.
    Training stops with the message, the ledger stays within the target, and ``--resume``
    (the real CLI) takes no further step."""
    from safelm.api import prepare
    from safelm.privacy import make_privacy
    c = Config.load(None, TINY + [d for d in DP if "noise_multiplier" not in d] + [
        "train.epochs=4", "privacy.target_epsilon=3", "privacy.accountant=rdp"])
    prep = prepare(cls_csv, c)
    full = make_privacy(c, prep)
    assert full.steps_planned >= 8
    short = DifferentialPrivacy(c.privacy, n_units=full.n_units, batch_size=c.train.batch_size,
                                epochs=c.train.epochs, steps_planned=full.steps_planned // 2)
    run = tmp_path / "run"
    final = train_run(cls_csv, c, run, privacy=short)
    assert "privacy budget reached" in final["stopped"]
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["epsilon"] <= 3.0
    assert full.steps_planned // 2 <= ledger["steps"] < full.steps_planned
    stops = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "stop" and "privacy budget" in r["reason"] for r in stops)
    before = (run / "model.safetensors").read_bytes()
    out = subprocess.run([sys.executable, "-m", "safelm.cli", "train", "--data", str(cls_csv),
                          "--out", str(run), "--resume"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "privacy budget reached" in out.stderr
    again = json.loads((run / "privacy.json").read_text())
    assert again["steps"] == ledger["steps"] and again["epsilon"] == ledger["epsilon"]
    assert (run / "model.safetensors").read_bytes() == before


def test_demo_verdicts_fail_on_a_failed_gate_or_audit(tmp_path, capsys, monkeypatch):
    """The demo's exit code reads every verdict: a failed privacy audit or release gate
    makes ``safelm demo`` exit 1 naming it; all passing (the null case) exits 0."""
    from safelm import cli, demo
    audit = tmp_path / "report.json"
    audit.write_text(json.dumps({"passed": True}))
    ok = {"privacy_audit": str(audit), "release_ok": True,
          "release_gates": ["PASS integrity: fine", "PASS require_secret_noise: os entropy"]}
    assert all(v[1] for v in demo.demo_verdicts(ok)) and len(demo.demo_verdicts(ok)) == 2
    bad = dict(ok, release_ok=False, release_gates=["PASS integrity: fine",
                                                    "FAIL require_secret_noise: seeded"])
    (name, passed, detail), = [v for v in demo.demo_verdicts(bad) if not v[1]]
    assert name == "release verify" and "require_secret_noise" in detail
    audit.write_text(json.dumps({"passed": None}))  # descriptive only: no verdict to fail
    assert all(v[1] for v in demo.demo_verdicts(ok)) and len(demo.demo_verdicts(ok)) == 1
    audit.write_text(json.dumps({"passed": False}))
    assert [v[0] for v in demo.demo_verdicts(ok) if not v[1]] == ["privacy audit"]
    for failed, rc in (([], 0), (["privacy audit: x"], 1)):
        monkeypatch.setattr(demo, "run_demo", lambda out, quick=False, f=failed: {"failed": f})
        assert cli.main(["demo", "--out", str(tmp_path / "d")]) == rc
    assert "demo: FAILED privacy audit: x" in capsys.readouterr().err


def test_require_secret_noise_gate():
    from audits.release.verify import _secret_noise_gate
    assert _secret_noise_gate({"enabled": True, "noise_source": "os_entropy"})[0]
    assert not _secret_noise_gate({"enabled": True, "noise_source": "seeded"})[0]
    assert not _secret_noise_gate({"enabled": True})[0]  # unrecorded: an older ledger
    assert not _secret_noise_gate({"enabled": False})[0]
