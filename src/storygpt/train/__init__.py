"""Training: from scratch (`train`) or further (`finetune`), on one process or many.

- config.py: `RunConfig`, `TrainConfig` and the named presets; pretrain.py: `train`; finetune.py: `finetune`;
- loop.py: the loop both share; validation.py: its validation; runstate.py, runlog.py: a run's state, checkpoints, logs;
  progress.py: its progress on stderr;
- distributed.py: DDP and FSDP2 under torchrun; averaging.py: weight averages; distill.py: distillation from teachers.
"""

from .averaging import average_snapshots
from .config import RunConfig, TrainConfig, build_config
from .finetune import finetune
from .pretrain import train
from .runlog import read_log

__all__ = ["RunConfig", "TrainConfig", "average_snapshots", "build_config", "finetune", "read_log", "train"]
