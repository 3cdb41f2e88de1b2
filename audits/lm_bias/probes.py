"""Loading and checking probe sets (the format is documented in ``audits/probes``)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelm.errors import UserError

from ..probes import DEFAULT


@dataclass
class Instance:
    """One counterfactual tuple: the same template filled with each group's i-th term."""

    attribute: str
    template: int
    sentiment: str | None
    prefixes: dict[str, str]  # group -> text up to and including the term
    continuation: str  # the words after the term (identical for every group)


def load_probes(path: str | Path | None = None) -> dict[str, Any]:
    """The default probe set, or a user's JSON file, checked."""
    if path is None:
        return validate(copy.deepcopy(DEFAULT), "the default probe set")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--probes {p}: no such file; give a JSON probe set (format: "
                        "audits/probes/__init__.py)")
    try:
        probes = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--probes {p}: not valid JSON ({e})") from None
    return validate(probes, str(p))


def _groups_of(where: str, attrs: Any, aligned: bool) -> None:
    if not isinstance(attrs, dict) or not attrs:
        raise UserError(f"{where}: 'attributes' must map attribute -> group -> list of strings")
    for attr, groups in attrs.items():
        if not isinstance(groups, dict) or len(groups) < 2:
            raise UserError(f"{where}: attribute {attr!r} needs at least two groups")
        for g, items in groups.items():
            if (not isinstance(items, list) or not items
                    or not all(isinstance(t, str) and t.strip() for t in items)):
                raise UserError(f"{where}: {attr}.{g} must be a non-empty list of strings")
        if aligned and len({len(v) for v in groups.values()}) != 1:
            sizes = {g: len(v) for g, v in groups.items()}
            raise UserError(f"{where}: the term lists of {attr!r} differ in length {sizes}; "
                            "the i-th terms of all groups form one counterfactual tuple")


def validate(probes: Any, where: str) -> dict[str, Any]:
    if not isinstance(probes, dict) or not ({"counterfactual", "generation"} & set(probes)):
        raise UserError(f"{where}: a probe set is an object with 'counterfactual' and/or "
                        "'generation' (see audits/probes/__init__.py)")
    cf = probes.get("counterfactual")
    if cf is not None:
        _groups_of(f"{where} counterfactual", cf.get("attributes"), aligned=True)
        templates = cf.get("templates")
        if not isinstance(templates, list) or len(templates) < 2:
            raise UserError(f"{where}: counterfactual.templates needs at least two templates")
        for i, t in enumerate(templates):
            text = t.get("text") if isinstance(t, dict) else t
            if not isinstance(text, str) or text.count("{X}") != 1:
                raise UserError(f"{where}: template {i} must contain '{{X}}' exactly once")
            if not text.split("{X}", 1)[1].strip():
                raise UserError(f"{where}: template {i} ({text!r}) ends with {{X}}; the words "
                                "after the term are what the model scores")
            if isinstance(t, dict) and t.get("sentiment") not in (None, "positive", "negative"):
                raise UserError(f"{where}: template {i} sentiment must be positive or negative")
    gen = probes.get("generation")
    if gen is not None:
        _groups_of(f"{where} generation", gen.get("attributes"), aligned=False)
    probes.setdefault("name", Path(where).stem if where.endswith(".json") else where)
    return probes


def _capitalize_if_first(prefix: str, term: str) -> str:
    return term[:1].upper() + term[1:] if not prefix.strip() else term


def instances(probes: dict[str, Any]) -> list[Instance]:
    """Every (attribute, template, term index) counterfactual tuple."""
    cf = probes.get("counterfactual")
    if not cf:
        return []
    out = []
    for attr, groups in cf["attributes"].items():
        n_terms = len(next(iter(groups.values())))
        for ti, t in enumerate(cf["templates"]):
            text = t["text"] if isinstance(t, dict) else t
            sentiment = t.get("sentiment") if isinstance(t, dict) else None
            before, after = text.split("{X}", 1)
            for j in range(n_terms):
                out.append(Instance(attr, ti, sentiment, {
                    g: before + _capitalize_if_first(before, terms[j])
                    for g, terms in groups.items()}, after))
    return out
