"""The story-quality suite: measures on known cases, a hand-set model, determinism, the CLI, bad input."""

import json
import math

import pytest
import torch
import yaml
from conftest import run_cli, write_tinystories

from storygpt.errors import StoryGPTError
from storygpt.eval.minimal_pairs import PHENOMENA
from storygpt.eval.novelty import TrainingIndex
from storygpt.eval.scoring import score_continuations, split_tokens
from storygpt.eval.suite import SuiteConfig, cloze, continuation_items, grammar, load_cloze, load_prompts, run_suite, split_story
from storygpt.generate.story_model import StoryModel
from storygpt.model.config import ModelConfig
from storygpt.model.transformer import Transformer
from storygpt.text import measures
from storygpt.text.tokenizer import Tokenizer


# --------------------------------------------------------------------------------------------
# A hand-set bigram model: one-hot embeddings, attention and MLP switched off (zero output
# projections), so the logits after token t are exactly column t of the classifier.
# --------------------------------------------------------------------------------------------
def bigram_model(tokenizer: Tokenizer, logits: dict[tuple[int, int], float]) -> StoryModel:
    V = tokenizer.vocab_size
    cfg = ModelConfig(vocab_size=V, dim=V, n_layers=1, n_heads=1, hidden_dim=8, max_seq_len=64,
                      tie_embeddings=False, norm_eps=1e-12)
    net = Transformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.tok_emb.weight.copy_(torch.eye(V))
        net.norm.weight.fill_(1 / math.sqrt(V))  # RMSNorm of a one-hot row is sqrt(V) times it
        for layer in net.layers:
            layer.attn_norm.weight.fill_(1.0)
            layer.mlp_norm.weight.fill_(1.0)
        for (prev, nxt), value in logits.items():
            net.output.weight[nxt, prev] = value
    return StoryModel(net, tokenizer)


def bigram_logprob(tokenizer, logits, ids: list[int]) -> float:
    """log P(ids[1:] | ids[:-1]) under the bigram table, computed directly."""
    V = tokenizer.vocab_size
    total = 0.0
    for prev, nxt in zip(ids, ids[1:]):
        row = torch.zeros(V)
        for (p, n), v in logits.items():
            if p == prev:
                row[n] = v
        total += torch.log_softmax(row, 0)[nxt].item()
    return total


def test_cloze_with_a_hand_set_model(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    ctx, ball = split_tokens(bigram_model(tok, {}), "Lily threw the", " ball")
    path = [ctx[-1]] + ball
    table = {(a, b): 6.0 for a, b in zip(path, path[1:])}  # the model expects " ball" after "the"
    model = bigram_model(tok, table)
    items = [{"prompt": "Lily threw the", "good": " ball", "bad": [" cake", " hat"], "cat": "object"},
             {"prompt": "Lily threw the", "good": " cake", "bad": [" ball"], "cat": "trap"}]
    result = cloze(model, items)
    assert result == {"accuracy": 0.5, "items": 2, "by": {"object": 1.0, "trap": 0.0}}
    # the summed log-probability is exactly the bigram model's, for one- and several-token continuations
    for text in (" ball", " cake", " the ball went up"):
        ctx, cont = split_tokens(model, "Lily threw the", text)
        scored = score_continuations(model, [("Lily threw the", text)])[0]
        assert scored.tokens == len(cont)
        assert scored.logprob == pytest.approx(bigram_logprob(tok, table, [ctx[-1]] + cont), abs=1e-4)


def test_grammar_covers_six_phenomena(tokenizer_dir):
    model = bigram_model(Tokenizer.load(tokenizer_dir), {})
    result = grammar(model, per_phenomenon=100)
    assert result["items"] == 600 and set(result["by"]) == set(PHENOMENA)


# --------------------------------------------------------------------------------------------
# Text measures on known cases
# --------------------------------------------------------------------------------------------
def test_repetition_loops_distinct_spelling_known_values():
    assert measures.repetition("a b c d a b c d") == pytest.approx(1 / 5)
    assert measures.repetition("one two three four five") == 0.0
    assert measures.repetition("too short") is None
    assert measures.loops("Tom went to the park. He saw a dog. Tom went to the park!")
    assert not measures.loops("Tom went to the park. He saw a dog. Yes. Yes.")  # short sentences do not count
    assert measures.distinct(["a b a b", "a b"]) == pytest.approx(2 / 4)  # bigrams ab ba ab | ab
    assert measures.misspelled("The cat sat on the mat. Xqzzt blorf.") == (2, 8)


def test_self_bleu_is_100_for_copies_and_low_for_different_texts():
    same = ["the dog ran to the big red house"] * 3
    assert measures.self_bleu(same) == pytest.approx(100.0)
    different = ["the dog ran to the big red house", "a cat slept under a warm blanket", "birds sing songs in tall trees"]
    assert measures.self_bleu(different) < 10


def test_names_detected_and_renaming_caught():
    assert measures.names('Once upon a time, there was a bear named Bruno. Bruno said, "Hi, Mom!"') == ["Bruno"]
    prompt = "Once upon a time, there was a bear named Bruno. He loved honey."
    assert measures.keeps_names(prompt, " One day, Bruno found a tree. He was happy.")
    assert measures.keeps_names(prompt, " He met a girl named Sue. Sue was kind.")       # introduced: fine
    assert not measures.keeps_names(prompt, " One day, Ted found a tree. Ted was happy.")  # renamed
    assert measures.keeps_names(prompt, " The end.")
    # the names brought in, in order of first use: introduced ones and the prompt's own are not among them
    assert measures.new_names(prompt, " Ted met a girl named Sue. Sue, Ted and Max played. Bruno smiled.") == ["Ted", "Max"]
    assert measures.new_names(prompt, " He met a girl named Sue. Sue was kind.") == []


def test_rouge2_precision_and_shared_4grams_by_hand():
    index = TrainingIndex(["The cat sat on a log.", "On the mat the dog slept.", "Birds fly."])
    # completion bigrams: the cat, cat sat, sat on, on the, the mat -> story 0 has 3 of 5, story 1 has 2 of 5
    assert index.max_rouge2("the cat sat on the mat") == (pytest.approx(3 / 5), 0)
    # 4-grams: "the cat sat on" (in story 0), "cat sat on the", "sat on the mat" -> 1 of 3
    assert index.shared_4grams("the cat sat on the mat") == (1, 3)
    assert index.max_rouge2("zebras") == (0.0, -1)
    # counts are clipped: "the the the" has bigram (the, the) twice, a story with it once gives 1/2
    assert TrainingIndex(["the the"]).max_rouge2("the the the")[0] == pytest.approx(1 / 2)


def test_continuation_items_cut_and_distractors():
    stories = [f"Story {i} starts here and it goes on with many more words until it ends with {i} cats." for i in range(6)]
    head, rest = split_story(stories[0], 0.4)
    assert head + rest == stories[0] and len(head.split()) == round(0.4 * len(stories[0].split()))
    items = continuation_items(stories, 0.4, seed=3)
    assert items == continuation_items(stories, 0.4, seed=3) and len(items) == 6
    for story, item in zip(stories, items):
        assert item["prompt"] + item["options"][0] == story and len(item["options"]) == 4
        assert all(o not in story for o in item["options"][1:])


# --------------------------------------------------------------------------------------------
# The suite end to end
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def suite_inputs(tmp_path_factory, stories):
    d = tmp_path_factory.mktemp("suite")
    prompts = d / "prompts.yaml"
    prompts.write_text(yaml.safe_dump(["Once upon a time, there was a little dog named Ben.", "One day, Mia went to the"]))
    return {"prompts": prompts, "held": write_tinystories(d / "held.txt", stories[:12]),
            "train": write_tinystories(d / "train.txt", stories[100:200])}


def small_config(inputs, **kw) -> SuiteConfig:
    return SuiteConfig(text=[str(inputs["held"])], train=[str(inputs["train"])], prompts=str(inputs["prompts"]),
                       samples=3, max_new_tokens=24, grammar_per_phenomenon=5, **kw)


def test_suite_is_deterministic_and_complete(tiny_run, suite_inputs):
    first = run_suite([f"tiny={tiny_run}"], small_config(suite_inputs), progress=False)
    graded = []
    second = run_suite([f"tiny={tiny_run}", f"again={tiny_run}"], small_config(suite_inputs), progress=False,
                       on_graded=lambda name, result: graded.append((name, result)))
    assert [name for name, _ in graded] == ["tiny", "again"]
    assert all(result is second["models"][name] for name, result in graded)
    for report in (first, second):
        for result in report["models"].values():
            del result["speed"]
    assert first["suite"] == second["suite"]
    assert first["models"]["tiny"] == second["models"]["tiny"] == second["models"]["again"]
    r = first["models"]["tiny"]
    for key in ("bits_per_byte", "cloze", "continuation", "grammar", "ended", "repetition", "loops", "distinct_2",
                "self_bleu", "novelty", "spelling", "names", "samples"):
        assert key in r, key
    assert r["cloze"]["items"] == len(load_cloze()) >= 200
    assert r["continuation"]["items"] == 12 and r["grammar"]["items"] == 30
    assert len(r["samples"]) == 2 and 0 <= r["names"] <= 1 and 0 <= r["novelty"]["shared_4grams"] <= 1


def test_suite_checks_every_model_path_before_grading_any(tiny_run, suite_inputs, tmp_path):
    graded = []
    with pytest.raises(StoryGPTError, match="no such model or run directory"):
        run_suite([f"tiny={tiny_run}", f"gone={tmp_path / 'gone'}"], small_config(suite_inputs), progress=False,
                  on_graded=lambda name, result: graded.append(name))
    assert graded == []


def test_novelty_sees_completions_copied_from_training_text(tiny_run, suite_inputs, tmp_path):
    from storygpt import load

    model = load(tiny_run, dtype="fp32")
    copied = [model.generate(p, temperature=0, max_new_tokens=24)[len(p):] for p in load_prompts(suite_inputs["prompts"])]
    train = write_tinystories(tmp_path / "copied.txt", copied + ["An unrelated story about a fox."])
    cfg = small_config(suite_inputs, temperature=0.0)
    cfg.train = [str(train)]
    novelty = run_suite([str(tiny_run)], cfg, progress=False)["models"]["run"]["novelty"]
    assert novelty == {"max_rouge2": 1.0, "share_above_0.5": 1.0, "shared_4grams": 1.0}


def test_suite_cli_writes_report_and_prints_json(tiny_run, suite_inputs, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, err = run_cli(["eval", "--suite", "stories", "--model", tiny_run, "--model", f"again={tiny_run}",
                                 "--text", suite_inputs["held"], "--prompts", suite_inputs["prompts"], "--samples", 2,
                                 "--max-new-tokens", 16, "--grammar-pairs", 3, "--out", out, "--json", "--quiet"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert list(report["models"]) == ["run", "again"]
    assert report == json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert "| cloze | higher |" in md and "Sample stories: again" in md
    assert {p.name for p in out.glob("*.png")} == {"measures.png", "cloze.png", "grammar.png"}


def test_packaged_prompts_are_the_papers_44():
    prompts = load_prompts()
    assert len(prompts) == 44 and prompts[0].startswith("Once upon a time, there lived a bunny in a field.")


@pytest.mark.parametrize("case", ["cloze_line", "cloze_keys", "yaml_not_list", "yaml_numbers", "yaml_broken", "out_is_busy"])
def test_suite_bad_input_one_line_exit_2_nothing_written(case, tiny_run, suite_inputs, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["eval", "--suite", "stories", "--model", tiny_run, "--out", out, "--samples", 1, "--quiet"]
    bad = tmp_path / "bad"
    good_item = json.dumps({"prompt": "A", "good": " b", "bad": [" c"], "cat": "x"})
    if case == "cloze_line":
        bad.write_text(good_item + "\n" + good_item + "\n{not json\n")
        args += ["--cloze", bad]
        expect = ":3:"
    elif case == "cloze_keys":
        bad.write_text(good_item + "\n" + json.dumps({"prompt": "A", "good": " b"}) + "\n")
        args += ["--cloze", bad]
        expect = ":2:"
    elif case == "yaml_not_list":
        bad.write_text("prompt: Once upon a time\n")
        args += ["--prompts", bad]
        expect = "YAML list"
    elif case == "yaml_numbers":
        bad.write_text("- Once upon a time\n- 42\n")
        args += ["--prompts", bad]
        expect = "YAML list"
    elif case == "yaml_broken":
        bad.write_text("- 'Once upon\n- [\n")
        args += ["--prompts", bad]
        expect = "not valid YAML"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expect = "other files"
    code, _, err = run_cli(args, capsys)
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert (not out.exists()) if case != "out_is_busy" else [p.name for p in out.iterdir()] == ["notes.txt"]


def test_suite_record_keeps_the_measures_in_the_model_dir(tiny_run, suite_inputs, tmp_path, capsys):
    import shutil

    model_dir = shutil.copytree(tiny_run / "model", tmp_path / "model")
    code, _, err = run_cli(["eval", "--suite", "stories", "--model", model_dir, "--prompts", suite_inputs["prompts"],
                            "--samples", 1, "--max-new-tokens", 8, "--grammar-pairs", 2, "--out", tmp_path / "r",
                            "--record", "--quiet"], capsys)
    assert code == 0, err
    kept = json.loads((model_dir / "config.json").read_text())["storygpt"]["suite"]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert kept["measures"]["cloze"] == report["models"]["model"]["cloze"] and "samples" not in kept["measures"]
    assert kept["settings"]["samples"] == 1
