"""Run-config keys stay in sync with pyproject.toml and SafeLM's typed Config."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from federation.local import app_run_config
from federation.settings import FEDERATION_KEYS, parse_run_config
from safelm.config import SECTIONS
from safelm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def test_flower_app_tables():
    flwr = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]
    assert flwr["app"]["components"] == {"serverapp": "federation.server_app:app",
                                         "clientapp": "federation.client_app:app"}
    assert flwr["app"]["publisher"]
    # Flower 1.42 migrates and comments out this table on the first `flwr run`.
    assert "federations" not in flwr


def test_every_run_config_key_maps_to_config_or_a_documented_federation_key():
    rc = app_run_config(PYPROJECT)
    dotted = {k for k in rc if "." in k}
    plain = set(rc) - dotted
    assert plain == set(FEDERATION_KEYS), "pyproject and FEDERATION_KEYS differ"
    assert all(len(doc) > 15 for _, doc in FEDERATION_KEYS.values())
    fields = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert dotted <= fields, f"not safelm Config fields: {sorted(dotted - fields)}"
    cfg, fed = parse_run_config(rc)
    for key in dotted:  # the value landed in the typed config, parsed by the field's type
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        want = None if rc[key] == "" and got is None else rc[key]  # "": unset (optional)
        assert got == (want.split(",") if isinstance(got, list) else want), key
    assert cfg.train.epochs == fed.local_epochs  # the one federation key that maps into Config


@pytest.mark.parametrize("override, words", [
    (['strategy="fedsgd"'], "strategy"),
    (["model.n_head=3"], "divisible"),
    (['train.lr="fast"'], "train.lr"),
    (["fraction-train=1.5"], "fraction-train"),
    (['dp="server-fixed"', 'strategy="krum"'], "fedavg"),
    (['attack-clients="a,b"'], "attack-clients"),
])
def test_bad_values_are_one_line_user_errors(override, words):
    with pytest.raises(UserError) as e:
        parse_run_config(app_run_config(PYPROJECT, override))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_canaries_are_refused_in_federated_runs():
    rc = app_run_config(PYPROJECT)
    rc["privacy.canaries"] = 2
    with pytest.raises(UserError, match="canaries"):
        parse_run_config(rc)


def test_unknown_key_is_refused():
    rc = app_run_config(PYPROJECT)
    rc["num-rounds"] = 3
    with pytest.raises(UserError, match="num-rounds"):
        parse_run_config(rc)


def test_fed_settings_has_one_typed_field_per_federation_key():
    import dataclasses
    import typing

    from federation.settings import FEDERATION_KEYS, FedSettings

    hints = typing.get_type_hints(FedSettings)
    fields = {f.name.replace("_", "-"): hints[f.name] for f in dataclasses.fields(FedSettings)}
    assert fields == {k: kind for k, (kind, _) in FEDERATION_KEYS.items()}
