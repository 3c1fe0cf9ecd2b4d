"""Benchmark inputs: raw task inputs with their references, read through ``mlx_specstream.datasets``.

Three formats, recognised by :func:`mlx_specstream.datasets.detect_format` (gzip accepted):

* **E2E NLG CSV** (``mr``, ``ref``): rows grouped by MR, one example per distinct MR holding all
  its references in file order (the official test split: 4,693 rows -> 630 MRs). Metric: ROUGE.
* **DialogSum JSONL** (``dialogue`` + ``summary``, or ``summary1..3`` in the test split). Metric: ROUGE.
* **generic JSONL**: ``{"prompt": str, "reference": str}``; ``"references": [str, ...]`` or a
  trainer-style ``"completion"`` are accepted too, and the reference may be left out on every
  line (then no quality metric). Metric: exact match.

Prompts are formatted like training (:func:`bench_prompt`): the raw input goes through the
model's recorded ``prompt_template``, else through the dataset's own template.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..datasets import (
    PLAIN_PROMPT_TEMPLATE,
    Example,
    detect_format,
    iter_jsonl,
    read_dialogsum,
    read_e2e,
)
from ..prompting import prompt_template

METRICS = {"e2e": "rouge", "dialogsum": "rouge", "jsonl": "exact_match"}


@dataclasses.dataclass
class BenchData:
    examples: list[Example]  # .input is the raw task input, .references its references
    format: str  # "e2e" | "dialogsum" | "jsonl"
    template: str  # the dataset's own template (used when the model records none)

    @property
    def metric(self) -> Optional[str]:
        """``"rouge"``, ``"exact_match"``, or None when the file has no references."""
        return METRICS[self.format] if all(ex.references for ex in self.examples) else None


def read_generic(path: str | os.PathLike, limit: Optional[int] = None) -> list[Example]:
    """``{"prompt", "reference"}`` JSONL lines -> examples (errors name the line)."""
    examples: list[Example] = []
    with_refs: Optional[bool] = None
    for n, obj in iter_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path} line {n}: expected a non-empty string 'prompt', got keys {sorted(obj)}.")
        refs = _references(path, n, obj)
        if with_refs is not None and bool(refs) != with_refs:
            raise ValueError(
                f"{path} line {n}: some lines have a 'reference' and some do not; give one on every line or none."
            )
        with_refs = bool(refs)
        examples.append(Example(prompt=prompt, completion=refs[0] if refs else "", input=prompt, references=refs))
    if not examples:
        raise ValueError(f"{path} contains no examples.")
    return examples


def _references(path, n: int, obj: dict) -> tuple[str, ...]:
    if "references" in obj:
        refs = obj["references"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{path} line {n}: 'references' must be a non-empty list of strings.")
        return tuple(refs)
    for key in ("reference", "completion"):
        if key in obj:
            if not isinstance(obj[key], str):
                raise ValueError(f"{path} line {n}: '{key}' must be a string.")
            return (obj[key],)
    return ()


def load_bench_data(path: str | os.PathLike, num_samples: Optional[int] = None) -> BenchData:
    """Read a benchmark file (format detected from its name and first line); ``num_samples`` first examples."""
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}.")
    fmt = detect_format(path)
    if fmt == "e2e":
        ds = read_e2e(path, limit=num_samples, group_references=True)
    elif fmt == "dialogsum":
        ds = read_dialogsum(path, limit=num_samples)
    else:
        return BenchData(read_generic(path, num_samples), "jsonl", PLAIN_PROMPT_TEMPLATE)
    return BenchData(ds.examples, fmt, ds.prompt_template)


def bench_prompt(model, example: Example, data: BenchData) -> str:
    """The prompt text for ``example``: the model's recorded template wins over the dataset's."""
    template = prompt_template(getattr(model, "config", None) or {}) or data.template
    return template.replace("{input}", example.input)
