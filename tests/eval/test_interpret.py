"""Attention maps and MLP activations against the model's own forward pass."""

import pytest
import torch
import torch.nn.functional as F

from storygpt.errors import StoryGPTError
from storygpt.eval.interpret import attention_maps, mlp_activations, top_activations
from storygpt.model.config import ModelConfig
from storygpt.model.transformer import Transformer


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    torch.manual_seed(0)
    kv = 2 if request.param == "llama" else None
    return Transformer(ModelConfig(arch=request.param, vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=kv,
                                   max_seq_len=32)).eval()


def test_attention_maps_reproduce_the_layer_output(model):
    idx = torch.randint(0, 64, (12,))
    maps = attention_maps(model, idx, layer=1)
    assert maps.shape == (4, 12, 12)
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 12))
    assert (maps.triu(1) == 0).all()  # causal: nothing attends to the future
    # the maps times the values, through the output projection, are what the layer computed
    attn, seen = model.layers[1].attn, {}
    h1 = attn.register_forward_pre_hook(lambda m, a: seen.update(x=a[0], rope=a[1]))
    h2 = attn.register_forward_hook(lambda m, a, out: seen.update(out=out))
    model(idx[None])
    h1.remove(), h2.remove()
    x = seen["x"]
    v = attn.wqkv(x).view(1, 12, attn.n_heads + 2 * attn.n_kv_heads, attn.head_dim)[:, :, -attn.n_kv_heads:]
    v = v.transpose(1, 2).repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    y = (maps[None] @ v).transpose(1, 2).reshape(1, 12, -1)
    torch.testing.assert_close(attn.wo(y), seen["out"], atol=1e-5, rtol=1e-4)


def test_mlp_activations_feed_the_down_projection(model):
    idx = torch.randint(0, 64, (10,))
    acts = mlp_activations(model, idx, layer=0)
    mlp, seen = model.layers[0].mlp, {}
    h = mlp.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    model(idx[None])
    h.remove()
    torch.testing.assert_close(mlp.w_down(acts)[None], seen["out"])
    if mlp.swiglu:
        gate, up = mlp.w_gate_up(seen["x"]).chunk(2, dim=-1)
        torch.testing.assert_close(acts[None], F.silu(gate) * up)


class CharTokenizer:
    bos_id = 0

    def encode(self, text):
        return [ord(c) % 63 + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 63) if i else "" for i in ids)


def test_top_activations_are_the_largest(model):
    texts = ["abcdefghij", "klmnopqrstu"]
    tok = CharTokenizer()
    top = top_activations(model, tok, texts, layer=1, neurons=[0, 5], k=3, context=2)
    every = sorted((float(v) for t in texts
                    for v in mlp_activations(model, torch.tensor([0] + tok.encode(t)), 1)[1:, 5]), reverse=True)
    assert [v for v, _ in top[5]] == pytest.approx(every[:3])
    assert all("[" in snippet and "]" in snippet for _, snippet in top[0])
    with pytest.raises(StoryGPTError, match="neuron must be in"):
        top_activations(model, tok, texts, layer=1, neurons=[10_000])
    with pytest.raises(StoryGPTError, match="layer must be in"):
        attention_maps(model, torch.tensor([1, 2]), layer=5)
