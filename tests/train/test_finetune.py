"""Fine-tuning: full and PEFT LoRA runs end to end, exact resume, the masked loss of instruction data, adapter
folders (loading, errors) and their export to transformers + PEFT.

Everything trains tiny models made here, on the generated stories of conftest.py."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, write_tinystories
from safetensors.torch import load_file, save_file

import storygpt
from storygpt.data.shards import TokenData, read_meta
from storygpt.model import adapters
from storygpt.model.checkpoint import LATEST, load_checkpoint
from storygpt.model.config import ModelConfig
from storygpt.model.load import load_model
from storygpt.model.transformer import Transformer
from storygpt.text.instruct import is_instruct
from storygpt.train import loop
from storygpt.train.finetune import finetune
from storygpt.train.pretrain import train
from storygpt.train.runlog import read_log

FAST = dict(steps=12, seq_len=64, batch_size=8, dtype="fp32", progress=False,
            overrides=["eval_interval=6", "eval_iters=2", "checkpoint_interval=4", "log_interval=2", "lr=3e-3"])


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("storygpt: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory, stories, tokenizer_dir):
    """Instruction records (`Words: ...` then `Story: ...`) prepared with the tiny models' tokenizer; the data
    carries a loss mask over the instructions."""
    from storygpt.data.prepare import prepare

    root = tmp_path_factory.mktemp("instruct")
    records = [f"Words: {s.split()[7].strip('.,')}, {s.split()[-1].strip('.')}\nStory: {s}" for s in stories]
    meta = prepare([write_tinystories(root / "records.txt", records)], tokenizer_dir, root / "data", val_fraction=0.1,
                   workers=1, progress=False)
    if not meta.get("mask"):
        pytest.skip("data prepare does not mask instructions yet")
    return root / "data"


@pytest.fixture(scope="module")
def gqa_base(tmp_path_factory, data_dir):
    """A tiny llama with grouped-query attention (4 query heads, 2 key/value heads), briefly trained."""
    run = tmp_path_factory.mktemp("gqa") / "run"
    train(data_dir, run, preset="tiny", max_steps=10, progress=False, dtype="fp32",
          overrides=["model.n_kv_heads=2", "eval_iters=1", "eval_interval=10"])
    return run / "model"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, gqa_base, instruct_data):
    run = tmp_path_factory.mktemp("lora") / "run"
    finetune(gqa_base, instruct_data, run, lora=4, **FAST)
    return run


def test_full_finetune_end_to_end(tmp_path, tiny_run, instruct_data):
    run = tmp_path / "ft"
    summary = finetune(tiny_run, instruct_data, run, **FAST)
    assert summary["step"] == 12 and summary["finetune"] == "full"
    assert summary["trainable_params"] == summary["params"] == Transformer(load_model(tiny_run)[0].cfg).num_params()
    for name in ("config.json", "log.jsonl", "log.csv", "loss.png", "summary.json", LATEST, "ckpt_best.pt",
                 "tokenizer/tokenizer.model"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["finetune"]["base_model"] == str(tiny_run) and cfg["finetune"]["lora"] is None
    assert cfg["train"]["lr"] == 3e-3 and cfg["train"]["seq_len"] == 64
    vals = [r["val_loss"] for r in read_log(run) if "val_loss" in r]
    assert vals[-1] < vals[0]  # it learns the records
    # RUN/model: a model directory that says it follows instructions, every weight trained
    net, _, info = load_model(run / "model")
    assert is_instruct(info) and info["instruct"] == read_meta(instruct_data)["instruct"]
    assert info["finetune"]["base_model"] == str(tiny_run) and info["val_loss"] == summary["best_val_loss"]
    base = load_model(tiny_run)[0].state_dict()
    assert all(not torch.equal(v, base[k]) for k, v in net.state_dict().items())


def test_lora_finetune_end_to_end(lora_run, gqa_base, instruct_data):
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["finetune"] == "lora r=4" and summary["trainable_params"] < summary["params"] / 5
    adapter = lora_run / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "storygpt.json"} <= {p.name for p in adapter.iterdir()}
    assert not (lora_run / "model").exists()
    spec = json.loads((adapter / "storygpt.json").read_text())
    base_net, base_tok, _ = load_model(gqa_base)
    assert spec["base_model"] == str(gqa_base) and spec["tokenizer_sha256"] == base_tok.checksum
    assert spec["instruct"] == read_meta(instruct_data)["instruct"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert sorted(config["target_modules"]) == ["w_down", "w_gate_up", "wo", "wqkv"]
    # storygpt.load of the adapter (or of the run) is the base with the best checkpoint's LoRA merged in ...
    model = storygpt.load(lora_run, device="cpu", dtype="fp32")
    assert is_instruct(model.info) and model.info["adapter"]["base_model"] == str(gqa_base)
    assert model.info["val_loss"] == summary["best_val_loss"]
    peft_model = adapters.wrap_lora(Transformer(base_net.cfg), spec["lora"])
    peft_model.load_state_dict(load_checkpoint(lora_run / "ckpt_best.pt")["model"])
    x = torch.randint(0, base_net.cfg.vocab_size, (2, 48))
    with torch.no_grad():
        merged, peft_logits, base_logits = model.model(x, x)[0], peft_model.eval()(x, x)[0], base_net(x, x)[0]
    torch.testing.assert_close(merged, peft_logits, atol=1e-5, rtol=1e-5)
    assert (merged - base_logits).abs().max() > 1e-2  # the adapter does something
    # ... and only the adapted matrices changed
    for k, v in model.model.state_dict().items():
        adapted = k.endswith(("wqkv.weight", "wo.weight", "w_gate_up.weight", "w_down.weight"))
        assert torch.equal(v, base_net.state_dict()[k]) != adapted, k


def test_lora_is_peft_and_only_its_weights_train():
    import peft

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    net = Transformer(cfg)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    r, alpha = 4, 16
    wrapped = adapters.wrap_lora(net, adapters.lora_settings(r, alpha, 0.0, cfg))
    assert isinstance(wrapped, peft.PeftModel)
    layer = wrapped.base_model.model.layers[1].attn.wqkv
    assert isinstance(layer, peft.tuners.lora.Linear)
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: make the update visible
    x = torch.randn(3, 5, cfg.dim)
    W, A, B = base["layers.1.attn.wqkv.weight"], layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W.T + (alpha / r) * (x @ A.T @ B.T))
    trainable = {n: p.numel() for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    qkv = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
    per_layer = r * ((cfg.dim + qkv) + (cfg.dim + cfg.dim) + (cfg.dim + 2 * cfg.mlp_dim) + (cfg.mlp_dim + cfg.dim))
    assert sum(trainable.values()) == adapters.trainable_params(wrapped) == cfg.n_layers * per_layer


def test_lora_r8_on_the_default_model_shape():
    cfg = ModelConfig.from_dict(json.loads((storygpt.model.load.DEFAULT_MODEL / "config.json").read_text())["model"])
    assert (cfg.dim, cfg.n_layers) == (320, 6)
    full = Transformer(cfg).num_params()
    lora = adapters.trainable_params(adapters.wrap_lora(Transformer(cfg), adapters.lora_settings(8, None, 0.0, cfg)))
    qkv = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
    assert lora == 6 * 8 * ((320 + qkv) + 640 + (320 + 2 * cfg.mlp_dim) + (cfg.mlp_dim + 320))
    assert lora / full < 0.03  # measured: 247,296 of 8,749,120 (2.8%)


@pytest.mark.parametrize("lora", [None, 4])
def test_resume_is_exact(tmp_path, tiny_run, instruct_data, lora):
    # dropout in the model (and in LoRA) and masked data: the RNG and data positions must replay exactly
    settings = dict(FAST, overrides=FAST["overrides"] + ["model.dropout=0.1"], lora=lora,
                    **({"lora_dropout": 0.1} if lora else {}))
    straight, staged = tmp_path / "straight", tmp_path / "staged"
    finetune(tiny_run, instruct_data, straight, **settings)
    first = finetune(tiny_run, instruct_data, staged, **settings, until_step=5)
    assert first["stop_reason"] == "until_step" and not (staged / "model").exists() and not (staged / "adapter").exists()
    load_model(staged)  # a run that stopped midway loads from its checkpoint (a LoRA one merged)
    done = finetune(None, None, staged, resume=True, progress=False)
    assert done["step"] == 12
    a, b = load_checkpoint(straight / LATEST)["model"], load_checkpoint(staged / LATEST)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (staged / ("adapter" if lora else "model")).is_dir()


def test_loss_ignores_instruction_tokens(tmp_path, tiny_run, instruct_data):
    data = TokenData(instruct_data, "train")
    x, y = data.batch(0, 8, 64, seed=1)
    assert (y == -1).any() and (y != -1).any()
    net, tok, _ = load_model(tiny_run)
    net.train(False)

    def masked_ce(logits, y):  # by hand: the story's targets only
        keep = y != -1
        return F.cross_entropy(logits[keep], y[keep])

    # the training step: loss and gradients are those of the story tokens' cross-entropy
    job = SimpleNamespace(device=torch.device("cpu"), amp="fp32", trained=net, teachers=[],
                          cfg=SimpleNamespace(train=SimpleNamespace(grad_accum_steps=1)))
    loss, _ = loop.micro_step(job, net, x, y, loop.counted(y), may_fall_back=False)
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    logits, _ = net(x, y)
    want = masked_ce(logits, y)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    every = y.clone()
    every[:, :-1] = x[:, 1:]  # the instruction tokens as targets too
    assert loss.item() != pytest.approx(masked_ce(logits, every).item(), rel=1e-3)
    assert all(torch.allclose(grads[n], p.grad, atol=1e-7) for n, p in net.named_parameters())
    # a micro-batch of instructions alone: no loss, zero gradients, no NaN
    net.zero_grad()
    loss, _ = loop.micro_step(job, net, x, torch.full_like(y, -1), 0, may_fall_back=False)
    assert loss is None and all(p.grad is not None and not p.grad.any() for p in net.parameters())
    # the validation loss at step 0 of a fine-tune is the base model's on the story tokens of the val batches
    run = tmp_path / "ft"
    finetune(tiny_run, instruct_data, run, **dict(FAST, steps=1, seq_len=256))
    logged = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    batches = TokenData(instruct_data, "val").sequential_batches(8, 256, 2)
    with torch.no_grad():
        by_hand = sum(masked_ce(net(bx, by)[0], by).item() for bx, by in batches) / len(batches)
    assert logged["step"] == 0 and logged["val_loss"] == pytest.approx(by_hand, rel=1e-5)
    # and its instruction gain: each val story's loss after the next record's instruction minus after its own,
    # one record at a time here (the loop pads them into batches)
    val = TokenData(instruct_data, "val")
    stream, mask = np.asarray(val.shards[0]), np.asarray(val.masks[0])
    ends = np.flatnonzero(stream == read_meta(instruct_data)["eos_id"])
    records = [(stream[a:a + 1 + int(np.argmax(mask[a + 1:b + 1]))], stream[a + 1 + int(np.argmax(mask[a + 1:b + 1])):b + 1])
               for a, b in zip(ends[:-1], ends[1:])]

    def nll(head, story):
        seq = torch.from_numpy(np.concatenate([head, story]).astype(np.int64))[None]
        y = seq[:, 1:].clone()
        y[:, :len(head) - 1] = -1
        with torch.no_grad():
            return masked_ce(net(seq[:, :-1], y)[0], y).item() * len(story)
    pairs = [(h, s, nh) for (h, s), (nh, _) in zip(records, records[1:]) if max(len(h), len(nh)) + len(s) <= 257][:64]
    assert len(pairs) >= 4
    n = sum(len(s) for _, s, _ in pairs)
    gain = (sum(nll(nh, s) for _, s, nh in pairs) - sum(nll(h, s) for h, s, _ in pairs)) / n
    assert logged["instruction_gain"] == pytest.approx(gain, rel=1e-4, abs=1e-6)


def test_adapter_exports_to_transformers_and_peft(tmp_path, lora_run, capsys):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out = tmp_path / "hf"
    code, stdout, err = run_cli(["export", "--model", lora_run / "adapter", "--out", out, "--format", "hf",
                                 "--dtype", "fp32"], capsys)
    assert code == 0, err
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"])
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight" in load_file(out / "adapter" /
                                                                                        "adapter_model.safetensors")
    theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out), out / "adapter").eval()
    ours = storygpt.load(lora_run / "adapter", device="cpu", dtype="fp32")
    base = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[ours.tokenizer.eos_id] + ours.tokenizer.encode("Words: dog, ball\nStory: Once upon a time")])
    with torch.no_grad():
        got, want, plain = theirs(ids).logits[0], ours.model(ids, ids)[0][0], base(ids).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (plain - want).abs().max() > 1e-2  # the exported adapter is what makes them agree
    # a merged copy in storygpt's format is the loaded adapter model, and still an instruct model
    merged = tmp_path / "merged"
    code, _, err = run_cli(["export", "--model", lora_run, "--out", merged, "--dtype", "fp32"], capsys)
    net, _, info = load_model(merged)
    assert code == 0 and is_instruct(info) and "adapter" not in info
    assert all(torch.equal(v, ours.model.state_dict()[k]) for k, v in net.state_dict().items())


def copy_adapter(lora_run, dest, **spec_changes):
    shutil.copytree(lora_run / "adapter", dest)
    spec = json.loads((dest / "storygpt.json").read_text()) | spec_changes
    (dest / "storygpt.json").write_text(json.dumps(spec))
    return dest


def test_adapter_errors_are_one_line(tmp_path, lora_run, story_file, data_dir, capsys):
    def eval_error(adapter, *needles):
        code, _, err = run_cli(["eval", "--model", adapter, "--text", story_file], capsys)
        one_line_error(code, err, *needles)

    missing = tmp_path / "nowhere"
    eval_error(copy_adapter(lora_run, tmp_path / "a1", base_model=str(missing), base_model_path=str(missing),
                            base_model_relative="nowhere"), "its base model", "is missing")
    eval_error(copy_adapter(lora_run, tmp_path / "a2", tokenizer_sha256="0" * 64), "does not fit", "tokenizer")
    # a base of another shape
    other = tmp_path / "other"
    train(data_dir, other, preset="tiny", max_steps=1, progress=False, overrides=["model.dim=32", "eval_iters=1"])
    eval_error(copy_adapter(lora_run, tmp_path / "a3", base_model=str(other / "model"), base_model_path=None,
                            base_model_relative=None), "does not fit", "has shape")
    # module names the base does not have
    a4 = copy_adapter(lora_run, tmp_path / "a4")
    tensors = {k.replace("attn.wo.", "attn.w_out."): v for k, v in load_file(a4 / "adapter_model.safetensors").items()}
    save_file(tensors, a4 / "adapter_model.safetensors")
    eval_error(a4, "does not fit", "no layer", "w_out")
    a5 = copy_adapter(lora_run, tmp_path / "a5")
    (a5 / "storygpt.json").unlink()
    eval_error(a5, "storygpt.json")


def test_finetune_errors_are_one_line(tmp_path, tiny_run, data_dir, instruct_data, stories, capsys):
    from storygpt.data.prepare import prepare
    from storygpt.text.tokenizer import train_tokenizer

    def error(*args, needles=()):
        code, _, err = run_cli(["finetune", "--quiet", *args], capsys)
        one_line_error(code, err, *needles)

    out = ["--out", tmp_path / "run"]
    error("--model", tmp_path / "nope", "--data", data_dir, *out, needles=["no such model"])
    error("--model", tiny_run, "--data", data_dir, *out, "--lora", "0", needles=["--lora must be a rank >= 1"])
    error("--model", tiny_run, "--data", data_dir, *out, "--lora-alpha", "8", needles=["need --lora R"])
    error("--model", tiny_run, "--data", data_dir, *out, "--set", "model.dim=128", needles=["model.dim cannot change"])
    train_tokenizer(stories, 320, "bpe").save(tmp_path / "bpe")
    prepare([write_tinystories(tmp_path / "s.txt", stories[:100])], tmp_path / "bpe", tmp_path / "bpe_data",
            val_fraction=0.2, workers=1, progress=False)
    error("--model", tiny_run, "--data", tmp_path / "bpe_data", *out, needles=["another tokenizer", "checksum"])
    error("--resume", "--out", tiny_run, needles=["not a fine-tuning run"])
    assert not (tmp_path / "run").exists()
    # a LoRA run resumes as a fine-tune only, with its own settings
    run = tmp_path / "lora"
    finetune(tiny_run, instruct_data, run, lora=2, **dict(FAST, steps=2))
    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    one_line_error(code, err, "a fine-tuning run")
    error("--resume", "--out", run, "--lora", "8", needles=["LoRA settings are the run's"])
