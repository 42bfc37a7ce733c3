"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing existing touched."""

import hashlib
import json
from pathlib import Path

import pytest
from conftest import run_cli, write_tinystories

from storygpt.text.tokenizer import train_tokenizer
from storygpt.train.pretrain import train


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def visible_lines(err: str) -> list[str]:
    """What a terminal shows: progress bars redraw with \r and erase themselves on error."""
    return [line.rsplit("\r", 1)[-1].strip() for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = visible_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("storygpt: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("errors") / "run"
    train(data_dir, run, preset="tiny", max_steps=10, progress=False, overrides=["eval_iters=1"])
    return run


@pytest.fixture(scope="module")
def other_data(tmp_path_factory, stories):
    """Data prepared with a different tokenizer (BPE instead of unigram)."""
    from storygpt.data.prepare import prepare

    root = tmp_path_factory.mktemp("other")
    train_tokenizer(stories, 320, "bpe").save(root / "tok")
    f = write_tinystories(root / "s.txt", stories[:100])
    prepare([f], root / "tok", root / "data", val_fraction=0.2, workers=1, progress=False)
    return root / "data"


def test_missing_input(tmp_path, capsys, tokenizer_dir):
    code, _, err = run_cli(["tokenizer", "train", "--input", tmp_path / "nope.txt", "--out", tmp_path / "t"], capsys)
    assert_one_line_error(code, err, "nope.txt", "no such file")
    code, _, err = run_cli(["data", "prepare", "--input", tmp_path / "nope.txt", "--tokenizer", tokenizer_dir,
                            "--out", tmp_path / "d"], capsys)
    assert_one_line_error(code, err, "no such file")
    assert not (tmp_path / "t").exists() and not (tmp_path / "d").exists()


def test_empty_input(tmp_path, capsys, tokenizer_dir):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(["data", "prepare", "--input", tmp_path / "empty.txt", "--tokenizer", tokenizer_dir,
                            "--out", tmp_path / "d"], capsys)
    assert_one_line_error(code, err, "empty")


def test_no_separator_leaves_existing_output(tmp_path, capsys, tokenizer_dir, story_file):
    out = tmp_path / "d"
    code, _, err = run_cli(["data", "prepare", "--input", story_file, "--tokenizer", tokenizer_dir, "--out", out,
                            "--quiet"], capsys)
    assert code == 0, err
    before = snapshot(out)
    (tmp_path / "plain.txt").write_text("A story without any separator.\nAnother line.\n")
    code, _, err = run_cli(["data", "prepare", "--input", tmp_path / "plain.txt", "--tokenizer", tokenizer_dir,
                            "--out", out], capsys)
    assert_one_line_error(code, err, "plain.txt", "separator")
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_wrong_json_field(tmp_path, capsys, tokenizer_dir):
    (tmp_path / "s.jsonl").write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    code, _, err = run_cli(["data", "prepare", "--input", tmp_path / "s.jsonl", "--tokenizer", tokenizer_dir,
                            "--out", tmp_path / "d"], capsys)
    assert_one_line_error(code, err, "no field", "completion, prompt")
    (tmp_path / "bad.json").write_text('[{"story": "ok"}, {"story": ')
    code, _, err = run_cli(["data", "prepare", "--input", tmp_path / "bad.json", "--tokenizer", tokenizer_dir,
                            "--out", tmp_path / "d"], capsys)
    assert_one_line_error(code, err, "invalid JSON")


def test_not_a_tokenizer(tmp_path, capsys, story_file):
    (tmp_path / "tok").mkdir()
    code, _, err = run_cli(["data", "prepare", "--input", story_file, "--tokenizer", tmp_path / "tok",
                            "--out", tmp_path / "d"], capsys)
    assert_one_line_error(code, err, "not a tokenizer directory")


def test_tokenizer_checksum_mismatch(tmp_path, capsys, run_dir, other_data):
    code, _, err = run_cli(["eval", "--model", run_dir, "--data", other_data], capsys)
    assert_one_line_error(code, err, "different tokenizer", "checksum")
    before = snapshot(run_dir)
    code, _, err = run_cli(["train", "--resume", run_dir, "--data", other_data, "--max-steps", "20"], capsys)
    assert_one_line_error(code, err, "different tokenizer")
    assert snapshot(run_dir) == before


def test_corrupt_checkpoint(tmp_path, capsys, run_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = run / "ckpt_latest.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated
    before = snapshot(run)
    code, _, err = run_cli(["train", "--resume", run, "--max-steps", "20"], capsys)
    assert_one_line_error(code, err, "ckpt_latest.pt", "corrupt or truncated")
    assert snapshot(run) == before
    (run / "model" / "model.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = run_cli(["eval", "--model", run / "model", "--text", run / "config.json"], capsys)
    assert_one_line_error(code, err, "corrupt weights")


def test_unknown_config_key_and_out_of_range(tmp_path, capsys, data_dir):
    code, _, err = run_cli(["train", "--data", data_dir, "--out", tmp_path / "r", "--preset", "tiny",
                            "--set", "learning_rate=1"], capsys)
    assert_one_line_error(code, err, "unknown config key 'learning_rate'")
    code, _, err = run_cli(["train", "--data", data_dir, "--out", tmp_path / "r", "--preset", "tiny",
                            "--set", "seq_len=1024"], capsys)
    assert_one_line_error(code, err, "seq_len (1024) > model.max_seq_len (256)")
    code, _, err = run_cli(["train", "--data", data_dir, "--out", tmp_path / "r", "--preset", "tiny",
                            "--set", "lr=-1"], capsys)
    assert_one_line_error(code, err, "lr")
    (tmp_path / "c.toml").write_text("[model]\ndimension = 3\n")
    code, _, err = run_cli(["train", "--data", data_dir, "--out", tmp_path / "r", "--config", tmp_path / "c.toml"], capsys)
    assert_one_line_error(code, err, "unknown config key 'model.dimension'")
    assert not (tmp_path / "r").exists()


def test_existing_run_is_not_overwritten(capsys, run_dir, data_dir):
    before = snapshot(run_dir)
    code, _, err = run_cli(["train", "--data", data_dir, "--out", run_dir, "--preset", "tiny"], capsys)
    assert_one_line_error(code, err, "--resume")
    assert snapshot(run_dir) == before


def test_not_a_model_and_bad_arguments(tmp_path, capsys, story_file):
    code, _, err = run_cli(["eval", "--model", tmp_path, "--text", story_file], capsys)
    assert_one_line_error(code, err, "not a model directory")
    code, _, err = run_cli(["eval", "--model", tmp_path / "missing", "--text", story_file], capsys)
    assert_one_line_error(code, err, "no such model")
    code, _, err = run_cli(["train", "--max-steps", "ten"], capsys)
    assert_one_line_error(code, err, "invalid int value")
    code, _, err = run_cli(["frobnicate"], capsys)
    assert_one_line_error(code, err, "invalid choice")


def test_vocab_too_big_for_uint16(tmp_path, capsys, story_file):
    """A tokenizer over 65,535 tokens cannot write uint16 shards."""
    import io
    import itertools

    import sentencepiece as spm

    from storygpt.text.tokenizer import Tokenizer

    words = ["".join(w) for w in itertools.islice(itertools.product("abcdefghij", repeat=5), 70_000)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g h i j"] * 10), model_writer=proto,
                                   user_defined_symbols=words, vocab_size=70_100, hard_vocab_limit=False,
                                   eos_id=1, bos_id=-1, minloglevel=2)
    tok = Tokenizer(proto.getvalue())
    assert tok.vocab_size > 65_535
    tok.save(tmp_path / "big")
    code, _, err = run_cli(["data", "prepare", "--input", story_file, "--tokenizer", tmp_path / "big",
                            "--out", tmp_path / "d", "--dtype", "uint16"], capsys)
    assert_one_line_error(code, err, "does not fit uint16")
