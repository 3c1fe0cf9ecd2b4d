"""Task quality: ROUGE-1 / ROUGE-Lsum (E2E, DialogSum) and exact match (generic references).

ROUGE uses Google's ``rouge_score`` package (Porter stemming on), F-measure, the maximum over
an example's references, averaged over examples and reported in percent (0-100) as in the
paper. ROUGE-Lsum scores sentence by sentence: sentences are split at ``. ! ?`` followed by
whitespace (``rouge_score`` expects one sentence per line). Exact match is a fraction (0-1)
of predictions equal to one of their references after stripping surrounding whitespace.
"""

from __future__ import annotations

import re
from typing import Sequence

ROUGE_TYPES = ("rouge1", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> str:
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"rouge1": %, "rougeLsum": %}``: mean over examples of the best F-measure over references."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError("ROUGE needs the rouge-score package: pip install 'mlx-specstream[bench]'") from e
    if len(predictions) != len(references) or not predictions:
        raise ValueError("rouge needs one list of references per prediction, and at least one prediction.")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, references):
        if not refs:
            raise ValueError("Every prediction needs at least one reference for ROUGE.")
        scores = [scorer.score(_sentences(ref), _sentences(pred)) for ref in refs]
        for name in ROUGE_TYPES:
            totals[name] += max(s[name].fmeasure for s in scores)
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal (whitespace-stripped) to one of their references."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("exact_match needs one list of references per prediction, and at least one prediction.")
    hits = sum(pred.strip() in {r.strip() for r in refs} for pred, refs in zip(predictions, references))
    return hits / len(predictions)


def quality(metric: str | None, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The metric keys for a data file's metric kind (``"rouge"``, ``"exact_match"`` or None)."""
    if metric == "rouge":
        return rouge(predictions, references)
    if metric == "exact_match":
        return {"exact_match": exact_match(predictions, references)}
    return {}
