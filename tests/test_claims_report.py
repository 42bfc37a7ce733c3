"""benchmarks/claims_report.py: the verdicts docs/claims.md states follow from the numbers they are given."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import claims_report as report  # noqa: E402

GRID = {"w64": [64, 4], "w128": [128, 4], "w256": [256, 4], "w512": [512, 4], "d1": [256, 1], "d2": [256, 2],
        "d8": [256, 8]}


def grades(bpb: float, grammar: float, cloze: float, continuation: float, params: float) -> dict:
    return {"bits_per_byte": bpb, "grammar": {"accuracy": grammar}, "cloze": {"accuracy": cloze},
            "continuation": {"accuracy": continuation}, "names": 0.5, "params": params,
            "novelty": {"max_rouge2": 0.2}}


def stages(grammar_at: float, consistency_at: float) -> dict:
    """Ten stages along a run: grammar jumps to its final value at `grammar_at`, cloze and continuation at
    `consistency_at` (fractions of the run)."""
    out = {}
    for k in range(1, 11):
        f = k / 10
        g = 0.9 if f >= grammar_at else 0.55
        c = 0.6 if f >= consistency_at else 0.3
        out[f"w256@{f:.1f}"] = grades(2.0 - f, g, c, c, 3e6)
    return out


def capacity_grid(rising: bool) -> dict:
    """Consistency rises with width and depth (or falls, when not `rising`); loss falls where it rises."""
    size = {"w64": 1, "w128": 2, "w256": 4, "w512": 8, "d1": 1, "d2": 2, "d8": 8}
    out = {}
    for name, s in size.items():
        c = 0.3 + 0.05 * s if rising else 0.8 - 0.05 * s
        out[name] = grades(1.5 - c, 0.85, c, c, s * 1e6)
    return out


def test_grammar_first_reads_the_stages():
    assert report.grammar_first(stages(0.2, 0.6))[0] == "confirmed"
    assert report.grammar_first(stages(0.6, 0.2))[0] == "refuted"
    assert report.grammar_first(stages(0.4, 0.4))[0] == "cannot tell"
    verdict, why = report.grammar_first(stages(0.2, 0.6))
    assert "grammar at 20%" in why and "cloze at 60%" in why


def test_capacity_one_layer_and_loss_verdicts():
    assert report.needs_capacity(capacity_grid(True), GRID)[0] == "confirmed"
    assert report.needs_capacity(capacity_grid(False), GRID)[0] == "refuted"
    rising = capacity_grid(True)
    assert report.one_layer(rising)[0] == "confirmed"  # same grammar, 1 layer less consistent than 4
    rising["d1"]["grammar"]["accuracy"] = 0.6
    assert report.one_layer(rising)[0] == "refuted"  # one layer is not grammatical here
    together = {n: grades(1.5 - 0.1 * k, 0.6 + 0.03 * k, 0.3 + 0.05 * k, 0.3 + 0.04 * k, 1e6) for k, n in enumerate(GRID)}
    verdict, why = report.loss_tracks_grades(together)
    assert verdict == "confirmed" and "over 7 graded models" in why
    apart = {n: grades(1.0 + 0.1 * k, 0.6 + 0.03 * k, 0.3 + 0.05 * k, 0.3 + 0.04 * k, 1e6) for k, n in enumerate(GRID)}
    assert report.loss_tracks_grades(apart)[0] == "refuted"


def memo(train: float, heldout: float) -> dict:
    def split(p):
        return {"precision": [p] * 4, "f1": [p] * 4, "mean_precision": p, "mean_f1": p, "share_precision_above_0.5": 0.0}
    return {"w256": {"train": split(train), "heldout": split(heldout)}}


def test_copying_verdict():
    g = capacity_grid(True)
    assert report.no_copying(g, memo(0.12, 0.10))[0] == "confirmed"
    assert report.no_copying(g, memo(0.60, 0.10))[0] == "refuted"


def test_budget_note_and_the_written_report(tmp_path):
    g = capacity_grid(False)  # the largest models are the worst: undertrained at the budget
    steps = {"w64": 1000, "w128": 600, "w256": 300, "w512": 100, "d1": 700, "d2": 500, "d8": 150}
    result = {"budget_minutes": 8.0, "machine": "test machine", "date": "2026-11-28", "samples": 4, "grid": GRID,
              "steps": steps, "tokens_per_step": 4096, "grades": g, "stages": stages(0.2, 0.6),
              "memorisation": memo(0.12, 0.10)}
    note = report.budget_note(result)
    assert "1,000 steps x 4,096 tokens for w64" in note and "undertrained" in note
    path = report.write_claims(result, tmp_path)
    text = path.read_text()
    assert "| Grammar is learned before consistency | **confirmed** |" in text
    assert "| Consistency needs width or depth | **refuted** |" in text
    assert "undertrained" in text and "test machine" in text
    for png in ("grades.png", "loss_vs_grades.png", "memorisation.png", "results.json"):
        assert (tmp_path / "claims" / png).stat().st_size > 0
    rising = capacity_grid(True)
    assert "undertrained" not in report.budget_note(result | {"grades": rising})
