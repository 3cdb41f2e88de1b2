"""Trainer: determinism, exact resume (in-process crash and a real SIGKILL), schedule, metrics."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safelm import Config, train_run
from safelm.trainer import EpochBatchSampler, lr_factor, macro_f1
from conftest import TINY


def tiny_cfg(*extra: str, task: str = "lm") -> Config:
    cfg = Config.load(None, TINY + [f"train.task={task}", *extra])
    return cfg


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warm-up
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_sampler_is_a_permutation_and_resumes_mid_epoch():
    s = EpochBatchSampler(23, 5, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert sorted(i for b in full for i in b) == list(range(23))
    s.set_epoch(2, start=3)
    assert list(s) == full[3:]
    s.set_epoch(3)
    assert list(s) != full


def test_macro_f1_matches_hand_computation():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    p = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_same_seed_same_weights_other_seed_differs(tmp_path, cls_csv):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_run(cls_csv, tiny_cfg("train.epochs=2", f"train.seed={seed}", task="classify"),
                  tmp_path / name)
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "a", tmp_path / "c")


class Crash(Exception):
    pass


def test_resume_after_crash_in_process_equals_uninterrupted(tmp_path, lm_txt, monkeypatch):
    extra = ("train.epochs=3", "train.checkpoint_every=4")
    full = train_run(lm_txt, tiny_cfg(*extra), tmp_path / "full")
    # Crash at step 11: after the step-8 checkpoint, mid-way through epoch 2.
    import safelm.trainer as tr
    orig = tr.Trainer._on_step

    def crashing(self, trainer):
        orig(self, trainer)
        if self.global_step == 11:
            raise Crash
    monkeypatch.setattr(tr.Trainer, "_on_step", crashing)
    with pytest.raises(Crash):
        train_run(lm_txt, tiny_cfg(*extra), tmp_path / "cut")
    state = json.loads((tmp_path / "cut/resume/state.json").read_text())
    assert state["global_step"] == 8 and 0 < state["step_in_epoch"]
    monkeypatch.setattr(tr.Trainer, "_on_step", orig)
    resumed = train_run(lm_txt, None, tmp_path / "cut", resume=True)
    assert_same_weights(tmp_path / "full", tmp_path / "cut", atol=1e-6)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "cut/metrics.jsonl"))
             if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


def test_metrics_and_validation_perplexity_fall(tmp_path, lm_txt):
    final = train_run(lm_txt, tiny_cfg("train.epochs=4", "train.lr=3e-3"), tmp_path / "r")
    recs = [json.loads(line) for line in open(tmp_path / "r/metrics.jsonl")]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert len(epochs) == 4
    assert epochs[-1]["val_perplexity"] < 0.5 * epochs[0]["val_perplexity"]
    assert final["test_perplexity"] > 1.0
    assert recs[0]["kind"] == "model" and recs[0]["trainable_parameters"] == \
        recs[0]["parameters"] > 0  # what trains (all of it without LoRA)
    assert recs[1]["kind"] == "eval" and recs[1]["step"] == 0  # the starting point
    assert recs[1]["val_perplexity"] > epochs[0]["val_perplexity"]
    assert {"loss", "lr", "step", "epoch"} <= set(next(r for r in recs if r["kind"] == "step"))


def test_max_steps_caps_training(tmp_path, cls_csv):
    final = train_run(cls_csv, tiny_cfg("train.epochs=5", "train.max_steps=7", task="classify"),
                      tmp_path / "r")
    assert final["step"] == 7


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, lm_txt):
    """A real `safelm train` killed with SIGKILL mid-epoch, then `--resume`d."""
    args = ["--data", str(lm_txt), "--set", "train.epochs=3", "--set", "train.checkpoint_every=3"]
    for s in TINY:
        args += ["--set", s]
    cmd = [sys.executable, "-m", "safelm.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + args + ["--out", str(tmp_path / "full")], check=True, env=env,
                   capture_output=True)
    run = tmp_path / "cut"
    proc = subprocess.Popen(cmd + args + ["--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file, deadline, killed_at = run / "resume/state.json", time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.005)
            continue
        if state["epoch"] == 1 and state["step_in_epoch"] > 0:  # mid-way through epoch 2
            proc.send_signal(signal.SIGKILL)
            killed_at = state
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None, "training finished before it could be killed mid-epoch"
    assert proc.returncode == -signal.SIGKILL
    out = subprocess.run(cmd + ["--data", str(lm_txt), "--out", str(run), "--resume"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert_same_weights(tmp_path / "full", run, atol=1e-6)


_REFAULTS = """
import resource, sys, torch
from safelm.memory import keep_defaults, keep_freed_memory
applied = keep_freed_memory()
if sys.argv[1] == "declined":  # the memory check found memory tight: defaults restored
    keep_defaults("tight")
    applied = keep_freed_memory()
def step():  # three 64 MiB activations and a sum, written and freed, as a training step does
    xs = [torch.ones(16 * 2**20) for _ in range(3)]
    y = xs[0] + xs[1]
    del xs, y
for _ in range(6):  # the heap settles in a few steps
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
@pytest.mark.parametrize("keep", ["1", "0", "declined"])
def test_freed_memory_is_reused_not_refaulted(keep):
    """Planted and null: once the heap has settled, steps of four 64 MiB activations
    page-fault nothing with the trainer's allocator setting, and about 65,536 times each
    (every 4 KiB page of every block) with glibc's defaults, which unmap a block that large
    when it is freed; SAFELM_KEEP_FREED_MEMORY=0 keeps the defaults, and keep_defaults (what
    the memory check calls when memory is tight) restores them after the setting."""
    env = {**os.environ, "SAFELM_KEEP_FREED_MEMORY": "0" if keep == "0" else "1"}
    out = subprocess.run([sys.executable, "-c", _REFAULTS, keep], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    applied, faults = out[0] == "True", int(out[1])
    if keep == "1":
        assert applied and faults < 1_000, faults
    else:
        assert not applied and faults > 3 * 65_536 * 0.9, faults


def test_every_training_applies_the_allocator_setting(tmp_path, lm_txt, monkeypatch):
    import safelm.trainer as trainer_mod
    calls = []
    monkeypatch.setattr(trainer_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    train_run(lm_txt, tiny_cfg("train.max_steps=1"), tmp_path / "run")  # non-private
    assert calls == [1]
