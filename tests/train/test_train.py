import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from storygpt.errors import StoryGPTError
from storygpt.model.checkpoint import LATEST, load_checkpoint
from storygpt.model.load import load_model
from storygpt.train.config import TrainConfig, build_config
from storygpt.train.loop import lr_at, make_optimizer
from storygpt.train.pretrain import train

FAST = ["train.eval_interval=10", "train.eval_iters=2", "train.log_interval=5", "model.dropout=0.1"]


def weights(run):
    return load_checkpoint(run / LATEST)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_learns_and_writes_everything(tmp_path, data_dir):
    run = tmp_path / "run"
    summary = train(data_dir, run, preset="tiny", overrides=["train.eval_interval=50"], max_steps=150, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.5, vals  # it learns
    assert summary["step"] == 150 and summary["best_val_loss"] == min(vals)
    cfg = json.loads((run / "config.json").read_text())
    assert set(cfg) >= {"model", "train"} and cfg["train"]["max_steps"] == 150
    assert {"batch_size", "seq_len", "grad_accum_steps", "max_steps", "eval_interval", "checkpoint_interval", "lr"} <= set(cfg["train"])
    for name in ("log.csv", "loss.png", "ckpt_latest.pt", "ckpt_best.pt", "summary.json"):
        assert (run / name).is_file(), name
    # the exported model directory: config + safetensors + tokenizer, no pickles
    model_dir = run / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"]
    model, tok, info = load_model(model_dir)
    best = load_checkpoint(run / "ckpt_best.pt")
    assert info["step"] == best["step"]
    for k, v in load_file(model_dir / "model.safetensors").items():
        assert torch.equal(v, best["model"][k])
    # a run directory loads too
    assert load_model(run)[0].cfg == model.cfg


def test_resume_is_exact(tmp_path, data_dir):
    straight, staged = tmp_path / "straight", tmp_path / "staged"
    train(data_dir, straight, preset="tiny", overrides=FAST, max_steps=30, progress=False)
    s1 = train(data_dir, staged, preset="tiny", overrides=FAST, max_steps=30, progress=False, until_step=13)
    assert s1["stop_reason"] == "until_step" and s1["step"] == 13
    assert not (staged / "model").exists()
    s2 = train(None, staged, resume=True, progress=False)
    assert s2["step"] == 30
    assert_same_weights(weights(straight), weights(staged))
    # the log has no duplicated steps after resuming
    steps = [json.loads(line)["step"] for line in (staged / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))


def test_sigkill_then_resume(tmp_path, data_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--data", data_dir, "--preset", "tiny", "--max-steps", "300", "--quiet",
            "--set", "checkpoint_interval=20", "--set", "eval_interval=100", "--set", "eval_iters=2"]
    train(data_dir, straight, preset="tiny", max_steps=300, progress=False,
          overrides=["checkpoint_interval=20", "eval_interval=100", "eval_iters=2"])
    proc = subprocess.Popen([sys.executable, "-m", "storygpt", "train", "--out", killed, *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / LATEST).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    step_at_kill = load_checkpoint(killed / LATEST)["step"]
    assert 0 < step_at_kill < 300
    resumed = subprocess.run([sys.executable, "-m", "storygpt", "train", "--resume", killed, "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["step"] == 300
    assert_same_weights(weights(straight), weights(killed))


def test_set_overrides_apply_on_resume(tmp_path, data_dir):
    run = tmp_path / "run"
    train(data_dir, run, preset="tiny", overrides=FAST, max_steps=10, progress=False)
    summary = train(None, run, resume=True, overrides=["max_steps=20", "train.lr=0.001"], progress=False)
    assert summary["step"] == 20
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 20 and cfg["train"]["lr"] == 0.001


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert lr_at(0, 0.0, cfg) == pytest.approx(1e-4)  # warmup starts at lr / warmup_steps
    assert lr_at(9, 0.09, cfg) == pytest.approx(1e-3, rel=0.03)
    assert lr_at(50, 0.5, cfg) == pytest.approx(0.55e-3)
    assert lr_at(100, 1.0, cfg) == pytest.approx(1e-4)
    assert lr_at(200, 2.0, cfg) == pytest.approx(1e-4)  # the floor holds


def test_no_weight_decay_on_vectors():
    cfg = build_config("tiny", overrides=["model.arch=gpt2"])
    from storygpt.model.transformer import Transformer
    model = Transformer(cfg.model)
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) > 0


def test_config_file_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\ndim = 32\nn_heads = 2\n[train]\nlr = 0.01\nbatch_size = 4\n")
    cfg = build_config("tiny", str(toml), ["batch_size=6", "model.arch=gpt2", "compile=true", "n_kv_heads=none"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.arch) == (32, 2, "gpt2")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.compile) == (0.01, 6, True)
    with pytest.raises(StoryGPTError, match="unknown config key 'bogus'"):
        build_config("tiny", overrides=["bogus=1"])
    with pytest.raises(StoryGPTError, match="expects int"):
        build_config("tiny", overrides=["batch_size=two"])
    with pytest.raises(StoryGPTError, match="unknown preset"):
        build_config("huge")


def test_cli_train_and_eval(tmp_path, data_dir, story_file, capsys):
    code, out, err = run_cli(["train", "--data", data_dir, "--out", tmp_path / "r", "--preset", "tiny",
                              "--max-steps", "20", "--quiet", "--set", "eval_interval=10"], capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 20
    code, out, err = run_cli(["eval", "--model", tmp_path / "r", "--text", story_file, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
    code, out, err = run_cli(["eval", "--model", tmp_path / "r" / "model", "--data", data_dir], capsys)
    assert code == 0 and "bits/byte" in out


def test_compile_trains(tmp_path, data_dir):
    summary = train(data_dir, tmp_path / "c", preset="tiny", max_steps=5, compile=True, progress=False,
                    overrides=["eval_iters=1"])
    assert summary["step"] == 5 and summary["best_val_loss"] < 10
