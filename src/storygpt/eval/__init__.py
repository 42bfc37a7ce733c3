"""Evaluation: bits per byte, and the story-quality suite.

- bpb.py: `evaluate` (loss, perplexity, bits per byte of a text or of prepared data);
- suite.py: `run_suite` (cloze, grammar, continuation, generation measures) and `SuiteConfig`; report.py: its report;
- scoring.py, generation.py, minimal_pairs.py, novelty.py: the suite's parts; quality.py: a model's recorded quality;
- interpret.py: attention maps and neurons; selfsample.py: rejection sampling of the model's own stories.
"""

from .bpb import evaluate
from .quality import quality_rows
from .report import write_report
from .suite import SuiteConfig, load_prompts, run_suite

__all__ = ["SuiteConfig", "evaluate", "load_prompts", "quality_rows", "run_suite", "write_report"]
