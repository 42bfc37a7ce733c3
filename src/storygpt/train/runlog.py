"""A run's records: log.jsonl and log.csv (and TensorBoard when installed) as training goes, and loss.png
at the end (training and validation loss against tokens seen)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from storygpt.errors import StoryGPTError

LOG_FIELDS = ["step", "tokens", "time", "lr", "loss", "val_loss", "val_bpb", "tok_per_s"]


class RunLog:
    """Appends to log.jsonl and log.csv (and TensorBoard when installed)."""

    def __init__(self, run: Path, resume_step: int | None):
        self.jsonl, self.csv = run / "log.jsonl", run / "log.csv"
        if resume_step is None:
            for p in (self.jsonl, self.csv):
                p.unlink(missing_ok=True)
        else:  # drop what was logged after the checkpoint we resume from
            self._truncate(resume_step)
        new_csv = not self.csv.exists()
        self.csv_fh = open(self.csv, "a", newline="")
        self.csv_writer = csv.DictWriter(self.csv_fh, LOG_FIELDS)
        if new_csv:
            self.csv_writer.writeheader()
        self.jsonl_fh = open(self.jsonl, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            self.tb = None

    def _truncate(self, step: int) -> None:
        if self.jsonl.exists():
            keep = [line for line in self.jsonl.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            self.jsonl.write_text("".join(line + "\n" for line in keep))
        if self.csv.exists():
            with open(self.csv, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
            with open(self.csv, "w", newline="") as fh:
                w = csv.DictWriter(fh, LOG_FIELDS)
                w.writeheader()
                w.writerows(rows)

    def log(self, record: dict) -> None:
        """Append `record`; a write that fails (a full disk) raises StoryGPTError."""
        try:
            self.jsonl_fh.write(json.dumps(record) + "\n")
            self.jsonl_fh.flush()
            self.csv_writer.writerow({k: record.get(k, "") for k in LOG_FIELDS})
            self.csv_fh.flush()
        except OSError as e:
            raise StoryGPTError(f"{self.jsonl.parent}: could not write the training log ({e.strerror or e})") from None
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.jsonl_fh.close()
        self.csv_fh.close()
        if self.tb is not None:
            self.tb.close()


def read_log(run: str | os.PathLike) -> list[dict]:
    path = Path(run) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_losses(run: str | os.PathLike) -> Path | None:
    """Write RUN/loss.png: training and validation loss against tokens seen."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    records = read_log(run)
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="val", marker="o", ms=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run) / "loss.png"
    fig.savefig(out)
    return out
