"""The demo's last step: release the DP classifier, verify it under a demo policy, and write
one HTML index page linking the model card and every report.

Not registered anywhere: the demo's owner calls :func:`demo_step` after the audits, with the
paths they produced in ``ctx``. Links in the index are relative, so the demo folder can be
moved or zipped and still browsed offline.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


from ..common import atomic_write_text
from ..reporting import esc, page

# The demo trains the DP classifier to a target epsilon of 8, a budget it never exceeds.
DEMO_POLICY = ("require_dp = true\nmax_epsilon = 8.0\nempirical_le_claimed = true\n"
               "require_secret_noise = true\n")


def _release_dp_classifier(ctx: dict[str, Any], rel: Path) -> dict[str, Any]:
    """The release, with the DP model's own fairness audit and privacy audit. A report about
    other weights (e.g. the non-private classifier's fairness audit) is refused by the
    release's binding check and left out, with a note."""
    from .build import ReleaseOptions, release
    from .summaries import UnboundReport
    fairness = ctx.get("dp_fairness_report")  # the audit of the DP model's predictions
    if not fairness:
        print("  note: no audit of the DP model's predictions; trying the non-private "
              "classifier's fairness audit")
        fairness = ctx.get("fairness_report")
    opts = ReleaseOptions(name="SafeLM demo: DP sentiment classifier",
                          data_description="the bundled synthetic sentiment corpus (safelm "
                                           "corpus sentiment), with a planted bias",
                          fairness_report=fairness, privacy_audit=ctx.get("privacy_audit"))
    for _ in range(3):
        try:
            return release(ctx["dp_classifier_run"], rel, opts)
        except UnboundReport as e:
            print(f"  note: report not attached ({e})")
            if e.option == "--fairness-report":
                opts.fairness_report = None
            else:
                opts.privacy_audit = None
    raise AssertionError("unreachable: at most two reports can be dropped")


def demo_step(ctx: dict[str, Any]) -> None:
    """Release ``ctx['dp_classifier_run']`` to ``out/release``, verify it, write
    ``out/index.html``; adds ``release``, ``release_gates`` and ``index`` to ``ctx``."""
    from .policy import load_policy
    from .verify import report, verify_release
    out = Path(ctx["out"])
    rel = out / "release"
    if (rel / "release.json").is_file():  # an earlier demo's release is replaced, like its runs
        shutil.rmtree(rel)
    print("\n[release] the DP classifier, with its model card and manifest")
    manifest = _release_dp_classifier(ctx, rel)
    policy_path = out / "release-policy.toml"
    atomic_write_text(policy_path, DEMO_POLICY)
    lines, status = report(verify_release(rel, load_policy(policy_path)))
    for line in lines:
        print(f"  {line}")
    print(f"  re-check it: safelm verify {rel} --policy {policy_path}")
    ctx.update(release=str(rel), release_gates=lines, release_ok=status == 0)
    index = write_index(out, rel, manifest, lines, ctx)
    ctx["index"] = str(index)
    print(f"  model card: {rel / 'MODEL_CARD.html'}")
    print(f"  everything in one page: {index}")


def _link(out: Path, target: Any, label: str, note: str) -> str:
    if not target or not Path(target).exists():
        return ""
    href = os.path.relpath(Path(target).resolve(), out.resolve())
    return f'<li><a href="{esc(href)}">{esc(label)}</a> <span class="note">{esc(note)}' \
           "</span></li>"


def write_index(out: Path, rel: Path, manifest: dict[str, Any], gates: list[str],
                ctx: dict[str, Any]) -> Path:
    """out/index.html: the verdict first, then links to the card, manifest and reports."""
    p = manifest["privacy"]
    claim = (f"epsilon {p['epsilon']:.2f}, delta {p['delta']:g} per {p['unit']}"
             if p["enabled"] and p["epsilon"] is not None else "no DP guarantee")
    ok = all(g.startswith("PASS") for g in gates[:-1])
    links = [
        _link(out, rel / "MODEL_CARD.html", "Model card", f"the DP classifier ({claim})"),
        _link(out, rel / "release.json", "release.json", "the manifest for machines"),
        _link(out, ctx.get("fairness_report"), "Fairness audit", "the non-private classifier"),
        _link(out, ctx.get("dp_fairness_report"), "DP x fairness",
              "what DP cost each group"),
        _link(out, ctx.get("privacy_audit_html"), "Privacy audit",
              "membership inference and canaries vs the claimed epsilon"),
        _link(out, ctx.get("reweighted_fairness_report"), "In-training mitigation",
              "the classifier retrained with reweighing, before and after"),
        _link(out, ctx.get("lm_bias_report"), "Language-model bias probes", ""),
        _link(out, Path(ctx["federated_run"]) / "partitions.png" if ctx.get("federated_run")
              else None, "Federated run: client partitions",
              "rows, labels and group mix per simulated client"),
    ]
    body = (f"<h1>SafeLM demo</h1><p class=\"meta\">{esc(out.resolve())}</p>"
            f'<div class="lead{" ok" if ok else ""}"><b>Release verification</b><ul>'
            + "".join(f"<li>{esc(g)}</li>" for g in gates) + "</ul></div>"
            f"<h2>Reports</h2><ul>{''.join(links)}</ul>"
            f'<p class="note">Check the release yourself: <code>safelm verify '
            f"{esc(rel)} --policy {esc(out / 'release-policy.toml')}</code></p>")
    index = out / "index.html"
    atomic_write_text(index, page("SafeLM demo", body))
    return index
