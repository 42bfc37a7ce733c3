"""Training faults (issue 28): ckpt_prev.pt is kept until a newer checkpoint is written and read back; --resume
falls back to it when ckpt_latest.pt (or a shard of a sharded checkpoint) does not load, and the run still ends
exactly as an uninterrupted one; a write that fails (a full disk, simulated) keeps the old checkpoints and ends
the run with one line. Progress written to a file is a few plain lines, not a carriage return per step."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli

import storygpt.model.checkpoint as checkpoint
from storygpt.model.checkpoint import LATEST, PREV, load_checkpoint
from storygpt.progress import PlainProgress
from storygpt.train.pretrain import train

# checkpoints at steps 10 and 20; stopped after 25, ckpt_prev.pt is step 20's
STEPS, UNTIL, SETTINGS = 30, 25, ["checkpoint_interval=10", "eval_interval=10", "eval_iters=2", "log_interval=5",
                                  "model.dropout=0.1"]
FSDP_SETTINGS = ["checkpoint_interval=4", "eval_interval=6", "eval_iters=2", "log_interval=1", "warmup_steps=2",
                 "batch_size=8", "model.dropout=0.0"]


def tiny(data, run, overrides, **kw):
    return train(data, run, preset="tiny", max_steps=kw.pop("max_steps", STEPS), compile=False, dtype="fp32",
                 progress=False, overrides=overrides, **kw)


def val_losses(run) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if "val_loss" in r}


def visible_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("straight") / "run"
    tiny(data_dir, run, SETTINGS)
    return run


def test_truncated_latest_resumes_from_prev_exactly(tmp_path, data_dir, straight, capsys):
    run = tmp_path / "run"
    tiny(data_dir, run, SETTINGS, until_step=UNTIL)
    assert load_checkpoint(run / LATEST)["step"] == UNTIL and load_checkpoint(run / PREV)["step"] == 20
    truncate(run / LATEST)
    code, out, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    assert code == 0, err
    warning = visible_lines(err)
    assert len(warning) == 1 and warning[0].startswith("storygpt: warning: skipped"), err
    assert all(s in warning[0] for s in ("ckpt_latest.pt", "corrupt or truncated", "ckpt_prev.pt at step 20",
                                         "costs 5 steps"))
    summary = json.loads(out)
    assert summary["step"] == STEPS
    assert summary["best_val_loss"] == json.loads((straight / "summary.json").read_text())["best_val_loss"]
    assert val_losses(run) == val_losses(straight)  # the staged run's eval at step 25 is dropped with the log after 20
    a, b = load_checkpoint(straight / LATEST)["model"], load_checkpoint(run / LATEST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the bad latest was not kept as ckpt_prev.pt: the one before the end is a good checkpoint again
    assert load_checkpoint(run / PREV)["step"] in (20, STEPS)


def test_no_checkpoint_loads(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    tiny(data_dir, run, SETTINGS, until_step=12)
    truncate(run / LATEST)
    truncate(run / PREV)
    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    assert code == 2 and len(visible_lines(err)) == 1 and "Traceback" not in err
    assert "no checkpoint of" in err and "ckpt_latest.pt" in err and "ckpt_prev.pt" in err


def full_disk_after(n_bytes: int):
    """torch.save that writes `n_bytes` of the checkpoint, then fails as a full disk does."""
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:n_bytes])
        raise OSError(errno.ENOSPC, "No space left on device")
    real_save = torch.save
    return save


def test_failed_write_keeps_the_old_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    run = tmp_path / "run"
    tiny(data_dir, run, SETTINGS, until_step=12)
    before = {p.name: p.read_bytes() for p in run.glob("ckpt_*.pt")}
    assert set(before) == {LATEST, PREV, "ckpt_best.pt"}
    monkeypatch.setattr(torch, "save", full_disk_after(1000))
    code, out, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    assert code == 2 and out == ""
    lines = visible_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("storygpt: error: ") and "No space left on device" in lines[0]
    assert {p.name: p.read_bytes() for p in run.glob("ckpt_*.pt")} == before  # nothing half-written in place
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    monkeypatch.undo()
    assert tiny(None, run, [], resume=True)["step"] == STEPS  # and the run goes on from there


def test_written_checkpoint_is_read_back(tmp_path, monkeypatch):
    path = tmp_path / LATEST
    checkpoint.save_checkpoint(path, {"model": {}, "step": 1})
    def bad_read_back(tmp, step):
        raise OSError("it reads back wrong")

    monkeypatch.setattr(checkpoint, "read_back", bad_read_back)
    with pytest.raises(checkpoint.StoryGPTError, match="reads back wrong"):
        checkpoint.save_checkpoint(path, {"model": {}, "step": 2}, prev=tmp_path / PREV)
    assert load_checkpoint(path)["step"] == 1 and not (tmp_path / PREV).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST]


@pytest.fixture(scope="module")
def fsdp_straight(tmp_path_factory, data_dir):
    """One process, the FSDP tests' settings (test_distributed.py), no sharding: what the sharded runs match."""
    run = tmp_path_factory.mktemp("fsdp_straight") / "run"
    tiny(data_dir, run, FSDP_SETTINGS, max_steps=12)
    return run


def test_corrupt_shard_resumes_from_prev(tmp_path, data_dir, fsdp_straight, capsys):
    """--strategy fsdp without torchrun is a world of one that writes sharded checkpoints (test_distributed.py)."""
    run = tmp_path / "run"
    tiny(data_dir, run, FSDP_SETTINGS + ["strategy=fsdp"], max_steps=12, until_step=5)
    latest, prev = load_checkpoint(run / LATEST), load_checkpoint(run / PREV)
    assert (latest["step"], prev["step"]) == (5, 4) and latest["dcp"] != prev["dcp"]
    assert sorted(p.name for p in run.glob("ckpt_latest.dcp-*")) == sorted([latest["dcp"], prev["dcp"]])
    truncate(run / latest["dcp"] / "__0_0.distcp")
    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    assert code == 0, err
    assert "skipped" in err and "__0_0.distcp" in err and "ckpt_prev.pt at step 4 costs 1 step " in err
    got, want = val_losses(run), val_losses(fsdp_straight)
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-5 * want[k] for k in want), (got, want)
    # the corrupt folder is gone; what is left is what the checkpoint files name
    named = {load_checkpoint(run / name)["dcp"] for name in (LATEST, PREV)}
    assert {p.name for p in run.glob("ckpt_latest.dcp-*")} == named


def test_failed_sharded_write_keeps_the_old_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    run = tmp_path / "run"
    tiny(data_dir, run, FSDP_SETTINGS + ["strategy=fsdp"], max_steps=12, until_step=5)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and "ckpt" in str(p)}
    real = fs._write_item

    def write_item(*args, **kwargs):  # the first tensor goes to disk, then the disk is full
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "_write_item", write_item)
    code, out, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    lines = visible_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("storygpt: error: ") and "No space left on device" in lines[0]
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and "ckpt" in str(p)}
    assert after == before  # the failed save's folder is gone, the checkpoints are as they were
    monkeypatch.undo()
    assert tiny(None, run, [], resume=True, max_steps=12)["step"] == 12


def test_progress_to_a_file_is_a_few_plain_lines(tmp_path, data_dir):
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        result = subprocess.run([sys.executable, "-m", "storygpt", "train", "--data", str(data_dir), "--out",
                                 str(tmp_path / "run"), "--preset", "tiny", "--max-steps", "60", "--no-compile",
                                 "--set", "eval_interval=30", "--set", "eval_iters=2", "--set", "log_interval=1"],
                                stdout=fh, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert result.returncode == 0, text
    assert text.count("\r") == 0
    progress = [line for line in text.splitlines() if "step " in line and "/60" in line]
    assert 1 <= len(progress) <= 5 and "step 60/60 (100%)" in progress[-1], text
    assert len(text.splitlines()) < 40, text  # the summary's JSON and a handful of lines, not one per step


def test_plain_progress_lines():
    out = io.StringIO()
    bar = PlainProgress(total=10, initial=2, desc="train", stream=out, interval=3600)
    for _ in range(8):
        bar.update(1)
    bar.set_postfix(loss="1.234", refresh=False)
    bar.close()
    assert out.getvalue().count("\n") == 1 and "train: step 10/10 (100%) loss=1.234" in out.getvalue()
    out = io.StringIO()
    bar = PlainProgress(total=10, initial=0, desc="train", stream=out, interval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()  # the last step was shown already
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["1/10", "2/10", "3/10"]
