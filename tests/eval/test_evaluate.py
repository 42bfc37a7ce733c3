import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_tinystories

from storygpt.eval.bpb import evaluate, score_stream, text_stream, windows
from storygpt.model.config import ModelConfig
from storygpt.model.transformer import Transformer
from storygpt.text.tokenizer import Tokenizer


@pytest.mark.parametrize("n,context,stride", [(2, 8, 4), (9, 8, 4), (100, 8, 4), (100, 16, 16), (37, 10, 3)])
def test_windows_score_every_token_once(n, context, stride):
    scored = []
    for start, end, done in windows(n, context, stride):
        assert end - start <= context
        scored += list(range(max(done, start) + 1, end + 1))
        if done:  # every scored token sees at least context - stride tokens of history
            assert done + 1 - start >= context - stride
    assert scored == list(range(1, n))


def test_strided_score_matches_direct_computation():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, size=60)
    total, count = score_stream(model, tokens, torch.device("cpu"), stride=4, batch_size=3)
    assert count == 59
    # direct: each token i is scored in the window that ends at it, with the same history
    expected = 0.0
    for start, end, done in windows(60, 16, 4):
        x = torch.tensor(tokens[start:end])[None]
        with torch.no_grad():
            logits, _ = model(x, x)
        for i in range(max(done, start) + 1, end + 1):
            expected += F.cross_entropy(logits[0, i - start - 1], torch.tensor(tokens[i])).item()
    assert total == pytest.approx(expected, rel=1e-5)
    # a stream shorter than the context: one window, plain full-sequence loss
    short = tokens[:12]
    total, count = score_stream(model, short, torch.device("cpu"))
    x = torch.tensor(short)
    with torch.no_grad():
        _, loss = model(x[None, :-1], x[None, 1:])
    assert total / count == pytest.approx(loss.item(), rel=1e-5)


def test_evaluate_text_bits_per_byte(tmp_path, data_dir, stories):
    from storygpt.train.pretrain import train

    train(data_dir, tmp_path / "run", preset="tiny", max_steps=150, progress=False, overrides=["eval_interval=50"])
    f = write_tinystories(tmp_path / "held.txt", stories[:30])
    result = evaluate(tmp_path / "run", text=[f])
    tok = Tokenizer.load(tmp_path / "run" / "model")
    tokens, nbytes = text_stream(tok, [f])
    assert result["tokens"] == len(tokens) - 1 == sum(len(tok.encode(s)) + 1 for s in stories[:30])
    assert result["bytes"] == nbytes == sum(len(s.encode()) for s in stories[:30])
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / result["bytes"] / math.log(2))
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    uniform_bpb = math.log2(tok.vocab_size) * result["tokens"] / result["bytes"]
    assert 0 < result["bits_per_byte"] < 0.5 * uniform_bpb  # it learned something


def test_eval_record_keeps_the_result_in_the_model_dir(tiny_run, tmp_path, stories, capsys):
    import json
    import shutil

    from conftest import run_cli

    import storygpt

    model_dir = shutil.copytree(tiny_run / "model", tmp_path / "model")
    text = write_tinystories(tmp_path / "held.txt", stories[:20])
    code, out, _ = run_cli(["eval", "--model", model_dir, "--text", text, "--record", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    recorded = json.loads((model_dir / "config.json").read_text())["storygpt"]["evals"]["held.txt"]
    assert recorded["bits_per_byte"] == result["bits_per_byte"] and recorded["tokens"] == result["tokens"]
    assert storygpt.load(model_dir).facts()["evals"]["held.txt"]["loss"] == result["loss"]
    code, _, err = run_cli(["eval", "--model", tiny_run, "--text", text, "--record"], capsys)
    assert code == 2 and "needs a model directory" in err
