"""Validation during training: the mean loss over fixed batches (on one process, or with the rows spread
over the ranks of a distributed run), and the instruction gain of instruction data. Targets of -1 (the
instruction tokens of masked data) carry no loss and are not counted."""

from __future__ import annotations

import numpy as np
import torch

from storygpt.errors import StoryGPTError
from storygpt.model.device import autocast

from .distributed import Dist


def counted(y: torch.Tensor) -> int:
    """Targets that carry loss (-1: an instruction token of masked data, ignored by the model's loss)."""
    return int((y != -1).sum())


@torch.inference_mode()
def evaluate_batches(model: torch.nn.Module, batches, device: torch.device, dtype: str) -> float:
    """Mean loss over fixed batches (model put back in train mode afterwards)."""
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train()
    return float(np.mean(losses))


@torch.no_grad()  # not inference_mode: FSDP2 would keep inference tensors as its unsharded weights
def evaluate_rows(model: torch.nn.Module, batches, device: torch.device, dtype: str, d: Dist) -> float:
    """Mean loss over fixed batches whose rows are spread over the ranks (see rank_rows).

    Each batch's loss is the ranks' losses weighted by the targets they count, so the result is what one
    process computes on the whole batches. Every rank runs the same number of forwards (FSDP's are
    collective), also on rows whose targets are all masked.
    """
    model.eval()
    sums = torch.zeros(len(batches), 2, dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        n = counted(y)
        if n:
            sums[i, 0], sums[i, 1] = loss.item() * n, n
    model.train()
    sums = d.all_sum(sums.to(d.device)).cpu()
    return float((sums[:, 0] / sums[:, 1]).mean())


@torch.no_grad()
def instruction_gain(model: torch.nn.Module, own: list, other: list, device: torch.device, dtype: str) -> float:
    """Nats per story token that instructions are worth to the model: the stories' loss after another
    record's instruction minus after their own (`data.instruction_pairs`); every rank computes it whole."""
    model.eval()
    totals = []
    for batches in (own, other):
        nats = tokens = 0.0
        for x, y in batches:
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            nats, tokens = nats + loss.item() * counted(y), tokens + counted(y)
        totals.append(nats / tokens)
    model.train()
    return totals[1] - totals[0]


def rank_rows(batches: list[tuple[torch.Tensor, torch.Tensor]], d: Dist) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's rows (every world_size-th) of each batch; a batch with fewer rows than ranks is dropped."""
    mine = [(x[d.rank::d.world_size].clone(), y[d.rank::d.world_size].clone())
            for x, y in batches if len(x) >= d.world_size]
    if not mine:
        raise StoryGPTError(f"the val split is too small to give each of {d.world_size} ranks a sequence")
    return mine
