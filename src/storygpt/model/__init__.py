"""The model: its config and presets, the transformer, attention kernels, the KV cache, int8 weights, LoRA
adapters, the devices and precisions it runs in, and the files that hold it.

- config.py: `ModelConfig` and the named shapes `PRESETS`;
- transformer.py: `Transformer` (LLaMA or GPT-2 style); attention.py, cache.py: what it decodes with;
- quantize.py: weight-only int8; adapters.py: LoRA through PEFT; device.py: devices and dtypes;
- checkpoint.py: training checkpoints; model_dir.py: model directories; load.py: `load_model` and the shipped models.
"""

from .cache import KVCache, RowsCache
from .checkpoint import BEST, LATEST, load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig
from .device import DTYPES, pick_device, pick_dtype
from .load import SHIPPED_MODELS, default_model_path, instruct_model_path, load_model, resolve_model_path, shipped_or
from .model_dir import WEIGHTS, read_model_info, save_model_dir
from .quantize import quantize_int8
from .transformer import Transformer

__all__ = ["BEST", "DTYPES", "KVCache", "LATEST", "ModelConfig", "PRESETS", "RowsCache", "SHIPPED_MODELS",
           "Transformer", "WEIGHTS", "default_model_path", "instruct_model_path", "load_checkpoint", "load_model",
           "pick_device", "pick_dtype", "quantize_int8", "read_model_info", "resolve_model_path", "save_checkpoint",
           "save_model_dir", "shipped_or"]
