"""The README's front page cannot rot: its two commands for a fresh machine are the ones CI runs, its links resolve,
it stays short, and its ten-minute tour runs word for word, at a tiny setting, from the download (from a stand-in
for the Hugging Face Hub on loopback) to the served model answering curl."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_stories
from fakehub import FakeHub

from storygpt.text.tokenizer import EOS_TEXT

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# The tour at a tiny setting: what changes, and nothing else (the tokenizer, the model and the steps get smaller).
TINY = [
    (r"--vocab-size \d+", "--vocab-size 320"),
    (r"--preset small", "--preset tiny"),
    (r"--max-steps \d+", "--max-steps 30"),
    (r"--max-new-tokens \d+", "--max-new-tokens 20"),
    (r"\"max_tokens\": \d+", "\"max_tokens\": 10"),
]


def section(heading: str) -> str:
    start = README.index(f"\n## {heading}\n")
    end = README.find("\n## ", start + 1)
    return README[start: end if end > 0 else len(README)]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_the_fresh_machine_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [ci[i + 1] for i, line in enumerate(ci) if line.startswith("# --- README command")]
    assert len(commands) == 2
    blocks = [line for block in bash_blocks(README) for line in block.splitlines()]
    for command in commands:
        assert command in blocks, command


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 250


def test_every_relative_link_resolves():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    relative = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:|#", link)]
    assert relative, "no relative link found: the pattern is wrong"
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_the_ten_minute_tour_runs(tmp_path):
    block = bash_blocks(section("Ten-minute tour (CPU)"))
    assert len(block) == 1
    script = block[0]
    for pattern, tiny in TINY:
        script, n = re.subn(pattern, tiny, script)
        assert n, f"the tour no longer has {pattern}: update TINY"
    port = re.search(r"--port (\d+)", script).group(1)
    script = script.replace(port, str(free_port()))
    stories = "".join(f"{s}\n{EOS_TEXT}\n" for s in make_stories(400, seed=11)).encode()
    assert shutil.which("curl"), "curl is needed: the tour uses it"
    with FakeHub({"roneneldan/TinyStories": {"TinyStories-valid.txt": stories}}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "data" / "tinystories" / "validation" / "TinyStories-valid.txt").read_bytes() == stories
    assert "bits/byte" in run.stdout  # storygpt eval
    assert '"object":"text_completion"' in run.stdout.replace(" ", "")  # the served model answered curl
