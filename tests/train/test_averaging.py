"""Weight averaging: a run keeps its weights from train.snapshot_from on, resumes keep the same ones, and
`storygpt average` writes their mean as a model that loads and writes."""

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from storygpt.errors import StoryGPTError
from storygpt.generate.story_model import load
from storygpt.model.checkpoint import LATEST, load_checkpoint
from storygpt.model.load import load_model
from storygpt.train.averaging import average_snapshots, snapshots
from storygpt.train.pretrain import train

KEEP = ["train.eval_interval=10", "train.eval_iters=2", "train.log_interval=5", "train.checkpoint_interval=5",
        "train.snapshot_from=12"]


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("avg") / "run"
    train(data_dir, run, preset="tiny", overrides=KEEP, max_steps=32, progress=False)
    return run


def test_a_run_keeps_its_weights_from_snapshot_from(kept_run):
    """Each regular checkpoint from step 12 on (15, 20, 25, 30) and the last step (32), as the weights then."""
    kept = snapshots(kept_run)
    assert list(kept) == [15, 20, 25, 30, 32]
    final = load_checkpoint(kept_run / LATEST)["model"]
    last = load_file(kept[32])
    assert last.keys() == {k for k in final if k != "output.weight"}  # tied embeddings are stored once
    for k, v in last.items():
        assert torch.equal(v, final[k].float()), k
    assert not torch.equal(load_file(kept[15])["tok_emb.weight"], last["tok_emb.weight"])


def test_a_resumed_run_keeps_the_same_weights(kept_run, tmp_path, data_dir):
    """Stopped at step 17 (between snapshots) and resumed: the same steps, the same tensors."""
    staged = tmp_path / "staged"
    train(data_dir, staged, preset="tiny", overrides=KEEP, max_steps=32, progress=False, until_step=17)
    assert list(snapshots(staged)) == [15]
    train(None, staged, resume=True, progress=False)
    a, b = snapshots(kept_run), snapshots(staged)
    assert list(a) == list(b)
    for step in a:
        ta, tb = load_file(a[step]), load_file(b[step])
        assert all(torch.equal(ta[k], tb[k]) for k in ta), step


def test_the_average_is_the_mean_and_a_model(kept_run, tmp_path):
    out = average_snapshots(kept_run, tmp_path / "avg", from_step=20)
    info = json.loads((out / "config.json").read_text())["storygpt"]
    assert info["averaged_steps"] == [20, 25, 30, 32] and info["step"] == 32
    files = [load_file(p) for p in snapshots(kept_run, 20).values()]
    net, _, _ = load_model(out)
    state = net.state_dict()
    for k in files[0]:
        assert torch.allclose(state[k], sum(f[k] for f in files) / 4, atol=1e-6), k
    assert torch.equal(state["output.weight"], state["tok_emb.weight"])
    story = load(out, dtype="fp32").generate("Once upon a time", max_new_tokens=8, temperature=0)
    assert story.startswith("Once upon a time") and len(story) > len("Once upon a time")


def test_average_command(kept_run, tmp_path, capsys):
    code, out, err = run_cli(["average", kept_run, "--from-step", "25", "--out", tmp_path / "m", "--dtype", "fp16"],
                             capsys)
    assert code == 0, err
    assert "mean of 3 snapshots, steps 25-32, fp16" in out
    assert load_file(tmp_path / "m" / "model.safetensors")["tok_emb.weight"].dtype == torch.float16


def test_average_bad_input(kept_run, tmp_path, data_dir, capsys):
    code, _, err = run_cli(["average", kept_run, "--from-step", "33"], capsys)
    assert code == 2 and "no weight snapshots at or after step 33" in err and "Traceback" not in err
    code, _, err = run_cli(["average", tmp_path], capsys)
    assert code == 2 and "not a run directory" in err
    with pytest.raises(StoryGPTError, match="snapshot_from"):
        train(data_dir, tmp_path / "bad", preset="tiny", overrides=["train.snapshot_from=-1"], max_steps=2,
              progress=False)
