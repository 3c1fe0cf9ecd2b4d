"""Tree auto-tuning: pick the draft tree that maximises expected tokens/s on this device.

Two measurements, a model of tokens/s, then the best-modelled trees timed for real:

1. **Step cost** ``c(n, d)``: seconds of one real speculative decoding step (forward pass
   over a tree of ``n`` nodes and depth ``d``, each node with its ``d`` stream tokens, plus
   acceptance, drafting and cache commit; n up to 32) and ``c_ar`` of one autoregressive
   step, decoding from a calibration prompt. Rounds interleave the configurations, each timed
   right after an AR step window and costed by its median ratio to it (the host's speed
   drifts); the costs are made non-decreasing in ``n`` (isotonic fit), since a bigger tree
   never costs less. The acceptance replay (2) runs first, so that a depth's bigger trees
   are not timed once even its best candidate could not come near plain decoding's speed at
   the cost already measured (``PRUNE_BELOW``): on a CPU, where big trees cost several plain
   steps, that halves this stage or better; where tree steps are nearly free (a GPU) it
   skips nothing.
2. **Acceptance**: greedy continuations of the calibration prompts, then one teacher-forced
   pass with streams on every position (``model.all_logits``). At position p, stream j drafts
   the token the main stream chooses at p + j; ``R[p, j]`` is that token's rank in stream j's
   logits (``MAX_RANK`` = not in the top ``MAX_RANK``). A step from p with tree T accepts the
   longest path ``(R[p,1], ..., R[p,d])`` that is a node of T, then moves to p + d + 1: replaying
   that walk over the calibration continuations gives the exact greedy tokens per step ``E(T)``
   (pruning ignored). Per-depth, per-rank acceptance ``P(R[:, j] = r)`` is reported and drives
   the greedy sparse trees.

Candidates: every Cartesian tree (non-increasing per-depth top-k, at most 32 nodes) and the
greedy sparse trees of 2..32 nodes (add paths in order of the product of their per-depth rank
acceptance, Medusa-style). Each is scored by its modelled speedup ``E(T) * c_ar / c(|T|, depth(T))``.

3. **Finalists, timed for real**: the ``FINALISTS`` best-scored trees and plain decoding
   generate from the calibration prompts, interleaved per prompt as ``specstream bench`` does
   (:func:`.runner.measure`), ``FINAL_ROUNDS`` times. The winner is the finalist with the
   highest measured speedup (median over rounds of SS / AR decode tokens/s), and that is the
   expected speedup reported. The model alone was not trustworthy on a 2-core CPU: 16-step
   windows after a fresh prefill catch the host in one speed phase or another, and costed the
   stories260K model's ``1`` tree at ~1.0x an AR step where generations measure ~1.6x
   (expected 1.54x, measured 0.95x); it still ranks the hundreds of candidates, which are too
   many to time in generations.

Calibrating on the benchmark prompts themselves is optimistic: prefer a separate split
(``--tune-data``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..config import CONFIG_KEY, SpecStreamConfig
from ..device import describe_device
from ..generate import generate_step
from ..sampling import SamplingParams
from ..tree import Tree, cartesian_tree, parse_tree_spec, sparse_tree
from .baselines import Mode, ours, param_bytes
from .runner import measure, speedups, summarize

MAX_NODES = 32  # largest tree considered
MAX_RANK = 8  # ranks >= this count as "not drafted"
COST_STEPS = 16  # decoding steps timed per tree size and round
COST_WARMUP_STEPS = 2  # steps run, not timed, first: the first step after the prefill also starts the pipeline
COST_ROUNDS = 3
FINALISTS = 4  # best-modelled trees timed in real generations
FINAL_ROUNDS = 3  # rounds of those generations over the calibration prompts
# A depth's larger trees are not timed once its best possible tree (the most tokens per step
# of any candidate that deep), at the cost just measured, would decode below this fraction of
# plain decoding's speed: bigger trees cost at least as much (cost_sweep). Conservative: the
# cost model has underestimated a finalist's measured speedup by up to ~35% (1.10x modelled,
# 1.48x measured), so a tree skipped here would have to be off by ~65% to break even.
PRUNE_BELOW = 0.6


@dataclasses.dataclass
class Calibration:
    ranks: list[list[tuple[int, ...]]]  # per sequence, per position p: (R[p,1], ..., R[p,γ])
    emitted: list[int]  # tokens generated per sequence
    contexts: list[list[int]]  # per sequence: prompt + the first half of its continuation

    def rank_acceptance(self, depth: int) -> np.ndarray:
        """``[γ, MAX_RANK]``: fraction of positions where stream j's rank-r token is the main stream's."""
        rows = np.array([r for seq in self.ranks for r in seq], dtype=np.int64).reshape(-1, depth)
        return np.stack([(rows == r).mean(axis=0) for r in range(MAX_RANK)], axis=1) if len(rows) else (
            np.zeros((depth, MAX_RANK)))


def calibrate(model, prompts: Sequence[list[int]], max_tokens: int, eos: set[int]) -> Calibration:
    """Greedy continuations of ``prompts`` and the stream ranks along them (module docstring)."""
    g = model.num_streams
    cal = Calibration([], [], [])
    for ids in prompts:
        cont: list[int] = []
        for step in generate_step(model, mx.array(ids, dtype=mx.int32), max_tokens=max_tokens):
            cont.extend(step.tokens)
            if eos & set(step.tokens) or len(cont) >= max_tokens:
                break
        cont = cont[:max_tokens]
        cont = cont[: next((k + 1 for k, t in enumerate(cont) if t in eos), len(cont))]
        seq = mx.array(ids + cont, dtype=mx.int32)[None]
        main, streams, _ = model.all_logits(seq)
        choices = mx.argmax(main[0], axis=-1)  # [L]: the main stream's token after each position
        length, start = seq.shape[1], len(ids) - 1
        pos = np.arange(start, length - 1)[:, None] + np.arange(1, g + 1)[None, :]  # [n, γ]: p + j
        target = choices[mx.array(np.minimum(pos, length - 1))]
        logits = streams[0, start: length - 1].astype(mx.float32)  # [n, γ, V]
        chosen = mx.take_along_axis(logits, target[..., None], axis=-1)
        rank = np.array(mx.sum(logits > chosen, axis=-1))
        rank = np.where(pos <= length - 1, np.minimum(rank, MAX_RANK), MAX_RANK)
        cal.ranks.append([tuple(int(x) for x in row) for row in rank])
        cal.emitted.append(len(cont))
        cal.contexts.append(ids + cont[: len(cont) // 2])
    return cal


def tokens_per_step(cal: Calibration, tree: Tree) -> float:
    """Replay greedy speculative decoding with ``tree`` over the calibration continuations."""
    nodes = set(tree.paths)
    tokens = steps = 0
    for ranks, n in zip(cal.ranks, cal.emitted):
        i, emitted = 0, 1  # the prefill emitted the first token
        while emitted < n:
            d = 0
            while d < len(ranks[i]) and ranks[i][: d + 1] in nodes:
                d += 1
            d = min(d, n - emitted - 1)
            emitted += d + 1
            i += d + 1
            tokens += d + 1
            steps += 1
    return tokens / steps if steps else 1.0


def _monotone(values: Sequence[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return [s / c for s, c in blocks for _ in range(int(c))]


COST_SIZES = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32)  # tree sizes timed; others interpolated


def cost_tree(n: int, depth: int) -> Tree:
    """A tree of ``n`` nodes and ``depth`` levels: a chain of ``depth`` drafts plus root children.

    A step's cost depends on its node count and, through the streams each node runs
    (``min(γ, depth)``), on its depth; not otherwise on the shape.
    """
    chain = [(0,) * d for d in range(1, depth + 1)]
    return sparse_tree(chain + [(r,) for r in range(1, n - depth)])


def cost_shapes(num_streams: int) -> list[tuple[int, int]]:
    """``(depth, nodes)`` of every tree :func:`step_costs` times: ``COST_SIZES`` at each depth."""
    return [(d, n) for d in range(1, num_streams + 1) for n in COST_SIZES if d < n <= MAX_NODES]


def cost_sweep(shapes: Sequence[tuple[int, int]], time_ar: Callable[[], float],
               time_tree: Callable[[int, int], float], rounds: int,
               ceiling: Optional[dict[int, float]] = None) -> tuple[float, dict[tuple[int, int], float]]:
    """Time the trees of ``shapes`` (``(depth, nodes)``, nodes increasing within a depth):
    ``(c_ar, {shape: seconds})``.

    Every tree window comes right after an AR window, and a shape's cost is the median over
    ``rounds`` of its time relative to that AR window, times the median AR window (see
    :func:`step_costs`). ``ceiling[d]``: the most tokens per step any candidate tree of depth
    ``d`` reaches; once, in the first round, that over a shape's cost ratio is below
    ``PRUNE_BELOW``, no bigger tree of that depth can pay, and none is timed again (they are
    absent from the result). Pure scheduling: the timers are arguments.
    """
    ratios: dict[tuple[int, int], list[float]] = {}
    ar_times: list[float] = []
    active = list(shapes)
    for r in range(rounds):
        closed: set[int] = set()
        timed = []
        for d, n in active:
            if d in closed:
                continue
            ar = time_ar()  # right before each shape: the host's speed of the moment
            ar_times.append(ar)
            ratio = time_tree(d, n) / ar
            ratios.setdefault((d, n), []).append(ratio)
            timed.append((d, n))
            if r == 0 and ceiling is not None and ceiling.get(d, float("inf")) / ratio < PRUNE_BELOW:
                closed.add(d)
        active = timed
    c_ar = statistics.median(ar_times)
    return c_ar, {shape: c_ar * statistics.median(ratios[shape]) for shape in active}


def step_costs(model, context: list[int], rounds: Optional[int] = None, steps: Optional[int] = None,
               ceiling: Optional[dict[int, float]] = None
               ) -> tuple[float, dict[int, list[Optional[float]]], dict[int, list[Optional[float]]]]:
    """``(c_ar, fitted, raw)`` in seconds; ``fitted[d][n - 1]`` is the cost of a tree of ``n``
    nodes and depth ``d`` (n = 1..MAX_NODES; n <= d is not a valid tree and repeats the first),
    None past the largest size timed at that depth (``ceiling``: see :func:`cost_sweep`).

    Times real decoding steps (``generate_step``: forward pass, acceptance, drafting, cache
    commit) after prefilling ``context``: each configuration decodes ``COST_WARMUP_STEPS``
    untimed steps (the first decoding step also pays for starting the pipeline: ~2x a
    steady AR step on a small model, which made AR look dearer than it is), then ``steps``
    steps; its cost is their mean time. Each configuration's window comes right after an AR
    window, and its cost is the median over ``rounds`` rounds of its time relative to that AR
    window, times the median of all AR windows: this host's speed swings ~2x over tens of
    milliseconds, enough to make a whole window slow, so the configurations are compared with
    AR timed at the same moment (plain medians of 3 rounds made an AR step of the 260K stories
    model look 2.45 ms against 1.34 ms in generation, and tuning promised 2.30x where 0.92x was
    measured). Sizes between those of ``COST_SIZES`` are
    interpolated; each depth's costs are made non-decreasing in ``n`` (isotonic fit), since
    a bigger tree never costs less. Defaults: ``COST_ROUNDS`` rounds of ``COST_STEPS`` steps.
    """
    rounds, steps = rounds or COST_ROUNDS, steps or COST_STEPS
    prompt = mx.array(context, dtype=mx.int32)
    total = steps + COST_WARMUP_STEPS
    max_tokens = total * (model.num_streams + 1) + 1

    def one(**kwargs) -> float:
        times = []
        tic = time.perf_counter()
        for step in generate_step(model, prompt, max_tokens=max_tokens, **kwargs):
            now = time.perf_counter()
            if not step.prefill:
                times.append(now - tic)
            tic = now
            if len(times) == total:
                break
        return statistics.fmean(times[COST_WARMUP_STEPS:] or times)

    c_ar, costs = cost_sweep(cost_shapes(model.num_streams), lambda: one(speculate=False),
                             lambda d, n: one(tree=cost_tree(n, d)), rounds, ceiling)
    fitted, raw = {}, {}
    for d in range(1, model.num_streams + 1):
        sizes = sorted(n for depth, n in costs if depth == d)
        if not sizes:
            continue
        ys = [costs[(d, n)] for n in sizes]
        timed = [float(np.interp(n, sizes, ys)) for n in range(1, sizes[-1] + 1)]
        untimed = [None] * (MAX_NODES - sizes[-1])
        raw[d], fitted[d] = timed + untimed, _monotone(timed) + untimed
    return c_ar, fitted, raw


def cartesian_candidates(depth: int) -> list[tuple[int, ...]]:
    """Every non-increasing per-depth top-k of at most ``depth`` levels and MAX_NODES nodes."""
    out: list[tuple[int, ...]] = []

    def grow(ks: tuple[int, ...], size: int, width: int) -> None:
        if ks:
            out.append(ks)
        if len(ks) == depth:
            return
        for k in range(1, (ks[-1] if ks else MAX_RANK) + 1):
            if size + width * k > MAX_NODES:
                break
            grow(ks + (k,), size + width * k, width * k)

    grow((), 1, 1)
    return out


def greedy_paths(rank_acc: np.ndarray) -> list[tuple[int, ...]]:
    """Up to MAX_NODES - 1 paths, best first by the product of per-depth rank acceptance."""
    depth = rank_acc.shape[0]
    heap = [(-float(rank_acc[0, r]), (r,)) for r in range(MAX_RANK)]
    heapq.heapify(heap)
    out: list[tuple[int, ...]] = []
    while heap and len(out) < MAX_NODES - 1:
        neg, path = heapq.heappop(heap)
        if neg >= 0:  # never accepted on the calibration data
            break
        out.append(path)
        if len(path) < depth:
            for r in range(MAX_RANK):
                heapq.heappush(heap, (neg * float(rank_acc[len(path), r]), path + (r,)))
    return out


def tree_spec(tree: Tree, ks: Optional[tuple[int, ...]] = None) -> str:
    """The string saved as ``default_tree``: ``"4,2,1"`` or a JSON list of paths."""
    if ks is not None:
        return ",".join(map(str, ks))
    return json.dumps([list(p) for p in tree.paths[1:]], separators=(",", ":"))


@dataclasses.dataclass
class TuneResult:
    tree: str
    size: int
    expected_tokens_per_step: float  # the acceptance replay's E(T) on the calibration continuations
    expected_speedup: float  # measured in generations from the calibration prompts (finalists)
    expected_ss_tokens_per_sec: float  # idem
    expected_ar_tokens_per_sec: float  # idem
    step_cost_ar_s: float
    step_cost_s: dict[int, list[Optional[float]]]  # fitted, [depth][n - 1] for a tree of n nodes; None: not timed
    step_cost_raw_s: dict[int, list[Optional[float]]]
    rank_acceptance: list[list[float]]  # [depth][rank]
    best_speedup_by_size: dict[int, float]  # best modelled speedup among candidates of each size
    candidates: list[dict]  # the best few by modelled speedup, for the report
    finalists: list[dict]  # the candidates timed in generations, best measured first
    calibration_prompts: int
    calibration_tokens: int
    cost_shapes_timed: int = 0  # tree shapes whose step cost was timed (the rest could not pay)
    cost_shapes_total: int = 0

    @property
    def speculate(self) -> bool:
        """Whether the best tree beat plain decoding in the timed generations: what saving the
        result makes the model's default (``speculate`` in its config)."""
        return self.expected_speedup >= 1.0

    def to_dict(self) -> dict:
        """The fields, :attr:`speculate` and the pruning threshold, for reports and JSON."""
        return dict(vars(self), speculate=self.speculate, cost_prune_below=PRUNE_BELOW)


def time_finalists(model, prompts: Sequence[list[int]], trees: Sequence[str], max_tokens: int, eos: set[int],
                   rounds: Optional[int] = None) -> tuple[float, list[dict]]:
    """Greedy generations from ``prompts`` with plain decoding and with each tree of ``trees``,
    interleaved per prompt, ``rounds`` times (default ``FINAL_ROUNDS``).

    Returns ``(AR decode tokens/s, [{tree, speedup, ss_tokens_per_sec, tokens_per_step}, ...])``
    in the order of ``trees``: speedup is the median over rounds of the tree's decode tokens/s
    over AR's in the same round; tokens/s are medians over rounds (:mod:`.runner` conventions).
    """
    greedy = SamplingParams()
    weights = param_bytes(model)
    modes = [Mode("ar", ours(model, greedy, speculate=False), weights)]
    modes += [Mode(spec, ours(model, greedy, tree=parse_tree_spec(spec)), weights) for spec in trees]
    runs = measure(modes, prompts, max_tokens=max_tokens, repeats=rounds or FINAL_ROUNDS, eos=eos)
    stats = {m.name: summarize(m, runs[m.name]) for m in modes}
    out = [dict(tree=spec, speedup=statistics.median(speedups(runs[spec], runs["ar"])),
                ss_tokens_per_sec=stats[spec]["decode_tokens_per_sec"], tokens_per_step=stats[spec]["tokens_per_step"])
           for spec in trees]
    return stats["ar"]["decode_tokens_per_sec"], out


def tune_tree(model, prompts: Sequence[list[int]], max_tokens: int, eos: set[int],
              rounds: Optional[int] = None, final_rounds: Optional[int] = None,
              phase: Optional[Callable[[str], ContextManager]] = None) -> TuneResult:
    """Measure, model, time the finalists, and choose the fastest (module docstring).

    ``rounds``: of the step-cost windows (``COST_ROUNDS``); ``final_rounds``: of the finalists'
    generations (``FINAL_ROUNDS``). ``phase(message)``: a context manager around each of the
    three stages (the CLI shows it with the stage's duration: on a large model each takes
    minutes).
    """
    phase = phase or (lambda message: contextlib.nullcontext())
    if not model.num_streams:
        raise ValueError("--tune needs a model with speculative streams; this model has none.")
    if not prompts:
        raise ValueError("--tune needs at least one calibration prompt.")
    g = model.num_streams
    with phase(f"Tuning 1/3: acceptance of the streams over greedy continuations of {len(prompts)} prompts"):
        cal = calibrate(model, prompts, max_tokens, eos)
    if sum(cal.emitted) < 2:
        raise ValueError("The calibration prompts generated no tokens to tune on; "
                         "use other prompts or more --max-tokens.")
    acc = cal.rank_acceptance(g)
    trees = [(cartesian_tree(ks), ks) for ks in cartesian_candidates(g)]
    paths = greedy_paths(acc)
    trees += [(sparse_tree(paths[:n]), None) for n in range(1, len(paths) + 1)]
    candidates = []
    seen = set()
    for tree, ks in trees:
        if tree.paths in seen or tree.size > MAX_NODES:
            continue
        seen.add(tree.paths)
        candidates.append((tree, ks, tokens_per_step(cal, tree)))
    ceiling: dict[int, float] = {}
    for tree, _, e in candidates:
        ceiling[tree.max_depth] = max(ceiling.get(tree.max_depth, 0.0), e)

    shapes = len(cost_shapes(g))
    with phase(f"Tuning 2/3: step cost of up to {shapes} tree shapes, {_rounds(rounds or COST_ROUNDS)}"):
        c_ar, cost, raw = step_costs(model, cal.contexts[0], rounds, ceiling=ceiling)
    timed_shapes = sum(1 for d, n in cost_shapes(g) if d in cost and cost[d][n - 1] is not None)

    scored = []
    for tree, ks, e in candidates:
        c = cost[tree.max_depth][tree.size - 1] if tree.max_depth in cost else None
        if c is None:  # bigger than any tree timed at its depth: it cannot pay (cost_sweep)
            continue
        scored.append(dict(tree=tree_spec(tree, ks), size=tree.size, depth=tree.max_depth, tokens_per_step=e,
                           speedup=e * c_ar / c, step_cost_s=c))
    scored.sort(key=lambda s: -s["speedup"])
    by_size: dict[int, float] = {}
    for s in scored:
        by_size[s["size"]] = max(by_size.get(s["size"], 0.0), s["speedup"])

    modelled = {s["tree"]: s for s in scored[:FINALISTS]}
    with phase(f"Tuning 3/3: the {len(modelled)} best-modelled trees and plain decoding timed in generations "
               f"from {len(prompts)} prompts, {_rounds(final_rounds or FINAL_ROUNDS)}"):
        ar_rate, timed = time_finalists(model, prompts, list(modelled), max_tokens, eos, final_rounds)
    finalists = sorted(
        (dict(f, size=modelled[f["tree"]]["size"], modelled_speedup=modelled[f["tree"]]["speedup"],
              expected_tokens_per_step=modelled[f["tree"]]["tokens_per_step"]) for f in timed),
        key=lambda f: -f["speedup"])
    best = finalists[0]
    return TuneResult(
        tree=best["tree"], size=best["size"], expected_tokens_per_step=best["expected_tokens_per_step"],
        expected_speedup=best["speedup"], expected_ss_tokens_per_sec=best["ss_tokens_per_sec"],
        expected_ar_tokens_per_sec=ar_rate, step_cost_ar_s=c_ar, step_cost_s=cost, step_cost_raw_s=raw,
        rank_acceptance=acc.round(4).tolist(), best_speedup_by_size=dict(sorted(by_size.items())),
        candidates=scored[:8], finalists=finalists, calibration_prompts=len(prompts),
        calibration_tokens=sum(cal.emitted), cost_shapes_timed=timed_shapes, cost_shapes_total=shapes,
    )


def _rounds(n: int) -> str:
    return f"{n} round" + ("" if n == 1 else "s")


def tree_destination(model_dir: str | os.PathLike) -> Path:
    """The config.json that saving a tuned tree rewrites: not the bundled demo (that would edit
    the installed package), and writable. Callers that tune check it before they start."""
    from ..loading import DEMO_DIR

    path = Path(model_dir) / "config.json"
    if Path(model_dir).resolve() == DEMO_DIR.resolve():
        raise ValueError(
            f"Saving a tuned tree would edit the bundled demo model inside the installed package ({DEMO_DIR}). "
            f"Copy it first (cp -r {DEMO_DIR} DIR) and pass --model DIR, or see the choice without saving it (specstream tune --no-save)."
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a converted model directory.")
    if not (_writable(path) and _writable(path.parent)):
        raise PermissionError(
            f"Cannot write {path} (the tuned tree is saved there); make the folder writable, "
            "tune a copy of the model, or see the choice without saving it (specstream tune --no-save)."
        )
    return path


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def tuning_fields(spec: str, speculate: bool = True, device: Optional[str] = None) -> dict[str, Any]:
    """The ``speculative_streaming`` keys a tuning result sets, the one place that maps it to
    them: ``default_tree``, ``speculate`` (False when plain decoding was faster; None, i.e. no
    key, otherwise) and ``tuned_on`` (``device``, by default this process's
    :func:`~..device.describe_device`)."""
    return {"default_tree": spec, "speculate": None if speculate else False,
            "tuned_on": device if device is not None else describe_device()}


def save_default_tree(model_dir: str | os.PathLike, spec: str, speculate: bool = True,
                      device: Optional[str] = None) -> Path:
    """Write ``spec`` as ``speculative_streaming.default_tree`` in config.json, atomically
    (where :func:`tree_destination` allows), with ``tuned_on``: the device it was measured on
    (``device``, by default this process's :func:`~..device.describe_device`). ``speculate``
    False also saves ``"speculate": false`` (generation on that device then decodes without
    speculation unless asked); True removes it."""
    path = tree_destination(model_dir)
    config = json.loads(path.read_text())
    block = config.get(CONFIG_KEY)
    if not block:
        raise ValueError(f"{path} has no '{CONFIG_KEY}' block; only a speculative model has a default tree.")
    for key, value in tuning_fields(spec, speculate, device).items():
        if value is None:
            block.pop(key, None)
        else:
            block[key] = value
    streams = SpecStreamConfig.from_dict(block, unknown="warn").num_streams  # still a valid block (a newer version's keys stay)
    tree = parse_tree_spec(spec)
    if tree.size < 2 or tree.max_depth > streams:
        raise ValueError(f"Tree {spec!r} needs 1 to {streams} levels of drafts for this model's {streams} streams.")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
