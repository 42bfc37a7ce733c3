"""Exports to other tools compute what storygpt computes: transformers' LlamaForCausalLM on the hf
export, and a NumPy transcription of llama2.c's run.c forward pass on the llama2c export."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from conftest import run_cli
from llama_ref import SHAPES, random_model_dir, read_llama2c, run_c_forward

from storygpt.convert.export import export_model
from storygpt.model.config import ModelConfig
from storygpt.model.load import load_model
from storygpt.model.model_dir import save_model_dir
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer


@pytest.fixture(params=list(SHAPES))
def model_dir(request, tmp_path, tokenizer_dir):
    return random_model_dir(tmp_path / "model", Tokenizer.load(tokenizer_dir), SHAPES[request.param])


def prompt_ids(model_dir) -> torch.Tensor:
    tok = Tokenizer.load(model_dir)
    return torch.tensor([[tok.eos_id] + tok.encode("Tom and Mia went to the park. They saw a big dog.")])


def storygpt_logits(model_dir, ids) -> torch.Tensor:
    net, _, _ = load_model(model_dir)
    with torch.no_grad():
        return net(ids, targets=ids)[0][0]


def test_hf_export_matches(model_dir, tmp_path):
    from transformers import LlamaForCausalLM

    out = export_model(model_dir, tmp_path / "hf", dtype="fp32", format="hf")
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ids = prompt_ids(model_dir)
    with torch.no_grad():
        theirs = hf(ids).logits[0]
    ours = storygpt_logits(model_dir, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # and greedy decoding agrees token for token
    net, _, _ = load_model(model_dir)
    from storygpt.generate.story_model import StoryModel

    story = StoryModel(net, Tokenizer.load(model_dir)).generate("Tom and Mia", temperature=0, max_new_tokens=20)
    tok = Tokenizer.load(model_dir)
    start = torch.tensor([[tok.eos_id] + tok.encode("Tom and Mia")])
    gen = hf.generate(start, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_id, eos_token_id=tok.eos_id)
    assert tok.decode(gen[0].tolist()) == story


def test_llama2c_export_matches_run_c(model_dir, tmp_path):
    out = export_model(model_dir, tmp_path / "l2c", format="llama2c")
    cfg, weights = read_llama2c(out / "model.bin")
    net, _, _ = load_model(model_dir)
    assert (cfg["dim"], cfg["hidden"], cfg["layers"], cfg["heads"], cfg["seq_len"]) == \
        (net.cfg.dim, net.cfg.mlp_dim, net.cfg.n_layers, net.cfg.n_heads, net.cfg.max_seq_len)
    ids = prompt_ids(model_dir)
    theirs = run_c_forward(cfg, weights, ids[0].tolist())
    ours = storygpt_logits(model_dir, ids).numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)


def test_llama2c_tokenizer_bin(model_dir, tmp_path):
    out = export_model(model_dir, tmp_path / "l2c", format="llama2c")
    tok = Tokenizer.load(model_dir)
    raw = (out / "tokenizer.bin").read_bytes()
    (max_len,) = struct.unpack("I", raw[:4])
    at, pieces = 4, []
    for _ in range(tok.vocab_size):  # run.c's build_tokenizer
        score, n = struct.unpack("fI", raw[at:at + 8])
        pieces.append((score, raw[at + 8:at + 8 + n].decode()))
        at += 8 + n
    assert at == len(raw) and max_len == max(len(p.encode()) for _, p in pieces)
    assert pieces[tok.eos_id][1] == "\n<s>\n" and pieces[0][1] == "<unk>"
    assert pieces[3][1] == "<0x00>"  # byte fallback at id 3 + byte, where run.c looks for it
    word = next(i for i in range(tok.vocab_size) if tok.sp.id_to_piece(i).startswith("\u2581") and len(tok.sp.id_to_piece(i)) > 2)
    assert pieces[word][1] == " " + tok.sp.id_to_piece(word)[1:]
    assert pieces[word][0] == pytest.approx(tok.sp.get_score(word))


def test_export_bad_input(tiny_run, tmp_path, capsys):
    code, _, err = run_cli(["export", "--model", tiny_run, "--out", tmp_path / "x", "--format", "bogus"], capsys)
    assert code == 2 and "invalid choice" in err and "Traceback" not in err
    code, _, err = run_cli(["export", "--model", tmp_path / "nothing", "--out", tmp_path / "x", "--format", "hf"], capsys)
    assert code == 2 and "nothing" in err and "Traceback" not in err


def test_gpt2_arch_is_refused(tmp_path, tokenizer_dir, capsys):
    tok = Tokenizer.load(tokenizer_dir)
    cfg = ModelConfig(arch="gpt2", vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=32)
    src = save_model_dir(tmp_path / "g", cfg, Transformer(cfg).state_dict(), tok, {})
    for fmt in ("hf", "llama2c"):
        code, _, err = run_cli(["export", "--model", src, "--out", tmp_path / fmt, "--format", fmt], capsys)
        assert code == 2 and "only llama-architecture models" in err
