"""LoRA adapters of storygpt models, with the PEFT library.

`storygpt finetune --lora R` trains a PEFT LoRA (`peft.LoraConfig` + `get_peft_model`) on the attention
projections (`wqkv`: queries, keys and values in one matrix; `wo`) and the MLP's (`w_gate_up`, `w_down`; gpt2:
`w_up`, `w_down`) of storygpt's Transformer, and saves it as an adapter folder:

    adapter_config.json, adapter_model.safetensors   PEFT's format (`save_pretrained`), storygpt's module names
    storygpt.json                                    the base model (as given, or "default"), the tokenizer
                                                     checksum, what the data recorded (e.g. `instruct`), the run

`storygpt.load(ADAPTER)` (checkpoint.load_model) loads the base model, checks that the adapter fits it (module
names, shapes, tokenizer) and merges the adapter into its weights (`merge_and_unload`): a plain Transformer,
as fast as the base model. PEFT is imported only when an adapter is made or loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from storygpt.errors import StoryGPTError
from storygpt.text.tokenizer import Tokenizer

from .config import ModelConfig
from .transformer import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SPEC = "storygpt.json"
PREFIX = "base_model.model."  # PEFT's prefix of the wrapped model's module names in adapter files


def lora_targets(cfg: ModelConfig) -> list[str]:
    """The module names LoRA adapts: attention q/k/v (fused) and output, the MLP's projections."""
    return ["wqkv", "wo", "w_gate_up", "w_down"] if cfg.arch == "llama" else ["wqkv", "wo", "w_up", "w_down"]


def lora_settings(r: int, alpha: float | None, dropout: float, cfg: ModelConfig) -> dict:
    """The LoRA settings a run records (alpha defaults to 2 r), checked."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise StoryGPTError(f"--lora must be a rank >= 1, got {r}")
    alpha = 2 * r if alpha is None else alpha
    if not alpha > 0:
        raise StoryGPTError(f"--lora-alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise StoryGPTError(f"--lora-dropout must be in [0, 1), got {dropout}")
    return {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": lora_targets(cfg)}


def wrap_lora(model: Transformer, lora: dict):
    """`model` inside a PEFT LoRA (`get_peft_model`): base weights frozen, A random, B zero (so the wrapped
    model computes what `model` does until it trains)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["target_modules"]))
    return get_peft_model(model, config)


def merge_lora_state(cfg: ModelConfig, state: dict, lora: dict) -> dict:
    """The plain Transformer weights of a LoRA run's checkpoint (a PEFT model's state dict), merged."""
    net = wrap_lora(Transformer(cfg), lora)
    net.load_state_dict(state)
    return net.merge_and_unload().state_dict()


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def write_adapter(peft_model, folder: str | os.PathLike, spec: dict) -> Path:
    """PEFT's adapter files (`save_pretrained`) and storygpt.json into `folder`."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder))
    (folder / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------------------------
# Reading adapter folders
# --------------------------------------------------------------------------------------------
def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_spec(path: str | os.PathLike) -> dict:
    """storygpt.json of an adapter folder, its LoRA config (`lora`: PEFT's adapter_config.json) checked."""
    path = Path(path)
    if not (path / SPEC).is_file():
        raise StoryGPTError(f"{path}: a PEFT adapter without {SPEC}, which names its base model "
                            "(storygpt finetune --lora writes both)")
    try:
        spec = json.loads((path / SPEC).read_text())
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        spec["base_model"], spec["tokenizer_sha256"]  # noqa: B018 - required keys
    except (json.JSONDecodeError, KeyError, TypeError):
        raise StoryGPTError(f"{path}: corrupt adapter ({SPEC} or {ADAPTER_CONFIG})") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
        raise StoryGPTError(f"{path}: only plain LoRA adapters load (this one: {config.get('peft_type')})")
    return {**spec, "lora": {**(spec.get("lora") or {}), "r": config["r"], "alpha": config["lora_alpha"]}}


def find_base(path: Path, spec: dict) -> Path:
    """The base model's folder: the absolute path recorded, else the path relative to the adapter folder,
    else the path as given (relative to the working directory). "default" is resolved by the caller."""
    given = spec["base_model"]
    candidates = [spec.get("base_model_path"), spec.get("base_model_relative") and path / spec["base_model_relative"],
                  given]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    raise StoryGPTError(f"{path}: its base model {given} is missing (storygpt.json names it; the adapter needs it)")


def apply_adapter(net: Transformer, tokenizer: Tokenizer, path: Path, spec: dict) -> Transformer:
    """`net` (the base model) with the adapter merged into its weights, after checking that the adapter
    fits it: the tokenizer, the module names and every tensor's shape."""
    from peft import PeftModel

    checked_tensors(net, tokenizer, path, spec)
    merged = PeftModel.from_pretrained(net, str(path)).merge_and_unload()
    if not isinstance(merged, Transformer):
        raise StoryGPTError(f"{path}: the adapter did not merge into a storygpt model")
    return merged


def checked_tensors(net: Transformer, tokenizer: Tokenizer, path: Path, spec: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors, once checked to fit `net` and its tokenizer."""
    if tokenizer.checksum != spec["tokenizer_sha256"]:
        raise StoryGPTError(f"{path}: adapter does not fit its base model {spec['base_model']}: it was trained "
                            "with another tokenizer (checksum mismatch)")
    tensors = lora_tensors(path)
    check_fits(net, tensors, path, spec)
    return tensors


def lora_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An adapter's tensors by PEFT's names (`base_model.model.layers.0.attn.wqkv.lora_A.weight`, ...)."""
    file = Path(path) / ADAPTER_WEIGHTS
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise StoryGPTError(f"{file}: missing or corrupt adapter weights ({str(e).splitlines()[0]})") from None


def check_fits(net: Transformer, tensors: dict[str, torch.Tensor], path: Path, spec: dict) -> None:
    """Every tensor is a lora_A (r, in) or lora_B (out, r) of a Linear layer that `net` has."""
    r = spec["lora"]["r"]
    unfit = f"{path}: adapter does not fit its base model {spec['base_model']}"
    if not tensors:
        raise StoryGPTError(f"{unfit}: it holds no tensors")
    for key, t in tensors.items():
        name, dot, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or not dot or kind not in ("A.weight", "B.weight"):
            raise StoryGPTError(f"{unfit}: unexpected tensor {key}")
        try:
            layer = net.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, torch.nn.Linear):
            raise StoryGPTError(f"{unfit}: the base model has no layer {name}")
        want = (r, layer.in_features) if kind == "A.weight" else (layer.out_features, r)
        if tuple(t.shape) != want:
            raise StoryGPTError(f"{unfit}: {key} has shape {list(t.shape)}, the base model needs {list(want)}")


def adapter_info(base_info: dict, spec: dict, path: Path) -> dict:
    """What `storygpt.load()` reports for an adapter: the run's facts from storygpt.json (val loss, training
    settings, `instruct`, ...) over the base model's (its own evaluations left out: they are the base's)."""
    base = {k: v for k, v in base_info.items() if k not in ("evals", "suite", "instruct")}
    own = {k: v for k, v in spec.items() if k not in ("base_model_path", "base_model_relative", "tokenizer_sha256")}
    return base | own | {"adapter": {"path": str(path), "base_model": spec["base_model"], "lora": spec["lora"]}}
