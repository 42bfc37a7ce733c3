"""The ONNX graph of a storygpt model (see onnx.py): `OnnxGraph`, a module that computes what `Transformer`
computes with a cache passed in and out as tensors, written with plain ops only, and `export_graph`.

    input_ids                 int64   [batch, seq]
    past_key_values.{i}.key   float32 [batch, kv_heads, past, head_dim]   (and .value; past may be 0)
    -> logits                 float32 [batch, seq, vocab]
    -> present.{i}.key        float32 [batch, kv_heads, past + seq, head_dim]   (and .value)

The new tokens sit at positions past .. past+seq-1 and attend to every past position and, causally, to
each other. Attention is two MatMuls, a Where mask and a Softmax; norms, SiLU and GELU are written out
(no LayerNormalization/RMSNormalization/Gelu/Attention ops of recent opsets), and every weight is the second
input of a MatMul in [in, out] layout, so onnxruntime's dynamic quantization turns them all into
MatMulInteger. A tied embedding is stored once, transposed ([dim, vocab]): the input side gathers its
columns, the output side multiplies by it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings

import torch
import torch.nn as nn

from storygpt.errors import StoryGPTError
from storygpt.model.transformer import Transformer

OPSET = 18


def input_names(n_layers: int) -> list[str]:
    return ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _t(w: torch.Tensor) -> nn.Parameter:
    """A weight [out, in] as [in, out], for x @ w."""
    return nn.Parameter(w.detach().float().t().contiguous(), requires_grad=False)


def _p(w: torch.Tensor | None) -> nn.Parameter | None:
    return None if w is None else nn.Parameter(w.detach().float().clone(), requires_grad=False)


class _Layer(nn.Module):
    def __init__(self, block):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.norm1_w, self.norm1_b = _p(block.attn_norm.weight), _p(getattr(block.attn_norm, "bias", None))
        self.norm2_w, self.norm2_b = _p(block.mlp_norm.weight), _p(getattr(block.mlp_norm, "bias", None))
        self.wqkv, self.bqkv = _t(attn.wqkv.weight), _p(attn.wqkv.bias)
        self.wo, self.bo = _t(attn.wo.weight), _p(attn.wo.bias)
        if mlp.swiglu:
            self.w_in, self.b_in = _t(mlp.w_gate_up.weight), None
        else:
            self.w_in, self.b_in = _t(mlp.w_up.weight), _p(mlp.w_up.bias)
        self.w_down, self.b_down = _t(mlp.w_down.weight), _p(mlp.w_down.bias)


class OnnxGraph(nn.Module):
    """`net` as forward(input_ids, past) -> (logits, presents): past and presents are flat lists
    [key 0, value 0, key 1, value 1, ...] of [batch, kv_heads, length, head_dim]."""

    def __init__(self, net: Transformer):
        super().__init__()
        c = self.cfg = net.cfg
        self.llama = c.arch == "llama"
        self.eps = c.norm_eps
        self.emb_t = _t(net.tok_emb.weight)  # [dim, vocab]: gathered by column, and the tied output matrix
        self.out_t = None if c.tie_embeddings else _t(net.output.weight)
        self.pos_emb = None if self.llama else _p(net.pos_emb.weight)
        self.norm_w, self.norm_b = _p(net.norm.weight), _p(getattr(net.norm, "bias", None))
        if self.llama:
            self.register_buffer("rope_cos", net.rope_cos.detach().float().clone())
            self.register_buffer("rope_sin", net.rope_sin.detach().float().clone())
        self.layers = nn.ModuleList(_Layer(block) for block in net.layers)

    def norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.llama:  # RMSNorm
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * w
        mu = x.mean(-1, keepdim=True)
        d = x - mu
        return d * torch.rsqrt((d * d).mean(-1, keepdim=True) + self.eps) * w + b

    @staticmethod
    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = torch.matmul(x, w)
        return y if b is None else y + b

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c = self.cfg
        H, K, D = c.n_heads, c.kv_heads, c.head_dim
        B, T = input_ids.shape
        P = past[0].shape[2]
        pos = torch.arange(T, device=input_ids.device) + P  # the new tokens' positions
        # [dim, B*T] -> [B, T, dim]
        x = torch.index_select(self.emb_t, 1, input_ids.reshape(-1)).t().reshape(B, T, c.dim)
        if self.llama:
            cos = torch.index_select(self.rope_cos, 0, pos)[:, None]  # [T, 1, D]
            sin = torch.index_select(self.rope_sin, 0, pos)[:, None]
        else:
            x = x + torch.index_select(self.pos_emb, 0, pos)
        keys = torch.arange(P + T, device=input_ids.device)
        mask = (keys[None, :] <= pos[:, None])  # [T, S]: query i may attend to key j
        scale = 1.0 / math.sqrt(D)
        presents = []
        for i, layer in enumerate(self.layers):
            h = self.norm(x, layer.norm1_w, layer.norm1_b)
            qkv = self.linear(h, layer.wqkv, layer.bqkv).reshape(B, T, H + 2 * K, D)
            qk, v = qkv[:, :, :H + K], qkv[:, :, H + K:]
            if self.llama:  # consecutive pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), as apply_rope
                swapped = qk.reshape(B, T, H + K, D // 2, 2).flip(-1).reshape(B, T, H + K, D)
                qk = qk * cos + swapped * sin
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            k = torch.cat([past[2 * i], k], dim=2)  # [B, K, P+T, D]
            v = torch.cat([past[2 * i + 1], v.transpose(1, 2)], dim=2)
            presents += [k, v]
            if K != H:  # grouped-query attention: each kv head serves H/K query heads, as repeat_interleave
                k = k[:, :, None].expand(B, K, H // K, P + T, D).reshape(B, H, P + T, D)
                v = v[:, :, None].expand(B, K, H // K, P + T, D).reshape(B, H, P + T, D)
            att = torch.matmul(q, k.transpose(-2, -1)) * scale
            att = torch.where(mask, att, torch.finfo(torch.float32).min).softmax(dim=-1)
            y = torch.matmul(att, v).transpose(1, 2).reshape(B, T, H * D)
            x = x + self.linear(y, layer.wo, layer.bo)
            h = self.linear(self.norm(x, layer.norm2_w, layer.norm2_b), layer.w_in, layer.b_in)
            if self.llama:
                gate, up = h[..., :h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
                h = gate * torch.sigmoid(gate) * up
            else:  # GELU, tanh approximation
                h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * h * h)))
            x = x + self.linear(h, layer.w_down, layer.b_down)
        x = self.norm(x, self.norm_w, self.norm_b)
        logits = torch.matmul(x, self.emb_t if self.out_t is None else self.out_t)
        return logits, presents


def example_inputs(cfg, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    cache = [torch.randn(batch, cfg.kv_heads, past, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
    return ids, cache


def export_graph(net: Transformer, path: str | os.PathLike, opset: int = OPSET) -> None:
    """Write `net`'s graph to `path` (one file, weights inside) with torch.onnx's dynamo exporter, traced at
    batch 2, seq 3, past 4 (sizes other than 0 and 1, which it would specialise) with all three dynamic."""
    graph = OnnxGraph(net).eval()
    n = net.cfg.n_layers
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    shapes = {"input_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past} for _ in range(2 * n)]}
    noise = io.StringIO()
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(noise), \
                contextlib.redirect_stderr(noise):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, example_inputs(net.cfg), dynamo=True, opset_version=opset,
                                        dynamic_shapes=shapes, input_names=input_names(n),
                                        output_names=output_names(n), external_data=False, verbose=False)
            program.save(str(path), external_data=False)
    except Exception as e:  # the exporter's failures are long; the first line says what it could not do
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StoryGPTError(f"could not export this model to ONNX: {first}") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
