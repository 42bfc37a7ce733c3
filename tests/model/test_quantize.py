"""Weight-only int8 (storygpt.quantize, `--dtype int8`): close logits, the same next tokens, 1/4 of the bytes."""

import copy
import itertools
import json

import pytest
import torch
from conftest import run_cli

import storygpt
from storygpt.errors import StoryGPTError
from storygpt.model.config import PRESETS, ModelConfig
from storygpt.model.device import cpu_has_native_bf16
from storygpt.model.quantize import Int8Embedding, Int8Linear, quantize_int8, quantize_rows, weight_bytes
from storygpt.model.transformer import Transformer

GPT2 = ModelConfig(arch="gpt2", vocab_size=300, dim=64, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=False)


def test_quantize_rows_round_trip():
    w = torch.randn(50, 40) * torch.logspace(-3, 1, 50)[:, None]  # rows of very different sizes
    w[7] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (50,) and q.abs().max() == 127
    assert torch.equal(scale.bfloat16().float(), scale)  # exact in bf16, for _weight_int8pack_mm
    assert torch.all(q.abs().amax(dim=1)[torch.arange(50) != 7] >= 126)  # rounding the scale up costs < 1 step
    err = (q.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-12)  # round to nearest: at most half a step per row
    assert torch.all(q[7] == 0)


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], GPT2], ids=["llama-tied", "gpt2-untied-bias"])
def test_int8_logits_close_to_fp32(cfg):
    """Measured on random models (5 seeds): the largest logit error is 4-6% of the logits' standard
    deviation, the typical (rms) error 1%; the bounds leave 2x room."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    q = quantize_int8(copy.deepcopy(model))
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.inference_mode():
        want, _ = model(idx, idx)
        got, _ = q(idx, idx)
    scale = want.std()
    assert (got - want).abs().max() < 0.12 * scale
    assert (got - want).pow(2).mean().sqrt() < 0.02 * scale


def test_int8_kernels_agree():
    """Int8Linear's product (the bf16 _weight_int8pack_mm where the CPU computes bf16 natively, else the dequantized
    matrix in the activations' dtype) is x @ (int8 * scale)^T + bias up to bf16 rounding, for any leading shape."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    q = Int8Linear.from_linear(linear, torch.float32)
    for packed, x in itertools.product((False, True), (torch.randn(5, 3, 64), torch.randn(1, 1, 64),
                                                         torch.randn(700, 64))):
        q.packed = packed and cpu_has_native_bf16()
        want = x @ (q.weight.float() * q.scale[:, None]).T + q.bias
        got = q(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max() <= (1e-2 if q.packed else 1e-5) * want.abs().max()
    qb = Int8Linear.from_linear(linear, torch.bfloat16)
    assert qb(torch.randn(2, 64).bfloat16()).dtype == torch.bfloat16


def test_int8_state_is_int8():
    model = quantize_int8(Transformer(PRESETS["tiny"]))
    fp32 = Transformer(PRESETS["tiny"])
    for name in ("wqkv", "wo"):
        layer = getattr(model.layers[0].attn, name)
        assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.int8
    assert isinstance(model.tok_emb, Int8Embedding) and model.tok_emb.weight.dtype == torch.int8
    assert model.output.weight is model.tok_emb.weight  # a tied head shares the int8 table and its scales
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in model.modules())
    assert model.num_params() == fp32.num_params()
    matrices = sum(p.numel() for n, p in fp32.named_parameters() if p.dim() == 2)  # all but the norms
    assert weight_bytes(fp32) == 4 * fp32.num_params()
    ratio = weight_bytes(model) / weight_bytes(fp32)
    assert 0.25 <= ratio < 0.25 + 0.75 * (fp32.num_params() - matrices) / fp32.num_params() + 0.02
    assert not model.training


def test_int8_top1_agrees_on_trained_model(tiny_run):
    """The trained tiny model's next-token choices: int8 picks fp32's top token almost everywhere."""
    fp32, int8 = storygpt.load(tiny_run, dtype="fp32"), storygpt.load(tiny_run, dtype="int8")
    texts = fp32.generate("Once upon a time", num_samples=6, temperature=1.0, seed=3, max_new_tokens=fp32.context,
                          ignore_eos=True)
    ids = torch.tensor([fp32.encode_prompt(t)[:fp32.context] for t in texts])  # sampled stories, a context each
    with torch.inference_mode():
        a, _ = fp32.model(ids, ids)
        b, _ = int8.model(ids, ids)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert ids.numel() >= 300 and agree >= 0.95, agree


def test_load_int8_and_cli(tiny_run, capsys):
    model = storygpt.load(tiny_run, dtype="int8")
    assert model.facts()["dtype"] == "int8" and model.dtype == torch.float32  # fp32 activations and cache
    story = model.generate("Once upon a time", temperature=0, max_new_tokens=30)
    assert story.startswith("Once upon a time") and len(story) > len("Once upon a time")
    code, out, err = run_cli(["generate", "Once upon a time", "--model", tiny_run, "--dtype", "int8", "--json",
                              "--temperature", "0", "--max-new-tokens", "30"], capsys)
    assert code == 0, err
    assert json.loads(out)["stories"] == [story]


def test_eval_int8(tiny_run, story_file, capsys):
    code, out, err = run_cli(["eval", "--model", tiny_run, "--text", story_file, "--json"], capsys)
    fp32 = json.loads(out)
    code, out, err = run_cli(["eval", "--model", tiny_run, "--text", story_file, "--json", "--dtype", "int8"], capsys)
    assert code == 0, err
    int8 = json.loads(out)
    assert int8["tokens"] == fp32["tokens"]
    assert int8["bits_per_byte"] == pytest.approx(fp32["bits_per_byte"], rel=0.01)


def test_int8_compiled_matches_eager(tiny_run):
    """compile=True works with int8 (frozen where the products run in _weight_int8pack_mm, unfrozen where they
    dequantize the weights, which stay int8 either way)."""
    eager = storygpt.load(tiny_run, dtype="int8")
    compiled = storygpt.load(tiny_run, dtype="int8", compile=True)
    options = {"temperature": 0, "max_new_tokens": 24}
    assert compiled.generate("Once upon a time", **options) == eager.generate("Once upon a time", **options)
    assert compiled.model.layers[0].mlp.w_down.weight.dtype == torch.int8


def test_int8_bad_combinations(tiny_run, capsys):
    # a device other than the CPU ("meta" stands for cuda/mps here): one clear error, before loading anything
    code, out, err = run_cli(["generate", "hi", "--model", tiny_run, "--dtype", "int8", "--device", "meta"], capsys)
    assert code == 2 and "int8 weights are for decoding on CPU" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    meta = Transformer(PRESETS["tiny"]).to("meta")
    with pytest.raises(StoryGPTError, match="int8 weights are for decoding on CPU"):
        quantize_int8(meta)
    with pytest.raises(StoryGPTError, match="fp32 or bf16"):
        quantize_int8(Transformer(PRESETS["tiny"]).half())
    model = quantize_int8(Transformer(PRESETS["tiny"]))
    with pytest.raises(StoryGPTError, match="already quantized"):
        quantize_int8(model)
    with pytest.raises(StoryGPTError, match="int8"):
        storygpt.load(tiny_run, dtype="int4")


def test_app_int8(tiny_run, monkeypatch):
    """`storygpt app --dtype int8`: the option reaches the Streamlit script, which loads and writes in int8."""
    from streamlit.testing.v1 import AppTest

    import storygpt.app.page as app_module
    from storygpt.cli.main import build_parser

    assert build_parser().parse_args(["app", "--dtype", "int8"]).dtype == "int8"
    monkeypatch.setenv(app_module.MODELS_ENV, json.dumps([str(tiny_run)]))
    monkeypatch.setenv(app_module.DTYPE_ENV, "int8")
    at = AppTest.from_file(app_module.__file__, default_timeout=60)
    at.run()
    assert not at.exception and not at.error
    at.text_area(key="prompt").input("Once upon a time, Tom had a")
    at.button(key="write").click().run()
    assert not at.exception and not at.error
    assert at.session_state.history[0]["story"].strip()
    assert app_module.get_model(str(tiny_run), False, "int8").facts()["dtype"] == "int8"


def test_serve_int8(tiny_run):
    """`storygpt serve --dtype int8` (the argument parses) serves int8 weights: the same greedy completion as
    the int8 model from the Python API."""
    from fastapi.testclient import TestClient

    from storygpt.cli.main import build_parser
    from storygpt.serve.models import load_models
    from storygpt.serve.routes import create_app

    assert build_parser().parse_args(["serve", "--model", str(tiny_run), "--dtype", "int8"]).dtype == "int8"
    models = load_models([f"tiny={tiny_run}"], dtype="int8")
    assert models["tiny"].weights == "int8"
    want = storygpt.load(tiny_run, dtype="int8").generate("Once", max_new_tokens=8, temperature=0)
    with TestClient(create_app(models)) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and "Once" + r.json()["choices"][0]["text"] == want
