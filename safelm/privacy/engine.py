"""DP-SGD for the one Trainer: private look-alikes of model, optimizer and loader (Opacus style).

``DifferentialPrivacy.make_private`` hands the Trainer a per-sample-clipping model wrapper, an
Opacus ``DPOptimizer`` (noise, scaling, accountant hook) and a Poisson-sampling loader; the
training loop itself does not change. What this module adds to Opacus:

* a budget that is never exceeded: with ``privacy.target_epsilon`` the noise is calibrated for
  the planned number of steps, and :meth:`can_step` refuses any step that would take the
  accountant's epsilon past the target (the Trainer stops with a message);
* a ledger (``privacy.json``) with the accountant's history, enough to recompute epsilon with
  any accountant, and a state that resumes the same ledger;
* secret randomness: the Gaussian noise and the Poisson draws come from a seed taken from the
  operating system's entropy (``secrets``), independent of ``train.seed`` and never written
  outside ``resume/`` (which is as sensitive as the data and never released). The DP guarantee
  assumes the noise is unknown to the adversary; a seed printed in ``config.json`` would let
  anyone replay training with and without a target record. ``privacy.reproducible=true`` opts
  back into noise seeded from ``train.seed`` (recorded as ``noise_source: "seeded"``);
* Poisson sampling whose draws depend only on ``(secret seed, epoch)``, so a resumed run samples
  the same batches, and which yields correctly shaped empty batches (accounted like any other
  step);
* ``privacy.max_physical_batch_size``: logical batches split into physical ones through
  Opacus' virtual-step machinery (:class:`PhysicalBatchSampler`); the accountant counts
  logical steps only;
* user-level DP: sample users, take up to ``privacy.max_examples_per_user`` of each sampled
  user's rows, and clip each user's summed gradient (see :mod:`safelm.privacy.users`).
"""

from __future__ import annotations

import math
import secrets
import warnings
from typing import Any

import numpy as np
import opacus
import torch
import torch.nn as nn
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

from ..config import PrivacyConfig
from ..distributed import current
from ..errors import UserError
from . import bk, internals, seeds
from .users import UserBatchSampler, WithPadding, collate_with_padding

MODES = ("auto", "bk", "hooks", "functorch", "ew")

# Opacus' RDP search warns when its largest order is optimal; the bound stays valid (only
# looser), so the warning is noise on every calibration.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


class PoissonBatchSampler(UniformWithReplacementSampler):
    """Poisson sampling (each unit independently with probability ``sample_rate``) whose
    draws for epoch ``e`` come from a generator seeded by ``(secret seed, e)``, so a run resumed at
    batch ``start`` of an epoch continues with exactly the batches it would have drawn."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, seed: int,
                 rank: int = 0, world: int = 1):
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.seed, self.epoch, self.start = seed, 0, 0
        self.rank, self.world = rank, world  # each rank keeps its shard of the global draw

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(seeds.derive(self.seed, seeds.POISSON, self.epoch))
        for b in range(self.steps):
            mask = torch.rand(self.num_samples, generator=g) < self.sample_rate
            if b >= self.start:
                chosen = mask.nonzero(as_tuple=False).reshape(-1)
                yield chosen[chosen % self.world == self.rank].tolist()


class PhysicalBatchSampler(BatchSplittingSampler):
    """Logical (Poisson) batches cut into physical batches of at most ``max_batch_size`` rows.

    This is Opacus' ``BatchMemoryManager`` mechanism: before each physical batch the
    optimizer is told whether a logical step ends with it (``signal_skip_step``); until then
    ``optimizer.step()`` only accumulates the clipped per-sample gradients, and noise, the
    parameter update and the accountant's step happen once per logical batch. So splitting
    changes memory, not the update (up to float rounding) and not the privacy accounting.

    What it adds: cuts fall on unit boundaries (a user's ``rows_per_unit`` rows are clipped
    together, so they must share a physical batch); ``len()`` and ``set_epoch`` are those of
    the logical sampler, since the Trainer counts and resumes optimizer steps; and a new pass
    first drops skip signals left by a pass abandoned after its last batch was drawn (the
    Trainer stops on a budget or step limit only at a logical-batch boundary, but the signal
    for the first piece of the next batch is already queued by then).
    """

    def __init__(self, sampler, max_batch_size: int, optimizer: DPOptimizer,
                 rows_per_unit: int = 1):
        super().__init__(sampler=sampler, max_batch_size=max_batch_size, optimizer=optimizer)
        self.rows = rows_per_unit

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        return len(self.sampler)  # logical batches: optimizer steps

    def __iter__(self):
        internals.clear_skip_signals(self.optimizer)  # flags of an abandoned pass
        per = max(1, self.max_batch_size // self.rows) * self.rows
        for batch in self.sampler:
            pieces = [batch[i:i + per] for i in range(0, len(batch), per)] or [[]]
            for piece in pieces[:-1]:
                self.optimizer.signal_skip_step(do_skip=True)
                yield piece
            self.optimizer.signal_skip_step(do_skip=False)  # the logical step ends here
            yield pieces[-1]


def resolve_mode(model: nn.Module, mode: str) -> str:
    """``auto``: our exact one-backward clipping when every layer supports it, else hooks."""
    if mode == "auto":
        return "bk" if bk.supports(model) else "hooks"
    if mode == "bk" and not bk.supports(model):
        raise UserError("privacy.grad_sample_mode=bk needs every parameter in a Linear, "
                        "Embedding or LayerNorm; use grad_sample_mode=auto or hooks")
    return mode


class DifferentialPrivacy:
    """Everything DP about one training run; the Trainer's ``privacy=`` argument.

    ``n_units`` is the number of training examples (unit=example) or users (unit=user, with
    ``users`` the row indices of each user). ``batch_size`` is the expected number of rows per
    step: Poisson sampling with rate ``batch_size / n`` (for users, ``batch_size /
    max_examples_per_user`` users per step). The noise is calibrated for ``steps_planned``
    steps (default: ``epochs`` passes of ``1/q`` steps, capped by ``max_steps``); a federated
    client passes its whole plan over all rounds.
    """

    def __init__(self, cfg: PrivacyConfig, *, n_units: int, batch_size: int, epochs: int = 1,
                 max_steps: int = 0, seed: int = 0, users: list[list[int]] | None = None,
                 rows_per_unit: int = 1, steps_planned: int | None = None):
        validate(cfg, n_units)
        self.cfg, self.n_units, self.users = cfg, n_units, users
        # ``seed`` (train.seed) is used only with privacy.reproducible=true
        self.seed = seed if cfg.reproducible else secrets.randbits(63)
        self.noise_source = "seeded" if cfg.reproducible else "os_entropy"
        self.generator: torch.Generator | None = None  # the noise generator (make_private)
        self._sampler: Any = None  # the Poisson (user) sampler, reseeded on resume
        self.rows_per_unit = rows_per_unit if users is not None else 1
        per_step = batch_size / self.rows_per_unit
        self.sample_rate = min(1.0, max(1.0, per_step) / n_units)
        self.expected_batch_size = max(1, round(self.sample_rate * n_units))
        self.steps_per_epoch = max(1, math.ceil(1 / self.sample_rate))
        planned = epochs * self.steps_per_epoch
        planned = min(planned, max_steps) if max_steps and epochs else (max_steps or planned)
        self.steps_planned = max(1, steps_planned or planned)
        if cfg.target_epsilon is not None:
            with np.errstate(divide="ignore", invalid="ignore"):  # PRV at q=1 logs log(0)
                self.noise_multiplier = get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon, target_delta=cfg.delta,
                    sample_rate=self.sample_rate, steps=self.steps_planned,
                    accountant=cfg.accountant, epsilon_tolerance=0.01)
        else:
            self.noise_multiplier = float(cfg.noise_multiplier)
        self.accountant = create_accountant(mechanism=cfg.accountant)
        self._safe_steps = 0  # steps known to keep epsilon within the target
        self.mode = cfg.grad_sample_mode
        self.module: nn.Module | None = None
        self._optimizer: Any = None  # the DP optimizer make_private built

    # ---- wrapping the loop ----------------------------------------------------------------
    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            raise UserError(f"the model has a layer Opacus cannot make private: {errors[0]}")
        self.mode = resolve_mode(module, self.cfg.grad_sample_mode)
        rows = self.rows_per_unit
        ddp = current()
        if ddp.active:
            if self.mode != "bk" or self.users is not None:
                raise UserError("DP under torchrun supports unit=example with "
                                "grad_sample_mode=auto/bk (the Transformer)")
            module = DPDDP(module)  # broadcast rank 0's initial weights
            self.seed = _shared_seed(self.seed)  # one global Poisson draw: one secret, no disk
        device = next(module.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(
            seeds.derive(self.seed, seeds.NOISE))
        common = dict(noise_multiplier=self.noise_multiplier,
                      max_grad_norm=self.cfg.max_grad_norm,
                      expected_batch_size=max(1, round(self.expected_batch_size / ddp.world)),
                      loss_reduction="mean", generator=self.generator)
        if self.mode == "bk":
            wrapped = bk.BKGradSampleModule(module, self.cfg.max_grad_norm,
                                            rows_per_unit=rows if self.users is not None else None)
            cls = bk.BKDistributedDPOptimizer if ddp.active else bk.BKDPOptimizer
            dp_opt = cls(optimizer, module=wrapped, **common)
        else:
            if self.users is not None:
                raise UserError(f"privacy.unit={self.cfg.unit} with several blocks per unit "
                                "needs grad_sample_mode=auto or bk (a model of Linear/"
                                "Embedding/LayerNorm layers, e.g. model.arch=transformer); "
                                "or raise model.block_size so each example is one block")
            wrapped = GradSampleModule(module, batch_first=True, loss_reduction="mean",
                                       force_functorch=self.mode == "functorch") \
                if self.mode != "ew" else _expanded_weights(module)
            dp_opt = DPOptimizer(optimizer, **common)
        dp_opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(
            sample_rate=self.sample_rate))
        self.module = wrapped
        dataset, steps = WithPadding(data_loader.dataset), self.steps_per_epoch
        if self.users is not None:
            sampler = UserBatchSampler(self.users, sample_rate=self.sample_rate, steps=steps,
                                       seed=self.seed, rows_per_user=rows)
        else:
            sampler = PoissonBatchSampler(num_samples=self.n_units, sample_rate=self.sample_rate,
                                          steps=steps, seed=self.seed, rank=ddp.rank,
                                          world=ddp.world)
        self._sampler = sampler
        physical = self.cfg.max_physical_batch_size
        if physical:
            if physical < rows:
                raise UserError(f"privacy.max_physical_batch_size={physical} is below the "
                                f"{rows} rows of one {self.cfg.unit}, which must stay in one "
                                f"physical batch; set it to at least {rows} (or 0: no split)")
            sampler = PhysicalBatchSampler(sampler, physical, dp_opt, rows_per_unit=rows)
        loader = DataLoader(dataset, batch_sampler=sampler,
                            collate_fn=collate_with_padding(dataset),
                            generator=torch.Generator().manual_seed(self.seed))
        self._optimizer = dp_opt
        return wrapped, dp_opt, loader

    # ---- the budget -----------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.accountant.history)

    def epsilon(self, extra_steps: int = 0) -> float:
        history = list(self.accountant.history)
        if extra_steps:
            history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        if not history:
            return 0.0
        if any(s <= 0 for s, _, n in history if n):
            return math.inf  # a noiseless step has no finite guarantee
        acc = create_accountant(mechanism=self.cfg.accountant)
        acc.history = history
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(acc.get_epsilon(delta=self.cfg.delta))

    def can_step(self) -> bool:
        """False when one more step would take epsilon past ``privacy.target_epsilon``."""
        target = self.cfg.target_epsilon
        if target is None or self.steps + 1 <= self._safe_steps:
            return True
        # Check far ahead once (to the plan), then one step at a time beyond it.
        ahead = max(1, self.steps_planned - self.steps)
        if self.epsilon(extra_steps=ahead) <= target:
            self._safe_steps = self.steps + ahead
            return True
        if self.epsilon(extra_steps=1) <= target:
            self._safe_steps = self.steps + 1
            return True
        return False

    def before_step(self, module: nn.Module) -> None:
        """Nothing: clipping happens per sample, inside the optimizer's step."""

    def took_step(self) -> bool:
        """False after a physical batch that only accumulated (Opacus' virtual steps)."""
        return not internals.last_step_skipped(self._optimizer)

    def budget_message(self) -> str:
        return (f"privacy budget reached: one more step would exceed target epsilon "
                f"{self.cfg.target_epsilon} (now {self.epsilon():.3f} after {self.steps} steps); "
                "training stopped")

    # ---- ledger and state -----------------------------------------------------------------
    def ledger(self) -> dict[str, Any]:
        """privacy.json: enough to recompute epsilon with any accountant."""
        eps = self.epsilon()
        return {
            "epsilon": eps if math.isfinite(eps) else None,  # None: no guarantee (noise 0)
            "delta": self.cfg.delta,
            "accountant": self.cfg.accountant, "unit": self.cfg.unit, "sampling": "poisson",
            "max_grad_norm": self.cfg.max_grad_norm,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
            "target_epsilon": self.cfg.target_epsilon,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "steps": self.steps, "steps_planned": self.steps_planned,
            "dataset_size": self.n_units, "expected_batch_size": self.expected_batch_size,
            "rows_per_unit": self.rows_per_unit,
            "grad_sample_mode": self.mode, "opacus_version": opacus.__version__,
            "noise_source": self.noise_source,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self.noise_multiplier = float(state["noise_multiplier"])
        self.sample_rate = float(state["sample_rate"])

    # The secret part of the state: kept apart from ``state_dict`` (the accountant), which
    # federated clients report to the server and which is written beside the weights.
    def rng_state(self) -> dict[str, Any]:
        """The secret seed and the noise generator's state, for ``resume/`` only."""
        out: dict[str, Any] = {"seed": torch.tensor(self.seed, dtype=torch.int64),
                               "source": self.noise_source}
        if self.generator is not None:
            out["noise"] = self.generator.get_state()
        return out

    def load_rng_state(self, state: dict[str, Any]) -> None:
        """Continue the noise and Poisson draws of the run that wrote ``state``."""
        self.seed = int(state["seed"])
        if self._sampler is not None:
            self._sampler.seed = self.seed
        if self.generator is not None and "noise" in state:
            self.generator.set_state(state["noise"])


def _shared_seed(seed: int) -> int:
    """Rank 0's secret seed on every rank, through the process group (never through disk)."""
    import torch.distributed as dist
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def validate(cfg: PrivacyConfig, n_units: int) -> None:
    """Refuse settings that would void or misstate the guarantee (exit 2 via UserError)."""
    if (cfg.target_epsilon is None) == (cfg.noise_multiplier is None):
        raise UserError("set exactly one of privacy.target_epsilon and privacy.noise_multiplier")
    if cfg.target_epsilon is not None and not (cfg.target_epsilon > 0
                                               and math.isfinite(cfg.target_epsilon)):
        raise UserError(f"privacy.target_epsilon={cfg.target_epsilon} must be a finite number > 0")
    if cfg.noise_multiplier is not None and not (cfg.noise_multiplier >= 0
                                                 and math.isfinite(cfg.noise_multiplier)):
        raise UserError(f"privacy.noise_multiplier={cfg.noise_multiplier} must be >= 0")
    if not 0.0 < cfg.delta < 1.0:
        raise UserError(f"privacy.delta={cfg.delta} must be in (0, 1), e.g. 1e-5")
    if cfg.delta >= 1.0 / n_units:
        raise UserError(f"privacy.delta={cfg.delta} is not below 1/N = 1/{n_units} "
                        f"({cfg.unit}s): such a delta allows leaking a whole record; "
                        f"set privacy.delta below {1.0 / n_units:.2g}")
    if not (cfg.max_grad_norm > 0 and math.isfinite(cfg.max_grad_norm)):
        raise UserError(f"privacy.max_grad_norm={cfg.max_grad_norm} must be a finite number > 0")
    if cfg.grad_sample_mode not in MODES:
        raise UserError(f"privacy.grad_sample_mode={cfg.grad_sample_mode!r} is not one of "
                        f"{', '.join(MODES)}")
    if cfg.max_physical_batch_size < 0:
        raise UserError("privacy.max_physical_batch_size must be >= 0 (0: no split)")
    if cfg.max_examples_per_user < 1:
        raise UserError("privacy.max_examples_per_user must be >= 1")


def _expanded_weights(module: nn.Module) -> nn.Module:
    from opacus.grad_sample import GradSampleModuleExpandedWeights
    return GradSampleModuleExpandedWeights(module, batch_first=True, loss_reduction="mean")
