"""docs/claims.md from the study's results (benchmarks/claims.py): the tables, the plots, and a verdict per
claim computed from the numbers (confirmed / refuted / cannot tell, with the numbers that decide it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

CHANCE = {"grammar": 0.5, "cloze": 0.25, "continuation": 0.25}
GRADES = ("grammar", "cloze", "continuation")


def grade_of(result: dict, key: str) -> float | None:
    v = result.get(key)
    return v.get("accuracy") if isinstance(v, dict) else v


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def first_reach(stages: list[tuple[float, float]], chance: float, share: float = 0.8) -> float | None:
    """The first fraction of the run where a grade has made `share` of its final gain over chance."""
    final = stages[-1][1]
    if final <= chance:
        return None
    return next(f for f, v in stages if v - chance >= share * (final - chance))


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------
def grammar_first(stages: dict) -> tuple[str, str]:
    order = sorted(stages, key=lambda n: float(n.split("@")[1]))
    series = {g: [(float(n.split("@")[1]), grade_of(stages[n], g)) for n in order] for g in GRADES}
    reach = {g: first_reach(series[g], CHANCE[g]) for g in GRADES}
    text = ", ".join(f"{g} at {reach[g]:.0%}" if reach[g] is not None else f"{g} never above chance" for g in GRADES)
    if None in reach.values():
        return "cannot tell", f"80% of the final gain over chance: {text}."
    later = [g for g in ("cloze", "continuation") if reach[g] > reach["grammar"]]
    same = [g for g in ("cloze", "continuation") if reach[g] == reach["grammar"]]
    if len(later) == 2:
        verdict = "confirmed"
    elif not later and not same:
        verdict = "refuted"
    else:
        verdict = "cannot tell"
    return verdict, f"80% of the final gain over chance reached: {text}."


def needs_capacity(grades: dict, grid: dict) -> tuple[str, str]:
    def trend(names: list[str], axis: int) -> dict:
        xs = [grid[n][axis] for n in names]
        return {g: spearman(xs, [grade_of(grades[n], g) for n in names]) for g in ("cloze", "continuation")}

    widths = sorted((n for n in grades if grid[n][1] == 4), key=lambda n: grid[n][0])
    depths = sorted((n for n in grades if grid[n][0] == 256), key=lambda n: grid[n][1])
    tw, td = trend(widths, 0), trend(depths, 1)
    rises = min(tw.values()) >= 0.8 and min(td.values()) >= 0.8
    flat = max(tw.values()) <= 0.2 and max(td.values()) <= 0.2
    verdict = "confirmed" if rises else "refuted" if flat else "cannot tell"
    return verdict, ("rank correlation of consistency with width: " + ", ".join(f"{g} {v:+.2f}" for g, v in tw.items())
                     + "; with depth: " + ", ".join(f"{g} {v:+.2f}" for g, v in td.items()) + ".")


def one_layer(grades: dict) -> tuple[str, str]:
    d1, d4 = grades.get("d1"), grades.get("w256")
    if not d1 or not d4:
        return "cannot tell", "the 1- and 4-layer models are not both graded."
    g1, g4 = grade_of(d1, "grammar"), grade_of(d4, "grammar")
    c1, c4 = grade_of(d1, "cloze"), grade_of(d4, "cloze")
    k1, k4 = grade_of(d1, "continuation"), grade_of(d4, "continuation")
    grammatical = g1 >= g4 - 0.03
    less_consistent = c1 < c4 - 0.03 and k1 < k4 - 0.03
    verdict = "confirmed" if grammatical and less_consistent else "refuted" if not grammatical or (c1 >= c4 and k1 >= k4) \
        else "cannot tell"
    return verdict, (f"1 layer against 4 (dim 256): grammar {g1:.3f} vs {g4:.3f}, cloze {c1:.3f} vs {c4:.3f}, "
                     f"continuation {k1:.3f} vs {k4:.3f}.")


def no_copying(grades: dict, memo: dict) -> tuple[str, str]:
    parts, copying = [], False
    for n, m in memo.items():
        tr, he = m["train"], m["heldout"]
        parts.append(f"{n}: Rouge-2 precision of its ending {tr['mean_precision']:.3f} on training stories vs "
                     f"{he['mean_precision']:.3f} on held-out ones ({tr['share_precision_above_0.5']:.0%} vs "
                     f"{he['share_precision_above_0.5']:.0%} above 0.5)")
        copying |= tr["mean_precision"] > he["mean_precision"] + 0.1
    nov = {n: (r.get("novelty") or {}) for n, r in grades.items()}
    worst = max(nov, key=lambda n: nov[n].get("max_rouge2", 0))
    parts.append(f"completions of the 44 beginnings: highest mean max-Rouge-2 against all training stories "
                 f"{nov[worst].get('max_rouge2', float('nan')):.3f} ({worst})")
    return ("refuted" if copying else "confirmed"), "; ".join(parts) + "."


def loss_tracks_grades(points: dict) -> tuple[str, str]:
    names = [n for n in points if points[n].get("bits_per_byte") is not None]
    bpb = [points[n]["bits_per_byte"] for n in names]
    rho = {g: spearman(bpb, [grade_of(points[n], g) for n in names]) for g in GRADES}
    verdict = "confirmed" if max(rho.values()) <= -0.7 else "refuted" if min(rho.values()) >= 0 else "cannot tell"
    return verdict, (f"rank correlation with held-out bits/byte over {len(names)} graded models: "
                     + ", ".join(f"{g} {v:+.2f}" for g, v in rho.items()) + " (negative: lower loss, better grade).")


def budget_note(result: dict) -> str:
    """What one budget of minutes means for the grid: how many tokens each model saw, and whether the
    largest models were still undertrained (then the verdicts are about a fixed budget, not capacity)."""
    grades, steps = result["grades"], result["steps"]
    per_step = result["tokens_per_step"]
    most, least = max(steps, key=steps.get), min(steps, key=steps.get)
    best = min(grades, key=lambda n: grades[n]["bits_per_byte"])
    params = {n: grades[n]["params"] for n in grades}
    text = (f"Every model had the same {result['budget_minutes']} minutes, so they saw different amounts of text: "
            f"{steps[most]:,} steps x {per_step:,} tokens for {most} ({params[most] / 1e6:.2f}M parameters) down to "
            f"{steps[least]:,} steps for {least} ({params[least] / 1e6:.2f}M). The lowest held-out loss is {best}'s "
            f"({grades[best]['bits_per_byte']:.3f} bits/byte, {params[best] / 1e6:.2f}M parameters).")
    largest = max(grades, key=params.get)
    if best != largest:
        text += (f" The largest model, {largest}, reaches only {grades[largest]['bits_per_byte']:.3f}: at this budget a "
                 "larger model is undertrained, not more capable, so the verdicts on width and depth say what a fixed "
                 "CPU budget buys. The paper trained every model to convergence on the whole TinyStories set; "
                 "testing capacity that way needs each model trained until its held-out loss stops falling.")
    return text


# --------------------------------------------------------------------------------------------
# Plots and tables
# --------------------------------------------------------------------------------------------
def plot_series(ax, xs, grades: dict, names: list[str], log2: bool = False) -> None:
    for g in GRADES + ("names",):
        ax.plot(xs, [grade_of(grades[n], g) for n in names], "o-", label=g)
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)


def plots(result: dict, out: Path) -> list[str]:
    grades, stages, grid = result["grades"], result["stages"], result["grid"]
    files = []
    fig = Figure(figsize=(12, 3.6))
    a, b, c = fig.subplots(1, 3)
    order = sorted(stages, key=lambda n: float(n.split("@")[1]))
    plot_series(a, [float(n.split("@")[1]) for n in order], stages, order)
    a.set(title="along one run (dim 256, 4 layers)", xlabel="fraction of the run", ylabel="accuracy / share")
    a.legend(fontsize=7)
    widths = sorted((n for n in grades if grid[n][1] == 4), key=lambda n: grid[n][0])
    plot_series(b, [grid[n][0] for n in widths], grades, widths, log2=True)
    b.set(title="width (4 layers)", xlabel="dim")
    depths = sorted((n for n in grades if grid[n][0] == 256), key=lambda n: grid[n][1])
    plot_series(c, [grid[n][1] for n in depths], grades, depths, log2=True)
    c.set(title="depth (dim 256)", xlabel="layers")
    fig.tight_layout()
    fig.savefig(out / "grades.png", dpi=110)
    files.append("grades.png")

    fig = Figure(figsize=(12, 3.4))
    points = grades | stages
    for ax, g in zip(fig.subplots(1, 3), GRADES):
        for n, r in points.items():
            ax.scatter(r["bits_per_byte"], grade_of(r, g), c="C1" if "@" in n else "C0", s=18)
            if "@" not in n:
                ax.annotate(n, (r["bits_per_byte"], grade_of(r, g)), fontsize=7)
        ax.set(xlabel="held-out bits/byte", ylabel=g, title=f"{g} vs held-out loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_grades.png", dpi=110)
    files.append("loss_vs_grades.png")

    fig = Figure(figsize=(4.5 * len(result["memorisation"]), 3.2))
    for ax, (n, m) in zip(np.atleast_1d(fig.subplots(1, len(result["memorisation"]))), result["memorisation"].items()):
        bins = np.linspace(0, 1, 21)
        ax.hist(m["train"]["precision"], bins, alpha=0.6, label="training stories")
        ax.hist(m["heldout"]["precision"], bins, alpha=0.6, label="held-out stories")
        ax.set(title=f"{n}: Rouge-2 precision of its ending", xlabel="Rouge-2 precision", ylabel="stories")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memorisation.png", dpi=110)
    files.append("memorisation.png")
    return files


def table(points: dict, grid: dict | None = None, steps: dict | None = None) -> list[str]:
    cols = ["bits_per_byte", "grammar", "cloze", "continuation", "names", "ended", "distinct_2", "spelling"]
    head = "| model | " + ("dim x layers | params | steps | " if grid else "") + " | ".join(cols) + " |"
    lines = [head, "|---|" + ("---|---:|---:|" if grid else "") + "---:|" * len(cols)]
    for n, r in points.items():
        shape = f"{grid[n][0]} x {grid[n][1]} | {r['params'] / 1e6:.2f}M | {steps[n]} | " if grid else ""
        vals = [grade_of(r, c) for c in cols]
        lines.append(f"| {n} | {shape}" + " | ".join("" if v is None else f"{v:.3f}" for v in vals) + " |")
    return lines


def write_claims(result: dict, out: Path, smoke: bool = False) -> Path:
    figs = out / "claims"
    figs.mkdir(parents=True, exist_ok=True)
    (figs / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plots(result, figs)
    grades, stages = result["grades"], result["stages"]
    verdicts = [
        ("Grammar is learned before consistency", *grammar_first(stages), "grades.png"),
        ("Consistency needs width or depth", *needs_capacity(grades, result["grid"]), "grades.png"),
        ("One layer writes grammatical but less consistent stories", *one_layer(grades), "grades.png"),
        ("The models do not just copy their training stories", *no_copying(grades, result["memorisation"]),
         "memorisation.png"),
        ("Held-out loss and the quality grades move together", *loss_tracks_grades(grades | stages),
         "loss_vs_grades.png"),
    ]
    lines = ["# The TinyStories claims at laptop scale", "",
             f"Made by `python benchmarks/claims.py --budget-minutes {result['budget_minutes']}` on {result['machine']}, "
             f"{result['date']}: every model trained for the same {result['budget_minutes']} minutes on this machine "
             "(turned into a step count per model by a speed probe), on train.txt + train_extra.txt, graded with "
             f"the story-quality suite ({result['samples']} completions per beginning) and held-out bits/byte on "
             "heldout.txt. The numbers of every run: [claims/results.json](claims/results.json)." +
             (" **SMOKE RUN: tiny budget, not a result.**" if smoke else ""), "", "## Verdicts", "",
             "| claim | verdict | the numbers |", "|---|---|---|"]
    lines += [f"| {c} | **{v}** | {why} |" for c, v, why, _ in verdicts]
    lines += ["", "**Reading the verdicts.** " + budget_note(result)]
    lines += ["", "![grades](claims/grades.png)", "", "![loss vs grades](claims/loss_vs_grades.png)", "",
              "![memorisation](claims/memorisation.png)", "", "## The grid", ""]
    lines += table(grades, result["grid"], result["steps"])
    lines += ["", "## Along one run (dim 256, 4 layers)", ""] + table(stages)
    lines += ["", "## Memorisation test (endings of stories cut at 40%, greedy)", "",
              "| model | stories | mean Rouge-2 precision | mean Rouge-2 F1 | share above 0.5 |", "|---|---|---:|---:|---:|"]
    for n, m in result["memorisation"].items():
        for split in ("train", "heldout"):
            s = m[split]
            lines.append(f"| {n} | {split} | {s['mean_precision']:.3f} | {s['mean_f1']:.3f} | "
                         f"{s['share_precision_above_0.5']:.2f} |")
    path = out / "claims.md"
    path.write_text("\n".join(lines) + "\n")
    return path
