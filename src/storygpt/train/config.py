"""Training configuration: the `TrainConfig` dataclass, named presets (model + training), TOML
files and `--set key=value` overrides.

A run's `config.json` has two sections, `model` (ModelConfig) and `train` (TrainConfig).
Precedence, lowest first: preset, `--config FILE.toml`, `--set key=value`.
"""

from __future__ import annotations

import json
import os
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from storygpt.errors import StoryGPTError
from storygpt.model.config import PRESETS as MODEL_PRESETS
from storygpt.model.config import ModelConfig


@dataclass
class TrainConfig:
    batch_size: int = 32            # sequences per micro-batch, per process (global batch: x grad_accum x ranks)
    seq_len: int = 256              # tokens per sequence (<= model.max_seq_len)
    grad_accum_steps: int = 1       # micro-batches per optimizer step
    max_steps: int = 5000           # optimizer steps; the schedule ends here
    max_time: float = 0.0           # minutes of training; 0 = no limit. When set, the schedule ends at it
    lr: float = 2e-3                # peak learning rate
    min_lr: float = 2e-4            # where the schedule ends
    warmup_steps: int = 100
    schedule: str = "cosine"        # cosine: warmup, cosine to min_lr | wsd: warmup, constant, (1 - sqrt) cooldown
    cooldown: float = 0.2           # wsd: the share of the run (steps, or time with max_time) the cooldown takes
    sampling: str = "random"        # random: windows anywhere | epochs: each story once per epoch, fresh order each
    ema_decay: float = 0.0          # an EMA of the weights (e.g. 0.999), evaluated beside them; 0 = off
    distill_alpha: float = 0.5      # with teachers: loss = (1 - alpha) CE + alpha T^2 KL(teachers || student)
    distill_temperature: float = 1.0
    weight_decay: float = 0.1       # on matrices only; norms, biases and other 1-D params get none
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # max global grad norm; 0 = off
    eval_interval: int = 250        # steps between validation runs
    eval_iters: int = 20            # fixed validation batches per run
    checkpoint_interval: int = 500  # steps between latest-checkpoint writes
    snapshot_from: int = 0          # keep the weights of each checkpoint from this step on (weight averaging); 0 = off
    log_interval: int = 10
    dtype: str = "auto"             # auto | bf16 | fp16 | fp32 (autocast compute dtype)
    compile: bool = False           # torch.compile the model
    device: str = "auto"            # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    seed: int = 1337
    strategy: str = "ddp"           # ddp | fsdp: data parallelism under torchrun (FSDP2 shards weights + optimizer)

    def validate(self) -> None:
        for name in ("batch_size", "seq_len", "grad_accum_steps", "max_steps", "eval_interval",
                     "eval_iters", "checkpoint_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise StoryGPTError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_time < 0:
            raise StoryGPTError(f"train.max_time must be >= 0 minutes, got {self.max_time}")
        if not (0 < self.lr < 1) or not (0 <= self.min_lr <= self.lr):
            raise StoryGPTError(f"need 0 < train.lr < 1 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.snapshot_from < 0:
            raise StoryGPTError("train.warmup_steps, weight_decay, grad_clip and snapshot_from must be >= 0")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise StoryGPTError(f"train.dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise StoryGPTError(f"train.strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise StoryGPTError(f"train.schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 < self.cooldown <= 1:
            raise StoryGPTError(f"train.cooldown must be in (0, 1], got {self.cooldown}")
        if self.sampling not in ("random", "epochs"):
            raise StoryGPTError(f"train.sampling must be random or epochs, got {self.sampling!r}")
        if not 0 <= self.ema_decay < 1:
            raise StoryGPTError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            raise StoryGPTError("need 0 <= train.distill_alpha <= 1 and train.distill_temperature > 0, got "
                                f"{self.distill_alpha} and {self.distill_temperature}")


# Training defaults per preset (the model shape comes from model.PRESETS).
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(batch_size=8, seq_len=64, max_steps=200, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                        eval_interval=50, eval_iters=4, checkpoint_interval=50),
    "small": TrainConfig(batch_size=16, seq_len=256, lr=2e-3, min_lr=2e-4, warmup_steps=50, eval_interval=100,
                         compile=True),
    "15m": TrainConfig(batch_size=128, seq_len=256, grad_accum_steps=4, max_steps=100_000, lr=5e-4,
                       min_lr=5e-5, warmup_steps=1000, eval_interval=2000, eval_iters=100,
                       checkpoint_interval=2000),
    "33m": TrainConfig(batch_size=64, seq_len=512, grad_accum_steps=4, max_steps=100_000, lr=5e-4,
                       min_lr=5e-5, warmup_steps=1000, eval_interval=2000, eval_iters=100,
                       checkpoint_interval=2000),
    "110m": TrainConfig(batch_size=32, seq_len=1024, grad_accum_steps=8, max_steps=200_000, lr=3e-4,
                        min_lr=3e-5, warmup_steps=2000, eval_interval=2000, eval_iters=100,
                        checkpoint_interval=2000),
}
assert TRAIN_PRESETS.keys() == MODEL_PRESETS.keys()


@dataclass
class RunConfig:
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> RunConfig:
        cfg = RunConfig(ModelConfig(), TrainConfig())
        return apply_sections(cfg, d, source)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def preset(name: str) -> RunConfig:
    if name not in MODEL_PRESETS:
        raise StoryGPTError(f"unknown preset {name!r}; choose from {', '.join(MODEL_PRESETS)}")
    return RunConfig(replace(MODEL_PRESETS[name]), replace(TRAIN_PRESETS[name]))


def load_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StoryGPTError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StoryGPTError(f"{path}: invalid TOML ({e})") from None


def apply_sections(cfg: RunConfig, d: dict, source: str) -> RunConfig:
    """Overlay a {"model": {...}, "train": {...}} mapping onto cfg, checking every key."""
    for section, values in d.items():
        if section not in ("model", "train"):
            raise StoryGPTError(f"{source}: unknown section [{section}] (expected [model] and [train])")
        if not isinstance(values, dict):
            raise StoryGPTError(f"{source}: [{section}] must be a table")
        for key, value in values.items():
            cfg = set_value(cfg, f"{section}.{key}", value, source)
    return cfg


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise StoryGPTError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def apply_overrides(cfg: RunConfig, items: list[str]) -> RunConfig:
    """Apply `--set key=value` items; key is `section.name` or a bare name unique to one section."""
    for item in items:
        key, value = parse_override(item)
        cfg = set_value(cfg, key, value, "--set")
    return cfg


def set_value(cfg: RunConfig, key: str, value, source: str) -> RunConfig:
    section, _, name = key.rpartition(".")
    sections = [section] if section else ["train", "model"]
    for sec in sections:
        if sec not in ("model", "train"):
            break
        obj = getattr(cfg, sec)
        field = next((f for f in fields(obj) if f.name == name), None)
        if field is None:
            continue
        coerced = _coerce(value, field.type, f"{sec}.{name}", source)
        new = replace(obj, **{name: coerced})  # ModelConfig re-validates itself here
        return RunConfig(**{**vars(cfg), sec: new})
    raise StoryGPTError(f"{source}: unknown config key {key!r}")


def _coerce(value, annotation, key: str, source: str):
    typ = _resolve(annotation)
    allow_none = isinstance(typ, tuple)
    if allow_none:
        typ = typ[0]
    if allow_none and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise StoryGPTError(f"{source}: {key} expects {typ.__name__}, got {value!r}") from None


def _resolve(annotation):
    """int | None -> (int,), plain types as they are (annotations are strings under __future__)."""
    names = {"int": int, "float": float, "bool": bool, "str": str}
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.split("|")]
        base = names[parts[0]]
        return (base,) if "None" in parts else base
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return (next(a for a in typing.get_args(annotation) if a is not type(None)),)
    return annotation


def build_config(preset_name: str = "small", config_file: str | None = None,
                 overrides: list[str] | None = None) -> RunConfig:
    cfg = preset(preset_name)
    if config_file:
        cfg = apply_sections(cfg, load_toml(config_file), str(config_file))
    cfg = apply_overrides(cfg, overrides or [])
    cfg.train.validate()
    return cfg
