"""User-level DP sampling, and collation that keeps empty and padded batches well-shaped.

User-level DP protects everything one user contributed, so the unit of sampling and clipping
is the user: each step samples users independently with probability q (Poisson), takes up to
``rows_per_user`` of each sampled user's rows (a random subset when they have more), and pads
to exactly that many rows with padding rows whose loss is zero. The rows of one user sit next
to each other, so the clipping module can treat them as one unit and clip the gradient of the
sum of that user's losses to ``max_grad_norm``: removing one user then changes the noiseless
update by at most the clip bound, and the accountant's epsilon is per user.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset, Sampler

from ..data import Batch
from . import seeds

PAD_LABEL = -100  # ignored by the loss


class UserBatchSampler(Sampler[list[int]]):
    """Poisson over users; yields ``rows_per_user`` dataset indices per sampled user, with the
    padding index ``pad_index`` filling short users. Draws depend on ``(secret seed, epoch)`` only."""

    def __init__(self, users: list[list[int]], *, sample_rate: float, steps: int, seed: int,
                 rows_per_user: int):
        self.users, self.sample_rate, self.steps = users, sample_rate, steps
        self.seed, self.rows = seed, rows_per_user
        self.pad_index = -1
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(seeds.derive(self.seed, seeds.USERS, self.epoch))
        for b in range(self.steps):
            chosen = (torch.rand(len(self.users), generator=g) < self.sample_rate).nonzero()
            batch: list[int] = []
            for u in chosen.reshape(-1).tolist():
                rows = self.users[u]
                pick = torch.randperm(len(rows), generator=g)[:self.rows].tolist()
                batch += [rows[i] for i in pick] + [self.pad_index] * (self.rows - len(pick))
            if b >= self.start:
                yield batch


def collate_with_padding(dataset: Dataset) -> Callable[[list], Batch]:
    """Stack :class:`~safelm.data.Batch` items; index -1 items arrive as None and become
    padding rows; an empty batch becomes correctly shaped empty tensors."""
    x0, y0 = dataset[0][:2]

    def pad_row() -> Batch:
        return Batch(torch.zeros_like(x0), torch.full_like(y0, PAD_LABEL), torch.tensor(1),
                     torch.tensor(PAD_LABEL))

    def collate(items: list) -> Batch:
        if not items:
            return Batch(torch.zeros((0, *x0.shape), dtype=x0.dtype),
                         torch.zeros((0, *y0.shape), dtype=y0.dtype),
                         torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        rows = [pad_row() if it is None else Batch(*it[:4]) for it in items]
        return Batch.collate(rows)
    return collate


class WithPadding(Dataset):
    """A dataset whose index -1 is the padding row (returned as None for the collate)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return None if i == -1 else self.base[i]
