"""The gguf export (llama.cpp's format): transformers' GGUF loader computes storygpt's logits from it
(f32 to float rounding; f16 and q8_0 to their rounding, measured), a q/k layout error shows, the
metadata and vocabulary are llama.cpp's, the tokenizer transformers builds from the file encodes as
storygpt's does where its conversion can, and bad input is one line, exit 2, nothing written.

Measured max |logit difference| on the two random SHAPES (logits up to ~1.5): f32 2.4e-7, f16 2.3e-4,
q8_0 5.8e-3; the f32 export with transformers' halves q/k layout (the wrong one): 4.3e-3 to 5.2e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_stories, run_cli
from llama_ref import SHAPES, random_model_dir

from storygpt.convert.export import _pairs_to_halves, export_model
from storygpt.model.config import ModelConfig
from storygpt.model.load import load_model
from storygpt.model.model_dir import save_model_dir
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer, train_tokenizer

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF

TOLERANCE = {"f32": 1e-4, "f16": 1e-3, "q8_0": 2e-2}  # a few times the measured error (module docstring)
PROMPT = "Tom and Mia went to the park. They saw a big dog."


@pytest.fixture(params=list(SHAPES))
def model_dir(request, tmp_path, tokenizer_dir):
    return random_model_dir(tmp_path / "model", Tokenizer.load(tokenizer_dir), SHAPES[request.param])


def logits_pair(model_dir, out) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformers' logits from out/model.gguf, storygpt's) on PROMPT after the start token."""
    from transformers import AutoModelForCausalLM

    net, tok, _ = load_model(model_dir)
    ids = torch.tensor([[tok.bos_id] + tok.encode(PROMPT)])
    hf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf").eval()
    with torch.no_grad():
        return hf(ids).logits[0], net(ids, targets=ids)[0][0]


def fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_logits_match(model_dir, tmp_path, dtype):
    out = export_model(model_dir, tmp_path / dtype, dtype, "gguf")
    theirs, ours = logits_pair(model_dir, out)
    err = (theirs - ours).abs().max().item()
    assert err < TOLERANCE[dtype], f"{dtype}: max |logit difference| {err:.2e}"
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    # the tensors are stored as asked: 2-D in the dtype, norms (1-D) in f32
    net, _, _ = load_model(model_dir)
    tensors = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert ("output.weight" in tensors) == (not net.cfg.tie_embeddings)
    assert len(tensors) == 2 + 9 * net.cfg.n_layers + (not net.cfg.tie_embeddings)
    want = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    for name, t in tensors.items():
        assert t.tensor_type.name == ("F32" if name.endswith("norm.weight") else want), name


def test_gguf_wrong_qk_layout_fails(model_dir, tmp_path, monkeypatch):
    """The halves layout transformers uses (what the hf export writes) is wrong for a llama GGUF."""
    import storygpt.convert.gguf as ge

    right = ge.gguf_tensors

    def halves(net):
        c = net.cfg
        return {k: _pairs_to_halves(v, c.n_heads if ".attn_q." in k else c.kv_heads)
                if ".attn_q." in k or ".attn_k." in k else v for k, v in right(net).items()}

    monkeypatch.setattr(ge, "gguf_tensors", halves)
    theirs, ours = logits_pair(model_dir, export_model(model_dir, tmp_path / "bad", "f32", "gguf"))
    assert (theirs - ours).abs().max().item() > 10 * TOLERANCE["f32"]


def test_gguf_metadata(model_dir, tmp_path):
    net, tok, _ = load_model(model_dir)
    c = net.cfg
    meta = fields(export_model(model_dir, tmp_path / "g", "q8_0", "gguf") / "model.gguf")
    expect = {"general.architecture": "llama", "general.name": "model", "general.file_type": 7,
              "llama.vocab_size": c.vocab_size, "llama.context_length": c.max_seq_len,
              "llama.embedding_length": c.dim, "llama.block_count": c.n_layers,
              "llama.feed_forward_length": c.mlp_dim, "llama.attention.head_count": c.n_heads,
              "llama.attention.head_count_kv": c.kv_heads, "llama.rope.dimension_count": c.head_dim,
              "llama.rope.freq_base": c.rope_theta, "tokenizer.ggml.model": "t5",  # unigram: llama.cpp's UGM
              "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
              "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": True,
              "tokenizer.ggml.remove_extra_whitespaces": False}
    assert {k: meta.get(k) for k in expect} == expect
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    sp = tok.sp
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    np.testing.assert_allclose(meta["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(sp.get_piece_size())])
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == 2 and types[tok.eos_id] == 3 and types[sp.piece_to_id("\n")] == 1  # "\n": see gguf_export
    assert all(types[i] == 6 for i in range(sp.get_piece_size()) if sp.is_byte(i))
    assert sum(t == 1 for t in types) == sp.get_piece_size() - 2 - 256


def lines_without_gaps(tok: Tokenizer, n: int) -> list[str]:
    """Lines of stories with single spaces, no edge spaces, and every character in the vocabulary."""
    lines = [line for s in make_stories(n, seed=1) for line in s.split("\n")]
    return [x for x in lines if " " * 2 not in x and x == x.strip() and not any(tok.sp.is_byte(i) for i in tok.encode(x))]


def test_gguf_tokenizer_unigram(tokenizer_dir, tmp_path):
    """storygpt's unigram tokenizer is written as llama.cpp's UGM ("t5"). transformers builds a T5-style
    Unigram from it, which splits the text at whitespace (so newlines and repeated or edge spaces are lost),
    maps characters outside the vocabulary to id 2 where SentencePiece falls back to bytes, and adds 100
    <extra_id_N> tokens beyond the vocabulary; on the rest, one line of single-spaced in-vocabulary text,
    it encodes exactly as storygpt does (and adds the start token)."""
    from transformers import AutoTokenizer

    tok = Tokenizer.load(tokenizer_dir)
    out = export_model(random_model_dir(tmp_path / "m", tok, SHAPES["tied"]), tmp_path / "g", "f32", "gguf")
    hf = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    lines = lines_without_gaps(tok, 50)
    assert len(lines) > 40
    for line in lines:
        assert hf(line)["input_ids"] == [tok.bos_id] + tok.encode(line), line
    assert hf.decode(hf("Tom and Mia.", add_special_tokens=False)["input_ids"]) == "Tom and Mia."


def test_gguf_tokenizer_bpe(tmp_path):
    """A SentencePiece BPE tokenizer is written as llama.cpp's SPM ("llama"), whose score-ordered merges are
    BPE's: transformers' tokenizer from the file encodes whole stories (newlines included) as storygpt does."""
    from transformers import AutoTokenizer

    tok = train_tokenizer(make_stories(400), vocab_size=320, type="bpe")
    out = export_model(random_model_dir(tmp_path / "m", tok, SHAPES["tied"]), tmp_path / "g", "f16", "gguf")
    assert fields(out / "model.gguf")["tokenizer.ggml.model"] == "llama"
    hf = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    for story in make_stories(40, seed=2):
        assert hf(story)["input_ids"] == [tok.bos_id] + tok.encode(story), story


def test_gguf_cli_and_aliases(tmp_path, tokenizer_dir, capsys):
    src = random_model_dir(tmp_path / "m", Tokenizer.load(tokenizer_dir), SHAPES["tied"])
    code, out, err = run_cli(["export", "--model", src, "--out", tmp_path / "g", "--format", "gguf", "--dtype", "fp16"], capsys)
    path = tmp_path / "g" / "model.gguf"
    assert code == 0 and err == "" and f"-> {path} (gguf, " in out and "MB, f16)" in out
    assert fields(path)["general.file_type"] == 1
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["model.gguf"]  # no temporary left behind


@pytest.mark.parametrize("fmt,dtype", [("gguf", "bf16"), ("hf", "q8_0"), ("storygpt", "f16"), ("llama2c", "q8_0")])
def test_gguf_bad_dtype(tmp_path, tokenizer_dir, capsys, fmt, dtype):
    src = random_model_dir(tmp_path / "m", Tokenizer.load(tokenizer_dir), SHAPES["tied"])
    code, out, err = run_cli(["export", "--model", src, "--out", tmp_path / "x", "--format", fmt, "--dtype", dtype], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and repr(dtype) in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_gguf_gpt2_refused(tmp_path, tokenizer_dir, capsys):
    tok = Tokenizer.load(tokenizer_dir)
    cfg = ModelConfig(arch="gpt2", vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=32)
    src = save_model_dir(tmp_path / "g", cfg, Transformer(cfg).state_dict(), tok, {})
    code, out, err = run_cli(["export", "--model", src, "--out", tmp_path / "x", "--format", "gguf", "--dtype", "q8_0"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "only llama-architecture models" in err
    assert not (tmp_path / "x").exists()


def test_gguf_llama_cpp(model_dir, tmp_path):
    """With llama-cpp-python installed (skipped otherwise): llama.cpp itself computes storygpt's logits
    from the f32 file and tokenizes stories (newlines included) as storygpt does. Measured with
    llama-cpp-python 0.3.36 built for CPU: max |logit difference| 0.9e-4 to 1.3e-4 (llama.cpp keeps its
    KV cache in f16); with transformers' halves q/k layout 4.3e-3 to 5.2e-3, so llama.cpp wants pairs too."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = export_model(model_dir, tmp_path / "g", "f32", "gguf")
    net, tok, _ = load_model(model_dir)
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=net.cfg.max_seq_len, logits_all=True, verbose=False)
    for story in make_stories(20, seed=3):
        if not any(tok.sp.is_byte(i) for i in tok.encode(story)):  # llama.cpp's UGM has no byte fallback
            assert llm.tokenize(story.encode()) == [tok.bos_id] + tok.encode(story), story
    ids = [tok.bos_id] + tok.encode(PROMPT)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = net(torch.tensor([ids]), targets=torch.tensor([ids]))[0][0]
    assert (theirs - ours).abs().max().item() < 1e-3
