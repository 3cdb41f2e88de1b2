"""Warm start (--init-from) and LoRA (safelm/lora.py): DP clipping of the adapters is exact
against a float64 vmap(grad) reference over the trainable parameters only, merged weights give
the same logits, base weights stay frozen, and bad combinations exit 2 naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.func import functional_call, grad, vmap

from conftest import TINY, write_cls_csv, write_lm_txt
from safelm import Config, train_run
from safelm.api import load_run
from safelm.cli import main
from safelm.config import ModelConfig
from safelm.lora import LoRALinear, count_trainable, merge_lora
from safelm.model import build_model
from safelm.privacy.bk import BKGradSampleModule
from safelm.rundir import load_weights
from safelm.trainer import batch_loss

V, T = 300, 12


def lora_model(task: str, targets=("attn", "mlp")):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=4, block_size=T, vocab_size=V, dropout=0.0,
                      num_classes=3, lora_rank=3, lora_alpha=6.0, lora_targets=list(targets))
    model = build_model(cfg, task).double()
    with torch.no_grad():  # non-zero B, so that A's gradient is not zero
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    return model


def make_batch(B: int, task: str):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    y = x.roll(-1, 1)
    y[torch.arange(T)[None] >= lengths[:, None]] = -100
    labels = torch.randint(0, 3, (B,), generator=g) if task == "classify" else \
        torch.full((B,), -1)
    return x, y if task == "lm" else torch.zeros(B, 0, dtype=torch.long), lengths, labels


def reference(model, batch, task, C):
    train = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def one(p, x, y, n, lab):
        f = lambda *a: functional_call(model, {**p, **frozen}, a)  # noqa: E731
        return batch_loss(f, (x[None], y[None], n[None], lab[None]), task)[0]
    per = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(train, *batch)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per.values()))
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    return norms, {k: (g * c.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per.items()}


@pytest.mark.parametrize("task", ["lm", "classify"])
@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_dp_lora_clipping_is_exact_over_the_trainable_parameters(task, mode):
    model = lora_model(task)
    trainable, total = count_trainable(model)
    assert 0 < trainable < total / 3
    batch = make_batch(6, task)
    norms, _ = reference(model, batch, task, C=1.0)
    C = float(norms.median())  # about half the samples get clipped
    norms, want = reference(model, batch, task, C=C)
    if mode == "bk":
        wrapped = BKGradSampleModule(model, C)
        batch_loss(wrapped, batch, task)[0].backward()
        torch.testing.assert_close(wrapped.clip_and_sum(), norms, rtol=1e-10, atol=1e-12)
    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                          lr=0.0), noise_multiplier=0.0, max_grad_norm=C,
                          expected_batch_size=6, loss_reduction="sum")
        batch_loss(wrapped, batch, task)[0].backward()
        opt.pre_step()
    for name, p in model.named_parameters():
        if name in want:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12)
        else:
            assert p.grad is None and not p.requires_grad, name
    assert (norms > C).any() and (norms < C).any()


def test_merged_weights_give_the_same_logits():
    model = lora_model("classify")
    x, _, lengths, _ = make_batch(5, "classify")
    with torch.no_grad():
        before = model(x, lengths)
        merge_lora(model)
        after = model(x, lengths)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)


def cli(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm")
    train_run(write_lm_txt(d / "lm.txt", n=40),
              Config.load(None, TINY + ["train.max_steps=6", "model.block_size=24"]), d / "run")
    return d / "run"


def test_lora_classifier_from_a_pretrained_lm_under_dp(lm_run, tmp_path, capsys):
    data = write_cls_csv(tmp_path / "cls.csv")
    rc, out, err = cli(capsys, "train", "--data", data, "--task", "classify", "--out",
                       tmp_path / "run", "--init-from", lm_run, "--set", "model.lora_rank=2",
                       "--set", "model.lora_targets=attn,mlp", "--set", "train.epochs=1",
                       "--set", "privacy.enabled=true", "--set", "privacy.noise_multiplier=0.5",
                       "--set", "train.progress=off", "--set", "train.batch_size=16")
    assert rc == 0, err
    assert "trainable (LoRA rank 2, attn, mlp)" in err
    run = tmp_path / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["block_size"] == 24 and cfg["train"]["init_from"] == str(lm_run)
    assert (run / "tokenizer.json").read_bytes() == (lm_run / "tokenizer.json").read_bytes()
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][0]
    assert rec["kind"] == "model" and 0 < rec["trainable_parameters"] < rec["parameters"]
    with safe_open(str(run / "model.safetensors"), "pt") as f:  # the run keeps the adapters
        keys = set(f.keys())
    assert "blocks.0.attn.q.lora_A.weight" in keys and "blocks.0.attn.q.base.weight" in keys
    # the base stayed frozen: equal to the pretrained LM's weights
    lm = build_model(Config.from_dict(json.loads((lm_run / "config.json").read_text())).model,
                     "lm")
    load_weights(lm, lm_run / "model.safetensors")
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("blocks.0.attn.q.base.weight"),
                           lm.blocks[0].attn.q.weight.detach())
        assert torch.equal(f.get_tensor("tok_emb.weight"), lm.tok_emb.weight.detach())
        assert f.get_tensor("blocks.0.mlp.fc.lora_B.weight").abs().sum() > 0  # it trained
    # predict and load_run use the merged weights
    loaded = load_run(run, device="cpu")
    assert not any(isinstance(m, LoRALinear) for m in loaded.model.modules())
    assert cli(capsys, "predict", run, "--data", data, "--out", tmp_path / "p.csv")[0] == 0
    transformers = pytest.importorskip("transformers")  # export uses the merged weights too
    assert cli(capsys, "export", "hf", run, "--out", tmp_path / "hf")[0] == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([[loaded.tokenizer.bos_id] + loaded.tokenizer.encode("a great film")])
    with torch.no_grad():
        assert (hf(x).logits - loaded.model(x, torch.tensor([x.shape[1]]))).abs().max() < 1e-4


def exit2(capsys, *args) -> str:
    rc, out, err = cli(capsys, *args)
    assert rc == 2, (rc, out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_init_from_refuses_conflicts_by_name(lm_run, tmp_path, capsys):
    data = write_cls_csv(tmp_path / "cls.csv")
    err = exit2(capsys, "train", "--data", data, "--task", "classify", "--out", tmp_path / "a",
                "--init-from", lm_run, "--set", "model.n_layer=3")
    assert "model.n_layer is 1 in that run but 3 here" in err
    err = exit2(capsys, "train", "--data", data, "--task", "classify", "--out", tmp_path / "b",
                "--init-from", lm_run, "--set", "model.block_size=64")
    assert "model.block_size=64 is beyond that run's 24" in err
    err = exit2(capsys, "train", "--data", data, "--task", "classify", "--out", tmp_path / "c",
                "--set", "model.lora_rank=4")
    assert "--init-from" in err
    err = exit2(capsys, "train", "--data", data, "--out", tmp_path / "d", "--init-from",
                tmp_path / "nope")
    assert "not a run dir" in err
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_lm_to_lm_continues_from_the_weights(lm_run, tmp_path, capsys):
    data = write_lm_txt(tmp_path / "more.txt", n=20, seed=1)
    rc, _, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "run", "--init-from",
                     lm_run, "--set", "train.max_steps=1", "--set", "train.lr=1e-9",
                     "--set", "train.warmup_steps=0", "--set", "model.dropout=0.0")
    assert rc == 0, err
    a, b = load_run(lm_run, device="cpu").model, load_run(tmp_path / "run", device="cpu").model
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() < 1e-5, n  # one step at lr 1e-9: the same weights


def test_resume_repeats_the_lora_command_and_refuses_another_init(lm_run, tmp_path, capsys):
    data = write_cls_csv(tmp_path / "cls.csv")
    args = ["train", "--data", data, "--task", "classify", "--out", tmp_path / "run",
            "--init-from", lm_run, "--set", "model.lora_rank=2", "--set", "train.max_steps=2",
            "--set", "train.checkpoint_every=1", "--set", "train.progress=off"]
    assert cli(capsys, *args)[0] == 0
    rc, _, err = cli(capsys, *args, "--resume")  # the same command again: fine
    assert rc == 0, err
    other = [str(tmp_path / "other") if a == lm_run else a for a in args]
    err = exit2(capsys, *other, "--resume")
    assert "train.init_from" in err and "a resumed run keeps its config" in err
