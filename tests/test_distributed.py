"""DP data parallelism under torchrun (2 CPU processes, gloo) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY

pytestmark = pytest.mark.slow


def test_two_gloo_processes_match_one_process(tmp_path, cls_csv):
    sets = TINY + ["model.dropout=0.0", "train.epochs=2", "train.task=classify",
                   "privacy.enabled=true", "privacy.noise_multiplier=0.7", "privacy.delta=1e-3",
                   "privacy.reproducible=true"]  # one secret on both ranks; comparable noise
    args = ["train", "--data", str(cls_csv)]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "safelm.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port=29533", "-m", "safelm.cli", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    from safelm.model import build_model
    from safelm.rundir import read_config
    cfg = read_config(tmp_path / "one")
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model, "classify").state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-2  # training moved it
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
    la = json.loads((tmp_path / "one/privacy.json").read_text())
    lb = json.loads((tmp_path / "two/privacy.json").read_text())
    assert la["history"] == lb["history"] and la["epsilon"] == pytest.approx(lb["epsilon"])
    assert la["expected_batch_size"] == lb["expected_batch_size"]
