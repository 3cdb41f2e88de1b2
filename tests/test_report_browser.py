"""Every audit's report.html, and the release's MODEL_CARD.html, opened in headless Chromium:
no console errors, every image loaded, the key numbers of report.json in the rendered text;
and a deliberately broken copy fails each of those checks. Skips where no Chromium is
installed (tests/browser_helpers.py)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from browser_helpers import Browser, CDPError, find_chromium

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt install chromium, or "
                       "set SAFELM_CHROMIUM=/path/to/chrome): reports not checked in a browser"),
]

DATA_URI = re.compile(r'src="data:image/png;base64,([^"]*)"')


@pytest.fixture(scope="module")
def browser():
    try:
        b = Browser(CHROMIUM)
    except (CDPError, OSError) as e:  # e.g. Ubuntu's chromium-browser stub without the snap
        pytest.skip(f"found {CHROMIUM}, but it did not start as a browser: {e}")
    yield b
    b.close()


def norm(s: str) -> str:
    return " ".join(s.split())


def png_problems(html: str) -> list[str]:
    """Chromium shows a truncated or damaged PNG as far as it decodes (naturalWidth > 0), so
    each embedded image is also decoded strictly here: valid base64, a complete PNG."""
    from PIL import Image
    out = []
    for i, b64 in enumerate(DATA_URI.findall(html)):
        try:
            Image.open(io.BytesIO(base64.b64decode(b64, validate=True))).load()
        except Exception as e:  # noqa: BLE001 (any decoding failure is the finding)
            out.append(f"image {i}: {type(e).__name__}: {e}")
    return out


def problems(browser: Browser, path: Path, numbers: list[str]) -> list[str]:
    """What is wrong with ``path`` as a person's browser shows it (empty: nothing)."""
    html = path.read_text(encoding="utf-8")
    page = browser.open(path)
    out = [f"console: {e}" for e in page.errors]
    if len(page.images) != html.count("<img"):
        out.append(f"{len(page.images)} images in the DOM, {html.count('<img')} in the file")
    out += [f"image not loaded: {i['src']}..." for i in page.broken_images()]
    out += png_problems(html)
    text = norm(page.text)
    out += [f"not in the rendered text: {n!r}" for n in numbers if norm(n) not in text]
    return out


# ---- the reports, each made the fastest way the audit allows ---------------------------------
def fairness_report(d: Path, made: dict) -> tuple[Path, list[str]]:
    from audits.reporting import fmt, fmt_ci
    from fairness_helpers import simulate, write
    from safelm.cli import main
    preds = write(simulate(0.8), d / "preds.csv")
    base = write(simulate(0.0), d / "base.csv")
    val = write(simulate(0.8, split="val", seed=1), d / "val.csv")
    assert main(["audit", "fairness", "--predictions", str(preds), "--sensitive",
                 "gender,age_group", "--out", str(d / "fair"), "--n-boot", "100", "--compare",
                 str(base), "--mitigate", "demographic_parity", "--fit-predictions",
                 str(val)]) == 0
    rep = json.loads((d / "fair" / "report.json").read_text())
    nums = [f"{rep['summary']['n_flagged']} disparities flagged", f"{rep['inputs']['rows']} rows"]
    nums += rep["summary"]["flagged"][:8]  # the headline (HEADLINE_MAX lines)
    nums += [f"{fmt(v['value'])} {fmt_ci(v['ci'])}"  # the Overall table: value, interval
             for v in rep["overall"]["metrics"].values()]
    nums += [f"{fmt(e['metrics']['selection_rate']['value'])} "
             f"{fmt_ci(e['metrics']['selection_rate']['ci'])}" for e in rep["by_group"]]
    return d / "fair" / "report.html", nums


def embeddings_report(d: Path, made: dict) -> tuple[Path, list[str]]:
    from safelm.cli import main
    rng = np.random.default_rng(0)
    shift = np.zeros(8)
    shift[0] = 3.0
    sets = {"x": rng.normal(size=(5, 8)) + shift, "y": rng.normal(size=(5, 8)) - shift,
            "a": rng.normal(size=(5, 8)) + shift, "b": rng.normal(size=(5, 8)) - shift}
    lines = [f"{k}{i} " + " ".join(f"{v:.5f}" for v in row)
             for k, m in sets.items() for i, row in enumerate(m)]
    (d / "v.txt").write_text(f"{len(lines)} 8\n" + "\n".join(lines) + "\n")
    tests = [{"name": "planted", "targets": [[f"x{i}" for i in range(5)],
                                             [f"y{i}" for i in range(5)]],
              "attributes": [[f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)]]}]
    (d / "t.json").write_text(json.dumps(tests))
    assert main(["audit", "embeddings", "--vectors", str(d / "v.txt"), "--tests",
                 str(d / "t.json"), "--out", str(d / "emb"), "--bootstrap", "100"]) == 0
    rep = json.loads((d / "emb" / "report.json").read_text())
    (t,) = rep["tests"]
    return d / "emb" / "report.html", [*rep["summary"], f"{t['effect_size']:.2f}",
                                       f"[{t['ci'][0]:.2f}, {t['ci'][1]:.2f}]",
                                       f"{t['p_value']:.3g}"]


def lm_bias_report(d: Path, made: dict) -> tuple[Path, list[str]]:
    from audits.lm_bias.audit import LMBiasSettings, lm_bias_audit
    from conftest import TINY, write_lm_txt
    from safelm import Config, train_run
    cfg = Config.load(None, TINY + ["train.epochs=1", "model.block_size=64",
                                    "train.device=cpu"])
    train_run(write_lm_txt(d / "lm.txt", n=40), cfg, d / "lm")
    rep = lm_bias_audit(d / "lm", d / "lmb",
                        settings=LMBiasSettings(samples=2, max_new_tokens=6, n_boot=50))
    nums = list(rep["summary"]["lines"])
    for r in rep["counterfactual"]:
        nums += [f"{v['value']:.3f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]"
                 for v in r["preference"].values()]
    return d / "lmb" / "report.html", nums


def privacy_report(d: Path, made: dict) -> tuple[Path, list[str]]:
    from audits.privacy.audit import PrivacySettings, privacy_audit
    from conftest import TINY
    from safelm import Config, train_run
    from test_privacy_audit_e2e import random_label_csv, write_split_files
    data = random_label_csv(d / "data.csv", n_train=60, n_test=60)
    cfg = Config.load(None, TINY + ["train.epochs=1", "train.task=classify",
                                    "train.device=cpu"])
    train_run(data, cfg, d / "cls")
    write_split_files(data, d)
    rep = privacy_audit(d / "cls", d / "members.csv", d / "non_members.csv", d / "priv",
                        settings=PrivacySettings(reference_models=0, n_boot=100),
                        log=lambda s: None)
    (a,) = rep["attacks"]
    return d / "priv" / "report.html", [
        rep["verdict"], f"{rep['n']['members']} members",
        f"AUC {a['auc']['value']:.3f} [{a['auc']['ci'][0]:.3f}, {a['auc']['ci'][1]:.3f}]"]


def model_card(d: Path, made: dict) -> tuple[Path, list[str]]:
    """The release's MODEL_CARD.html, of the privacy report's run with that report attached."""
    from audits.release.build import ReleaseOptions, release
    priv = made["privacy"][0].parent
    m = release(priv.parent / "cls", d / "rel", ReleaseOptions(privacy_audit=priv))
    rows = ", ".join(f"{k} {v}" for k, v in m["data"]["rows"].items())
    return d / "rel" / "MODEL_CARD.html", [
        f"parameters: {m['model']['n_parameters']:,}", f"rows per split: {rows}",
        m["privacy"]["statement"], m["files"]["model.safetensors"]]


KINDS = {"fairness": fairness_report, "embeddings": embeddings_report,
         "lm_bias": lm_bias_report, "privacy": privacy_report, "model_card": model_card}


@pytest.fixture(scope="module")
def reports(tmp_path_factory, one_thread):
    """``reports[kind]``: (the HTML file, its key numbers), each made on first use."""
    class Made(dict):
        def __missing__(self, kind: str) -> tuple[Path, list[str]]:
            self[kind] = KINDS[kind](tmp_path_factory.mktemp(kind), self)
            return self[kind]
    return Made()


@pytest.mark.parametrize("kind", list(KINDS))
def test_report_renders_cleanly_in_chromium(browser, reports, kind):
    path, numbers = reports[kind]
    assert numbers and all(numbers)
    assert problems(browser, path, numbers) == []


# ---- planted controls: a broken copy fails each check --------------------------------------
def _broken(tmp_path: Path, src: Path, edit) -> Path:
    p = tmp_path / f"broken-{len(list(tmp_path.iterdir()))}.html"
    p.write_text(edit(src.read_text(encoding="utf-8")), encoding="utf-8")
    return p


def test_each_check_fails_on_a_broken_copy(browser, reports, tmp_path):
    path, numbers = reports["fairness"]
    assert problems(browser, path, numbers) == []
    # 1) a console error and an uncaught exception
    found = problems(browser, _broken(tmp_path, path, lambda h: h.replace(
        "</body>", "<script>console.error('x')</script><script>null.f()</script></body>")),
        numbers)
    assert found[0] == "console: console.error: x" and "exception: TypeError" in found[1]
    assert len(found) == 2
    # 2) images: a damaged PNG signature, base64 that is not base64, a truncated PNG (which
    #    Chromium shows as far as it goes: caught by the strict decode) and a missing file
    #    (a browser log error as well)
    b64 = DATA_URI.findall(path.read_text(encoding="utf-8"))
    assert len(b64) >= 5

    def damage(h: str) -> str:
        h = h.replace(b64[0], "AAAAAAAA" + b64[0][8:])
        h = h.replace(b64[1], b64[1][:100] + "!!*" + b64[1][100:])
        h = h.replace(b64[2], b64[2][:len(b64[2]) // 2])
        return h.replace("</body>", '<img alt="x" src="missing.png"></body>')

    found = problems(browser, _broken(tmp_path, path, damage), numbers)
    assert sum(f.startswith("image not loaded") for f in found) == 3  # 0, 1, missing.png
    assert any(f.startswith("console: log: Failed to load resource") for f in found)
    assert sum(f.startswith(("image 0:", "image 1:", "image 2:")) for f in found) == 3
    assert not any("rendered text" in f for f in found)
    # 3) a key number no longer rendered: the Overall table removed, then hidden by CSS
    from audits.reporting import fmt, fmt_ci
    rep = json.loads((path.parent / "report.json").read_text())
    overall = [f"{fmt(v['value'])} {fmt_ci(v['ci'])}" for v in rep["overall"]["metrics"].values()]
    for edit in (lambda h: re.sub(r"<h2>Overall</h2><table>.*?</table>", "", h, count=1),
                 lambda h: h.replace("<h2>Overall</h2><table>",
                                     '<h2>Overall</h2><table style="display:none">', 1)):
        found = problems(browser, _broken(tmp_path, path, edit), numbers)
        assert found and all(f.startswith("not in the rendered text") for f in found), found
        assert any(n in f for f in found for n in overall)
