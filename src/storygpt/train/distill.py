"""Distillation from teachers: models trained on the same data (same tokenizer) whose softened next-token
distributions the student learns from as well as from the data.

The loss of a micro-batch is `(1 - alpha) * CE + alpha * T^2 * KL(p || q)`, where p is the mean of the
teachers' softmax(logits / T) and q the student's softmax(logits / T) (Hinton et al. 2015; the T^2 keeps the
gradient's scale as T changes). Positions whose target is -1 (masked instructions) carry neither term.
The teachers run in eval mode (no dropout), under the student's autocast, without gradients.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from storygpt.errors import StoryGPTError
from storygpt.model.load import load_model


def load_teachers(paths: list[str | os.PathLike], tokenizer_checksum: str, vocab_size: int,
                  device: torch.device) -> list[torch.nn.Module]:
    """The teachers in eval mode on `device`, frozen; each must have the data's tokenizer."""
    teachers = []
    for path in paths:
        model, tokenizer, _ = load_model(path, device=device, dtype=torch.float32)
        if tokenizer.checksum != tokenizer_checksum or model.cfg.vocab_size != vocab_size:
            raise StoryGPTError(f"{path}: the teacher's tokenizer is not the data's (checksum mismatch); "
                                "a teacher must share the student's tokenizer")
        model.requires_grad_(False)
        teachers.append(model.eval())
    return teachers


@torch.no_grad()
def teacher_probs(teachers: list, x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """The mean of the teachers' softened next-token distributions, (B, T, vocab) in fp32."""
    probs = None
    for teacher in teachers:
        logits, _ = teacher(x, y)  # with targets: logits at every position
        p = torch.softmax(logits.float() / temperature, dim=-1)
        probs = p if probs is None else probs.add_(p)
    return probs.div_(len(teachers))


def kl_loss(probs: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the counted positions of KL(probs || softmax(logits / T))."""
    log_q = torch.log_softmax(logits.float() / temperature, dim=-1)
    kl = (probs * (probs.clamp_min(1e-30).log() - log_q)).sum(-1)
    keep = y != -1
    return kl[keep].mean()


def distill_loss(ce: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, y: torch.Tensor, alpha: float,
                 temperature: float) -> torch.Tensor:
    """(1 - alpha) * CE + alpha * T^2 * KL(teachers || student)."""
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl_loss(probs, logits, y, temperature)


def teacher_paths(paths: list[str | os.PathLike] | None) -> list[str]:
    """Absolute paths of the teachers (kept in the run's config.json, for --resume)."""
    return [str(Path(p).resolve()) for p in paths or []]
