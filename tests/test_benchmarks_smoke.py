"""Benchmarks are not tests, but a seconds-long smoke run of each keeps them from rotting."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_train_throughput_smoke():
    out = subprocess.run([sys.executable, BENCHMARKS / "train_throughput.py", "--smoke"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| storygpt | fp32 | no |" in out.stdout and "| transformers | fp32 | no |" in out.stdout


def test_decode_smoke(tiny_run, story_file):
    out = subprocess.run([sys.executable, BENCHMARKS / "decode.py", "--smoke", "--model", tiny_run, "--heldout", story_file],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for row in ("| storygpt fp32 | 1 |", "| transformers fp32 | 1 |", "| storygpt fp32 | 8 |", "| transformers fp32 | 8 |",
                "| storygpt int8 | 1 |", "| storygpt int8 | 8 |"):
        assert row in out.stdout
    assert "held-out bits/byte" in out.stdout and "int8" in out.stdout


def test_attention_smoke():
    out = subprocess.run([sys.executable, BENCHMARKS / "attention.py", "--smoke"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| 64 | fp32 | sdpa |" in out.stdout and "| 64 | fp32 | naive |" in out.stdout


def test_data_prep_smoke():
    out = subprocess.run([sys.executable, BENCHMARKS / "data_prep.py", "--smoke"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| 0.5 MB | 1 |" in out.stdout and "MB/s" in out.stdout


def test_serve_load_smoke():
    """`storygpt serve` with the shipped model answers the openai client, 8 streams at once."""
    out = subprocess.run([sys.executable, BENCHMARKS / "serve_load.py", "--smoke"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| 8 | 8 | 8 |" in out.stdout and out.stdout.strip().endswith("| 0 |")


def test_instruct_smoke(story_file):
    """The instruction-following benchmark on the shipped instruct model against the shipped base model."""
    out = subprocess.run([sys.executable, BENCHMARKS / "instruct.py", "--smoke", "--model", "base=default",
                          "--model", "instruct=instruct", "--heldout", story_file, "--no-bpb"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for line in ("base fields: {'all_words'", "base request: {'all_words'", "instruct fields: {'all_words'",
                 "instruct request: {'all_words'", "base fields: {'all_words'"):
        assert line in out.stdout, out.stdout
    assert "base fields+guide" not in out.stdout  # a plain model is never guided
    for fmt in ("fields", "request"):  # guided: every word and the sentence, even in 40 tokens
        assert f"instruct {fmt}+guide: {{'all_words': 1.0, 'each_word': 1.0, 'sentence': 1.0," in out.stdout, out.stdout


def test_names_probe_smoke(tmp_path):
    """names kept over the suite's 44 beginnings, split into completions with and without a misspelled word."""
    import json

    out = subprocess.run([sys.executable, BENCHMARKS / "names_probe.py", "--model", "shipped=default", "--samples", "1",
                          "--max-new-tokens", "24", "--out", tmp_path / "names.json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "names.json").read_text())["models"]["shipped"]
    assert r["completions"] == 44 == r["completions_clean"] + r["completions_misspelled"]
    kept = sum((r[f"names_{k}"] or 0) * r[f"completions_{k}"] for k in ("clean", "misspelled"))
    assert abs(kept / 44 - r["names"]) < 1e-9 and 0 <= r["misspelled_words"] < 1
    assert out.stdout.startswith("shipped: names kept")
