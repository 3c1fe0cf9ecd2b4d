"""``specstream bench``: speculative vs autoregressive decoding of the same weights, against baselines.

* :mod:`.data`: benchmark inputs (E2E CSV, DialogSum JSONL, generic ``{"prompt", "reference"}`` JSONL);
* :mod:`.metrics`: ROUGE-1 / ROUGE-Lsum and exact match;
* :mod:`.baselines`: the decoding modes (ours AR/SS, prompt lookup, mlx-lm, mlx-lm draft model);
* :mod:`.runner`: interleaved timing and the metric conventions;
* :mod:`.tune`: choosing the draft tree from measured step cost and acceptance;
* :mod:`.report`: markdown, JSON and plot;
* :func:`run_bench`: all of it, returning one JSON-ready dict; :func:`run_tune`: tuning alone.
"""

from .benchmark import run_bench, run_tune
from .data import BenchData, bench_prompt, load_bench_data
from .metrics import exact_match, rouge
from .tune import TuneResult, save_default_tree, tune_tree

__all__ = [
    "BenchData",
    "TuneResult",
    "bench_prompt",
    "exact_match",
    "load_bench_data",
    "rouge",
    "run_bench",
    "run_tune",
    "save_default_tree",
    "tune_tree",
]
