"""Distributed training on CPU: 2 processes launched by torchrun, gloo, for DDP and FSDP2.

The runs are compared with one process training on the same global batch: per-rank batch 4 x 2
ranks against batch 8 in one process, with 2 accumulation micro-steps (so DDP's no_sync and FSDP's
deferred gradient sync are used). The ranks share the one shard of the test data, so they train on
exactly the windows the single process trains on (see TokenData) and the loss curves agree to float32
rounding: measured max relative difference ~1e-7 over 12 steps; asserted below 1e-5 (TOLERANCE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from storygpt.data.prepare import prepare
from storygpt.data.shards import TokenData
from storygpt.model.checkpoint import LATEST, checkpoint_weights, load_checkpoint
from storygpt.model.config import ModelConfig
from storygpt.model.load import load_model
from storygpt.train.averaging import snapshots
from storygpt.train.pretrain import train

TOLERANCE = 1e-5  # relative, on every logged train and val loss
STEPS, UNTIL = 12, 5
SETTINGS = ["eval_interval=6", "eval_iters=2", "log_interval=1", "checkpoint_interval=4", "warmup_steps=2",
            "grad_accum_steps=2", "model.dropout=0.0"]
PER_RANK, GLOBAL = ["batch_size=4"], ["batch_size=8"]

# torchrun runs a script or a module; this script adds what the CLI does not have: stopping early at a step
UNTIL_SCRIPT = textwrap.dedent("""
    import sys
    from storygpt.train import train
    data, out, until, *overrides = sys.argv[1:]  # data "-": resume OUT
    train(data if data != "-" else None, out, preset="tiny", resume=data == "-", compile=False, dtype="fp32",
          progress=False, until_step=int(until), overrides=overrides)
""")


def torchrun(nproc: int, *args) -> None:
    """`torchrun --standalone --nproc_per_node N ARGS` on CPU; fails the test with the ranks' output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]


def train_cli(*args) -> list:
    return ["-m", "storygpt", "train", "--preset", "tiny", "--max-steps", STEPS, "--fp32", "--no-compile", "--quiet",
            *args]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def curve(run) -> dict[tuple[int, str], float]:
    """{(step, "loss" | "val_loss"): value} from a run's log."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in records for k in ("loss", "val_loss") if k in r}


def assert_same_curve(run, reference, steps=range(STEPS + 1)) -> float:
    got, want = curve(run), curve(reference)
    keys = [k for k in want if k[0] in steps]
    assert keys and all(k in got for k in keys), (sorted(got), sorted(keys))
    worst = max(abs(got[k] - want[k]) / abs(want[k]) for k in keys)
    assert worst < TOLERANCE, worst
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One process, global batch 8 (= 2 ranks x 4)."""
    run = tmp_path_factory.mktemp("single") / "run"
    train(data_dir, run, preset="tiny", max_steps=STEPS, compile=False, dtype="fp32", progress=False,
          overrides=SETTINGS + GLOBAL)
    return run


@pytest.fixture
def until_script(tmp_path):
    path = tmp_path / "train_until.py"
    path.write_text(UNTIL_SCRIPT)
    return path


def test_ddp_matches_one_process_and_resumes_exactly(tmp_path, data_dir, reference, until_script):
    straight = tmp_path / "ddp"
    torchrun(2, *train_cli("--data", data_dir, "--out", straight, "--strategy", "ddp", *sets(SETTINGS + PER_RANK)))
    assert_same_curve(straight, reference)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == STEPS * 8 * 2 * 64  # global tokens
    assert (straight / "model" / "model.safetensors").is_file()
    # stopped after step 5 and resumed under torchrun: bit-identical to the straight run
    staged = tmp_path / "staged"
    torchrun(2, until_script, data_dir, staged, UNTIL, *SETTINGS, *PER_RANK, f"max_steps={STEPS}")
    assert load_checkpoint(staged / LATEST)["step"] == UNTIL and not (staged / "model").exists()
    torchrun(2, *train_cli("--resume", staged))
    a, b = load_checkpoint(straight / LATEST), load_checkpoint(staged / LATEST)
    assert b["step"] == STEPS and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(b["rng_ranks"]) == 2


def test_fsdp_matches_one_process_and_resumes_on_other_world_sizes(tmp_path, data_dir, reference, until_script):
    run = tmp_path / "fsdp"
    # 2 ranks, sharded checkpoint at step 5 ...
    torchrun(2, until_script, data_dir, run, UNTIL, *SETTINGS, *PER_RANK, f"max_steps={STEPS}", "strategy=fsdp")
    ckpt = load_checkpoint(run / LATEST)
    assert ckpt["step"] == UNTIL and "model" not in ckpt
    shards = sorted(p.name for p in (run / ckpt["dcp"]).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    prev = load_checkpoint(run / "ckpt_prev.pt")
    assert prev["step"] == 4 and {p.name for p in run.glob("ckpt_latest.dcp-*")} == {ckpt["dcp"], prev["dcp"]}
    assert_same_curve(run, reference, steps=range(UNTIL + 1))
    # ... one of its shards truncated: resumed from step 4's (ckpt_prev.pt) by 1 rank (batch 8: the same global
    # batch) up to step 8 ...
    shard = run / ckpt["dcp"] / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    torchrun(1, until_script, "-", run, 8, "batch_size=8")
    # ... and by 2 ranks again, to the end, through the CLI
    torchrun(2, *train_cli("--resume", run, "--set", "batch_size=4", "--set", f"snapshot_from={STEPS}"))
    assert_same_curve(run, reference)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["strategy"] == "fsdp"
    # the weights kept for averaging are the whole model, gathered from the shards
    latest = load_checkpoint(run / LATEST)
    full = checkpoint_weights(run / LATEST, latest, ModelConfig.from_dict(latest["config"]["model"]))
    kept = load_file(snapshots(run)[STEPS])
    assert list(snapshots(run)) == [STEPS] and kept.keys() == full.keys() - {"output.weight"}  # tied: once
    assert all(torch.equal(v, full[k]) for k, v in kept.items())
    # the exported model and the sharded checkpoint hold the same weights, readable without any process group
    model, _, info = load_model(run / "model")
    best = load_checkpoint(run / "ckpt_best.pt")
    assert info["step"] == best["step"]
    weights = checkpoint_weights(run / "ckpt_best.pt", best, model.cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_fsdp_in_one_process_then_plain_resume(tmp_path, data_dir, reference):
    """--strategy fsdp without torchrun is a world of one; its sharded checkpoint resumes in a plain process."""
    run = tmp_path / "run"
    train(data_dir, run, preset="tiny", max_steps=STEPS, compile=False, dtype="fp32", progress=False,
          until_step=UNTIL, overrides=SETTINGS + GLOBAL + ["strategy=fsdp"])
    assert "dcp" in load_checkpoint(run / LATEST)
    assert not torch.distributed.is_initialized()  # the process group it made is gone
    summary = train(None, run, resume=True, progress=False, overrides=["strategy=ddp"])
    assert summary["step"] == STEPS
    assert_same_curve(run, reference)


def test_plain_checkpoint_cannot_resume_as_fsdp(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    train(data_dir, run, preset="tiny", max_steps=3, compile=False, dtype="fp32", progress=False,
          overrides=SETTINGS + GLOBAL)
    code, _, err = run_cli(["train", "--resume", run, "--strategy", "fsdp", "--max-steps", "4", "--quiet"], capsys)
    assert code == 2 and "resume it with --strategy ddp" in err
    code, _, err = run_cli(["train", "--data", data_dir, "--out", tmp_path / "x", "--set", "strategy=zero3"], capsys)
    assert code == 2 and "train.strategy must be ddp or fsdp" in err


def test_ranks_split_the_global_batch_or_own_their_shards(tmp_path, data_dir, story_file, tokenizer_dir):
    # one shard: the ranks' batches are the slices of the batch one process draws with the global size
    whole = TokenData(data_dir, "train").batch(7, 8, 32, seed=3)
    parts = [TokenData(data_dir, "train", rank, 2).batch(7, 4, 32, seed=3) for rank in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    # as many shards as ranks or more: each rank reads only its own shards
    many = tmp_path / "many"
    meta = prepare([story_file], tokenizer_dir, many, workers=1, bucket_bytes=30_000, progress=False)
    files = [s["file"] for s in meta["splits"]["train"]["shards"]]
    assert len(files) >= 4
    ranks = [TokenData(many, "train", rank, 2) for rank in range(2)]
    assert [len(r.shards) for r in ranks] == [len(files[0::2]), len(files[1::2])]
    assert sum(r.tokens for r in ranks) == meta["splits"]["train"]["tokens"]
