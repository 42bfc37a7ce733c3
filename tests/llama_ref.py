"""Reference material shared by test_export.py and test_import.py: small llama shapes, and llama2.c's
model.bin reader and forward pass (run.c's, transcribed to NumPy) to check storygpt's weights against."""

from __future__ import annotations

import struct

import numpy as np
import torch

from storygpt.model.config import ModelConfig
from storygpt.model.model_dir import save_model_dir
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer

SHAPES = {
    "tied": dict(dim=64, n_layers=2, n_heads=4),
    "gqa+untied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False),
}


def random_model_dir(out, tok: Tokenizer, shape: dict, seed: int = 0):
    """A model directory of a randomly initialised llama of `shape` (one of SHAPES) over `tok`."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=64, **shape)
    net = Transformer(cfg)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return save_model_dir(out, cfg, net.state_dict(), tok, {})


def read_llama2c(path) -> tuple[dict, dict]:
    """model.bin as run.c's memory_map_weights reads it."""
    raw = path.read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("7i", raw[:28])
    shared = vocab > 0
    vocab, hs = abs(vocab), dim // heads
    kv_dim = kv_heads * hs
    w = np.frombuffer(raw[28:], dtype=np.float32)
    shapes = [("emb", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
              ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
              ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
              ("w3", (layers, hidden, dim)), ("rms_final", (dim,)), ("freq_real", (seq_len, hs // 2)),
              ("freq_imag", (seq_len, hs // 2))]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    out, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = w[at:at + n].reshape(shape)
        at += n
    assert at == w.size, "model.bin has trailing or missing floats"
    out.setdefault("wcls", out["emb"])
    cfg = dict(dim=dim, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, seq_len=seq_len)
    return cfg, out


def run_c_forward(cfg: dict, w: dict, tokens: list[int]) -> np.ndarray:
    """run.c's forward(), one position at a time, in NumPy: logits (T, vocab)."""
    dim, heads, kv_heads = cfg["dim"], cfg["heads"], cfg["kv_heads"]
    hs = dim // heads
    kv_dim = kv_heads * hs

    def rmsnorm(x, g):
        return g * (x / np.sqrt(np.mean(x * x) + 1e-5))

    keys = np.zeros((cfg["layers"], len(tokens), kv_dim), np.float32)
    values = np.zeros_like(keys)
    logits = []
    for pos, token in enumerate(tokens):
        x = w["emb"][token].copy()
        for li in range(cfg["layers"]):
            xb = rmsnorm(x, w["rms_att"][li])
            q, k, v = w["wq"][li] @ xb, w["wk"][li] @ xb, w["wv"][li] @ xb
            for i in range(0, dim, 2):  # RoPE on consecutive pairs, base 10000, as run.c writes it
                angle = pos * (1.0 / 10000.0 ** ((i % hs) / hs))
                fcr, fci = np.cos(angle), np.sin(angle)
                for vec in ((q, k) if i < kv_dim else (q,)):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            keys[li, pos], values[li, pos] = k, v
            att_out = np.zeros(dim, np.float32)
            for h in range(heads):
                kvh = h // (heads // kv_heads)
                kh = keys[li, :pos + 1, kvh * hs:(kvh + 1) * hs]
                scores = kh @ q[h * hs:(h + 1) * hs] / np.sqrt(hs)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att_out[h * hs:(h + 1) * hs] = p @ values[li, :pos + 1, kvh * hs:(kvh + 1) * hs]
            x = x + w["wo"][li] @ att_out
            xb = rmsnorm(x, w["rms_ffn"][li])
            h1, h3 = w["w1"][li] @ xb, w["w3"][li] @ xb
            x = x + w["w2"][li] @ (h1 / (1 + np.exp(-h1)) * h3)
        logits.append(w["wcls"] @ rmsnorm(x, w["rms_final"]))
    return np.stack(logits)
