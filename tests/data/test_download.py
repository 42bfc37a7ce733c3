"""`storygpt data download tinystories` end to end against a local fake of the Hugging Face Hub
(tests/fakehub.py): listing, download through huggingface_hub, verification, layout, the JSON archive,
a download whose connection drops and resumes, the cache, and the one-line errors when offline."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile

import pytest
from conftest import make_stories, run_cli
from fakehub import FakeHub

from storygpt.text.tokenizer import EOS_TEXT

REPO = "roneneldan/TinyStories"
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes downloads in 10 MiB chunks: a resume starts at one


def tinystories_txt(stories: list[str]) -> bytes:
    return "".join(f"{s}\n{EOS_TEXT}\n" for s in stories).encode()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


@pytest.fixture(scope="module")
def repo_files() -> dict[str, bytes]:
    """The dataset repository's files, small; the V2 train file is just over one 10 MiB chunk."""
    big = tinystories_txt(make_stories(400, seed=5))
    shards = {f"data{i:02d}.json": json.dumps([{"story": s, "source": "GPT-4"} for s in make_stories(60, seed=i)])
              for i in range(2)}
    return {
        "TinyStories-train.txt": tinystories_txt(make_stories(300, seed=1)),
        "TinyStories-valid.txt": tinystories_txt(make_stories(40, seed=2)),
        "TinyStoriesV2-GPT4-train.txt": big * (CHUNK // len(big) + 2),
        "TinyStoriesV2-GPT4-valid.txt": tinystories_txt(make_stories(40, seed=3)),
        "TinyStories_all_data.tar.gz": tar_gz({name: text.encode() for name, text in shards.items()}),
        "README.md": b"# TinyStories\n",
    }


def download(args: list, hub_url: str, hf_home, **env) -> subprocess.CompletedProcess:
    """`storygpt data download tinystories ARGS` in a fresh process (huggingface_hub reads HF_* at import)."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME")}
    env = {**inherited, "HF_ENDPOINT": hub_url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    cmd = [sys.executable, "-m", "storygpt", "data", "download", "tinystories", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("storygpt: error: "), result.stderr
    return lines[0]


def test_download_v1_then_prepare_then_cached(tmp_path, repo_files, tokenizer_dir, capsys):
    out, hf_home = tmp_path / "tinystories", tmp_path / "hf"
    with FakeHub({REPO: repo_files}) as hub:
        result = download(["--out", out], hub.url, hf_home)
        assert result.returncode == 0, result.stderr
        assert (out / "train" / "TinyStories-train.txt").read_bytes() == repo_files["TinyStories-train.txt"]
        assert (out / "validation" / "TinyStories-valid.txt").read_bytes() == repo_files["TinyStories-valid.txt"]
        files = sorted(p.name for p in out.rglob("*") if p.is_file())
        assert files == ["TinyStories-train.txt", "TinyStories-valid.txt"]
        assert "next: storygpt data prepare --input" in result.stdout
        assert any(path.startswith("/api/datasets/roneneldan/TinyStories/revision/main") for _, path, _ in hub.requests)
        gets = len(hub.content_gets())
        assert gets == 2
        # in the cache: a second run lists the repository again but downloads nothing
        again = download(["--out", out], hub.url, hf_home)
        assert again.returncode == 0, again.stderr
        assert len(hub.content_gets()) == gets
        seen = len(hub.requests)
        offline = download(["--out", tmp_path / "copy"], hub.url, hf_home, HF_HUB_OFFLINE="1")
        assert offline.returncode == 0, offline.stderr
        assert len(hub.requests) == seen  # HF_HUB_OFFLINE: not one request
        copy = tmp_path / "copy" / "train" / "TinyStories-train.txt"
        assert copy.read_bytes() == repo_files["TinyStories-train.txt"]
    # the Hub is gone now: the cached files still serve, with a warning
    gone = download(["--out", out], hub.url, hf_home)
    assert gone.returncode == 0 and "using the cached files" in gone.stderr, gone.stderr
    # data prepare takes the result directly
    code, _, err = run_cli(["data", "prepare", "--input", out / "train", "--tokenizer", tokenizer_dir,
                                 "--out", tmp_path / "data", "--workers", "1", "--quiet"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["splits"]["train"]["stories"] + meta["splits"]["val"]["stories"] == 300


def test_interrupted_download_resumes(tmp_path, repo_files):
    name = "TinyStoriesV2-GPT4-train.txt"
    with FakeHub({REPO: repo_files}) as hub:
        hub.cut[name] = CHUNK + 12_345  # the connection drops after the first chunk and a bit
        result = download(["--version", "v2", "--split", "train", "--out", tmp_path / "out"], hub.url, tmp_path / "hf")
        assert result.returncode == 0, result.stderr
        gets = hub.content_gets()
    assert len(gets) == 2, gets
    assert gets[0][1] is None and gets[1][1] == f"bytes={CHUNK}-", gets  # resumed where the kept bytes end
    assert (tmp_path / "out" / "train" / name).read_bytes() == repo_files[name]
    assert not (tmp_path / "out" / "validation").exists()


def test_json_archive_is_extracted_for_prepare(tmp_path, repo_files, tokenizer_dir, capsys):
    out = tmp_path / "out"
    with FakeHub({REPO: repo_files}) as hub:
        result = download(["--version", "json", "--out", out, "--quiet"], hub.url, tmp_path / "hf")
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in (out / "all").glob("*.json")) == ["data00.json", "data01.json"]
        again = download(["--version", "json", "--out", out, "--quiet"], hub.url, tmp_path / "hf")
        assert again.returncode == 0, again.stderr
        wrong = download(["--version", "json", "--split", "train", "--out", out], hub.url, tmp_path / "hf")
        assert "has no 'train' split" in one_line_error(wrong)
    code, _, err = run_cli(["data", "prepare", "--input", out / "all", "--tokenizer", tokenizer_dir,
                                 "--out", tmp_path / "data", "--workers", "1", "--quiet"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["splits"]["train"]["stories"] + meta["splits"]["val"]["stories"] == 120


def test_unsafe_archive_is_refused(tmp_path, repo_files):
    evil = {**repo_files, "TinyStories_all_data.tar.gz": tar_gz({"data00.json": b"[]", "../evil.json": b"[]"})}
    with FakeHub({REPO: evil}) as hub:
        error = one_line_error(download(["--version", "json", "--out", tmp_path / "out"], hub.url, tmp_path / "hf"))
    assert "unsafe path '../evil.json'" in error
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "out" / "all").exists()


def test_checksum_mismatch_is_an_error(tmp_path, repo_files):
    with FakeHub({REPO: repo_files}, listed_sha256={"TinyStories-valid.txt": "0" * 64}) as hub:
        error = one_line_error(download(["--split", "validation", "--out", tmp_path / "out"], hub.url, tmp_path / "hf"))
    assert "TinyStories-valid.txt: checksum mismatch" in error


def test_offline_is_one_clear_line(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    error = one_line_error(download(["--out", tmp_path / "out"], dead, tmp_path / "hf"))
    assert f"cannot reach {dead}" in error
    error = one_line_error(download(["--out", tmp_path / "out"], dead, tmp_path / "hf", HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE is set and TinyStories-train.txt is not in the cache" in error
    assert not (tmp_path / "out").exists()
