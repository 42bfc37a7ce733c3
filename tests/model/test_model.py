import math

import pytest
import torch

from storygpt.errors import StoryGPTError
from storygpt.model.attention import blocked_attention, matmul_attention, naive_attention
from storygpt.model.config import PRESETS, ModelConfig
from storygpt.model.transformer import Transformer, apply_rope, rope_tables


def small_cfg(**kw):
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, max_seq_len=48)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_sdpa_matches_naive_attention(arch, n_kv_heads):
    torch.manual_seed(0)
    cfg = small_cfg(arch=arch, n_kv_heads=n_kv_heads)
    sdpa = Transformer(cfg).eval()
    naive = Transformer(small_cfg(arch=arch, n_kv_heads=n_kv_heads, attention="naive")).eval()
    naive.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        a, la = sdpa(idx, idx)
        b, lb = naive(idx, idx)
    assert a.shape == (3, 40, cfg.vocab_size)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(la, lb)


@pytest.mark.parametrize("T,S", [(300, 300), (100, 300), (64, 64)])
def test_blocked_attention_matches_naive(T, S):
    """Query blocks against only the keys they can see: the same output and gradients as the full
    masked softmax, including queries that are the last T of S cached positions."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, T, 16, requires_grad=True)
    k, v = torch.randn(2, 3, S, 16, requires_grad=True), torch.randn(2, 3, S, 16, requires_grad=True)
    g = torch.randn(2, 3, T, 16)
    grads = []
    for fn in (naive_attention, lambda q, k, v: blocked_attention(q, k, v, block=64)):
        out = fn(q, k, v)
        grads.append((out, *torch.autograd.grad(out, (q, k, v), g)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_attention_choice_and_bf16_gradients():
    """attention="auto" takes the matmul path on CPU in bf16 up to 1024 keys, SDPA otherwise; in bf16
    both give the same loss and gradients to bf16 precision."""
    q32, q16 = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    assert matmul_attention("auto", q16, 1024) and not matmul_attention("auto", q16, 1025)
    assert not matmul_attention("auto", q32, 512)
    assert not matmul_attention("sdpa", q16, 512) and matmul_attention("naive", q32, 4096)
    torch.manual_seed(0)
    idx = torch.randint(0, 97, (2, 40))
    grads, losses = [], []
    for attention in ("sdpa", "auto"):
        torch.manual_seed(0)
        model = Transformer(small_cfg(attention=attention))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=1e-2)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_and_shapes(arch):
    torch.manual_seed(0)
    model = Transformer(small_cfg(arch=arch)).eval()
    idx = torch.randint(0, 97, (2, 30))
    changed = idx.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx, idx)
        b, _ = model(changed, changed)
        last, loss = model(idx)
    assert loss is None and last.shape == (2, 1, 97)
    torch.testing.assert_close(a[:, :20], b[:, :20])  # the future does not leak into the past
    assert not torch.allclose(a[:, 20:], b[:, 20:])
    torch.testing.assert_close(last[:, 0], a[:, -1], rtol=1e-4, atol=1e-5)


def test_initial_loss_is_uniform():
    torch.manual_seed(0)
    model = Transformer(small_cfg(vocab_size=500))
    idx, targets = torch.randint(0, 500, (2, 4, 48))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(500)) < 0.1


def test_rope_matches_complex_reference():
    """Rotary embedding equals multiplying consecutive pairs by e^{i * pos * theta^(-2k/d)}."""
    torch.manual_seed(0)
    B, T, H, D = 2, 10, 3, 16
    x = torch.randn(B, T, H, D)
    cos, sin = rope_tables(D, T, 10000.0)
    ours = apply_rope(x, cos, sin)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)
    rot = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), freqs))
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(B, T, H, D // 2, 2)) * rot[:, None]).flatten(-2)
    torch.testing.assert_close(ours, ref)
    # relative: q.k depends only on the distance between positions
    q, k = torch.randn(D), torch.randn(D)
    def dot(i, j):
        qs = apply_rope(q.expand(1, T, 1, D).contiguous(), cos, sin)[0, i, 0]
        ks = apply_rope(k.expand(1, T, 1, D).contiguous(), cos, sin)[0, j, 0]
        return (qs @ ks).item()
    assert dot(5, 3) == pytest.approx(dot(7, 5), rel=1e-5)


def test_llama_has_no_biases_gpt2_does():
    llama = Transformer(small_cfg())
    gpt2 = Transformer(small_cfg(arch="gpt2"))
    assert not any(n.endswith("bias") for n, _ in llama.named_parameters())
    assert any(n.endswith("bias") for n, _ in gpt2.named_parameters())
    assert isinstance(llama.norm, torch.nn.RMSNorm) and isinstance(gpt2.norm, torch.nn.LayerNorm)
    assert hasattr(gpt2, "pos_emb") and not hasattr(llama, "pos_emb")


def test_tied_embeddings():
    tied = Transformer(small_cfg())
    untied = Transformer(small_cfg(tie_embeddings=False))
    assert tied.output.weight is tied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 97 * 64


# Parameter counts at each preset's default vocab (the tokenizer decides the real vocab).
EXPECTED_PARAMS = {"tiny": 139_584, "small": 5_868_800, "15m": 15_191_712, "33m": 32_663_040, "110m": 109_529_856}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    assert n == EXPECTED_PARAMS[name]
    if name == "tiny":
        assert n < 1_000_000
    if name == "small":
        assert 4_000_000 <= n <= 8_000_000
    if name == "15m":
        assert (cfg.dim, cfg.n_layers, cfg.n_heads) == (288, 6, 6)


def test_bad_configs():
    with pytest.raises(StoryGPTError, match="divisible"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(StoryGPTError, match="arch"):
        ModelConfig(arch="rnn")
    with pytest.raises(StoryGPTError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    model = Transformer(small_cfg())
    with pytest.raises(StoryGPTError, match="longer than the model's context"):
        model(torch.zeros(1, 49, dtype=torch.long))
