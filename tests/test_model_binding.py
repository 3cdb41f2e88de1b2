"""Audits bound to the model (issue 13, point 4).

Oracle: the sha256 of ``model.safetensors`` computed here with hashlib. Every report must
record the weights it evaluated; a predictions table carries them in its ``.meta.json``
sidecar; a release refuses a report about other (or unknown) weights unless told, says so on
the card, and verify's ``audits_bound`` gate fails for it (null case: a bound report passes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY, write_cls_csv, write_lm_txt
from safelm import Config, train_run

from release_helpers import cli, failed_gates, one_error_line, sha


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here trains or scores tiny models: one torch thread."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cls_csv(tmp_path_factory.mktemp("data") / "cls.csv")


def _train(root: Path, data: Path, name: str, seed: int) -> Path:
    cfg = Config.load(None, TINY + ["train.task=classify", "train.epochs=1",
                                    f"train.seed={seed}"])
    train_run(data, cfg, root / name)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"a": _train(root, data, "a", 0), "b": _train(root, data, "b", 1)}


def predict(capsys, run: Path, data: Path, out: Path) -> Path:
    rc, _, err = cli(capsys, "predict", run, "--data", data, "--out", out, "--group-cols",
                     "gender")
    assert rc == 0, err
    return out


def fairness(pred: Path, out: Path) -> dict:
    from audits.fairness.audit import FairnessSettings
    from audits.fairness.pipeline import fairness_audit
    return fairness_audit(pred, ["gender"], out, settings=FairnessSettings(n_boot=20))


# ---- the sidecar and every report's model hash ------------------------------------------------
def test_predict_writes_the_model_hash_and_the_fairness_report_records_it(capsys, runs, data,
                                                                          tmp_path):
    pred = predict(capsys, runs["a"], data, tmp_path / "pred.csv")
    meta = json.loads((tmp_path / "pred.csv.meta.json").read_text())
    assert meta["model_sha256"] == sha(runs["a"] / "model.safetensors")
    assert meta["predictions_sha256"] == sha(pred) and meta["rows"] == 120
    rep = fairness(pred, tmp_path / "audit")
    assert rep["inputs"]["model_sha256"] == sha(runs["a"] / "model.safetensors")
    assert not any("sidecar" in w for w in rep["inputs"]["warnings"])
    assert sha(runs["a"] / "model.safetensors") in (tmp_path / "audit/report.md").read_text()


def test_a_table_without_a_matching_sidecar_has_an_unknown_model(capsys, runs, data, tmp_path):
    pred = predict(capsys, runs["a"], data, tmp_path / "pred.csv")
    df = pd.read_csv(pred)
    df.iloc[:-1].to_csv(pred, index=False)  # edited after predict: the sidecar is stale
    rep = fairness(pred, tmp_path / "a1")
    assert rep["inputs"]["model_sha256"] is None
    assert any("another version of the table" in w for w in rep["inputs"]["warnings"])
    (tmp_path / "pred.csv.meta.json").unlink()
    rep = fairness(pred, tmp_path / "a2")
    assert rep["inputs"]["model_sha256"] is None
    assert any("no sidecar" in w for w in rep["inputs"]["warnings"])
    # Writing a table that no model made removes an old sidecar rather than keeping it.
    from safelm.api import write_csv
    predict(capsys, runs["a"], data, tmp_path / "p2.csv")
    write_csv(df, tmp_path / "p2.csv")
    assert not (tmp_path / "p2.csv.meta.json").exists()


def test_privacy_and_lm_bias_reports_record_the_weights(runs, data, tmp_path):
    from audits.lm_bias.audit import LMBiasSettings, lm_bias_audit
    from audits.privacy.audit import PrivacySettings, privacy_audit
    df = pd.read_csv(data)
    df.iloc[:60].to_csv(tmp_path / "m.csv", index=False)
    df.iloc[60:].assign(text=[f"an unseen review number {i}" for i in range(60)]).to_csv(
        tmp_path / "n.csv", index=False)
    rep = privacy_audit(runs["a"], tmp_path / "m.csv", tmp_path / "n.csv", tmp_path / "priv",
                        settings=PrivacySettings(reference_models=0, n_boot=10),
                        log=lambda s: None)
    assert rep["inputs"]["model_sha256"] == sha(runs["a"] / "model.safetensors")
    lm = tmp_path / "lm"
    train_run(write_lm_txt(tmp_path / "lm.txt", n=20),
              Config.load(None, TINY + ["train.epochs=1", "model.block_size=64"]), lm)
    rep = lm_bias_audit(lm, None, settings=LMBiasSettings(samples=1, max_new_tokens=2,
                                                          n_boot=10))
    assert rep["inputs"]["model_sha256"] == sha(lm / "model.safetensors")


# ---- the release refuses unbound reports; verify checks the binding ---------------------------
@pytest.fixture(scope="module")
def reports(tmp_path_factory, runs, data) -> dict[str, Path]:
    """Fairness reports over run a's predictions (bound), run b's (other weights) and a table
    without a sidecar (unknown weights)."""
    from safelm.api import load_run, predictions_table, write_csv
    d = tmp_path_factory.mktemp("reports")
    out = {}
    for name, run in (("bound", runs["a"]), ("other", runs["b"]), ("unknown", runs["a"])):
        table = predictions_table(load_run(run), data, data_overrides={"group_cols": ["gender"]})
        if name == "unknown":
            table.to_csv(d / f"{name}.csv", index=False)  # pandas alone: no sidecar
        else:
            write_csv(table, d / f"{name}.csv")
        out[name] = Path(fairness(d / f"{name}.csv", d / name)["_paths"]["json"])
    return out


def test_release_refuses_a_report_about_other_or_unknown_weights(capsys, runs, reports,
                                                                 tmp_path):
    for name, needle in (("other", "other weights"), ("unknown", "no model_sha256")):
        rc, _, err = cli(capsys, "release", runs["a"], "--out", tmp_path / name,
                         "--fairness-report", reports[name])
        one_error_line(rc, err, "--fairness-report", needle, "--allow-unbound-report")
        assert not (tmp_path / name).exists()
    rc, _, err = cli(capsys, "release", runs["a"], "--out", tmp_path / "ok", "--fairness-report",
                     reports["bound"])
    assert rc == 0, err
    fair = json.loads((tmp_path / "ok/release.json").read_text())["fairness_audit"]
    assert fair["bound_to_weights"] and fair["model_sha256"] == sha(runs["a"] /
                                                                   "model.safetensors")
    rc, out, _ = cli(capsys, "verify", tmp_path / "ok")
    assert rc == 0 and "PASS audits_bound" in out, out


def test_allow_unbound_report_says_so_and_verify_fails_the_binding(capsys, runs, reports,
                                                                   tmp_path):
    rel = tmp_path / "rel"
    rc, out, err = cli(capsys, "release", runs["a"], "--out", rel, "--fairness-report",
                       reports["other"], "--allow-unbound-report")
    assert rc == 0, err
    assert "NOT bound" in out
    fair = json.loads((rel / "release.json").read_text())["fairness_audit"]
    assert fair["bound_to_weights"] is False and fair["model_sha256"] == sha(
        runs["b"] / "model.safetensors")
    card = (rel / "MODEL_CARD.md").read_text()
    assert "NOT bound to the released weights" in card and "--allow-unbound-report" in card
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 1 and failed_gates(out) == {"audits_bound"}, out
    pol = tmp_path / "p.toml"
    pol.write_text("require_bound_audits = false\n")
    rc, out, _ = cli(capsys, "verify", rel, "--policy", pol)
    assert rc == 0 and "audits_bound" not in out, out


def test_a_flag_rewritten_to_bound_does_not_pass(capsys, runs, reports, tmp_path):
    """Someone edits bound_to_weights to true and rewrites both listings: the gate compares
    the hashes themselves, not the flag."""
    from audits.release.manifest import sums_text
    rel = tmp_path / "rel"
    rc, _, err = cli(capsys, "release", runs["a"], "--out", rel, "--fairness-report",
                     reports["other"], "--allow-unbound-report")
    assert rc == 0, err
    m = json.loads((rel / "release.json").read_text())
    m["fairness_audit"].update(bound_to_weights=True, unbound_reason=None)
    (rel / "release.json").write_text(json.dumps(m))
    (rel / "release.sha256").write_text(sums_text({n: sha(rel / n) for n in
                                                   list(m["files"]) + ["release.json"]}))
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 1 and failed_gates(out) == {"audits_bound"}, out
