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


RANKS_SHARE_SECRET = """
import torch, torch.distributed as dist
from safelm.config import PrivacyConfig
from safelm.distributed import init_from_env
from safelm.privacy import DifferentialPrivacy
init_from_env()
p = DifferentialPrivacy(PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-4),
                        n_units=100, batch_size=10)
drawn = p.seed
model = torch.nn.Linear(4, 2)
p.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
               torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
                   torch.zeros(100, 4), torch.zeros(100, 4, dtype=torch.long),
                   torch.ones(100, dtype=torch.long), torch.zeros(100, dtype=torch.long))))
every = [None] * dist.get_world_size()
dist.all_gather_object(every, (drawn, p.seed))
assert len({d for d, _ in every}) == 2, every  # each rank drew its own secret from the OS
assert len({s for _, s in every}) == 1 and every[0][1] == every[0][0], every  # rank 0's wins
dist.barrier()
print("shared", dist.get_rank(), flush=True)
dist.destroy_process_group()  # a gloo group left open can abort the process at exit
"""


def test_torchrun_ranks_share_rank_0s_os_entropy_secret(tmp_path):
    """The DP secret of rank 0 reaches every rank by a broadcast; no file is written."""
    script = tmp_path / "share.py"
    script.write_text(RANKS_SHARE_SECRET)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port=29534", str(script)], capture_output=True, text=True,
                         env=env, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("shared") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["share.py"]  # nothing went to disk
