"""One Trainer for central, private and federated training.

``train_one_epoch`` and ``evaluate`` are the only training and evaluation code in SafeLM: a
federated client calls them for its local epochs, and differential privacy wraps the model,
optimizer and data loader they use (Opacus style) instead of forking the loop. A
:class:`Privacy` (:class:`NoPrivacy` unless DP is asked for) is asked once for look-alikes of
the three, and the loop calls only its declared methods: one loop, no DP branches.

Exact resume: the data order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone,
and a checkpoint stores the position in it together with the optimizer, scheduler and RNG
states, so a run killed at any point and resumed from its last checkpoint takes the same steps
as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from . import monitor, rundir
from .config import TrainConfig
from .data import Batch
from .distributed import current
from .errors import UserError
from .memory import keep_freed_memory


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches whose order depends only on ``(seed, epoch)``; can start mid-epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world  # under torchrun: this rank's slice of each batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world]


class Privacy(Protocol):
    """Everything the Trainer asks of whatever wraps its loop: :class:`NoPrivacy` for
    central training, :class:`safelm.privacy.DifferentialPrivacy` for DP-SGD. The loop calls
    these methods and nothing else, so it is one loop for both."""

    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader) -> tuple[nn.Module, Any, DataLoader]:
        """Look-alikes of the model, optimizer and loader that the loop then uses."""

    def can_step(self) -> bool:
        """False when the next optimizer step must not be taken (a spent privacy budget)."""

    def budget_message(self) -> str:
        """Why :meth:`can_step` said no (logged as the run's stop reason)."""

    def before_step(self, module: nn.Module) -> None:
        """After ``backward``, before ``optimizer.step`` (central: global gradient clipping)."""

    def took_step(self) -> bool:
        """Whether the last ``optimizer.step()`` updated the weights (False: one physical
        batch of a logical batch that is still accumulating)."""

    def ledger(self) -> dict[str, Any] | None:
        """``privacy.json`` to publish beside the weights, or None (nothing to claim)."""

    def state_dict(self) -> dict[str, Any]:
        """Resume state that may be published (accountant history)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def rng_state(self) -> dict[str, Any]:
        """Secret state (the noise seed and generator): written to resume/ only."""

    def load_rng_state(self, state: dict[str, Any]) -> None: ...


class NoPrivacy:
    """Central (non-private) training as a :class:`Privacy`: PyTorch's DDP under torchrun,
    global gradient-norm clipping (``train.grad_clip``), every step taken, nothing to claim."""

    def __init__(self, grad_clip: float = 0.0):
        self.grad_clip = grad_clip

    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader) -> tuple[nn.Module, Any, DataLoader]:
        if current().active:
            module = nn.parallel.DistributedDataParallel(module)
        return module, optimizer, data_loader

    def can_step(self) -> bool:
        return True

    def budget_message(self) -> str:
        return ""

    def before_step(self, module: nn.Module) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip)

    def took_step(self) -> bool:
        return True

    def ledger(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def rng_state(self) -> dict[str, Any]:
        return {}

    def load_rng_state(self, state: dict[str, Any]) -> None:
        pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", current().local_rank)
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import UserError
        raise UserError("train.device=cuda but no CUDA device is available; use train.device=auto")
    return torch.device(name)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_loss(model: nn.Module, batch: Batch, task: str) -> tuple[torch.Tensor, int]:
    """Mean over the batch's rows of each row's own loss, and the number of rows.

    A row's loss is its mean token NLL (LM) or its label's cross-entropy; it depends on that
    row alone, which is what per-sample clipping (DP-SGD) needs. Padding rows (all targets
    -100) have loss 0 and still count in the mean, as DP's user-level batches need; an empty
    batch (Poisson sampling) gives a zero loss that still backpropagates. ``batch.weights``,
    when present, weights each row's loss (``train.reweight``).
    """
    b = batch if isinstance(batch, Batch) else Batch(*batch)
    x = b.input_ids
    rows = max(x.shape[0], 1)
    if task == "lm":
        logits = model(x)  # [B, T, V]
        nll = F.cross_entropy(logits.transpose(1, 2), b.targets, ignore_index=-100,
                              reduction="none")
        per_row = nll.sum(1) / (b.targets != -100).sum(1).clamp(min=1)  # [B]
    else:
        logits = model(x, b.lengths)  # [B, n_classes]
        per_row = F.cross_entropy(logits, b.labels, ignore_index=-100, reduction="none")
    if b.weights is not None:
        per_row = per_row * b.weights
    return per_row.sum() / rows, x.shape[0]


def macro_f1(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in truth or prediction (sklearn's macro)."""
    f1s = []
    for c in range(num_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset | None, task: str, batch_size: int,
                   num_classes: int = 0, device: torch.device | str = "cpu"
                   ) -> dict[str, float]:
    """Loss (+ perplexity for LM, accuracy and macro-F1 for classification) of ``model``.

    What :meth:`Trainer.evaluate` reports, without a Trainer: building one makes an AdamW
    optimizer, and the first torch optimizer of a process imports ``torch._dynamo`` (about
    0.8 s here), which an evaluation-only process (a federated server) need not pay.
    """
    if dataset is None or len(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    loss_sum, units, preds, truth = 0.0, 0, [], []
    for batch in DataLoader(dataset, batch_size=batch_size, generator=torch.Generator(),
                            collate_fn=Batch.collate):
        x, y, lengths, labels = batch.to(device)[:4]
        if task == "lm":
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                              ignore_index=-100, reduction="sum"))
            units += int((y != -100).sum())
        else:
            logits = model(x, lengths)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            units += x.shape[0]
            preds.append(logits.argmax(-1).cpu())
            truth.append(labels.cpu())
    model.train(was_training)
    loss = loss_sum / max(units, 1)
    if task == "lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    y_pred, y_true = torch.cat(preds), torch.cat(truth)
    return {"loss": loss, "accuracy": float((y_pred == y_true).float().mean()),
            "macro_f1": macro_f1(y_true, y_pred, num_classes)}


class Trainer:
    """Trains ``model`` on ``train_set`` with AdamW and a warm-up + cosine schedule."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_set: Dataset,
                 val_set: Dataset | None = None, *, run_dir: str | Path | None = None,
                 privacy: Privacy | None = None, num_classes: int = 0):
        self.cfg, self.task, self.num_classes = cfg, cfg.task, num_classes
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = pick_device(cfg.device)
        keep_freed_memory()  # steps would free and re-fault their activations (memory.py)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        self.train_set, self.val_set = train_set, val_set
        ddp = current()
        self.sampler = EpochBatchSampler(len(train_set), cfg.batch_size, cfg.seed,
                                         ddp.rank, ddp.world)
        # A private generator: otherwise each new loader iterator draws a seed from the global
        # RNG, which would shift dropout noise after a mid-epoch resume.
        self.loader = DataLoader(train_set, batch_sampler=self.sampler, collate_fn=Batch.collate,
                                 generator=torch.Generator().manual_seed(cfg.seed))
        trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: adapters only
        decay = [p for p in trainable if p.dim() >= 2]
        no_decay = [p for p in trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        # Look-alikes of model, optimizer and loader (DP-SGD, or DDP for central training);
        # the loop below is the same for every Privacy.
        self.privacy: Privacy = privacy if privacy is not None else NoPrivacy(cfg.grad_clip)
        self.model, self.optimizer, self.loader = self.privacy.make_private(
            self.model, self.optimizer, self.loader)
        mode = getattr(self.privacy, "mode", None)
        if cfg.precision == "bf16" and mode not in (None, "bk"):
            raise UserError(f"train.precision=bf16 under DP needs the one-backward clipping "
                            f"(privacy.grad_sample_mode=auto or bk, a Transformer), which keeps "
                            f"per-sample norms in fp32; this run uses {mode}: set "
                            "train.precision=fp32")
        self.sampler = self.loader.batch_sampler
        self.steps_per_epoch = len(self.sampler)
        epochs_steps = cfg.epochs * self.steps_per_epoch
        self.total_steps = (min(cfg.max_steps, epochs_steps) if cfg.max_steps and cfg.epochs
                            else cfg.max_steps or epochs_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, self.total_steps,
                                                cfg.lr_min_ratio))
        self.stop_reason: str | None = None
        self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        # TensorBoard / MLflow views of metrics.jsonl: opened by the first log(), closed by
        # close_monitors(); after restore() they purge what was logged past the checkpoint
        self.sinks: list[monitor.Sink] | None = None
        self._purge_step: int | None = None

    # ---- the loop -------------------------------------------------------------------------
    def _to_device(self, batch: Batch) -> Batch:
        return Batch(*batch).to(self.device)

    def _autocast(self) -> torch.autocast:
        """The training forward pass's precision (``train.precision``): bf16 autocast, or
        a disabled autocast (fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.precision == "bf16")

    def _progress(self, total: int, initial: int, desc: str) -> tqdm:
        mode = self.cfg.progress
        show = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not show,
                    dynamic_ncols=True, leave=False)

    def train_one_epoch(self, epoch: int, start: int = 0,
                        on_step=None) -> dict[str, float]:
        """One pass over the training set from batch ``start``; returns mean loss and rate.

        ``on_step(trainer)`` runs after each optimizer step (logging, checkpoints, budget).
        Stops early when ``train.max_steps`` is reached.
        """
        self.model.train()
        self.epoch = epoch
        self.sampler.set_epoch(epoch, start)
        loss_sum, units, tokens, t0 = 0.0, 0, 0, time.perf_counter()
        step_loss, step_rows = 0.0, 0  # over the physical batches of one optimizer step
        bar = self._progress(self.steps_per_epoch, start, f"epoch {epoch + 1}")
        self.step_in_epoch = start
        for batch in self.loader:
            if self.global_step >= self.total_steps:
                break
            if not self.privacy.can_step():
                self.stop_reason = self.privacy.budget_message()
                break
            batch = self._to_device(batch)
            with self._autocast():
                loss, n = batch_loss(self.model, batch, self.task)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.privacy.before_step(self.model)
            self.optimizer.step()
            loss_sum += float(loss.detach()) * n
            units += n
            tokens += int(batch.lengths[batch.labels != -100].sum())  # padding rows excluded
            step_loss, step_rows = step_loss + float(loss.detach()) * n, step_rows + n
            if not self.privacy.took_step():
                continue  # a physical batch inside a logical one (max_physical_batch_size)
            self.scheduler.step()
            self.global_step += 1
            self.step_in_epoch += 1
            # mean over the logical batch (its only physical batch: that batch's loss as is)
            self.last_loss = float(loss.detach()) if step_rows == n else step_loss / step_rows
            step_loss, step_rows = 0.0, 0
            bar.update(1)
            if bar.n % 10 == 0:
                bar.set_postfix(loss=f"{self.last_loss:.3f}", refresh=False)
            if on_step is not None:
                on_step(self)
        bar.close()
        dt = time.perf_counter() - t0
        return {"train_loss": loss_sum / max(units, 1), "tokens_per_s": tokens / max(dt, 1e-9),
                "seconds": dt}

    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Loss (+ perplexity for LM, accuracy and macro-F1 for classification)."""
        dataset = dataset if dataset is not None else self.val_set
        cap = self.cfg.eval_blocks
        if dataset is not None and 0 < cap < len(dataset):  # the same subset every time
            keep = np.sort(np.random.default_rng(self.cfg.seed).choice(len(dataset), cap,
                                                                       replace=False))
            dataset = Subset(dataset, keep.tolist())
        return evaluate_model(self.model, dataset, self.task, self.cfg.eval_batch_size,
                              self.num_classes, self.device)

    # ---- fit: epochs, logging, checkpoints, resume -----------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.run_dir is not None:
            with open(self.run_dir / rundir.METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.sinks is None:
                self.sinks = monitor.open_sinks(self.run_dir, tensorboard=self.cfg.tensorboard,
                                                mlflow=self.cfg.mlflow,
                                                purge_step=self._purge_step)
            for sink in self.sinks:
                sink.write(record)

    def close_monitors(self) -> None:
        for sink in self.sinks or []:
            sink.close()
        self.sinks = None

    def _on_step(self, trainer: Trainer) -> None:
        cfg = self.cfg
        if self.global_step % cfg.log_every == 0:
            self.log({"kind": "step", "step": self.global_step, "epoch": self.epoch,
                      "loss": self.last_loss, "lr": self.scheduler.get_last_lr()[0]})
        if self.global_step % cfg.checkpoint_every == 0 and self.step_in_epoch < self.steps_per_epoch:
            self.checkpoint()

    def fit(self, resume: bool = False,
            resume_from: tuple[int, int] | None = None) -> dict[str, float]:
        """Train to ``total_steps``; evaluate, log and checkpoint at every epoch end."""
        start_epoch, start = resume_from or (0, 0)
        if resume:
            start_epoch, start = self.restore()
        elif resume_from is None:  # the starting point, so learning curves show the progress
            self.log({"kind": "eval", "step": 0, "epoch": 0,
                      **{f"val_{k}": v for k, v in self.evaluate().items()}})
        final: dict[str, float] = {}
        epoch = start_epoch
        while self.global_step < self.total_steps and self.stop_reason is None:
            stats = self.train_one_epoch(epoch, start, on_step=self._on_step)
            start = 0
            val = {f"val_{k}": v for k, v in self.evaluate().items()}
            final = {"epoch": epoch + 1, "step": self.global_step, **stats, **val}
            ledger = self.privacy.ledger()
            spent = {"epsilon": ledger["epsilon"]} if ledger and ledger.get("epsilon") else {}
            self.log({"kind": "epoch", **final, **spent})  # epsilon so far, for DP runs
            epoch += 1
            self.epoch, self.step_in_epoch = epoch, 0
            self.checkpoint()
        if self.stop_reason:
            self.log({"kind": "stop", "step": self.global_step, "reason": self.stop_reason})
            final["stopped"] = self.stop_reason
        return final

    def state_tensors(self) -> dict[str, Any]:
        tensors = {"optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(),
                   "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["rng_cuda"] = torch.cuda.get_rng_state_all()
        secret = self.privacy.rng_state()
        if secret:  # the secret noise seed: resume/ only, never released
            tensors["privacy_rng"] = secret
        return tensors

    def checkpoint(self) -> None:
        """Publish the weights and write ``resume/`` (position = next batch to train)."""
        if self.run_dir is None:
            return
        epoch, pos = self.epoch, self.step_in_epoch
        if pos >= self.steps_per_epoch:
            epoch, pos = epoch + 1, 0
        state = {"global_step": self.global_step, "epoch": epoch, "step_in_epoch": pos,
                 "total_steps": self.total_steps}
        private_state = self.privacy.state_dict()
        if private_state:
            state["privacy"] = private_state
        rundir.save_resume(self.run_dir, self.model, self.state_tensors(), state)
        rundir.save_weights(self.model, self.run_dir / rundir.WEIGHTS)
        ledger = self.privacy.ledger()
        if ledger is not None:  # the ledger always matches the published weights
            rundir.atomic_write_json(self.run_dir / rundir.PRIVACY, ledger)
        rundir.write_checksums(self.run_dir)  # load_run refuses files changed after this

    def restore(self, write: bool = True) -> tuple[int, int]:
        """Load ``resume/``; drop metrics logged after it; return (epoch, batch position)."""
        d, tensors, state = rundir.load_resume(self.run_dir)
        rundir.load_weights(self.model, d / rundir.WEIGHTS)
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["rng_cpu"])
        if "rng_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(tensors["rng_cuda"])
        if "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
        if "privacy_rng" in tensors:
            self.privacy.load_rng_state(tensors["privacy_rng"])
        self.global_step = state["global_step"]
        self._purge_step = self.global_step + 1
        if not write:
            return state["epoch"], state["step_in_epoch"]
        kept = [r for r in rundir.read_metrics(self.run_dir) if r.get("step", 0) <= self.global_step]
        rundir.atomic_write_text(self.run_dir / rundir.METRICS,
                                 "".join(json.dumps(r) + "\n" for r in kept))
        self.history = kept
        return state["epoch"], state["step_in_epoch"]
