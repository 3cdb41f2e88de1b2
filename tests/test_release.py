"""Releases and their verification (issue 5, points 4-6 and 8).

Oracles: hashes are recomputed here with hashlib, epsilon with a fresh Opacus accountant, the
data fingerprint from the CSV itself; tampering flips one byte of each file in turn; policies
are checked against planted audit reports whose verdicts are known in advance.
"""

from __future__ import annotations

import csv
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from conftest import TINY, write_cls_csv
from release_helpers import cli, failed_gates, one_error_line, sha
from safelm import Config, train_run
from safelm.api import load_run, predictions_table, write_csv
from safelm.cli import main
from safelm.errors import UserError

RELEASED = ("model.safetensors", "config.json", "tokenizer.json", "privacy.json",
            "MODEL_CARD.md", "MODEL_CARD.html", "release.json", "release.sha256")
KEYS = ("schema_version", "kind", "name", "created", "files", "integrity", "intended_use",
        "model", "data", "training", "privacy", "empirical_privacy_audit", "fairness_audit",
        "evaluation", "versions", "seeds")


def flip_byte(p: Path, at: float = 0.5) -> None:
    data = bytearray(p.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x01
    p.write_bytes(bytes(data))


# ---- fixtures: a tiny DP run, a non-private run, audit reports --------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cls_csv(tmp_path_factory.mktemp("data") / "cls.csv")


def _train(root: Path, data: Path, name: str, *extra: str) -> Path:
    cfg = Config.load(None, TINY + ["train.task=classify", "train.epochs=2", *extra])
    train_run(data, cfg, root / name)
    return root / name


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, data) -> Path:
    return _train(tmp_path_factory.mktemp("runs"), data, "dp", "privacy.enabled=true",
                  "privacy.target_epsilon=3", "privacy.delta=1e-3")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data) -> Path:
    return _train(tmp_path_factory.mktemp("runs"), data, "plain")


@pytest.fixture(scope="module")
def fairness_report(tmp_path_factory, dp_run, data) -> Path:
    """A real fairness audit of the DP run's predictions (the report format it consumes)."""
    from audits.fairness.audit import FairnessSettings
    from audits.fairness.pipeline import fairness_audit
    d = tmp_path_factory.mktemp("fair")
    table = predictions_table(load_run(dp_run), data, data_overrides={"group_cols": ["gender"]})
    write_csv(table, d / "pred.csv")  # with its .meta.json: the report knows the weights
    rep = fairness_audit(d / "pred.csv", ["gender"], d / "audit",
                         settings=FairnessSettings(n_boot=100))
    return Path(rep["_paths"]["html"])


def planted_fairness(path: Path, n_flagged: int, diff: float = 0.3,
                     weights: Path | None = None) -> Path:
    """A fairness report.json (docs/design.md keys) with ``n_flagged`` flagged disparities,
    bound to ``weights`` (their sha256 as inputs.model_sha256) when given."""
    disp = [{"slice": "gender", "metric": "accuracy", "kind": "difference",
             "reference": "overall", "label": f"g{i}", "value": -diff + i * 0.01,
             "ci": [-diff - 0.1, -diff + 0.05], "threshold": 0.1, "flagged": i < n_flagged}
            for i in range(max(n_flagged, 1) + 2)]
    path.write_text(json.dumps({"by_group": [], "disparities": disp, "overall": {},
                                "summary": {"n_flagged": n_flagged, "flagged": []},
                                "inputs": {"predictions_sha256": "0" * 64,
                                           "model_sha256": sha(weights) if weights else None},
                                "versions": {}}))
    return path


def planted_privacy_audit(path: Path, claimed: float | None, bound: float,
                          weights: Path | None = None) -> Path:
    """A privacy-audit report.json. Without ``weights``: the keys of the issue
    (``empirical_epsilon: {value, confidence}``); with: the layout audits/privacy writes (a
    number plus per-attack dicts, the audited weights' sha256, canary secrets in rows)."""
    attack = {"name": "loss_threshold", "description": "x" * 200, "auc": 0.52,
              "tpr_at_fpr": {"0.01": {"value": 0.02, "ci": [0.0, 0.05]}},
              "empirical_epsilon": {"value": bound, "confidence": 0.95}}
    canaries = {"n_canaries": 1, "mean_exposure": 3.1,
                "canaries": [{"secret": "my PIN is 4711 secret canary", "exposure": 3.1}]}
    rep = {"attacks": [attack], "claimed_epsilon": claimed, "delta": 1e-3,
           "passed": bound <= (claimed or 1e9), "canaries": canaries, "versions": {},
           "empirical_epsilon": {"value": bound, "confidence": 0.95},
           "inputs": {"members_sha256": "1" * 64}}
    if weights is not None:
        rep.update(empirical_epsilon=bound, confidence=0.95)
        rep["inputs"]["model.safetensors_sha256"] = sha(weights)
    path.write_text(json.dumps(rep))
    return path


@pytest.fixture(scope="module")
def dp_release(tmp_path_factory, dp_run, fairness_report) -> Path:
    out = tmp_path_factory.mktemp("rel") / "release"
    claimed = json.loads((dp_run / "privacy.json").read_text())["epsilon"]
    audit = planted_privacy_audit(out.parent / "privacy_report.json", claimed, 0.4,
                                  weights=dp_run / "model.safetensors")
    assert main(["release", str(dp_run), "--out", str(out), "--fairness-report",
                 str(fairness_report), "--privacy-audit", str(audit),
                 "--intended-use", "unit tests only",
                 "--data-description", "synthetic film reviews"]) == 0
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst
    return make


# ---- point 4: contents -------------------------------------------------------------------------
def test_release_holds_every_field_and_hashes_recompute(dp_release, dp_run, data,
                                                        fairness_report):
    files = sorted(p.name for p in dp_release.iterdir())
    assert files == sorted(RELEASED + ("hf",))  # hf/: the transformers copy (test_hf.py)
    hf_files = tuple(sorted(f"hf/{p.name}" for p in (dp_release / "hf").iterdir()))
    assert {"hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"} <= set(hf_files)
    m = json.loads((dp_release / "release.json").read_text())
    assert set(KEYS) <= set(m) and m["schema_version"] == 1
    assert m["huggingface"]["exported"] is True
    # Every other file's sha256, recomputed independently; release.sha256 covers release.json.
    assert m["files"] == {n: sha(dp_release / n) for n in RELEASED[:6] + hf_files}
    lines = (dp_release / "release.sha256").read_text().splitlines()
    assert lines == [f"{sha(dp_release / n)}  {n}" for n in sorted(RELEASED[:7] + hf_files)]
    # the model card carries the Hub's metadata with the privacy claim
    card = (dp_release / "MODEL_CARD.md").read_text()
    head = card.split("---")[1]
    assert '"differential-privacy"' in head and "library_name:" in head and "metrics:" in head
    assert f"epsilon: {json.dumps(m['privacy']['epsilon'])}" in head
    assert 'noise_source: "os_entropy"' in head
    for name in ("model.safetensors", "config.json", "tokenizer.json", "privacy.json"):
        assert sha(dp_release / name) == sha(dp_run / name)  # copied byte for byte
    # Data fingerprint: the CSV's own hash and row counts, no text.
    assert m["data"]["sha256"] == sha(data)
    assert sum(m["data"]["rows"].values()) == 120
    assert m["data"]["description"] == "synthetic film reviews"
    # Privacy: the ledger, and epsilon recomputed here with a fresh Opacus accountant.
    from opacus.accountants import create_accountant
    ledger = json.loads((dp_run / "privacy.json").read_text())
    for k in ("epsilon", "delta", "unit", "accountant", "sampling", "max_grad_norm", "history",
              "target_epsilon"):
        assert m["privacy"][k] == ledger[k], k
    acc = create_accountant(mechanism=ledger["accountant"])
    acc.history = [tuple(h) for h in ledger["history"]]
    assert m["privacy"]["recomputed_epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-9)
    assert m["privacy"]["enabled"] and 0 < m["privacy"]["epsilon"] <= 3
    # Evaluation: the run's test record.
    test = [json.loads(x) for x in (dp_run / "metrics.jsonl").read_text().splitlines()
            if '"test"' in x][-1]
    assert m["evaluation"]["metrics"]["accuracy"] == pytest.approx(test["test_accuracy"])
    assert m["model"]["n_parameters"] > 0 and m["model"]["labels"] == ["negative", "positive"]
    assert m["intended_use"]["use"] == "unit tests only"
    assert {"torch", "opacus", "python"} <= set(m["versions"]) and "train.seed" in m["seeds"]
    # Audits: the empirical bound, and the fairness summary of the real report.
    emp = m["empirical_privacy_audit"]
    assert emp["empirical_epsilon"] == 0.4 and emp["confidence"] == 0.95
    assert emp["attacks"][0]["empirical_epsilon"] == 0.4 and emp["canaries"]["n_canaries"] == 1
    report = fairness_report.with_name("report.json")
    fair = json.loads(report.read_text())
    assert m["fairness_audit"]["report_sha256"] == sha(report)
    assert m["fairness_audit"]["n_disparities"] == len(fair["disparities"])
    assert m["fairness_audit"]["n_flagged"] == sum(d["flagged"] for d in fair["disparities"])
    assert m["fairness_audit"]["worst"] and all("ci" in w for w in m["fairness_audit"]["worst"])
    card = (dp_release / "MODEL_CARD.md").read_text()
    for needle in ("Intended use", "Training data", "Privacy guarantee", "Empirical privacy",
                   "Fairness audit", "Evaluation", f"{m['privacy']['epsilon']:.3g}"):
        assert needle in card


def test_release_carries_no_raw_text_and_no_secrets(dp_release, data):
    with open(data, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)][:30]
    blobs = {str(p.relative_to(dp_release)): p.read_bytes() for p in dp_release.rglob("*")
             if p.is_file()}
    assert any(name.startswith("hf/") for name in blobs)  # the transformers copy too
    for name, blob in blobs.items():
        for t in texts:
            assert t.encode() not in blob, (name, t)
        assert b"4711" not in blob and b"secret canary" not in blob, name  # canary text
        assert str(data).encode() not in blob, name  # not even the local data path


# ---- point 5: verify ---------------------------------------------------------------------------
def test_verify_passes_and_names_each_gate(capsys, dp_release):
    rc, out, err = cli(capsys, "verify", dp_release)
    assert rc == 0, out + err
    gates = [ln.split()[1].rstrip(":") for ln in out.splitlines()
             if ln.startswith(("PASS", "FAIL"))]
    assert gates == ["integrity", "schema", "epsilon_recomputes", "empirical_le_claimed",
                     "audits_bound"]
    assert sha(dp_release / "release.sha256") in out  # the release digest is printed


@pytest.mark.parametrize("name", RELEASED)
def test_flipping_one_byte_of_any_file_fails_integrity(capsys, dp_release, copy_of, name):
    rel = copy_of(dp_release)
    flip_byte(rel / name)
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 1 and "integrity" in failed_gates(out), out
    assert out.splitlines()[-1].startswith("verify: FAILED") and "integrity" in out.splitlines()[-1]


@pytest.mark.parametrize("at", [0.0, 0.999])
def test_first_and_last_bytes_of_release_json_are_covered(capsys, dp_release, copy_of, at):
    rel = copy_of(dp_release)
    flip_byte(rel / "release.json", at)
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 1 and "integrity" in failed_gates(out)


def test_added_or_removed_file_fails_integrity(capsys, dp_release, copy_of):
    rel = copy_of(dp_release)
    (rel / "notes.txt").write_text("hello")
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 1 and "extra file notes.txt" in out
    rel.joinpath("notes.txt").unlink()
    (rel / "privacy.json").unlink()
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 1 and "missing file privacy.json" in out and "integrity" in failed_gates(out)


def test_the_transformers_copy_is_covered_like_every_file(capsys, dp_release, copy_of, tmp_path):
    """hf/ files are hashed and checked: a changed byte, an extra file and a listing that
    points outside the release each fail (planted); the untouched copy passes (control)."""
    from safelm.hashing import listed_name_ok
    assert cli(capsys, "verify", dp_release)[0] == 0
    rel = copy_of(dp_release)
    flip_byte(rel / "hf" / "model.safetensors")
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 1 and "hf/model.safetensors: sha256 differs" in out, out
    rel2 = tmp_path / "rel2"
    shutil.copytree(dp_release, rel2)
    (rel2 / "hf" / "extra.py").write_text("print('hi')\n")
    rc, out, _ = cli(capsys, "verify", rel2)
    assert rc == 1 and "extra file hf/extra.py" in out, out
    assert listed_name_ok("hf/config.json") and listed_name_ok("model.safetensors")
    for bad in ("../x", "hf/../x", "a/b", "hf/a/b", "", "hf/"):
        assert not listed_name_ok(bad), bad


def test_rewritten_listings_cannot_understate_epsilon(capsys, dp_release, copy_of):
    """Someone lowers epsilon in release.json and privacy.json and rewrites both listings:
    the hashes agree again, but the fresh accountant does not."""
    from audits.release.manifest import sums_text
    rel = copy_of(dp_release)
    ledger = json.loads((rel / "privacy.json").read_text())
    ledger["epsilon"] /= 2
    (rel / "privacy.json").write_text(json.dumps(ledger))
    m = json.loads((rel / "release.json").read_text())
    m["privacy"]["epsilon"] = ledger["epsilon"]
    m["files"]["privacy.json"] = sha(rel / "privacy.json")
    (rel / "release.json").write_text(json.dumps(m))
    names = [n for n in RELEASED if n != "release.sha256"] + \
        [f"hf/{p.name}" for p in (rel / "hf").iterdir()]
    (rel / "release.sha256").write_text(sums_text({n: sha(rel / n) for n in names}))
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 1 and failed_gates(out) == {"epsilon_recomputes"}, out


# ---- point 6: loading never trusts a changed file, never unpickles ------------------------------
def test_release_loads_and_predicts_like_its_run(capsys, dp_release, dp_run, data, tmp_path,
                                                 monkeypatch):
    import torch

    def refuse(*a, **k):
        raise AssertionError("something was unpickled")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    a = predictions_table(load_run(dp_release), data)
    b = predictions_table(load_run(dp_run), data)
    assert (a["y_pred"] == b["y_pred"]).all() and (a["nll"] - b["nll"]).abs().max() < 1e-9
    rc, out, err = cli(capsys, "predict", dp_release, "--data", data, "--out",
                       tmp_path / "p.csv")
    assert rc == 0, err


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json",
                                  "release.json"])
def test_load_run_refuses_a_tampered_release(capsys, dp_release, copy_of, data, tmp_path, name):
    rel = copy_of(dp_release)
    text = (rel / name).read_bytes()
    # release.json: a digit of its timestamp, so it stays valid JSON whatever its layout
    at = (text.index(b'"created": "') + 13) / len(text) if name == "release.json" else 0.5
    flip_byte(rel / name, at)
    with pytest.raises(UserError, match="hash mismatch"):
        load_run(rel)
    rc, _, err = cli(capsys, "predict", rel, "--data", data, "--out", tmp_path / "p.csv")
    one_error_line(rc, err, name, "hash mismatch")
    assert not (tmp_path / "p.csv").exists()


def test_run_dir_checksums_written_and_enforced(capsys, dp_run, copy_of, data, tmp_path):
    sums = json.loads((dp_run / "checksums.json").read_text())
    assert sums == {n: sha(dp_run / n) for n in ("model.safetensors", "config.json",
                                                 "tokenizer.json", "privacy.json")}
    run = copy_of(dp_run)
    flip_byte(run / "model.safetensors")
    rc, _, err = cli(capsys, "predict", run, "--data", data, "--out", tmp_path / "p.csv")
    one_error_line(rc, err, "model.safetensors", "hash mismatch")
    rc, _, err = cli(capsys, "release", run, "--out", tmp_path / "rel")
    one_error_line(rc, err, "hash mismatch")
    assert not (tmp_path / "rel").exists()
    # An older run dir (no checksums.json) still loads: there is nothing to compare with.
    old = tmp_path / "old"
    shutil.copytree(dp_run, old)
    (old / "checksums.json").unlink()
    assert load_run(old).cfg.train.task == "classify"


# ---- policies ----------------------------------------------------------------------------------
def write_policy(tmp_path: Path, text: str, suffix: str = ".toml") -> Path:
    p = tmp_path / f"policy{suffix}"
    p.write_text(text)
    return p


def test_non_private_release_fails_require_dp_only(capsys, plain_run, tmp_path):
    out = tmp_path / "rel"
    rc, _, err = cli(capsys, "release", plain_run, "--out", out)
    assert rc == 0, err
    m = json.loads((out / "release.json").read_text())
    assert not m["privacy"]["enabled"] and m["privacy"]["epsilon"] is None
    assert not (out / "privacy.json").exists()
    rc, out_text, _ = cli(capsys, "verify", out)
    assert rc == 0, out_text
    rc, out_text, _ = cli(capsys, "verify", out, "--policy",
                          write_policy(tmp_path, "require_dp = true\n"))
    assert rc == 1 and failed_gates(out_text) == {"require_dp"}, out_text
    assert "require_dp" in out_text.splitlines()[-1]


def test_max_epsilon_below_the_claim_fails(capsys, dp_release, tmp_path):
    eps = json.loads((dp_release / "release.json").read_text())["privacy"]["epsilon"]
    pol = write_policy(tmp_path, json.dumps({"max_epsilon": eps * 0.9, "require_dp": True}),
                       ".json")
    rc, out, _ = cli(capsys, "verify", dp_release, "--policy", pol)
    assert rc == 1 and failed_gates(out) == {"max_epsilon"}, out
    pol = write_policy(tmp_path, f"[policy]\nmax_epsilon = {eps * 1.01}\nrequire_dp = true\n"
                       "max_delta = 1e-3\nrequire_empirical_audit = true\n"
                       "require_fairness_audit = true\n")
    rc, out, _ = cli(capsys, "verify", dp_release, "--policy", pol)
    assert rc == 0, out


def test_empirical_bound_above_the_claim_fails(capsys, dp_run, tmp_path):
    eps = json.loads((dp_run / "privacy.json").read_text())["epsilon"]
    audit = planted_privacy_audit(tmp_path / "audit.json", eps, eps + 0.5,
                                  dp_run / "model.safetensors")
    rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / "rel", "--privacy-audit",
                     audit)
    assert rc == 0, err
    rc, out, _ = cli(capsys, "verify", tmp_path / "rel")
    assert rc == 1 and failed_gates(out) == {"empirical_le_claimed"}, out
    rc, out, _ = cli(capsys, "verify", tmp_path / "rel", "--policy",
                     write_policy(tmp_path, "empirical_le_claimed = false\n"))
    assert rc == 0, out


def test_privacy_audit_without_a_weights_hash_is_refused(capsys, dp_run, tmp_path):
    """Even with this run's claimed epsilon: a claim is shared by many runs, weights are not."""
    eps = json.loads((dp_run / "privacy.json").read_text())["epsilon"]
    audit = planted_privacy_audit(tmp_path / "audit.json", eps, 0.1)
    rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / "rel", "--privacy-audit",
                     audit)
    one_error_line(rc, err, "no model_sha256", "--allow-unbound-report")
    assert not (tmp_path / "rel").exists()


def test_privacy_audit_is_tied_to_the_weights_when_it_records_them(capsys, dp_run, plain_run,
                                                                   tmp_path):
    eps = json.loads((dp_run / "privacy.json").read_text())["epsilon"]
    other = planted_privacy_audit(tmp_path / "a.json", eps, 0.1, plain_run / "model.safetensors")
    rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / "r1", "--privacy-audit",
                     other)
    one_error_line(rc, err, "other weights", "--allow-unbound-report")
    # Same weights, a different claim tested by the audit: still this model's audit.
    same = planted_privacy_audit(tmp_path / "b.json", eps * 2, 0.1, dp_run / "model.safetensors")
    rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / "r2", "--privacy-audit",
                     same)
    assert rc == 0, err


def test_a_descriptive_privacy_audit_does_not_satisfy_require_empirical_audit(
        capsys, dp_run, tmp_path):
    """Membership inference gives no epsilon bound: the gate must fail, and say why (planted),
    while a one-run bound attached the same way passes it (control)."""
    eps = json.loads((dp_run / "privacy.json").read_text())["epsilon"]
    pol = write_policy(tmp_path, "require_empirical_audit = true\n")
    for name, bound in (("descriptive", None), ("bound", 0.3)):
        rep = planted_privacy_audit(tmp_path / f"{name}.json", eps, 0.3,
                                    dp_run / "model.safetensors")
        report = json.loads(rep.read_text())
        report["empirical_epsilon"] = bound
        report["passed"] = None if bound is None else True
        rep.write_text(json.dumps(report))
        rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / name,
                         "--privacy-audit", rep)
        assert rc == 0, err
        rc, out, _ = cli(capsys, "verify", tmp_path / name, "--policy", pol)
        if bound is None:
            assert rc == 1 and failed_gates(out) == {"require_empirical_audit"}, out
            assert "no epsilon bound" in out and "--one-run" in out, out
        else:
            assert rc == 0, out


def test_missing_audits_fail_policies_that_require_them(capsys, plain_run, tmp_path):
    rc, _, _ = cli(capsys, "release", plain_run, "--out", tmp_path / "rel")
    pol = write_policy(tmp_path, "require_empirical_audit = true\nrequire_fairness_audit = "
                       "true\nmax_flagged_disparities = 5\n")
    rc, out, _ = cli(capsys, "verify", tmp_path / "rel", "--policy", pol)
    assert rc == 1 and failed_gates(out) == {"require_empirical_audit", "require_fairness_audit",
                                             "max_flagged_disparities"}, out


def test_flagged_disparities_above_the_maximum_fail(capsys, plain_run, tmp_path):
    rep = planted_fairness(tmp_path / "fair.json", n_flagged=3,
                           weights=plain_run / "model.safetensors")
    rc, _, err = cli(capsys, "release", plain_run, "--out", tmp_path / "rel",
                     "--fairness-report", rep)
    assert rc == 0, err
    m = json.loads((tmp_path / "rel/release.json").read_text())
    assert m["fairness_audit"]["n_flagged"] == 3
    assert m["fairness_audit"]["max_abs_difference"] == pytest.approx(0.3)
    for text, failed in (("max_flagged_disparities = 2\n", {"max_flagged_disparities"}),
                         ("max_flagged_disparities = 3\n", set()),
                         ("max_abs_difference = 0.2\n", {"max_abs_difference"}),
                         ("max_abs_difference = 0.35\n", set())):
        rc, out, _ = cli(capsys, "verify", tmp_path / "rel", "--policy",
                         write_policy(tmp_path, text))
        assert failed_gates(out) == failed and rc == (1 if failed else 0), (text, out)


@pytest.mark.parametrize("text,suffix,needle", [
    ("max_epsilon = ", ".toml", "not valid TOML"),
    ("{max_epsilon: 1}", ".json", "not valid JSON"),
    ("max_epsilom = 1.0\n", ".toml", "did you mean max_epsilon"),
    ("require_dp = 'yes'\n", ".toml", "require_dp"),
    ("max_epsilon = -1\n", ".toml", "max_epsilon"),
    ("max_flagged_disparities = 1.5\n", ".toml", "max_flagged_disparities"),
])
def test_bad_policy_is_a_usage_error(capsys, dp_release, tmp_path, text, suffix, needle):
    rc, out, err = cli(capsys, "verify", dp_release, "--policy",
                       write_policy(tmp_path, text, suffix))
    one_error_line(rc, err, needle)
    assert out == ""


def test_verify_usage_errors(capsys, dp_run, tmp_path):
    rc, _, err = cli(capsys, "verify", tmp_path / "nope")
    one_error_line(rc, err, "no such release dir")
    rc, _, err = cli(capsys, "verify", dp_run)
    one_error_line(rc, err, "not a release dir")
    rc, _, err = cli(capsys, "verify", tmp_path, "--policy", tmp_path / "none.toml")
    one_error_line(rc, err, "none.toml")


def test_existing_out_is_refused_and_untouched(capsys, dp_run, tmp_path):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = cli(capsys, "release", dp_run, "--out", out)
    one_error_line(rc, err, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() \
        == "mine"
    # A failing release (bad report) leaves neither --out nor a temporary dir behind.
    rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / "new",
                     "--fairness-report", tmp_path / "missing.json")
    one_error_line(rc, err, "missing.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"]
    # An existing empty dir is fine.
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / "empty")
    assert rc == 0, err


def test_demo_step_releases_verifies_and_links_everything(dp_run, fairness_report, tmp_path,
                                                          capsys):
    from audits.release.demo import demo_step
    eps = json.loads((dp_run / "privacy.json").read_text())["epsilon"]
    (tmp_path / "privacy").mkdir()
    audit = planted_privacy_audit(tmp_path / "privacy" / "report.json", eps, 0.2,
                                  dp_run / "model.safetensors")
    (tmp_path / "privacy" / "report.html").write_text("<html></html>")
    ctx = {"out": tmp_path / "demo", "dp_classifier_run": dp_run,
           "fairness_report": fairness_report, "privacy_audit": audit,
           "privacy_audit_html": tmp_path / "privacy" / "report.html"}
    (tmp_path / "demo").mkdir()
    demo_step(ctx)
    out = capsys.readouterr().out
    assert "PASS require_dp" in out and "PASS max_epsilon" in out and ctx["release_ok"]
    index = Path(ctx["index"])
    hrefs = re.findall(r'href="([^"]+)"', index.read_text())
    assert "release/MODEL_CARD.html" in hrefs and len(hrefs) == 4  # card, manifest, 2 reports
    for h in hrefs:
        assert not h.startswith("/") and (index.parent / h).is_file(), h
    m = json.loads((tmp_path / "demo/release/release.json").read_text())
    assert m["empirical_privacy_audit"]["empirical_epsilon"] == 0.2
    demo_step(ctx)  # a second demo into the same folder replaces its release
    assert ctx["release_ok"]


def test_lm_release_generates_like_its_run(capsys, tmp_path):
    from conftest import write_lm_txt
    data = write_lm_txt(tmp_path / "lm.txt")
    cfg = Config.load(None, TINY + ["train.epochs=1"])
    train_run(data, cfg, tmp_path / "lm")
    rc, _, err = cli(capsys, "release", tmp_path / "lm", "--out", tmp_path / "rel")
    assert rc == 0, err
    outs = []
    for d in (tmp_path / "lm", tmp_path / "rel"):
        rc, out, err = cli(capsys, "generate", d, "--prompt", "the cat", "--max-new-tokens", 8,
                           "--seed", 3)
        assert rc == 0, err
        outs.append(out)
    assert outs[0] == outs[1] and outs[0].startswith("the cat")
