"""Config: defaults, TOML loading, --set parsing, error messages, range checks, round-trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from safelm.config import SECTIONS, Config, DataConfig, ModelConfig, PrivacyConfig, TrainConfig
from safelm.errors import ConfigError, UserError


def test_defaults_validate_and_match_dataclass_defaults():
    cfg = Config()
    assert cfg.validate() is cfg
    # oracle: every section equals a freshly built dataclass with its declared defaults
    assert cfg.model == ModelConfig() and cfg.data == DataConfig()
    assert cfg.train == TrainConfig() and cfg.privacy == PrivacyConfig()
    assert Config.load() == Config()


def test_config_error_is_user_error():
    assert issubclass(ConfigError, UserError)


# ---- TOML file ------------------------------------------------------------------------------
def test_toml_file_loads_typed_values(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        "[model]\narch = 'lstm'\nn_layer = 2\nd_model = 64\nn_head = 8\ntie_weights = false\n"
        "[data]\ngroup_cols = ['gender', 'age']\nval_frac = 0.2\n"
        "[train]\nlr = 3e-4\nepochs = 7\n"
        "[privacy]\ntarget_epsilon = 8\n", encoding="utf-8")
    cfg = Config.load(p)
    assert cfg.model.arch == "lstm" and cfg.model.n_layer == 2 and cfg.model.d_model == 64
    assert cfg.model.n_head == 8 and cfg.model.tie_weights is False
    assert cfg.data.group_cols == ["gender", "age"] and cfg.data.val_frac == 0.2
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 7
    assert cfg.privacy.target_epsilon == 8.0 and isinstance(cfg.privacy.target_epsilon, float)
    # control: untouched keys keep their defaults
    assert cfg.model.block_size == ModelConfig().block_size
    assert cfg.train.batch_size == TrainConfig().batch_size


def test_overrides_apply_after_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nepochs = 7\nlr = 0.5\n", encoding="utf-8")
    cfg = Config.load(p, ["train.epochs=2"])
    assert cfg.train.epochs == 2  # --set wins
    assert cfg.train.lr == 0.5  # file value kept where not overridden


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.toml")


def test_unparseable_toml_names_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train\nepochs = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot parse") as e:
        Config.load(p)
    assert "bad.toml" in str(e.value)


def test_toml_unknown_section_and_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[trian]\nepochs = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="trian"):
        Config.load(p)
    p.write_text("[train]\nepoch = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train\.epoch\b.*did you mean train\.epochs\?"):
        Config.load(p)


def test_toml_wrong_types(tmp_path):
    p = tmp_path / "c.toml"
    for body, key in [("[train]\nepochs = 2.5\n", "train.epochs"),
                      ("[train]\nepochs = true\n", "train.epochs"),
                      ("[data]\ntext_col = 5\n", "data.text_col"),
                      ("[data]\ngroup_cols = 'a,b'\n", "data.group_cols"),
                      ("[train]\nlr = 'fast'\n", "train.lr"),
                      ("[model]\ntie_weights = 'maybe'\n", "model.tie_weights")]:
        p.write_text(body, encoding="utf-8")
        with pytest.raises(ConfigError) as e:
            Config.load(p)
        assert key in str(e.value), body
    # control: an integral float for an int field is accepted
    p.write_text("[train]\nepochs = 4.0\n", encoding="utf-8")
    assert Config.load(p).train.epochs == 4


def test_section_must_be_table():
    with pytest.raises(ConfigError, match="must be a table"):
        Config.from_dict({"train": 3})


# ---- --set ----------------------------------------------------------------------------------
@pytest.mark.parametrize("item, section, key, expected", [
    ("train.epochs=5", "train", "epochs", 5),
    ("train.max_steps=1_000", "train", "max_steps", 1000),
    ("train.lr=0.002", "train", "lr", 0.002),
    ("train.lr=1e-4", "train", "lr", 1e-4),
    ("train.lr=3", "train", "lr", 3.0),
    ("model.tie_weights=false", "model", "tie_weights", False),
    ("model.tie_weights=True", "model", "tie_weights", True),
    ("model.tie_weights=0", "model", "tie_weights", False),
    ("model.tie_weights=yes", "model", "tie_weights", True),
    ("model.tie_weights=off", "model", "tie_weights", False),
    ("data.group_cols=gender, age_group ,", "data", "group_cols", ["gender", "age_group"]),
    ("data.group_cols=", "data", "group_cols", []),
    ("data.user_col=author", "data", "user_col", "author"),
    ("data.split_col=", "data", "split_col", ""),
    ("privacy.target_epsilon=none", "privacy", "target_epsilon", None),
    ("privacy.target_epsilon=NULL", "privacy", "target_epsilon", None),
    ("privacy.target_epsilon=8", "privacy", "target_epsilon", 8.0),
    ("privacy.noise_multiplier=1.1", "privacy", "noise_multiplier", 1.1),
    (" train.epochs = 9 ", "train", "epochs", 9),
    ("data.text_col=a=b", "data", "text_col", "a=b"),  # only the first '=' splits
])
def test_set_parses_by_field_type(item, section, key, expected):
    cfg = Config()
    cfg.set(item)
    value = getattr(getattr(cfg, section), key)
    assert value == expected and type(value) is type(expected)


def test_set_none_resets_an_optional_set_earlier():
    cfg = Config.load(None, ["privacy.target_epsilon=3", "privacy.target_epsilon=none"])
    assert cfg.privacy.target_epsilon is None


@pytest.mark.parametrize("item, key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.lr=fast", "train.lr"),
    ("model.tie_weights=maybe", "model.tie_weights"),
    ("privacy.target_epsilon=big", "privacy.target_epsilon"),
])
def test_set_bad_value_names_key(item, key):
    with pytest.raises(ConfigError) as e:
        Config().set(item)
    msg = str(e.value)
    assert msg.startswith(key) and "not a valid" in msg


@pytest.mark.parametrize("item, bad, suggestion", [
    ("train.epoch=3", "train.epoch", "train.epochs"),
    ("model.dmodel=64", "model.dmodel", "model.d_model"),
    ("privacy.target_eps=1", "privacy.target_eps", "privacy.target_epsilon"),
    ("data.textcol=x", "data.textcol", "data.text_col"),
])
def test_unknown_key_names_it_and_suggests(item, bad, suggestion):
    with pytest.raises(ConfigError) as e:
        Config().set(item)
    msg = str(e.value)
    assert f"unknown config key {bad}" in msg
    assert f"did you mean {suggestion}?" in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as e:
        Config().set("train.zzzzzzzz=1")
    assert "train.zzzzzzzz" in str(e.value) and "did you mean" not in str(e.value)


def test_unknown_section_names_it_and_lists_known():
    with pytest.raises(ConfigError) as e:
        Config().set("modle.n_layer=2")
    msg = str(e.value)
    assert "'modle'" in msg
    for s in SECTIONS:
        assert s in msg


@pytest.mark.parametrize("item", ["train.epochs", "epochs=3", "=3", "train=3"])
def test_malformed_set(item):
    with pytest.raises(ConfigError, match="section.key=value"):
        Config().set(item)


def test_set_is_not_applied_partially_on_error():
    cfg = Config()
    with pytest.raises(ConfigError):
        cfg.set("train.epochs=abc")
    assert cfg.train.epochs == TrainConfig().epochs


# ---- range checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["model.d_model=130", "model.n_head=4"], "model.d_model"),
    (["train.lr=-0.001"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.epochs=0", "train.max_steps=0"], "train.epochs"),
    (["model.vocab_size=258"], "model.vocab_size"),
    (["model.vocab_size=100"], "model.vocab_size"),
    (["model.n_head=0"], "model.n_head"),
    (["model.n_layer=-1"], "model.n_layer"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.epochs=-1"], "train.epochs"),
    (["train.max_steps=-5"], "train.max_steps"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.dropout=-0.1"], "model.dropout"),
    (["data.val_frac=0.5"], "data.val_frac"),
    (["data.test_frac=-0.1"], "data.test_frac"),
    (["train.lr_min_ratio=1.5"], "train.lr_min_ratio"),
    (["model.arch=gru"], "model.arch"),
    (["train.task=regress"], "train.task"),
    (["privacy.unit=group"], "privacy.unit"),
    (["data.empty_group=drop"], "data.empty_group"),
])
def test_range_checks_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        Config.load(None, overrides)
    assert key in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["model.d_model=132", "model.n_head=4"],  # divisible
    ["model.vocab_size=259"],  # the boundary itself is allowed
    ["train.epochs=0", "train.max_steps=10"],  # one of them > 0 is enough
    ["train.epochs=1", "train.max_steps=0"],
    ["model.dropout=0"],
    ["data.val_frac=0", "data.test_frac=0.49"],
])
def test_range_controls_pass(overrides):
    Config.load(None, overrides)  # must not raise


@pytest.mark.parametrize("item", ["train.lr=nan", "train.lr=inf"])
def test_non_finite_lr_rejected(item):
    with pytest.raises(ConfigError, match="train.lr"):
        Config.load(None, [item])


# ---- round trip -------------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip():
    cfg = Config.load(None, [
        "model.arch=lstm", "model.n_layer=3", "model.tie_weights=false", "model.num_classes=4",
        "data.group_cols=a,b", "data.labels=neg,pos", "data.user_col=u",
        "train.lr=0.00025", "train.task=classify", "train.max_steps=17",
        "privacy.enabled=true", "privacy.target_epsilon=3.5", "privacy.noise_multiplier=none",
    ])
    tree = cfg.to_dict()
    back = Config.from_dict(tree)
    assert back == cfg and back.to_dict() == tree
    # through JSON too (config.json in a run dir)
    again = Config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.privacy.noise_multiplier is None and again.data.labels == ["neg", "pos"]
    # control: a changed value is seen
    tree["train"]["lr"] = 0.5
    assert Config.from_dict(tree) != cfg


def test_to_dict_has_every_field():
    tree = Config().to_dict()
    assert set(tree) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        assert set(tree[name]) == {f.name for f in dataclasses.fields(cls)}


def test_from_dict_does_not_share_mutable_defaults():
    a = Config.from_dict({"data": {"group_cols": ["x"]}})
    b = Config()
    assert b.data.group_cols == [] and a.data.group_cols == ["x"]
