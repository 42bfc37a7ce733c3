"""Looking inside a model, as the TinyStories paper's interpretability section did: the attention pattern
of a layer's heads over a story, and the tokens that most activate an MLP neuron.

    from storygpt.interpret import attention_maps, top_activations
    maps = attention_maps(model.model, ids, layer=0)            # (heads, T, T), rows sum to 1
    top = top_activations(model.model, model.tokenizer, stories, layer=3, neurons=[7, 42])

Both read the activations of an ordinary forward pass through hooks (nothing is re-implemented but the
softmax of the attention scores, which the fused attention kernels never materialise).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

import torch

from storygpt.errors import StoryGPTError
from storygpt.model.transformer import Transformer, apply_rope
from storygpt.text.tokenizer import Tokenizer


def _check_layer(model: Transformer, layer: int) -> None:
    if not 0 <= layer < model.cfg.n_layers:
        raise StoryGPTError(f"layer must be in [0, {model.cfg.n_layers - 1}], got {layer}")


@torch.no_grad()
def attention_maps(model: Transformer, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """Attention probabilities of every head of `layer` for one sequence `idx` (shape (T,) or (1, T)):
    a (heads, T, T) tensor whose row t is how much position t attends to each position <= t."""
    _check_layer(model, layer)
    idx = idx.reshape(1, -1)
    attn = model.layers[layer].attn
    seen: dict = {}

    def grab(module, args):
        seen["x"], seen["rope"] = args[0], args[1]

    handle = attn.register_forward_pre_hook(grab)
    try:
        model.eval()
        model(idx)
    finally:
        handle.remove()
    x, rope = seen["x"], seen["rope"]
    B, T, _ = x.shape
    qkv = attn.wqkv(x).view(B, T, attn.n_heads + 2 * attn.n_kv_heads, attn.head_dim)
    qk = qkv[:, :, :attn.n_heads + attn.n_kv_heads]
    if rope is not None:
        qk = apply_rope(qk, *rope)
    q, k = qk.split([attn.n_heads, attn.n_kv_heads], dim=2)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    if attn.n_kv_heads != attn.n_heads:
        k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)[0]


@torch.no_grad()
def mlp_activations(model: Transformer, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """The hidden activations of `layer`'s MLP (what its down projection reads: silu(gate) * up for
    LLaMA, gelu(up) for GPT-2) for one sequence: a (T, hidden) tensor, one column per neuron."""
    _check_layer(model, layer)
    seen: dict = {}
    handle = model.layers[layer].mlp.w_down.register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    try:
        model.eval()
        model(idx.reshape(1, -1))
    finally:
        handle.remove()
    return seen["h"][0].float()


def top_activations(model: Transformer, tokenizer: Tokenizer, texts: Iterable[str], layer: int,
                    neurons: list[int], k: int = 8, context: int = 6) -> dict[int, list[tuple[float, str]]]:
    """For each neuron, the k tokens of `texts` that activate it most: (activation, the text around the
    token with the token itself in [brackets]), highest first. Each text is read from the start-of-story
    token, cut at the model's context."""
    best: dict[int, list] = {n: [] for n in neurons}  # a min-heap of (activation, text, position) per neuron
    token_ids: dict[int, list[int]] = {}
    for t, text in enumerate(texts):
        ids = torch.tensor([tokenizer.bos_id] + tokenizer.encode(text))[:model.cfg.max_seq_len]
        acts = mlp_activations(model, ids.to(next(model.parameters()).device), layer)
        for n in neurons:
            if not 0 <= n < acts.shape[1]:
                raise StoryGPTError(f"neuron must be in [0, {acts.shape[1] - 1}], got {n}")
            for pos in range(1, len(ids)):
                item = (float(acts[pos, n]), t, pos)
                if len(best[n]) < k:
                    heapq.heappush(best[n], item)
                elif item > best[n][0]:
                    heapq.heapreplace(best[n], item)
        token_ids[t] = ids.tolist()
    out = {}
    for n in neurons:
        rows = []
        for value, t, pos in sorted(best[n], reverse=True):
            ids = token_ids[t]
            left = tokenizer.decode(ids[max(1, pos - context):pos])
            right = tokenizer.decode(ids[pos + 1:pos + 1 + context])
            rows.append((value, f"{left}[{tokenizer.decode([ids[pos]]).strip()}]{right}"))
        out[n] = rows
    return out
