"""The model card: release.json told to people, as MODEL_CARD.md and MODEL_CARD.html.

Both are rendered from the same list of sections built from release.json alone, so the card
can never say something the machine-readable manifest does not (and both are hashed).
"""

from __future__ import annotations

import json

from typing import Any, Union

from ..reporting import esc, md_table, page
from ..reporting import table as html_table

Block = Union[tuple[str, str], tuple[str, list[str]], tuple[str, list[str], list[list[str]]]]


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _counts(d: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) if isinstance(d, dict) else "n/a"


def _ci(ci: Any) -> str:
    return f"[{_f(ci[0])}, {_f(ci[1])}]" if isinstance(ci, list) and len(ci) == 2 else ""


def intended_use(cfg: Any, ledger: dict | None, fair: dict | None, emp: dict | None,
                 opts: Any) -> dict[str, Any]:
    """Use, out-of-scope uses and limitations: the user's words, then what the numbers say."""
    task = cfg.train.task
    use = opts.intended_use or (
        f"Research and demonstration: classifying short English texts as "
        f"{', '.join(cfg.data.labels)}, on text like the training data." if task == "classify"
        else "Research and demonstration: generating and scoring short English text in the "
             "style of the training corpus.")
    out = list(opts.out_of_scope) or [
        "Decisions about individuals (credit, hiring, housing, health, policing).",
        "Text unlike the training data (other languages, domains or lengths)."]
    lim = list(opts.limitations)
    lim.append(f"A small {cfg.model.arch} ({cfg.model.n_layer} layers, width "
               f"{cfg.model.d_model}) trained on one dataset; expect errors.")
    if ledger is None:
        lim.append("Not trained with differential privacy: it may memorize and reveal "
                   "training examples.")
    else:
        lim.append(f"The privacy guarantee covers each {ledger.get('unit', 'example')}'s "
                   "data in training; evaluation metrics and audits are not privatized.")
    lim.append("No fairness audit was attached." if fair is None else
               f"The fairness audit flagged {fair['n_flagged']} of {fair['n_disparities']} "
               "disparities (see below).")
    if emp is None:
        lim.append("No empirical privacy audit was attached.")
    for what, rep in (("fairness audit", fair), ("empirical privacy audit", emp)):
        if rep is not None and not rep.get("bound_to_weights"):
            lim.append(unbound_sentence(what, rep))
    return {"use": use, "out_of_scope": out, "limitations": lim}


def unbound_sentence(what: str, rep: dict[str, Any]) -> str:
    return (f"The attached {what} is NOT bound to the released weights: "
            f"{rep.get('unbound_reason') or 'it records no matching model hash'}. It was "
            "attached with --allow-unbound-report; its numbers may describe another model.")


def _binding(what: str, rep: dict[str, Any]) -> Block:
    if rep.get("bound_to_weights"):
        return ("p", f"This {what} evaluated the released weights (model.safetensors sha256 "
                     f"{rep['model_sha256']}).")
    return ("p", unbound_sentence(what, rep))


def _signature(m: dict[str, Any]) -> list[Block]:
    sig = m["integrity"].get("signature")
    if not sig:
        return [("p", "This release is not signed: its hashes show that files agree with each "
                      "other, not who made them. Compare the release digest with one published "
                      "by its maker.")]
    return [("p", f"release.sha256 is signed ({sig['file']}, OpenSSH {sig['format']}, namespace "
                  f"{sig['namespace']}) with the key {sig['key_fingerprint']}. Check it with "
                  f"stock OpenSSH: `{sig['check']}`, or `safelm verify DIR --allowed-signers "
                  "FILE`; the allowed_signers file says whose key this must be.")]


def sections(m: dict[str, Any]) -> list[tuple[str, list[Block]]]:
    """The card's content, in reading order."""
    mod, data, priv, ev = m["model"], m["data"], m["privacy"], m["evaluation"]
    iu = m["intended_use"]
    secs: list[tuple[str, list[Block]]] = [
        ("Model", [("ul", [f"task: {mod['task']}, architecture: {mod['arch']} "
                           f"({mod.get('n_layer')} layers, {mod.get('n_head')} heads, width "
                           f"{mod.get('d_model')}, context {mod.get('block_size')} tokens)",
                           f"parameters: {mod['n_parameters']:,}; vocabulary "
                           f"{mod.get('vocab_size')}"] +
                   ([f"labels: {', '.join(mod['labels'])}"] if mod.get("labels") else []))]),
        ("Intended use", [("p", iu["use"]), ("p", "Out of scope:"), ("ul", iu["out_of_scope"]),
                          ("p", "Limitations:"), ("ul", iu["limitations"])]),
        ("Training data", [("p", data["description"]), ("ul", [
            f"file sha256: {data.get('sha256') or 'n/a'}",
            f"rows per split: {_counts(data.get('rows'))}; blocks: {_counts(data.get('blocks'))}",
            f"group columns: {', '.join(data['columns']['groups']) or 'none'}"]
            + ([f"model input: the columns {', '.join(data['columns']['text_cols'])} as "
                "'column: value | ...' text (in this order)"]
               if data["columns"].get("text_cols") else [])
            + ([data["note"]] if data.get("note") else []))]),
        ("Privacy guarantee", _privacy(priv)),
        ("Empirical privacy audit", _empirical(m["empirical_privacy_audit"], priv)),
        ("Fairness audit", _fairness(m["fairness_audit"])),
        ("Evaluation", [("table", ["metric", ev.get("split") or "validation"],
                         [[k, _f(v)] for k, v in (ev["metrics"] or ev["validation"]).items()])]),
        ("Reproducibility", [("ul", [f"{k}: {v}" for k, v in m["seeds"].items()] +
                              [f"{k} {v}" for k, v in m["versions"].items()
                               if isinstance(v, str)])]),
        ("Files and verification", [
            ("table", ["file", "sha256"], [[k, v] for k, v in m["files"].items()]),
            ("p", "release.json lists every file but itself, release.sha256 and a signature; "
                  "release.sha256 lists every file but itself and a signature. Check everything with `safelm verify DIR "
                  "[--policy FILE]`, or the hashes alone with `sha256sum -c release.sha256`."),
            *_signature(m)]),
    ]
    hf = m.get("huggingface") or {}
    if hf.get("exported"):
        secs.append(("Loading with Hugging Face transformers", [("p", (
            f"The folder {hf['dir']}/ holds the same model as a transformers checkpoint "
            f"(logits equal to SafeLM's within 1e-4): {hf['load']}. Inputs start with the "
            f"bos token: {hf['inputs']}."))]))
    elif hf:
        secs.append(("Loading with Hugging Face transformers",
                     [("p", f"No transformers copy in this release: {hf.get('reason')}.")]))
    return secs


def _privacy(p: dict[str, Any]) -> list[Block]:
    if not p["enabled"]:
        return [("p", p["statement"])]
    hist = [[_f(s), _f(q), str(n)] for s, q, n in p["history"]]
    return [("p", p["statement"]), ("ul", [
        f"epsilon {_f(p['epsilon'])} (target {_f(p['target_epsilon'])}), delta "
        f"{_f(p['delta'])}, unit: {p['unit']}, accountant: {p['accountant']}, "
        f"sampling: {p['sampling']}, max_grad_norm {_f(p['max_grad_norm'])}",
        f"recomputed from the history with a fresh accountant: "
        f"{_f(p['recomputed_epsilon'])}", noise_sentence(p.get("noise_source"))]),
        ("table", ["noise multiplier", "sample rate", "steps"], hist)]


NOISE_WORDS = {
    "os_entropy": "Noise and batch sampling: drawn from a secret seed taken from the operating "
                  "system's entropy at training time and never published, as the guarantee "
                  "assumes. Caveat: the Gaussian noise is sampled in floating point by "
                  "torch's generator (not a cryptographic one); Mironov (2012) shows such "
                  "samplers can leak through their least significant bits, and the "
                  "safeguard against it (Opacus' secure_mode) was not used.",
    "seeded": "Noise and batch sampling: SEEDED from train.seed (privacy.reproducible=true). "
              "Anyone who has the configuration can replay the noise, so the stated epsilon "
              "does not protect against them. Do not rely on this guarantee.",
}


def noise_sentence(source: str | None) -> str:
    return NOISE_WORDS.get(source or "", "Noise source: not recorded (an older SafeLM); the "
                                         "noise may have been seeded from a published seed.")


def _empirical(e: dict[str, Any] | None, priv: dict[str, Any]) -> list[Block]:
    if e is None:
        return [("p", "No empirical privacy audit was attached to this release.")]
    one = e.get("one_run")
    if one:
        lead = (f"The one-run canary audit (Steinke, Nasr, Jagielski 2023: {_f(one.get('m'))} "
                f"canaries each included by a fair coin, {_f(one.get('correct'))} of "
                f"{_f(one.get('guesses'))} guesses correct) gives an empirical lower bound "
                f"epsilon >= {_f(e['empirical_epsilon'])} (confidence {_f(e['confidence'])})")
    elif e["empirical_epsilon"] is None:
        lead = ("Membership-inference attacks were run; they are descriptive only (AUC, TPR at "
                "low FPR) and give no epsilon bound")
    else:
        lead = (f"The attached audit reports an empirical lower bound epsilon >= "
                f"{_f(e['empirical_epsilon'])} (confidence {_f(e['confidence'])})")
    return [_binding("empirical privacy audit", e),
            ("p", f"{lead}, against the claimed {_f(priv['epsilon'])}. The audit's own "
                  f"verdict: "
                  f"{'passed' if e['passed'] else 'failed' if e['passed'] is False else 'n/a'}."),
            ("ul", [", ".join(f"{k} {_f(v)}" for k, v in a.items()) for a in e["attacks"]])]


def _fairness(f: dict[str, Any] | None) -> list[Block]:
    if f is None:
        return [("p", "No fairness audit was attached to this release.")]
    rows = [[str(d["slice"]), str(d["group"]), f"{d['metric']} {d['kind']}", _f(d["value"]),
             _ci(d["ci"]), _f(d["threshold"]), "yes" if d["flagged"] else "no"]
            for d in f["worst"]]
    return [_binding("fairness audit", f),
            ("p", f"{f['n_flagged']} of {f['n_disparities']} disparities flagged (a flag "
                  "needs the whole interval beyond the tolerance). The largest:"),
            ("table", ["slice", "group", "disparity", "value", "interval", "tolerance",
                       "flagged"], rows), ("ul", f["flagged"])]


def front_matter(m: dict[str, Any]) -> str:
    """The Hugging Face Hub's model-card metadata (YAML between ``---`` lines): library_name,
    pipeline_tag, tags, datasets, metrics, plus a ``privacy`` block with the claim, where the
    noise came from and the empirical audit's bound. Values are JSON scalars and flow lists,
    which YAML reads as they are."""
    model, priv = m.get("model", {}), m.get("privacy", {})
    emp, data = m.get("empirical_privacy_audit") or {}, m.get("data", {})
    task = model.get("task")
    tags = ["safelm", "gpt2" if model.get("arch") == "transformer" else "lstm"]
    if priv.get("enabled"):
        tags += ["differential-privacy", "dp-sgd"]
    if (m.get("training") or {}).get("federated"):
        tags.append("federated-learning")
    metrics = (["accuracy", "f1"] if task == "classify" else ["perplexity"])
    fields: list[tuple[str, Any]] = [
        ("library_name", "safelm"),
        ("pipeline_tag", "text-classification" if task == "classify" else "text-generation"),
        ("tags", tags),
        ("datasets", [f"sha256:{data['sha256']}"] if data.get("sha256") else []),
        ("metrics", metrics)]
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in fields]
    lines += ["privacy:"] + [f"  {k}: {json.dumps(v)}" for k, v in (
        ("differential_privacy", bool(priv.get("enabled"))), ("epsilon", priv.get("epsilon")),
        ("delta", priv.get("delta")), ("unit", priv.get("unit")),
        ("accountant", priv.get("accountant")), ("noise_source", priv.get("noise_source")),
        ("audit_epsilon_lower_bound", emp.get("empirical_epsilon")))]
    return "\n".join(lines + ["---", ""])


def markdown(m: dict[str, Any]) -> str:
    out = [front_matter(m), f"# Model card: {m['name']}", "", f"Released {m['created']} "
           f"(release schema {m['schema_version']}).", ""]
    for title, blocks in sections(m):
        out += [f"## {title}", ""]
        for b in blocks:
            if b[0] == "p":
                out += [str(b[1]), ""]
            elif b[0] == "ul":
                out += [f"- {x}" for x in b[1]] + [""] if b[1] else []
            else:
                out += [md_table(b[1], b[2]), ""]
    return "\n".join(out).rstrip() + "\n"


def html_page(m: dict[str, Any]) -> str:
    body = [f"<h1>Model card: {esc(m['name'])}</h1>",
            f'<p class="meta">Released {esc(m["created"])} (release schema '
            f'{esc(m["schema_version"])}).</p>']
    for title, blocks in sections(m):
        body.append(f"<h2>{esc(title)}</h2>")
        for b in blocks:
            if b[0] == "p":
                body.append(f"<p>{esc(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in b[1]) + "</ul>"
                            if b[1] else "")
            else:
                body.append(html_table([esc(h) for h in b[1]],
                                       [[esc(c) for c in r] for r in b[2]]))
    return page(f"Model card: {m['name']}", "".join(body))
