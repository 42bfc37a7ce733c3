"""The ONNX export computes what storygpt computes: logits of a prefill from an empty cache and of decoding with
the cache it returns (the shipped model, a GPT-2 one, a llama with fewer kv heads), greedy stories identical
to `storygpt generate --temperature 0`, an int8 graph a quarter the size and close; the CLI's line and errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_stories, run_cli

from storygpt.convert.export import export_model
from storygpt.convert.onnx import ONNX_FILE, OnnxStory, cross_entropy, export_onnx, quantize_int8
from storygpt.model.cache import KVCache
from storygpt.model.config import ModelConfig
from storygpt.model.load import default_model_path, load_model
from storygpt.model.model_dir import save_model_dir
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer

PROMPT = "Once upon a time, there was a little dog named Max. He liked to"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped model (fp32) and its ONNX export, made once for the module."""
    net, tok, info = load_model(default_model_path())
    out = export_model("default", tmp_path_factory.mktemp("onnx") / "shipped", format="onnx")
    return net, tok, out


def torch_logits(net: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        t = torch.tensor([ids])
        return net(t, targets=t)[0][0].numpy()


def test_shipped_prefill_and_decode_match(shipped):
    net, tok, out = shipped
    meta = json.loads((out / "onnx.json").read_text())
    c = net.cfg
    assert meta | {"bytes": 0} == meta | {
        "format": "storygpt-onnx", "version": 1, "arch": "llama", "vocab_size": c.vocab_size, "n_layers": c.n_layers,
        "kv_heads": c.kv_heads, "head_dim": c.head_dim, "context": 512, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "dtype": "fp32", "instruct": False, "params": net.num_params(), "bytes": 0, "source": "default"}
    assert meta["bytes"] == (out / ONNX_FILE).stat().st_size and meta["evals"]["heldout.txt"]["loss"] > 0
    assert meta["inputs"][:3] == ["input_ids", "past_key_values.0.key", "past_key_values.0.value"]
    assert meta["outputs"][-1] == f"present.{c.n_layers - 1}.value" and len(meta["outputs"]) == 1 + 2 * c.n_layers
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "onnx.json", "tokenizer.json", "tokenizer.model"]
    runner = OnnxStory(out, threads=1)
    ids = [tok.bos_id] + tok.encode(PROMPT)
    logits, past = runner.step([ids])  # past = 0
    assert past[0].shape == (1, c.kv_heads, len(ids), c.head_dim)
    assert np.abs(logits[0] - torch_logits(net, ids)).max() < 1e-4
    # 50 tokens decoded one at a time, against storygpt's own greedy KV-cached decoding
    cache, greedy = KVCache(c, 1), []
    with torch.no_grad():
        want = net(torch.tensor([ids]), cache=cache)[0][0, -1].numpy()
    worst = 0.0
    for _ in range(50):
        greedy.append(int(want.argmax()))
        assert int(logits[0, -1].argmax()) == greedy[-1]
        logits, past = runner.step([greedy[-1:]], past)
        with torch.no_grad():
            want = net(torch.tensor([greedy[-1:]]), cache=cache)[0][0, -1].numpy()
        worst = max(worst, float(np.abs(logits[0, -1] - want).max()))
    assert worst < 1e-4 and past[0].shape[2] == len(ids) + 50
    # OnnxStory.greedy: the same tokens, to the end of the story
    end = greedy.index(tok.eos_id) + 1 if tok.eos_id in greedy else len(greedy)
    assert runner.greedy(PROMPT, 50) == greedy[:end]


def test_greedy_story_is_storygpts(shipped, capsys):
    net, tok, out = shipped
    runner = OnnxStory(out, threads=1)
    story = runner.story(PROMPT, 60)
    code, printed, _ = run_cli(["generate", "--temperature", "0", "--dtype", "fp32", "--max-new-tokens", 60,
                                PROMPT], capsys)
    assert code == 0 and printed == story + "\n"
    ids = [tok.bos_id] + tok.encode(PROMPT)
    assert story == PROMPT + tok.decode(ids + runner.greedy(PROMPT, 60))[len(tok.decode(ids)):]
    assert len(story) > len(PROMPT) + 100


def test_int8_is_small_and_close(shipped, tmp_path):
    net, tok, out = shipped
    q = shutil.copytree(out, tmp_path / "int8")
    quantize_int8(out / ONNX_FILE, q / ONNX_FILE)  # what export_onnx(dtype="int8") does to the fp32 graph
    assert (q / ONNX_FILE).stat().st_size < (out / ONNX_FILE).stat().st_size / 3
    fp32, int8 = OnnxStory(out, threads=1), OnnxStory(q, threads=1)
    ids = ([tok.bos_id] + tok.encode("\n".join(make_stories(5, seed=7))))[:400]
    want, got = fp32.step([ids])[0][0], int8.step([ids])[0][0]
    assert np.abs(got - want).mean() < 0.3 and np.abs(got - want).max() < 3.0  # logits reach about 20
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.93  # measured 0.975
    assert abs(cross_entropy(int8, ids) - cross_entropy(fp32, ids)) < 0.05  # nats/token, of about 1.9
    # its greedy story with the cache starts as fp32's does (they part at a near tie, if ever)
    assert int8.greedy(PROMPT, 8) == fp32.greedy(PROMPT, 8)


def tiny_model_dir(out, tok: Tokenizer, **shape):
    """A random model with weights large enough that a misplaced position or head shows in the logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, max_seq_len=48, **shape)
    net = Transformer(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15)
    return save_model_dir(out, cfg, net.state_dict(), tok, {})


@pytest.mark.parametrize("shape", [dict(arch="gpt2", n_heads=2, tie_embeddings=False),
                                   dict(arch="llama", n_heads=4, n_kv_heads=2)], ids=["gpt2", "llama-gqa"])
def test_small_models_match(shape, tmp_path, tokenizer_dir):
    src = tiny_model_dir(tmp_path / "model", Tokenizer.load(tokenizer_dir), **shape)
    net, _, _ = load_model(src)
    runner = OnnxStory(export_onnx(src, tmp_path / "onnx"))
    assert runner.meta["arch"] == shape["arch"] and runner.meta["kv_heads"] == net.cfg.kv_heads
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, net.cfg.vocab_size, (2, 40), generator=g)  # a batch of two sequences
    want = np.stack([torch_logits(net, r.tolist()) for r in rows])
    logits, past = runner.step(rows[:, :5].numpy())  # prefill from an empty cache
    got = [logits]
    for t in range(5, 30):  # one token at a time
        logits, past = runner.step(rows[:, t:t + 1].numpy(), past)
        got.append(logits)
    logits, past = runner.step(rows[:, 30:40].numpy(), past)  # a chunk after a cache
    got.append(logits)
    assert np.abs(np.concatenate(got, axis=1) - want).max() < 1e-4 and np.abs(want).max() > 1.0
    assert past[0].shape == (2, net.cfg.kv_heads, 40, net.cfg.head_dim)


def test_cli_exports_int8(tmp_path, tokenizer_dir, capsys):
    tok = Tokenizer.load(tokenizer_dir)
    src = tiny_model_dir(tmp_path / "model", tok, arch="llama", n_heads=2)
    out = tmp_path / "web"  # an earlier export there is replaced
    out.mkdir()
    (out / "onnx.json").write_text('{"format": "storygpt-onnx"}')
    (out / "old.txt").write_text("from before")
    code, printed, err = run_cli(["export", "--format", "onnx", "--model", src, "--out", out, "--dtype", "int8"], capsys)
    size = (out / ONNX_FILE).stat().st_size
    assert code == 0 and err == "" and printed == f"-> {out / ONNX_FILE} (onnx, {size / 1e6:.1f} MB, int8)\n"
    runner = OnnxStory(out)
    assert runner.meta["dtype"] == "int8" and runner.meta["source"] == str(src)
    logits, _ = runner.step([[tok.bos_id] + tok.encode("Tom and Mia")])
    assert np.isfinite(logits).all() and logits.shape[-1] == tok.vocab_size
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "onnx.json", "tokenizer.json", "tokenizer.model"]


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for args, words in [(["--model", tmp_path / "nothing"], "no such model"),
                        (["--model", "default", "--dtype", "fp16"], "onnx dtype must be fp32 or int8"),
                        (["--model", "default", "--out", tmp_path / "mine"], "not an ONNX export")]:
        argv = ["export", "--format", "onnx", "--out", tmp_path / "x", *args]
        code, printed, err = run_cli(argv, capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and printed == ""
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and not (tmp_path / "x").exists()
