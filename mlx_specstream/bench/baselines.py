"""Decoding modes the benchmark times, all as the same kind of generator of steps.

A mode turns prompt token ids into ``(tokens, accepted)`` per step: the first step is the one
that produced the first token (the prefill; for mlx-lm's draft-model decoding, the prefill plus
its first verification), each later step one target-model forward pass that emitted
``tokens`` of which ``accepted`` were accepted drafts.

* ``ar`` / ``ss``: our generator without / with the speculative streams (same code path);
* ``lookup``: prompt lookup drafts (:class:`~mlx_specstream.lookup.PromptLookup`) through our verifier;
* ``mlx-lm``: ``mlx_lm.generate.generate_step`` on the same directory loaded by ``mlx_lm.load``;
* ``draft:DIR``: ``mlx_lm.generate.speculative_generate_step`` with the model in ``DIR`` drafting.

mlx-lm's steps run on the stream our own modes run on, not on mlx-lm's own stream: on a CPU a
stream is a worker thread, and with MKL a second thread calling BLAS slowed every later
product in the process, ours and mlx-lm's, by ~45% (docs/lab/2026-12-blas.md, "MKL on an Intel host");
the device is the same either way.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx

from ..generate import generate_step
from ..lookup import PromptLookup
from ..sampling import SamplingParams

StepFn = Callable[[list[int], int], Iterator[tuple[list[int], int]]]
BASELINES_HELP = "mlx-lm, lookup, draft:DIR"


@dataclasses.dataclass
class Mode:
    name: str
    steps: StepFn  # (prompt ids, max_tokens) -> (tokens, accepted) per step
    weights_bytes: int  # parameters this mode needs in memory (for its peak memory)


def parse_baselines(text: str | None) -> list[tuple[str, str]]:
    """``"mlx-lm,lookup,draft:DIR"`` -> ``[("mlx-lm", ""), ("lookup", ""), ("draft", "DIR")]``."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind, _, arg = item.partition(":")
        if kind not in ("mlx-lm", "lookup", "draft") or (kind == "draft") != bool(arg):
            raise ValueError(f"Unknown baseline {item!r}; use a comma list of {BASELINES_HELP}.")
        if kind == "draft" and not (Path(arg) / "config.json").is_file():
            raise ValueError(f"Draft model directory {arg!r} has no config.json; pass draft:DIR with a model "
                             "directory.")
        if (kind, arg) in out:
            raise ValueError(f"Baseline {item!r} is listed twice; list each baseline once.")
        out.append((kind, arg))
    return out


def param_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def ours(model, sampling: SamplingParams, tree=None, speculate: bool = True, drafter=None) -> StepFn:
    def steps(ids: list[int], max_tokens: int):
        prompt = mx.array(ids, dtype=mx.int32)
        for s in generate_step(model, prompt, max_tokens=max_tokens, sampling=sampling, tree=tree,
                               speculate=speculate, drafter=drafter):
            yield s.tokens, s.accepted

    return steps


def _on_our_stream(fn) -> dict:
    """Keyword arguments that run mlx-lm's generator ``fn`` on the default stream (module docstring)."""
    if "stream" in inspect.signature(fn).parameters:
        return {"stream": mx.default_stream(mx.default_device())}
    return {}


def _mlx_lm_sampler(sampling: SamplingParams):
    from mlx_lm.sample_utils import make_sampler

    top_p = sampling.top_p if sampling.top_p < 1.0 else 0.0  # mlx-lm: 0 disables nucleus sampling
    return make_sampler(temp=sampling.temp, top_p=top_p, min_p=sampling.min_p, top_k=sampling.top_k)


def mlx_lm_ar(lm_model, sampling: SamplingParams) -> StepFn:
    from mlx_lm.generate import generate_step as lm_generate_step

    sampler = _mlx_lm_sampler(sampling)

    stream = _on_our_stream(lm_generate_step)

    def steps(ids: list[int], max_tokens: int):
        for tok, _ in lm_generate_step(mx.array(ids), lm_model, max_tokens=max_tokens, sampler=sampler, **stream):
            yield [int(tok)], 0

    return steps


def mlx_lm_draft(lm_model, draft_model, sampling: SamplingParams, num_draft: int) -> StepFn:
    """Groups mlx-lm's per-token yields into steps: accepted drafts, then the target's own token."""
    from mlx_lm.generate import speculative_generate_step

    sampler = _mlx_lm_sampler(sampling)

    stream = _on_our_stream(speculative_generate_step)

    def steps(ids: list[int], max_tokens: int):
        pending: list[int] = []
        gen = speculative_generate_step(mx.array(ids), lm_model, draft_model, num_draft_tokens=num_draft,
                                        max_tokens=max_tokens, sampler=sampler, **stream)
        try:
            for tok, _, from_draft in gen:
                pending.append(int(tok))
                if not from_draft:
                    yield pending, len(pending) - 1
                    pending = []
            if pending:  # stopped at max_tokens inside a run of accepted drafts
                yield pending, len(pending)
        finally:
            gen.close()

    return steps


def build_modes(model, model_dir: Path, baselines: list[tuple[str, str]], sampling: SamplingParams,
                tree=None, num_draft: int = 4) -> list[Mode]:
    """``ar``, ``ss`` and one mode per baseline (mlx-lm models are loaded here, once)."""
    ours_bytes = param_bytes(model)
    modes = [Mode("ar", ours(model, sampling, speculate=False), ours_bytes),
             Mode("ss", ours(model, sampling, tree=tree), ours_bytes)]
    lm_model = None
    for kind, arg in baselines:
        if kind == "lookup":
            drafter = PromptLookup(num_draft=num_draft)
            modes.append(Mode("lookup", ours(model, sampling, drafter=drafter), ours_bytes))
            continue
        import mlx_lm

        if lm_model is None:
            lm_model = mlx_lm.load(str(model_dir))[0]
        if kind == "mlx-lm":
            modes.append(Mode("mlx-lm", mlx_lm_ar(lm_model, sampling), param_bytes(lm_model)))
        else:
            draft_model = mlx_lm.load(arg)[0]
            if draft_model.args.vocab_size != lm_model.args.vocab_size:
                raise ValueError(
                    f"Draft model {arg} has vocabulary {draft_model.args.vocab_size} but the model has "
                    f"{lm_model.args.vocab_size}; the draft must share the tokenizer."
                )
            modes.append(Mode(f"draft:{arg}", mlx_lm_draft(lm_model, draft_model, sampling, num_draft),
                              param_bytes(lm_model) + param_bytes(draft_model)))
    return modes
