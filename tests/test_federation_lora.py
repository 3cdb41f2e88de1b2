"""Federated fine-tuning from a pretrained run: every client starts from the same pretrained
weights, only the LoRA adapters (and the classifier head) travel, bytes per round are reported
and proportional to the adapter size, and client-level and sample-level DP still work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import write_lm_txt
from federation import task
from federation.local import app_run_config, run_local
from safelm import Config, rundir, train_run
from safelm.errors import UserError
from safelm.rundir import load_weights
from safelm.model import build_model

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
SHAPE = ["model.n_layer=1", "model.d_model=32", "model.n_head=4", "model.block_size=32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pre")
    train_run(write_lm_txt(d / "lm.txt", n=40),
              Config.load(None, SHAPE + ["train.max_steps=4", "train.progress=off",
                                         "model.vocab_size=300"]), d / "run")
    return d / "run"


def fed(out: Path, pretrained: Path, *extra: str) -> dict:
    return app_run_config(PYPROJECT, [f'out-dir="{out}"', "corpus-size=400", "client-threads=1",
                                      "num-server-rounds=2", f'train.init_from="{pretrained}"',
                                      *extra])


def rounds(out: Path) -> list[dict]:
    return [r for r in rundir.read_metrics(out) if r["kind"] == "round"]


def test_only_adapters_travel_and_the_base_stays_the_pretrained_one(pretrained, tmp_path):
    run_local(fed(tmp_path / "lora", pretrained, "model.lora_rank=2"), 3)
    run_local(fed(tmp_path / "full", pretrained), 3)
    lora, full = rounds(tmp_path / "lora"), rounds(tmp_path / "full")
    assert [r["replies"] for r in lora] == [3, 3] and [r["replies"] for r in full] == [3, 3]
    d, r, layers, classes = 32, 2, 1, 2
    adapters = layers * 4 * (r * d + d * r)  # q, k, v, proj: A [r, d] and B [d, r]
    head = classes * d + classes
    assert lora[0]["bytes"]["model_arrays"] == 4 * (adapters + head)  # float32
    assert full[0]["bytes"]["model_arrays"] > 20 * lora[0]["bytes"]["model_arrays"]
    for rec in lora:  # 3 train + 3 evaluate messages out, 3 train replies back
        assert rec["bytes"]["sent"] == 6 * rec["bytes"]["model_arrays"]
        assert rec["bytes"]["received"] == 3 * rec["bytes"]["model_arrays"]
    # the global run keeps the adapters; its base equals the pretrained weights
    lm = build_model(Config.load(None, SHAPE + ["model.vocab_size=300"]).model, "lm")
    import json
    lm_cfg = Config.from_dict(json.loads((pretrained / "config.json").read_text()))
    lm = build_model(lm_cfg.model, "lm")
    load_weights(lm, pretrained / "model.safetensors")
    with safe_open(str(tmp_path / "lora" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("blocks.0.attn.v.base.weight"),
                           lm.blocks[0].attn.v.weight.detach())
        assert f.get_tensor("blocks.0.attn.v.lora_B.weight").abs().sum() > 0  # it learned


@pytest.mark.parametrize("dp", [["dp=\"server-fixed\"", "dp-noise=0.3", "dp-clip=1.0"],
                                ["privacy.enabled=true", "privacy.noise_multiplier=1.0"]])
def test_client_and_sample_level_dp_with_adapters(pretrained, tmp_path, dp):
    run_local(fed(tmp_path / "dp", pretrained, "model.lora_rank=2", *dp), 3)
    recs = rounds(tmp_path / "dp")
    assert len(recs) == 2 and all(r["aggregated"] for r in recs)
    assert recs[-1]["epsilon"] is not None and recs[-1]["epsilon"] > 0
    assert (tmp_path / "dp" / "privacy.json").is_file()


def test_a_node_with_other_pretrained_weights_is_refused(pretrained):
    cfg = Config.load(None, [f"train.init_from={pretrained}"])
    task.check_init(cfg, task.file_sha256(pretrained / "model.safetensors"))  # control
    with pytest.raises(UserError, match="not the server's"):
        task.check_init(cfg, "0" * 64)
