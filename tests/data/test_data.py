import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import make_stories, run_cli, write_tinystories

from storygpt.data.prepare import prepare, token_dtype
from storygpt.data.shards import TokenData
from storygpt.errors import StoryGPTError
from storygpt.text.stories import expand_inputs, iter_stories
from storygpt.text.tokenizer import Tokenizer


def read_split(out, split):
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])


def test_prepare_counts_and_format(data_dir, stories, tokenizer_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    tok = Tokenizer.load(tokenizer_dir)
    assert meta["tokenizer"]["sha256"] == tok.checksum
    assert meta["vocab_size"] == tok.vocab_size and meta["dtype"] == "uint16"
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["stories"] + val["stories"] == len(stories)
    assert 0 < val["stories"] < 0.25 * len(stories)
    expected_tokens = sum(len(tok.encode(s)) + 1 for s in stories)
    assert train["tokens"] + val["tokens"] == expected_tokens
    assert train["bytes"] + val["bytes"] == sum(len(s.encode()) for s in stories)
    # every story is in exactly one split, intact, followed by EOS
    decoded = []
    for split in ("train", "val"):
        tokens = read_split(data_dir, split)
        assert len(tokens) == meta["splits"][split]["tokens"]
        assert tokens[-1] == tok.eos_id
        cuts = np.flatnonzero(tokens == tok.eos_id)
        decoded += [tok.decode(x) for x in np.split(tokens, cuts + 1)[:-1]]
    assert sorted(decoded) == sorted(stories)
    # shuffled: not in input order
    assert decoded[:20] != stories[:20]


def test_prepare_deterministic_across_worker_counts(tmp_path, story_file, tokenizer_dir, data_dir):
    prepare([story_file], tokenizer_dir, tmp_path / "two", val_fraction=0.1, workers=2, progress=False)
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "two", split), read_split(data_dir, split))


def test_prepare_json_jsonl_and_folders(tmp_path, tokenizer_dir):
    stories = make_stories(60, seed=3)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps([{"story": s, "summary": "x"} for s in stories[:20]], indent=1))
    (folder / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories[20:40]))
    write_tinystories(folder / "c.txt", stories[40:])
    assert sorted(iter_stories(expand_inputs([folder]))) == sorted(stories)
    meta = prepare([folder], tokenizer_dir, tmp_path / "out", val_fraction=0.0, workers=1, progress=False)
    assert meta["splits"]["train"]["stories"] == 60 and meta["splits"]["val"]["stories"] == 0
    # --field picks the key
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "i", "story": "A dog ran."}]))
    assert list(iter_stories([tmp_path / "d.json"], field="story")) == ["A dog ran."]
    with pytest.raises(StoryGPTError, match="no field 'summary2'"):
        list(iter_stories([tmp_path / "d.json"], field="summary2"))


def test_token_dtype():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint32
    with pytest.raises(StoryGPTError, match="does not fit uint16"):
        token_dtype(70_000, "uint16")


def test_loader_batches(data_dir):
    data = TokenData(data_dir, "train")
    x, y = data.batch(step=5, batch_size=4, seq_len=32, seed=1)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    x2, y2 = data.batch(step=5, batch_size=4, seq_len=32, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # pure function of (seed, step)
    x3, _ = data.batch(step=6, batch_size=4, seq_len=32, seed=1)
    assert not torch.equal(x, x3)
    # windows are real slices of the shard
    shard = torch.from_numpy(np.asarray(data.shards[0], dtype=np.int64))
    row = x[0]
    starts = [i for i in range(len(shard) - 32) if torch.equal(shard[i:i + 32], row)]
    assert starts
    val = TokenData(data_dir, "val")
    fixed = val.sequential_batches(4, 32, max_batches=3)
    assert len(fixed) <= 3 and all(torch.equal(a[0], b[0]) for a, b in zip(fixed, val.sequential_batches(4, 32, 3)))


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    from storygpt.data import prepare
    prepare([sys.argv[1]], sys.argv[2], sys.argv[3], workers=2, bucket_bytes=1 << 20, chunk_stories=64, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_prepare_memory_does_not_grow_with_input(tmp_path, tokenizer_dir):
    """Peak RSS of the main process is flat from a 2 MB to an 8 MB input (bucket size 1 MB)."""
    base = make_stories(7000, seed=7)
    small = write_tinystories(tmp_path / "small.txt", base)
    big = write_tinystories(tmp_path / "big.txt", base * 4)
    assert big.stat().st_size > 3.9 * small.stat().st_size > 7_000_000
    peaks = []
    for i, f in enumerate((small, big)):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, f, tokenizer_dir, tmp_path / f"o{i}"],
                             capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.strip()) * 1024)
    meta = json.loads((tmp_path / "o1" / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) >= 8
    growth = peaks[1] - peaks[0]
    assert growth < 0.5 * (big.stat().st_size - small.stat().st_size), (peaks, growth)


def test_prepare_never_replaces_a_folder_that_is_not_prepared_data(tmp_path, tokenizer_dir, capsys):
    """--out over a folder of stories (a download) is refused, and the folder keeps its files; over prepared data
    (a second run) it is replaced."""
    (tmp_path / "data" / "tinystories").mkdir(parents=True)
    stories = write_tinystories(tmp_path / "data" / "tinystories" / "stories.txt", make_stories(50, seed=3))
    code, out, err = run_cli(["data", "prepare", "--input", stories, "--tokenizer", tokenizer_dir,
                              "--out", tmp_path / "data", "--quiet"], capsys)
    assert code == 2 and "is not prepared data" in err and len(err.strip().splitlines()) == 1
    assert stories.is_file()
    prepared = tmp_path / "tokens"
    for _ in range(2):
        assert run_cli(["data", "prepare", "--input", stories, "--tokenizer", tokenizer_dir, "--out", prepared,
                        "--quiet"], capsys)[0] == 0
    assert (prepared / "meta.json").is_file()


def test_prepare_into_a_log_file_writes_a_few_updates_not_a_flood(tmp_path, tokenizer_dir):
    """Progress that goes to a file (not a terminal) is redrawn at most every PLAIN_INTERVAL_S seconds."""
    stories = write_tinystories(tmp_path / "stories.txt", make_stories(20000, seed=4))
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-m", "storygpt", "data", "prepare", "--input", str(stories), "--tokenizer",
                        str(tokenizer_dir), "--out", str(tmp_path / "data"), "--workers", "1"],
                       stdout=out, stderr=subprocess.STDOUT, check=True, timeout=300)
    text = log.read_text()
    assert "encoding" in text and text.count("\r") <= 3 and len(text.splitlines()) < 10, text
