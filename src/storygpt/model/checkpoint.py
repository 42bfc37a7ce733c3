"""Training checkpoints, in a run directory (what `storygpt train --out RUN` writes):

    RUN/config.json        {"model": ..., "train": ..., "data": ...}
    RUN/tokenizer/         the tokenizer of the data
    RUN/ckpt_latest.pt     weights + optimizer + step + RNG states (written atomically, read back before it
                           takes the place of the one before)
    RUN/ckpt_prev.pt       the one before it, kept until a newer one is written and read back: what --resume
                           goes on from when ckpt_latest.pt does not load
    RUN/ckpt_best.pt       the same, at the best validation loss so far
    RUN/ckpt_*.dcp-*/      FSDP runs: the weights and optimizer state sharded by torch.distributed.checkpoint;
                           ckpt_*.pt then holds everything else, the folder's name ("dcp") and the size and
                           sha256 of each of its files ("dcp_files")
    RUN/log.jsonl, log.csv, loss.png
    RUN/model/             the exported best model (a model directory, model_dir.py)
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_write

from .config import ModelConfig
from .transformer import Transformer

LATEST = "ckpt_latest.pt"
PREV = "ckpt_prev.pt"
BEST = "ckpt_best.pt"


def save_checkpoint(path: str | os.PathLike, state: dict, prev: str | os.PathLike | None = None) -> None:
    """Write `state` (a dict with a "step") to `path` atomically, and read it back before it replaces the file
    there; with `prev`, that file is kept as `prev` (the checkpoint before). A write that fails (a full disk)
    raises StoryGPTError and leaves `path` and `prev` as they were, with no half-written file beside them."""
    def write(tmp):
        with open(tmp, "wb") as fh:  # a file object: a full disk raises OSError(ENOSPC), not torch's RuntimeError
            torch.save(state, fh)

    try:
        atomic_write(path, write, check=lambda tmp: read_back(tmp, state["step"]), keep_old_as=prev)
    except OSError as e:
        raise StoryGPTError(f"{path}: could not write the checkpoint ({e.strerror or e}); the checkpoints "
                            "already there are kept") from None


def read_back(path: str | os.PathLike, step: int) -> None:
    """A checkpoint just written loads (its tensors mapped, not read: cheap) and holds `step`; else OSError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise OSError(f"it does not read back: {type(e).__name__}") from None
    if not isinstance(state, dict) or state.get("step") != step:
        raise OSError("it reads back as another checkpoint")


def load_checkpoint(path: str | os.PathLike, verify: bool = False) -> dict:
    """A checkpoint file's dict; StoryGPTError when it is missing, does not load or is not a storygpt checkpoint.

    verify: a sharded checkpoint's files are also checked against the sizes and sha256 recorded when they were
    written (reads them all; --resume does, to go on from the newest checkpoint that is whole).
    """
    path = Path(path)
    if not path.is_file():
        raise StoryGPTError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoryGPTError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or not ("model" in state or "dcp" in state) or "step" not in state:
        raise StoryGPTError(f"{path}: not a storygpt checkpoint")
    if "dcp" in state and not (path.parent / state["dcp"] / ".metadata").is_file():
        raise StoryGPTError(f"{path}: its sharded weights ({state['dcp']}/) are missing or incomplete")
    if verify and "dcp" in state:
        check_shard_files(path.parent / state["dcp"], state.get("dcp_files"))
    return state


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def shard_files(folder: str | os.PathLike) -> dict[str, list]:
    """{name: [size, sha256]} of each file of a sharded checkpoint just written (so reading them back), once
    its .metadata is checked to name only data that its files hold; else StoryGPTError."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = Path(folder)
    try:
        files = {p.name: [p.stat().st_size, sha256(p)] for p in sorted(folder.iterdir()) if p.is_file()}
        items = FileSystemReader(str(folder)).read_metadata().storage_data.values()
    except Exception as e:
        raise StoryGPTError(f"{folder}: the sharded checkpoint does not read back ({type(e).__name__})") from None
    for item in items:
        if item.offset + item.length > files.get(item.relative_path, [0])[0]:
            raise StoryGPTError(f"{folder / item.relative_path}: shorter than the checkpoint's .metadata says")
    return files


def check_shard_files(folder: Path, files: dict | None) -> None:
    """The folder's files are as shard_files recorded them (size first, then sha256); StoryGPTError if one is
    not. Checkpoints written before sizes and checksums were recorded pass."""
    for name, (size, digest) in (files or {}).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size or sha256(p) != digest:
            raise StoryGPTError(f"{p}: missing, truncated or corrupt (not the file written with the checkpoint)")


def sharded_folder(path: str | os.PathLike) -> str | None:
    """The name of the sharded folder that checkpoint file `path` points to; None when it names none or
    does not load."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors mapped, not read
    except Exception:
        return None
    return state.get("dcp") if isinstance(state, dict) else None


def checkpoint_weights(path: str | os.PathLike, ckpt: dict, cfg: ModelConfig) -> dict:
    """A checkpoint's full model state dict: stored in it, or read whole from its sharded folder (FSDP runs).

    Reading a sharded folder needs no process group, so any single process can do it (export, eval).
    """
    if "model" in ckpt:
        return ckpt["model"]
    model = Transformer(cfg)
    load_sharded(Path(path).parent / ckpt["dcp"], model, None, collective=False)
    return model.state_dict()


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): torch.distributed.checkpoint, one file per rank, any world size on load
# (distributed.save_sharded_checkpoint writes them during training; any process can read them here)
# --------------------------------------------------------------------------------------------
def save_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Every rank writes its shards of the weights and optimizer state into the folder `path` (collective).

    An optimizer that has not stepped yet has no state, and is left out: asking torch for its state
    dict would make it initialize the state with a zero-lr step, which shifts Adam's bias correction.
    Returns whether the optimizer state was saved. A write that fails on any rank (a full disk) raises
    StoryGPTError on every rank, and leaves what was written in the folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer.state:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        dcp.save(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # dcp gathers every rank's failure and raises it on all ranks
        raise StoryGPTError(f"{path}: could not write the sharded checkpoint ({dcp_failure(e)}); the checkpoints "
                            "already there are kept") from None
    return "optim" in state


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 collective: bool) -> None:
    """Load a sharded checkpoint into `model` (and `optimizer`, when given), whatever world size wrote it.

    collective: True when `model` is FSDP-sharded over the current process group (all ranks call this
    together); False for a plain model, which each process then reads whole on its own.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        _load_sharded(path, model, optimizer, collective)
    except CheckpointException as e:  # a BaseException whose text is every rank's traceback: one line instead
        raise StoryGPTError(f"{path}: the sharded checkpoint does not load ({dcp_failure(e)})") from None


def dcp_failure(e: BaseException) -> str:
    """One line for an error of torch.distributed.checkpoint: the first failing rank's exception."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _load_sharded(path, model: torch.nn.Module, optimizer, collective: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    with warnings.catch_warnings():  # "torch.distributed is uninitialized, assuming a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=str(path), no_dist=not collective)
            set_model_state_dict(model, state["model"])
            return
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path), no_dist=not collective)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
