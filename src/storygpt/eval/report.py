"""Write a suite report (suite.run_suite) as DIR/report.json, DIR/report.md and DIR/*.png.

The folder is written whole or not at all (checkpoint.atomic_dir).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_dir

# (key in the report, label, what is better) in table order; a dotted key reads a nested value
MEASURES = [
    ("bits_per_byte", "held-out bits/byte", "lower"),
    ("cloze.accuracy", "cloze", "higher"),
    ("continuation.accuracy", "continuation", "higher"),
    ("grammar.accuracy", "grammar", "higher"),
    ("names", "names kept", "higher"),
    ("names_reused", "prompt's names used again", "higher"),
    ("ended", "ended", "higher"),
    ("repetition", "repeated 4-grams", "lower"),
    ("loops", "loops", "lower"),
    ("distinct_2", "distinct-2", "higher"),
    ("self_bleu", "self-BLEU", "lower"),
    ("spelling", "misspelled words", "lower"),
    ("novelty.max_rouge2", "max Rouge-2 vs train", "lower"),
    ("novelty.shared_4grams", "4-grams in train", "lower"),
    ("speed.tokens_per_s", "tokens/s", "higher"),
]


def value(result: dict, key: str):
    for part in key.split("."):
        if not isinstance(result, dict) or part not in result:
            return None
        result = result[part]
    return result


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
    return str(v)


def markdown(report: dict, samples: int = 3) -> str:
    models = report["models"]
    names = list(models)
    rows = [(key, label, better) for key, label, better in MEASURES if any(value(models[n], key) is not None for n in names)]
    lines = ["# Story-quality report", "", "| measure | better | " + " | ".join(names) + " |",
             "|---|---|" + "---:|" * len(names)]
    for key, label, better in rows:
        lines.append(f"| {label} | {better} | " + " | ".join(fmt(value(models[n], key)) for n in names) + " |")
    for block, title in (("cloze", "Cloze accuracy by category"), ("grammar", "Grammar accuracy by phenomenon")):
        cats = sorted({c for n in names for c in (value(models[n], f"{block}.by") or {})})
        if not cats:
            continue
        lines += ["", f"## {title}", "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for c in cats:
            lines.append(f"| {c} | " + " | ".join(fmt(value(models[n], f"{block}.by.{c}")) for n in names) + " |")
    s = report["suite"]
    lines += ["", "## Settings", "",
              f"{s['prompts_count']} story beginnings x {s['samples']} completions, temperature {s['temperature']}, "
              f"top-p {s['top_p']}, at most {s['max_new_tokens']} new tokens, seed {s['seed']}, {s['dtype']}; "
              f"{s['cloze_items']} cloze items; held-out text: {', '.join(s['text']) or 'none'}; "
              f"training text: {', '.join(s['train']) or 'none'}."]
    for n in names:
        lines += ["", f"## Sample stories: {n}", ""]
        for sample in models[n].get("samples", [])[:samples]:
            text = (sample["prompt"] + "**" + sample["completion"].strip("\n") + "**").replace("\n", " ")
            lines += [f"> {text}", ""]
    return "\n".join(lines).rstrip() + "\n"


def plot(report: dict, out: Path) -> list[Path]:
    """measures.png (one panel per measure, a bar per model), cloze.png and grammar.png (by category)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    models = report["models"]
    names = list(models)
    colors = [f"C{i}" for i in range(len(names))]
    rows = [(k, label, b) for k, label, b in MEASURES if any(value(models[n], k) is not None for n in names)]
    cols = 4
    n_rows = (len(rows) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.6 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax, (key, label, better) in zip(axes.flat, rows):
        vals = [value(models[n], key) or 0.0 for n in names]
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_title(f"{label} ({better} is better)", fontsize=9)
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=20)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    written = [out / "measures.png"]
    fig.savefig(written[0], dpi=110)
    for block in ("cloze", "grammar"):
        cats = sorted({c for n in names for c in (value(models[n], f"{block}.by") or {})})
        if not cats:
            continue
        fig = Figure(figsize=(max(6, 1.1 * len(cats)), 3.2))
        ax = fig.subplots()
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar([x + i * width for x in range(len(cats))], [value(models[n], f"{block}.by.{c}") or 0 for c in cats],
                   width, label=n, color=colors[i])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cats))], cats, fontsize=8, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{block} accuracy by {'category' if block == 'cloze' else 'phenomenon'}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"{block}.png")
        fig.savefig(written[-1], dpi=110)
    return written


def check_out(out: str | os.PathLike) -> None:
    """Refuse, before any work, an --out that is a file or a folder of other things (it would be replaced)."""
    out = Path(out)
    if out.is_file():
        raise StoryGPTError(f"{out}: --out must be a folder, and this is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise StoryGPTError(f"{out}: --out is a folder that holds other files than a report; give a new or a report folder")


def write_report(report: dict, out: str | os.PathLike) -> Path:
    """DIR/report.json, DIR/report.md and the plots; `out` is replaced whole, or untouched on error."""
    out = Path(out)
    with atomic_dir(out) as work:
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (work / "report.md").write_text(markdown(report))
        plot(report, work)
    return out
