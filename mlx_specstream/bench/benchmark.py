"""``run_bench``: load, (tune,) time every mode, score, and return one JSON-ready dict.

Top-level keys: ``speedup`` (median over repeats of SS / AR decode tokens/s, see
:mod:`.runner`), ``tokens_per_step``, ``identical_fraction`` (SS outputs equal to AR outputs),
``ar_``/``ss_`` ``decode_tokens_per_sec``, ``latency_s``, ``peak_memory_gb``; ``num_samples``;
``rouge1``/``rougeLsum`` (percent) or ``exact_match`` (fraction) of the SS outputs of the first
repeat when the data has references (``ar_``-prefixed for the AR outputs); ``baselines``: one object per baseline;
``modes``: every mode's full statistics (``outputs``: its texts of the first repeat); ``tune``
when tuned; and the settings used.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..device import describe_device
from ..generate import DEFAULT_TREE, encode_prompt, resolve_tree
from ..loading import load, resolve_model_path
from ..sampling import SamplingParams
from ..tree import parse_tree_spec
from .baselines import build_modes, parse_baselines
from .data import bench_prompt, load_bench_data
from .metrics import quality
from .runner import measure, speedups, summarize
from .tune import save_default_tree, tree_destination, tune_tree, tuning_fields


def run_bench(
    model: Optional[str | os.PathLike],
    data: str | os.PathLike,
    *,
    num_samples: Optional[int] = None,
    max_tokens: int = 128,
    temp: float = 0.0,
    tree: Optional[str] = None,
    repeats: int = 3,
    baselines: Optional[str] = None,
    num_draft: int = 4,
    seed: int = 0,
    tune: bool = False,
    tune_data: Optional[str | os.PathLike] = None,
    tune_samples: int = 8,
    streams: Optional[str | os.PathLike] = None,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    status: Optional[Callable[[str], object]] = None,
) -> dict:
    """Benchmark ``model`` (default: the demo model) on ``data``; see the module docstring for the result.

    ``streams``: a directory or hub id whose streams, trained on this model's base, are attached
    (e.g. streams trained on the float model, benchmarked on its 4-bit copy).

    ``tune`` first picks the tree (:mod:`.tune`) on ``tune_samples`` prompts of ``tune_data``
    (default: ``data``), saves it as the model's default tree, and benchmarks with it.
    ``status(message)`` is a context manager factory for long phases (the CLI's spinner).
    """
    # Everything checkable without the model fails first.
    if max_tokens < 1 or repeats < 1 or num_draft < 1:
        raise ValueError("--max-tokens, --repeats and --num-draft must be >= 1.")
    if tune and tree is not None:
        raise ValueError("--tune chooses the tree itself; drop --tree (or drop --tune).")
    if tune and streams is not None:
        raise ValueError("--tune saves the tree into the model directory that holds the streams; with --streams "
                         "pass --tree instead (or copy the streams into the model's directory and tune that).")
    if tree is not None:
        parse_tree_spec(tree)
    sampling = SamplingParams(temp=temp)
    sampling.validate()
    wanted = parse_baselines(baselines)
    bench_data = load_bench_data(data, num_samples)
    calib_data = load_bench_data(tune_data, tune_samples) if tune and tune_data else None
    model_dir = resolve_model_path(model)
    if tune:
        tree_destination(model_dir)  # before minutes of tuning, not after
    phase = status or (lambda message: contextlib.nullcontext())

    with phase(f"Loading {model_dir}"):
        mdl, tokenizer = load(model_dir, streams=streams)
    resolve_tree(mdl, tree)  # depth vs streams: a clear error before any timing
    eos = set(tokenizer.eos_token_ids)
    prompts = [encode_prompt(tokenizer, bench_prompt(mdl, ex, bench_data)) for ex in bench_data.examples]

    tuned = None
    if tune:
        source = calib_data or bench_data
        tuned = _tune(mdl, tokenizer, source, tune_samples, max_tokens, eos, phase)
        fields = tuning_fields(tuned.tree, tuned.speculate)
        save_default_tree(model_dir, tuned.tree, speculate=tuned.speculate, device=fields["tuned_on"])
        for key, value in fields.items():  # the loaded model as the saved config now describes it
            setattr(mdl.spec, key, value)
    used_tree = resolve_tree(mdl, tree)

    with phase("Loading baselines" if wanted else "Preparing"):
        modes = build_modes(mdl, model_dir, wanted, sampling, tree=tree, num_draft=num_draft)
    runs = measure(modes, prompts, max_tokens=max_tokens, repeats=repeats, eos=eos, seed=seed, progress=progress)

    stats = {m.name: summarize(m, runs[m.name], None if m.name == "ar" else runs["ar"]) for m in modes}
    refs = [ex.references for ex in bench_data.examples]
    for name, st in stats.items():
        texts = [_text(tokenizer, r.tokens, eos) for r in runs[name][0]]  # first repeat's outputs
        st["quality"] = quality(bench_data.metric, texts, refs)
        st["outputs"] = texts  # e.g. to compare quantized and float32 outputs across runs
    ar, ss = stats["ar"], stats["ss"]
    ratios = speedups(runs["ss"], runs["ar"])
    result = {
        "speedup": statistics.median(ratios),
        "speedup_per_repeat": ratios,
        "tokens_per_step": ss["tokens_per_step"],
        "identical_fraction": ss["identical_fraction"],
        "ar_decode_tokens_per_sec": ar["decode_tokens_per_sec"],
        "ss_decode_tokens_per_sec": ss["decode_tokens_per_sec"],
        "ar_latency_s": ar["latency_s"],
        "ss_latency_s": ss["latency_s"],
        "ar_peak_memory_gb": ar["peak_memory_gb"],
        "ss_peak_memory_gb": ss["peak_memory_gb"],
        "tokens_per_step_distribution": ss["tokens_per_step_distribution"],
        "stream_acceptance": ss["stream_acceptance"],
        "num_samples": len(prompts),
        **ss["quality"],
        **{f"ar_{k}": v for k, v in ar["quality"].items()},
        "baselines": [
            dict(name=m.name, **stats[m.name], ss_speedup_over=statistics.median(speedups(runs["ss"], runs[m.name])))
            for m in modes[2:]
        ],
        "modes": stats,
        "settings": dict(
            model=str(model_dir), streams=str(streams) if streams is not None else None, data=str(data),
            format=bench_data.format, metric=bench_data.metric,
            max_tokens=max_tokens, temp=temp, repeats=repeats, seed=seed, num_draft=num_draft,
            tree=_tree_text(mdl, tree),
            tree_size=used_tree.size if used_tree is not None else 1, num_streams=mdl.num_streams,
            device=describe_device(), blas=_blas_kind(),
        ),
    }
    if tuned is not None:
        result["tune"] = dict(tuned.to_dict(), saved_to=str(Path(model_dir) / "config.json"),
                              measured_tokens_per_step=ss["tokens_per_step"], measured_speedup=result["speedup"],
                              measured_ss_tokens_per_sec=ss["decode_tokens_per_sec"],
                              measured_ar_tokens_per_sec=ar["decode_tokens_per_sec"])
    return result


def run_tune(
    model: Optional[str | os.PathLike],
    data: str | os.PathLike,
    *,
    num_samples: int = 8,
    max_tokens: int = 128,
    save: bool = True,
    status: Optional[Callable[[str], object]] = None,
) -> dict:
    """Choose the draft tree of ``model`` on the first ``num_samples`` prompts of ``data``
    (:func:`.tune.tune_tree`), and with ``save`` write it as the model's default tree.

    Returns the :class:`.tune.TuneResult` fields, ``saved_to`` (the config.json written, or
    None), ``previous_tree`` (the model's default before) and ``settings``.
    """
    if max_tokens < 1 or num_samples < 1:
        raise ValueError("--max-tokens and --num-samples must be >= 1.")
    calib_data = load_bench_data(data, num_samples)
    model_dir = resolve_model_path(model)
    if save:
        tree_destination(model_dir)  # before minutes of tuning, not after
    phase = status or (lambda message: contextlib.nullcontext())
    with phase(f"Loading {model_dir}"):
        mdl, tokenizer = load(model_dir)
    previous = _tree_text(mdl, None)
    tuned = _tune(mdl, tokenizer, calib_data, num_samples, max_tokens, set(tokenizer.eos_token_ids), phase)
    saved_to = str(save_default_tree(model_dir, tuned.tree, speculate=tuned.speculate)) if save else None
    return dict(
        tuned.to_dict(), saved_to=saved_to, previous_tree=previous,
        settings=dict(model=str(model_dir), data=str(data), format=calib_data.format, max_tokens=max_tokens,
                      num_streams=mdl.num_streams, device=describe_device(), blas=_blas_kind()),
    )


def _tune(mdl, tokenizer, data, num_samples: int, max_tokens: int, eos: set[int], phase):
    """Tune on the first ``num_samples`` prompts of ``data`` (a :class:`.data.BenchData`)."""
    calib = [encode_prompt(tokenizer, bench_prompt(mdl, ex, data)) for ex in data.examples[:num_samples]]
    return tune_tree(mdl, calib, max_tokens, eos, phase=phase)  # one status line per stage


def _text(tokenizer, tokens: list[int], eos: set[int]) -> str:
    return tokenizer.decode([t for t in tokens if t not in eos])


def _tree_text(model, tree: Optional[str]) -> Optional[str]:
    """The tree spec the SS mode ran with (the argument, the model's default, or DEFAULT_TREE)."""
    if not model.num_streams:
        return None
    return tree or model.spec.default_tree or ",".join(map(str, DEFAULT_TREE[: model.num_streams]))


def _blas_kind() -> str:
    from ..blas import blas_info

    return blas_info().kind
