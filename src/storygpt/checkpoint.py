"""Files that hold a model: training checkpoints (in a run directory) and model directories.

Run directory (what `storygpt train --out RUN` writes):
    RUN/config.json        {"model": ..., "train": ..., "data": ...}
    RUN/tokenizer/         the tokenizer of the data
    RUN/ckpt_latest.pt     weights + optimizer + step + RNG states (written atomically)
    RUN/ckpt_best.pt       the same, at the best validation loss so far
    RUN/ckpt_*.dcp-*/      FSDP runs: the weights and optimizer state sharded by torch.distributed.checkpoint;
                           ckpt_*.pt then holds everything else and the folder's name ("dcp")
    RUN/log.jsonl, log.csv, loss.png
    RUN/model/             the exported best model (a model directory)

Model directory (no pickles, loadable anywhere):
    config.json            {"model": ModelConfig, "storygpt": {...facts: params, val loss, bpb...}}
    model.safetensors
    tokenizer.model, tokenizer.json

Adapter folder (`storygpt finetune --lora`, RUN/adapter; see adapters.py): a PEFT LoRA adapter and storygpt.json
naming its base model; loading one loads the base and merges the adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import adapters
from .errors import StoryGPTError
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer

LATEST = "ckpt_latest.pt"
BEST = "ckpt_best.pt"
WEIGHTS = "model.safetensors"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), fsync it, then rename it over `path`: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result gets a normal file's permissions
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside `path` to fill; when the block ends without an error it replaces `path`
    (an old one is removed), otherwise it is deleted: `path` is the old folder or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield work
        if path.exists():
            shutil.rmtree(path)
        os.replace(work, path)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
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
    return state


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
    Returns whether the optimizer state was saved.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer.state:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))
    return "optim" in state


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 collective: bool) -> None:
    """Load a sharded checkpoint into `model` (and `optimizer`, when given), whatever world size wrote it.

    collective: True when `model` is FSDP-sharded over the current process group (all ranks call this
    together); False for a plain model, which each process then reads whole on its own.
    """
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



# --------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------
def save_model_dir(out: str | os.PathLike, model_cfg: ModelConfig, state_dict: dict, tokenizer: Tokenizer,
                   info: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a model directory; tied weights are stored once. `dtype` casts floating weights (e.g. fp16)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in state_dict.items():
        if model_cfg.tie_embeddings and k == "output.weight":
            continue
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    tokenizer.save(out)
    meta = {"model": model_cfg.to_dict(), "storygpt": info or {}}
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


RECORD_NEEDS = "--record needs a model directory (a run's is RUN/model)"


def read_model_info(model_dir: str | os.PathLike, problem: str = "not a model directory") -> dict:
    """The storygpt section of a model directory's config.json; StoryGPTError "{model_dir}: {problem}"
    when `model_dir` is not a model directory."""
    return _model_config(model_dir, problem)[1].get("storygpt", {})


def edit_model_info(model_dir: str | os.PathLike, edit: Callable[[dict], None],
                    problem: str = "not a model directory") -> None:
    """Let `edit` change the storygpt section of a model directory's config.json, and write it back atomically."""
    path, meta = _model_config(model_dir, problem)
    edit(meta.setdefault("storygpt", {}))
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))


def _model_config(model_dir: str | os.PathLike, problem: str) -> tuple[Path, dict]:
    path = Path(model_dir) / "config.json"
    if not (Path(model_dir) / WEIGHTS).is_file() or not path.is_file():
        raise StoryGPTError(f"{model_dir}: {problem}")
    return path, json.loads(path.read_text())


def record_eval(model_dir: str | os.PathLike, name: str, result: dict) -> None:
    """Keep an evaluation result in a model directory's config.json (under storygpt.evals[name]), so the
    model carries its measured quality with it (the web app and `facts()` show it)."""
    keep = {k: result[k] for k in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "context")}
    edit_model_info(model_dir, lambda info: info.setdefault("evals", {}).update({name: keep}), RECORD_NEEDS)


def record_suite(model_dir: str | os.PathLike, result: dict, settings: dict) -> None:
    """Keep a story-quality suite result (`eval --suite stories --record`) in a model directory's
    config.json, under storygpt.suite: the measures (without the sample stories) and the settings."""
    measures = {k: v for k, v in result.items() if k not in ("samples", "path")}
    edit_model_info(model_dir, lambda info: info.update(suite={"measures": measures, "settings": settings}),
                    RECORD_NEEDS)


DEFAULT_MODEL = Path(__file__).parent / "default_model"


def default_model_path() -> Path:
    """The model installed with the package (src/storygpt/default_model)."""
    if not (DEFAULT_MODEL / WEIGHTS).is_file():
        raise StoryGPTError("no default model is installed with this copy of storygpt; pass --model DIR")
    return DEFAULT_MODEL


INSTRUCT_MODEL = Path(__file__).parent / "instruct_model"
SHIPPED_MODELS = ("default", "instruct")  # the names `--model` and `storygpt.load()` take for the shipped models


def instruct_model_installed() -> bool:
    """Whether the instruction-tuned model ships with this copy (src/storygpt/instruct_model: a model
    directory, or an adapter folder over the default model)."""
    return (INSTRUCT_MODEL / WEIGHTS).is_file() or (INSTRUCT_MODEL / "adapter_config.json").is_file()


def instruct_model_path() -> Path:
    """The instruction-tuned model installed with the package (src/storygpt/instruct_model)."""
    if not instruct_model_installed():
        raise StoryGPTError("no instruct model is installed with this copy of storygpt; pass --model DIR of an "
                            "instruction-tuned model")
    return INSTRUCT_MODEL


def shipped_or(path: str | os.PathLike | None) -> str | os.PathLike:
    """`path` itself, except None or "default" (the shipped model) and "instruct" (the shipped instruct model),
    which name the models installed with the package (a folder of that name is ./default, ./instruct)."""
    if path is None or str(path) == "default":
        return default_model_path()
    if str(path) == "instruct":
        return instruct_model_path()
    return path


def trained_context(cfg: ModelConfig, info: dict) -> int:
    """The context a model can be used with: the training seq_len recorded with it, at most max_seq_len
    (RoPE does not extrapolate past what it was trained on)."""
    return min(cfg.max_seq_len, info.get("train", {}).get("seq_len") or cfg.max_seq_len)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model directory, an adapter folder, or a run directory (its exported model or adapter, else its
    best/latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise StoryGPTError(f"{path}: no such model or run directory")
    if path.is_file():
        raise StoryGPTError(f"{path}: expected a model or run directory, got a file")
    if (path / WEIGHTS).is_file() or adapters.is_adapter_dir(path):
        return path
    if (path / "model" / WEIGHTS).is_file():
        return path / "model"
    if adapters.is_adapter_dir(path / "adapter"):
        return path / "adapter"
    if (path / BEST).is_file() or (path / LATEST).is_file():
        return path
    raise StoryGPTError(f"{path}: not a model directory (no {WEIGHTS}) nor a run directory (no checkpoint)")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer, dict]:
    """Load (model in eval mode, tokenizer, info) from a model directory, an adapter folder or a run directory."""
    path = resolve_model_path(path)
    if adapters.is_adapter_dir(path):
        return load_adapter(path, device, dtype)
    if (path / WEIGHTS).is_file():
        cfg_path = path / "config.json"
        try:
            meta = json.loads(cfg_path.read_text())
            cfg = ModelConfig.from_dict(meta["model"])
        except FileNotFoundError:
            raise StoryGPTError(f"{path}: model directory has no config.json") from None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StoryGPTError(f"{cfg_path}: not a storygpt model config") from None
        try:
            state = load_file(str(path / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as e:
            raise StoryGPTError(f"{path / WEIGHTS}: corrupt weights file ({str(e).splitlines()[0]})") from None
        info = meta.get("storygpt", {})
        tokenizer = Tokenizer.load(path)
    else:
        ckpt_path = path / (BEST if (path / BEST).is_file() else LATEST)
        ckpt = load_checkpoint(ckpt_path)
        cfg = ModelConfig.from_dict(ckpt["config"]["model"])
        state = checkpoint_weights(ckpt_path, ckpt, cfg)
        if (ckpt.get("finetune") or {}).get("lora"):  # a LoRA run's checkpoint: a PEFT model's weights
            state = adapters.merge_lora_state(cfg, state, ckpt["finetune"]["lora"])
        info = {"step": ckpt["step"], "val_loss": ckpt.get("best_val_loss"), "train": ckpt["config"]["train"]}
        tokenizer = Tokenizer.load(path / "tokenizer")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise StoryGPTError(f"{path}: tokenizer vocab ({tokenizer.vocab_size}) does not match the model ({cfg.vocab_size})")
    model = Transformer(cfg)
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "output.weight"}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise StoryGPTError(f"{path}: weights do not match the config ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise StoryGPTError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer, info


def load_adapter(path: Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer, dict]:
    """An adapter folder: its base model (a path, or "default") with the adapter merged in (see adapters.py)."""
    spec = adapters.read_spec(path)
    net, tokenizer, info = load_model(adapter_base(path, spec))
    net = adapters.apply_adapter(net, tokenizer, path, spec)
    return net.to(device=device, dtype=dtype).eval(), tokenizer, adapters.adapter_info(info, spec, path)


def adapter_base(path: Path, spec: dict) -> Path:
    """The folder of an adapter's base model (storygpt.json's `base_model`: a path, or "default")."""
    return default_model_path() if spec["base_model"] == "default" else adapters.find_base(path, spec)
