"""The story-quality suite: grade story models the way the TinyStories paper did, offline.

The paper had GPT-4 grade completions of 44 story beginnings for grammar, creativity and consistency.
Here each quality has automatic, seeded measures (`storygpt eval --suite stories`):

- likelihood tests (the model ranks texts; see scoring.py): `cloze` (consistency: names, pronouns,
  objects, cause, emotion, negation, counting, plot), `grammar` (minimal pairs of six phenomena,
  minimal_pairs.py), `continuation` (a held-out story's true rest against rests of other stories),
  `bits_per_byte` on held-out text;
- measures of N completions of each of the paper's beginnings (generation.py): `ended`,
  `repetition`, `loops`, `distinct_2`, `self_bleu`, `novelty`, `spelling`, `names`, `speed`.

`run_suite` returns the report (a dict; docs/guides/evaluation.md describes it); eval/report.py writes it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from storygpt.errors import StoryGPTError
from storygpt.generate.story_model import StoryModel, load
from storygpt.model.load import resolve_model_path, shipped_or
from storygpt.progress import tqdm_bar
from storygpt.text.stories import expand_inputs, iter_stories

from .minimal_pairs import grammar_pairs
from .scoring import score_continuations

CLOZE_FILE = "cloze.jsonl"
PROMPTS_FILE = "eval_prompts.yaml"


@dataclass
class SuiteConfig:
    text: list[str] = field(default_factory=list)   # held-out stories: bits_per_byte and continuation
    train: list[str] = field(default_factory=list)  # training stories: novelty
    cloze: str | None = None                         # default: the package's cloze.jsonl
    prompts: str | None = None                       # default: the package's copy of the paper's prompts
    samples: int = 10                                # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    grammar_per_phenomenon: int = 100
    cut: float = 0.4                                 # continuation: share of a story's words given
    seed: int = 0
    dtype: str = "fp32"
    device: str = "auto"
    batch_size: int = 32

    def validate(self) -> None:
        if self.samples < 1:
            raise StoryGPTError(f"--samples must be >= 1, got {self.samples}")
        if not 0 < self.cut < 1:
            raise StoryGPTError(f"--cut must be in (0, 1), got {self.cut}")
        if self.grammar_per_phenomenon < 1:
            raise StoryGPTError(f"grammar pairs per phenomenon must be >= 1, got {self.grammar_per_phenomenon}")


# --------------------------------------------------------------------------------------------
# Inputs: read and checked before any model runs
# --------------------------------------------------------------------------------------------
def resource(name: str) -> Path:
    return Path(str(resources.files("storygpt") / "resources" / name))


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """The story beginnings: a YAML list of strings (the paper's `Evaluation prompts.yaml`)."""
    import yaml

    path = Path(path) if path else resource(PROMPTS_FILE)
    try:
        prompts = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoryGPTError(f"{path}: no such prompts file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise StoryGPTError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise StoryGPTError(f"{path}: expected a YAML list of story beginnings (non-empty strings)")
    return prompts


def load_cloze(path: str | os.PathLike | None = None) -> list[dict]:
    """Cloze items, one JSON object a line: {"prompt", "good", "bad": [...], "cat"}."""
    path = Path(path) if path else resource(CLOZE_FILE)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise StoryGPTError(f"{path}: no such cloze file") from None
    except UnicodeDecodeError:
        raise StoryGPTError(f"{path}: not UTF-8 text") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise StoryGPTError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        ok = (isinstance(item, dict) and isinstance(item.get("prompt"), str) and isinstance(item.get("good"), str)
              and item["good"] and isinstance(item.get("bad"), list) and item["bad"]
              and all(isinstance(b, str) and b and b != item["good"] for b in item["bad"])
              and isinstance(item.get("cat", ""), str))
        if not ok:
            raise StoryGPTError(f"{path}:{n}: a cloze item needs \"prompt\" (text), \"good\" (text) and \"bad\" "
                                f"(a list of other texts), and optionally \"cat\" (text)")
        items.append({"prompt": item["prompt"], "good": item["good"], "bad": item["bad"], "cat": item.get("cat") or "all"})
    if not items:
        raise StoryGPTError(f"{path}: no cloze items")
    return items


def read_stories(files: list[str], what: str) -> list[str]:
    stories = list(iter_stories(expand_inputs(files)))
    if not stories:
        raise StoryGPTError(f"{what}: no stories in {', '.join(map(str, files))}")
    return stories


# --------------------------------------------------------------------------------------------
# Likelihood tests
# --------------------------------------------------------------------------------------------
def accuracy_by(rights: list[bool], groups: list[str]) -> dict:
    by: dict[str, list[bool]] = {}
    for right, g in zip(rights, groups):
        by.setdefault(g, []).append(right)
    return {"accuracy": sum(rights) / len(rights), "items": len(rights),
            "by": {g: sum(v) / len(v) for g, v in sorted(by.items())}}


def cloze(model: StoryModel, items: list[dict], batch_size: int = 32) -> dict:
    """Right when the good continuation's summed log-likelihood beats every bad one's."""
    pairs = [(it["prompt"], option) for it in items for option in [it["good"], *it["bad"]]]
    scores = iter(score_continuations(model, pairs, batch_size))
    rights = []
    for it in items:
        good, *bad = [next(scores).logprob for _ in range(1 + len(it["bad"]))]
        rights.append(all(good > b for b in bad))
    return accuracy_by(rights, [it["cat"] for it in items])


def grammar(model: StoryModel, per_phenomenon: int = 100, seed: int = 0, batch_size: int = 32) -> dict:
    """Right when the grammatical sentence of a minimal pair is the more likely one."""
    pairs = grammar_pairs(per_phenomenon, seed)
    scores = score_continuations(model, [("", s) for p in pairs for s in (p["good"], p["bad"])], batch_size)
    rights = [scores[2 * i].logprob > scores[2 * i + 1].logprob for i in range(len(pairs))]
    return accuracy_by(rights, [p["phenomenon"] for p in pairs])


def split_story(story: str, cut: float) -> tuple[str, str]:
    """(the first `cut` of the story's words, the rest starting with its space)."""
    spans = [i for i, ch in enumerate(story) if ch.isspace() and (i == 0 or not story[i - 1].isspace())]
    n_words = len(spans) + 1
    at = spans[max(0, round(n_words * cut) - 1)] if spans else len(story)
    return story[:at], story[at:]


def trim_words(text: str, n_words: int) -> str:
    """The first whole sentences of `text` that reach `n_words` words (a similar length)."""
    out, count = [], 0
    for piece in text.replace("\n", "\n ").split(" "):
        out.append(piece)
        count += bool(piece.strip())
        if count >= n_words and piece.rstrip().endswith((".", "!", "?", '."', '!"', '?"')):
            break
    return " ".join(out).replace("\n ", "\n")


def continuation_items(stories: list[str], cut: float = 0.4, distractors: int = 3, seed: int = 0) -> list[dict]:
    """For each story with at least 10 words: its beginning, its true rest and `distractors` rests of
    other stories (chosen with `seed`) trimmed to a similar length, the true rest first."""
    splits = [split_story(s, cut) for s in stories]
    usable = [i for i, s in enumerate(stories) if len(s.split()) >= 10]
    if len(usable) < distractors + 1:
        raise StoryGPTError(f"continuation needs at least {distractors + 1} stories of 10 words or more")
    rng = random.Random(seed)
    items = []
    for i in usable:
        head, rest = splits[i]
        others = rng.sample([j for j in usable if j != i], distractors)
        n_words = len(rest.split())
        items.append({"prompt": head, "options": [rest] + [trim_words(splits[j][1], n_words) for j in others]})
    return items


def continuation(model: StoryModel, stories: list[str], cut: float = 0.4, seed: int = 0, batch_size: int = 16) -> dict:
    """Right when the story's true rest has the highest mean log-likelihood per token."""
    items = continuation_items(stories, cut, seed=seed)
    pairs = [(it["prompt"], option) for it in items for option in it["options"]]
    scores = iter(score_continuations(model, pairs, batch_size))
    rights = []
    for it in items:
        true, *other = [next(scores).mean for _ in it["options"]]
        rights.append(all(true > o for o in other))
    return {"accuracy": sum(rights) / len(rights), "items": len(rights)}


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------
def model_names(specs: list[str]) -> list[tuple[str, str | None]]:
    """[NAME=]PATH specs -> (name, path); 'default' (or no spec) is the shipped model."""
    out, seen = [], set()
    for spec in specs or ["default"]:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path_or_none = None if path == "default" else path
        name = name or ("default" if path_or_none is None else Path(path).resolve().name)
        if name in seen:
            raise StoryGPTError(f"two models are named {name!r}: name them with NAME=PATH")
        seen.add(name)
        out.append((name, path_or_none))
    return out


def run_suite(models: list[str], cfg: SuiteConfig | None = None, progress: bool = True,
              on_graded: Callable[[str, dict], None] | None = None) -> dict:
    """Grade each model ([NAME=]PATH, 'default' = the shipped model); returns the report. `on_graded(name,
    result)` is called as each model is done (a long study keeps its grades as it goes)."""
    from .bpb import evaluate
    from .generation import generation_measures
    from .novelty import TrainingIndex

    cfg = cfg or SuiteConfig()
    cfg.validate()
    named = model_names(models)
    prompts = load_prompts(cfg.prompts)
    items = load_cloze(cfg.cloze)
    heldout = read_stories(cfg.text, "--text") if cfg.text else []
    for _, path in named:  # a bad path fails now, not after the models before it were graded
        resolve_model_path(shipped_or(path))
    index = None
    if cfg.train:
        with tqdm_bar(total=1, desc="indexing --train", enabled=progress, leave=False):
            index = TrainingIndex(read_stories(cfg.train, "--train"))
    report = {"suite": {**asdict(cfg), "prompts_count": len(prompts), "cloze_items": len(items)}, "models": {}}
    for name, path in named:  # one model in memory at a time
        model = load(path, device=cfg.device, dtype=cfg.dtype)
        steps = tqdm_bar(total=5, desc=name, enabled=progress)
        result = {"path": model.path, "params": model.model.num_params(), "context": model.context}
        if heldout:
            result["bits_per_byte"] = evaluate(model.path, text=cfg.text, device=cfg.device)["bits_per_byte"]
        steps.update()
        result["cloze"] = cloze(model, items, cfg.batch_size)
        steps.update()
        result["grammar"] = grammar(model, cfg.grammar_per_phenomenon, cfg.seed, cfg.batch_size)
        steps.update()
        if heldout:
            result["continuation"] = continuation(model, heldout, cfg.cut, cfg.seed)
        steps.update()
        result |= generation_measures(model, prompts, cfg, index, progress)
        steps.update()
        steps.close()
        report["models"][name] = result
        del model
        if on_graded:
            on_graded(name, result)
    return report
