"""report.json follows docs/design.md; report.html is self-contained and leads with the finding;
the CLI and the plugin structure of `safelm audit`."""

from __future__ import annotations

import argparse
import hashlib
import json
import re

import pytest

from audits import plugin
from fairness_helpers import simulate, write
from safelm.cli import main


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    preds = write(simulate(0.8), d / "preds.csv")
    base = write(simulate(0.0), d / "base.csv")
    val = write(simulate(0.8, split="val", seed=1), d / "val.csv")
    rc = main(["audit", "fairness", "--predictions", str(preds), "--sensitive",
               "gender,age_group", "--out", str(d / "out"), "--n-boot", "200", "--compare",
               str(base), "--mitigate", "demographic_parity", "--fit-predictions", str(val)])
    assert rc == 0
    return preds, d / "out"


def _strict(text: str):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


def test_report_json_has_the_design_shape(audited):
    preds, out = audited
    rep = _strict((out / "report.json").read_text())
    assert {"by_group", "disparities", "overall", "inputs", "versions"} <= set(rep)
    for e in rep["by_group"]:
        assert {"slice", "group", "n", "metrics"} <= set(e)
        assert e["slice"] == "*".join(e["group"])
        for m in e["metrics"].values():
            assert set(m) >= {"value", "ci"} and len(m["ci"]) == 2
    assert {e["slice"] for e in rep["by_group"]} == {"gender", "age_group", "gender*age_group"}
    kinds = {(d["kind"], d["reference"]) for d in rep["disparities"]}
    assert kinds == {(k, r) for k in ("difference", "ratio")
                     for r in ("overall", "between_groups")}
    for d in rep["disparities"]:
        assert {"slice", "metric", "kind", "value", "ci", "threshold", "flagged"} <= set(d)
    assert rep["inputs"]["predictions_sha256"] == hashlib.sha256(preds.read_bytes()).hexdigest()
    assert {"fairlearn", "numpy", "pandas", "python"} <= set(rep["versions"])
    assert rep["comparison"]["by_group"] and rep["mitigation"][0]["by_group"]
    assert not list(out.glob("*.tmp"))


def test_html_is_self_contained_and_leads_with_the_finding(audited):
    _, out = audited
    html = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "<script" not in html and "@import" not in html
    assert html.count("data:image/png;base64,") >= 5
    lead = html[html.index('class="lead"'):]
    first = re.search(r"<li>(.*?)</li>", lead).group(1)
    assert first.startswith("female*old: selection rate") and "below the 4/5 threshold" in first
    assert re.search(r"ratio 0\.\d\d \[0\.\d\d, 0\.\d\d\]", first)
    md = (out / "report.md").read_text()
    assert "female*old: selection rate" in md


def test_cli_prints_the_finding_and_the_report_path(tmp_path, capsys):
    preds = write(simulate(0.8), tmp_path / "p.csv")
    assert main(["audit", "fairness", "--predictions", str(preds), "--sensitive",
                 "gender,age_group", "--out", str(tmp_path / "o"), "--n-boot", "100"]) == 0
    out = capsys.readouterr().out
    assert "female*old: selection rate" in out
    assert out.strip().endswith(str(tmp_path / "o" / "report.html"))


def test_audit_subcommands_extend_with_one_entry(monkeypatch, capsys):
    seen = {}

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dir")

    def handler(args: argparse.Namespace) -> int:
        seen["run_dir"] = args.run_dir
        return 0

    monkeypatch.setattr(plugin, "AUDITS", plugin.AUDITS + [
        plugin.Audit("toy", "a toy audit", add, handler)])
    assert main(["audit", "toy", "RUN"]) == 0 and seen == {"run_dir": "RUN"}
    assert main(["audit"]) == 2
    assert "fairness, lm-bias" in capsys.readouterr().err
