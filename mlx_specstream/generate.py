"""Generation: one forward pass per step verifies the draft tree and drafts the next one.

Layered like mlx-lm: ``generate_step`` yields token ids per step, ``stream_generate`` turns
them into text segments with running statistics, ``generate`` returns the whole string.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import mlx.core as mx

from .cache import make_cache, reserve_all
from .compiled import step_function
from .device import describe_device
from .prompting import prompt_template
from .sampling import SamplingParams, make_sampler
from .streams import AR_PLAN, Plan, SpecStreamModel, chain_plan, prefill_plan, tree_plan
from .tree import Tree, TreeSpec, parse_tree_spec
from .verify import draft

# Per-depth top-k, cut to the number of streams: 13 nodes at γ = 4, cheap enough on a CPU.
# `specstream bench --tune` measures and saves a better tree per model and device.
DEFAULT_TREE = (3, 1, 1, 1)
Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclasses.dataclass
class Step:
    """What one decoding step produced."""

    tokens: list[int]  # emitted this step: accepted drafts, then the bonus token
    accepted: int  # number of draft tokens accepted (len(tokens) - 1 for a full step)
    prefill: bool = False


# mlx-lm's default: a long prompt is prefilled in chunks of this many tokens, so its attention
# scores and masks stay bounded
PREFILL_STEP_SIZE = 2048


@dataclasses.dataclass
class PromptCache:
    """Per-layer caches kept from one generation to the next, and the tokens whose keys and
    values they hold: a new prompt that starts with those tokens prefills only the rest (a
    chat's next turn, a server's next request with the same system prompt)."""

    layers: list = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    reused: int = 0  # prompt tokens the last generation found cached

    def reuse(self, prompt: list[int], num_layers: int) -> int:
        """Keep the longest cached prefix of ``prompt`` (all but its last token at most: that
        one's logits start the generation) and drop the rest; returns the prefix length."""
        if len(self.layers) != num_layers:
            self.layers, self.tokens = make_cache(num_layers), []
        keep = 0
        limit = min(len(self.tokens), len(prompt) - 1)
        while keep < limit and self.tokens[keep] == prompt[keep]:
            keep += 1
        for c in self.layers:
            c.trim(int(c.offset) - keep)
        self.tokens = self.tokens[:keep]
        self.reused = keep
        return keep


def make_prompt_cache(model: SpecStreamModel) -> PromptCache:
    """An empty :class:`PromptCache` for ``model`` (pass it to every generation to reuse)."""
    return PromptCache(make_cache(model.num_layers))


def resolve_tree(model: SpecStreamModel, tree: Optional[TreeSpec]) -> Optional[Tree]:
    """The tree to draft with: the argument, else the model's default, else DEFAULT_TREE."""
    if not model.num_streams:
        return None
    spec = tree if tree is not None else model.spec.default_tree
    if spec is None:
        spec = list(DEFAULT_TREE[: model.num_streams])
    parsed = parse_tree_spec(spec)
    if parsed.max_depth > model.num_streams:
        raise ValueError(
            f"Tree {spec!r} is {parsed.max_depth} levels deep but the model has only "
            f"{model.num_streams} speculative streams; use at most {model.num_streams} levels."
        )
    if parsed.size < 2:
        raise ValueError(f"Tree {spec!r} has no draft nodes; give at least one level, e.g. '1'.")
    return parsed


def speculates_by_default(model: SpecStreamModel) -> bool:
    """Whether generation drafts with the streams when the caller does not say (``speculate``
    None, no ``tree``): yes, unless the model's config says ``"speculate": false``, which
    ``specstream tune`` saves when plain decoding was faster on the device it measured.

    That verdict is the measured device's: tune records it as ``tuned_on``
    (:func:`~.device.describe_device`), and on any other device the model speculates again,
    with a warning to tune there (a config without ``tuned_on`` is taken at its word)."""
    if model.num_streams == 0:
        return False
    spec = model.spec
    if spec is None or spec.speculate is not False:
        return True
    here = describe_device()
    if spec.tuned_on is None or spec.tuned_on == here:
        return False
    warnings.warn(
        f"This model's config says plain decoding was faster than speculation on the device it was "
        f"tuned on ({spec.tuned_on}), but this is another device ({here}), so it speculates here. "
        "Run `specstream tune --model DIR` on this device to measure it, or pass --no-speculate "
        "(speculate=False) for plain decoding.",
        stacklevel=2,
    )
    return True


def will_speculate(model: SpecStreamModel, speculate: Optional[bool], tree: Optional[TreeSpec] = None) -> bool:
    """Whether a generation drafts with the streams: as ``speculate`` says, else (None) when
    a ``tree`` is given or :func:`speculates_by_default`; never for a plain model."""
    if speculate is None:
        speculate = tree is not None or speculates_by_default(model)
    return bool(speculate) and model.num_streams > 0


def generate_step(
    model: SpecStreamModel,
    prompt: mx.array,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams = SamplingParams(),
    tree: Optional[TreeSpec] = None,
    speculate: Optional[bool] = None,
    prune_threshold: Optional[float] = None,
    cache: Optional[list] = None,
    drafter=None,
    compile: bool = True,
    pipeline: Optional[bool] = None,
    prompt_cache: Optional[PromptCache] = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    truncate_prompt: bool = False,
) -> Iterator[Step]:
    """Yield the tokens of each decoding step, the prefill's first token included.

    ``prompt`` is ``[P]`` int token ids. Stops by itself after ``max_tokens`` tokens
    (the caller may stop earlier). With ``speculate`` False, or a plain model, it is ordinary
    autoregressive decoding through the same main-stream code path; None (the default) asks
    :func:`speculates_by_default`. ``cache``: an empty
    list to receive the per-layer caches (for inspection); a fresh one is made otherwise.
    ``drafter``: an object with ``propose(history) -> list[int]`` (e.g. :class:`PromptLookup`)
    whose chain of drafts replaces the streams' tree; verified the same way.
    ``compile``: run decoding steps as compiled graphs (:mod:`.compiled`; the same
    arithmetic, far fewer launches); False runs them eagerly. Pruning always runs eagerly
    (the pruned tree's shape changes every step). ``pipeline``: launch each step before the
    previous one's tokens are read (see :func:`_decode`; AR and tree steps). The
    default (None) pipelines AR steps only: measured on a 2-core CPU, pipelined tree steps
    decoded ~9% slower (the next step's launch competes with the current step's BLAS
    threads), pipelined AR steps 1-3% faster (BENCHMARKS.md, examples/perf/pipeline.py).
    ``prompt_cache``: keys and values kept from earlier generations (:class:`PromptCache`):
    the prompt's cached prefix is not prefilled again, and the cache holds this generation's
    tokens afterwards, however it ends. The prompt is prefilled in chunks of
    ``prefill_step_size`` tokens. A prompt that does not fit the model's context beside
    ``max_tokens`` is an error naming both, or with ``truncate_prompt`` loses its oldest
    tokens, with a warning.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("The prompt must be a non-empty 1-D sequence of token ids.")
    sampling.validate()
    if model.family.plain_only:
        yield from _plain_only_steps(model, prompt, max_tokens, sampling, speculate, tree, drafter, prompt_cache,
                                     prefill_step_size)
        return
    use_streams = will_speculate(model, speculate, tree) and drafter is None
    draft_tree = resolve_tree(model, tree) if use_streams else None
    plan = tree_plan(draft_tree, model.num_streams) if use_streams else AR_PLAN
    if prune_threshold is None and model.spec is not None and model.spec.pruning is not None:
        prune_threshold = model.spec.pruning.threshold
    # positions up to the last step's deepest node, plus one pipelined step past the end
    depth = draft_tree.max_depth if use_streams else (drafter.num_draft if drafter is not None else 0)
    limit = model.max_positions
    needed = prompt.size + max_tokens + 2 * depth + 1
    if limit is not None and needed > limit:
        room = prompt.size - (needed - limit)
        if not truncate_prompt or room < 1:
            raise ValueError(
                f"Prompt ({prompt.size} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                f"{limit} positions; shorten the prompt, lower max_tokens, or truncate the prompt "
                "(--truncate-prompt, truncate_prompt=True)."
            )
        warnings.warn(
            f"The prompt ({prompt.size} tokens) does not fit the model's {limit}-token context beside "
            f"max_tokens ({max_tokens}); its first {prompt.size - room} tokens were dropped.",
            stacklevel=2,
        )
        prompt = prompt[-room:]
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}.")
    if prompt_cache is not None and cache is not None:
        raise ValueError("Pass either cache (to inspect a fresh one) or prompt_cache (to reuse one), not both.")
    ids = prompt.tolist()
    start = prompt_cache.reuse(ids, model.num_layers) if prompt_cache is not None else 0
    layers_cache = prompt_cache.layers if prompt_cache is not None else make_cache(model.num_layers)
    if cache is not None:
        cache.extend(layers_cache)
    cache = layers_cache

    run = _Run(model, cache, plan if use_streams else AR_PLAN, use_streams, sampling, max_tokens, prune_threshold,
               drafter, compile, pipeline)
    emitted: list[int] = []
    try:
        yield from _generate_steps(run, prompt[start:], ids, prefill_step_size, emitted)
    finally:
        if prompt_cache is not None:  # what the cache holds, however the generation ended
            prompt_cache.tokens = (ids + emitted)[: int(cache[0].offset)]


def _plain_only_steps(model, prompt, max_tokens, sampling, speculate, tree, drafter, prompt_cache,
                      prefill_step_size) -> Iterator[Step]:
    """A model that cannot verify a tree (:attr:`.family.Family.plain_only`) decodes plainly
    through mlx-lm's own generation loop and caches."""
    from mlx_lm.generate import generate_step as mlx_lm_generate_step

    if speculate or tree is not None or drafter is not None:
        raise ValueError(
            f"This model cannot verify drafts ({model.family.plain_only}); generate without speculation "
            "(--no-speculate, speculate=False) and without a tree or drafter."
        )
    if prompt_cache is not None:
        prompt_cache.reused = 0  # its caches are mlx-lm's own, made afresh for each generation
    sampler = make_sampler(sampling)
    steps = mlx_lm_generate_step(prompt, model.base, max_tokens=max_tokens, sampler=sampler,
                                 prefill_step_size=prefill_step_size)
    for i, (token, _) in enumerate(steps):
        yield Step([int(token)], 0, prefill=i == 0)


@dataclasses.dataclass(frozen=True)
class _Run:
    """One generation's settings, as :func:`generate_step` resolved them."""

    model: SpecStreamModel
    cache: list
    plan: Plan  # the draft tree's (AR_PLAN without streams)
    use_streams: bool
    sampling: SamplingParams
    max_tokens: int
    prune_threshold: Optional[float]
    drafter: Any
    compile: bool
    pipeline: Optional[bool]


def _generate_steps(run: _Run, rest: mx.array, ids: list[int], prefill_step_size: int,
                    emitted: list[int]) -> Iterator[Step]:
    """Prefill ``rest`` (the prompt past its cached prefix) in chunks, then decode; every
    emitted token is appended to ``emitted``."""
    model, cache, plan = run.model, run.cache, run.plan
    for start in range(0, rest.size - prefill_step_size, prefill_step_size):  # all chunks but the last
        chunk = rest[start : start + prefill_step_size]
        model.forward(chunk[None], cache, prefill_plan(chunk.size, 0), streams=False)
        mx.eval([c.state for c in cache])
        for c in cache:
            c.commit(None, chunk.size)
    last = rest[(rest.size - 1) // prefill_step_size * prefill_step_size :]
    out = model.forward(last[None], cache, prefill_plan(last.size, plan.num_streams), run.use_streams)
    root = make_sampler(run.sampling)(out.logits[-1:])
    drafts = draft(model, out.stream_hidden[-1], plan) if run.use_streams else None
    mx.eval(root, drafts) if drafts is not None else mx.eval(root)
    for c in cache:
        c.commit(None, last.size)
    for step in _decode(run, root, drafts, ids):
        emitted.extend(step.tokens)
        yield step


def _decode(run: _Run, root: mx.array, drafts: Optional[mx.array], ids: list[int]) -> Iterator[Step]:
    """The decoding loop, one for every step kind (:mod:`.compiled`): plain, tree (pruned or
    not) and an external drafter's chains. It alone moves the caches' offset, by the accepted
    depth + 1 of each step it reads.

    With ``pipeline``, step k + 1 is launched before step k's tokens are read: all its inputs
    are device arrays, so the host's per-step work (reading tokens, yielding, the caller's
    detokenizing) overlaps the computation. A caller that stops early leaves that one step
    unread; its results are simply dropped. ``pipeline=None``: AR steps only (see
    :func:`generate_step`). A drafter's next chain depends on the tokens just read, so its
    steps are never pipelined.
    """
    model, cache, plan, drafter, max_tokens = run.model, run.cache, run.plan, run.drafter, run.max_tokens
    yield Step([root.item()], 0, prefill=True)
    if max_tokens <= 1:
        return
    if drafter is not None:
        kind, tokens = None, root  # the kind follows each chain's length
    elif not run.use_streams:
        kind, tokens = "ar", root
    else:
        kind = "pruned" if run.prune_threshold and model.has_pruning else "tree"
        tokens = mx.concatenate([root, drafts])
    pipeline = (kind == "ar" if run.pipeline is None else run.pipeline) and kind in ("ar", "tree")
    history = ids + [root.item()]
    offset = cache[0].offset
    emitted = 1

    def launch(tokens: mx.array, dev_offset: mx.array, bound: int) -> _Launched:
        step_kind, step_plan, step_drafts = kind, plan, []
        if drafter is not None:
            step_drafts = drafter.propose(history)[: max(0, max_tokens - emitted - 1)]
            step_kind, step_plan = ("chain", chain_plan(len(step_drafts))) if step_drafts else ("ar", AR_PLAN)
            tokens = mx.array(history[-1:] + step_drafts, dtype=mx.int32)
        new = step_plan.msa_mask.shape[0] if step_kind in ("tree", "pruned") else step_plan.n_main
        reserve_all(cache, bound + new)
        fn = step_function(model, step_kind, step_plan, run.sampling, run.compile, run.prune_threshold)
        depth, path, bonus, nxt, next_offset, keys, values = fn(
            tokens, dev_offset, [c.keys for c in cache], [c.values for c in cache])
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v  # the old buffers are dropped, so the step may update them in place
        mx.async_eval(depth, path, bonus, nxt, next_offset, keys, values)
        return _Launched(depth, path, bonus, nxt, next_offset)

    advance = plan.tree.max_depth + 1 if kind == "tree" else 1  # most tokens one step commits
    pending = launch(tokens, mx.array(offset, dtype=mx.int32), offset)
    while True:
        ahead = None
        if pipeline and emitted + 1 < max_tokens:  # the next step may be needed
            ahead = launch(pending.next_tokens, pending.next_offset, offset + advance)
        depth = pending.depth.item()
        step_tokens = pending.path.tolist()[1 : depth + 1] + pending.bonus.tolist()
        offset += depth + 1  # the step gathered its accepted path into place
        for c in cache:
            c.offset = offset
        history.extend(step_tokens)
        emitted += len(step_tokens)
        yield Step(step_tokens, depth)
        if emitted >= max_tokens:
            return
        pending = ahead or launch(pending.next_tokens, pending.next_offset, offset)


@dataclasses.dataclass
class _Launched:
    """A step whose computation was started: its outputs, still lazy (:mod:`.compiled`)."""

    depth: mx.array  # accepted depth d
    path: mx.array  # tokens from the root to the accepted node [D + 1]
    bonus: mx.array  # [1] the main stream's next token
    next_tokens: mx.array  # the next step's input tokens
    next_offset: mx.array  # the next step's offset


@dataclasses.dataclass
class GenerationResponse:
    """One streamed piece of output with running statistics (DESIGN.md metric conventions)."""

    text: str  # new text segment
    token_ids: list[int]  # new token ids in this response
    accepted: list[int]  # draft tokens accepted in this step (subset of token_ids)
    prompt_tokens: int
    generation_tokens: int
    decode_steps: int  # decoding forward passes so far (prefill excluded)
    tokens_per_step: float  # decode tokens / decode steps (the call-reduction ratio)
    decode_tokens_per_sec: float
    prompt_tokens_per_sec: float
    prompt_time: float
    decode_time: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None  # None, "stop" or "length"
    acceptance_lengths: list[int] = dataclasses.field(default_factory=list)
    cached_prompt_tokens: int = 0  # prompt tokens found in the prompt cache (not prefilled again)


def encode_prompt(tokenizer, prompt: Prompt, template: Optional[str] = None) -> list[int]:
    """Token ids for a string, a list of ids, or chat messages: through the tokenizer's chat
    template, or, for a model without one, its recorded prompt ``template`` (config.json's
    ``prompt_template``) around the last user message, with a one-time notice."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        if getattr(tokenizer, "has_chat_template", False):
            return list(tokenizer.apply_chat_template(items, add_generation_prompt=True))
        if template is None:
            raise ValueError(
                "The prompt is a list of chat messages but this model has neither a chat template nor a "
                "prompt template; pass a plain string prompt instead."
            )
        return list(tokenizer.encode(template.replace("{input}", last_user_message(items))))
    if all(isinstance(t, int) for t in items):
        return items
    raise ValueError("prompt must be a string, a list of token ids, or a list of chat messages.")


def last_user_message(messages: Sequence[dict]) -> str:
    """The content of the last user message, for a model without a chat template (a task model
    answers one input; earlier turns have no place in its prompt template), with a notice."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("The chat messages have no user message to answer.")
    warnings.warn(
        "This model has no chat template: chat messages are answered from the last user message "
        "alone, formatted with the model's prompt template.",
        stacklevel=3,
    )
    return str(users[-1].get("content", ""))


def stream_generate(
    model: SpecStreamModel,
    tokenizer,
    prompt: Prompt,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    tree: Optional[TreeSpec] = None,
    speculate: Optional[bool] = None,
    stop: Optional[Sequence[str]] = None,
    prune_threshold: Optional[float] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    drafter=None,
    prompt_cache: Optional[PromptCache] = None,
    truncate_prompt: bool = False,
) -> Iterator[GenerationResponse]:
    """Yield :class:`GenerationResponse` objects as text is produced; the last has ``finish_reason``.

    ``prompt_cache`` (:func:`make_prompt_cache`): reuse the keys and values of earlier
    generations for the prompt's cached prefix (a chat's earlier turns)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    ids = encode_prompt(tokenizer, prompt, prompt_template(getattr(model, "config", None) or {}))
    if not ids:
        raise ValueError("The prompt encodes to no tokens; give a non-empty prompt.")
    if seed is not None:
        mx.random.seed(seed)
    eos = set(eos_token_ids if eos_token_ids is not None else tokenizer.eos_token_ids)
    stops = [s for s in (stop or []) if s]
    sampling = SamplingParams(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)

    detok = tokenizer.detokenizer
    detok.reset()
    mx.reset_peak_memory()
    text_so_far = ""
    n_gen = decode_steps = 0
    acceptance: list[int] = []
    tic = time.perf_counter()
    prompt_time = 0.0
    cached = 0
    decode_start = tic
    steps = generate_step(
        model, mx.array(ids, dtype=mx.int32), max_tokens=max_tokens, sampling=sampling,
        tree=tree, speculate=speculate, prune_threshold=prune_threshold, drafter=drafter, prompt_cache=prompt_cache,
        truncate_prompt=truncate_prompt,
    )
    for step in steps:
        now = time.perf_counter()
        if step.prefill:
            prompt_time = now - tic
            decode_start = now
            cached = prompt_cache.reused if prompt_cache is not None else 0
        else:
            decode_steps += 1
            acceptance.append(step.accepted)
        finish = None
        new = []
        for tok in step.tokens:
            if tok in eos:
                finish = "stop"
                break
            new.append(tok)
            detok.add_token(tok)
            if n_gen + len(new) >= max_tokens:
                finish = "length"
                break
        n_gen += len(new) + (1 if finish == "stop" else 0)
        if finish is not None:
            detok.finalize()
        segment = detok.last_segment
        if stops and segment:
            hit = _find_stop(text_so_far, segment, stops)
            if hit is not None:
                segment = (text_so_far + segment)[len(text_so_far) : max(hit, len(text_so_far))]
                finish = "stop"
        text_so_far += segment
        decode_time = now - decode_start
        decode_tokens = max(n_gen - 1, 0)
        yield GenerationResponse(
            text=segment,
            token_ids=new,
            accepted=new[: min(step.accepted, len(new))] if not step.prefill else [],
            prompt_tokens=len(ids),
            generation_tokens=n_gen,
            decode_steps=decode_steps,
            tokens_per_step=decode_tokens / decode_steps if decode_steps else 0.0,
            decode_tokens_per_sec=decode_tokens / decode_time if decode_time > 0 else 0.0,
            prompt_tokens_per_sec=(len(ids) - cached) / prompt_time if prompt_time > 0 else 0.0,
            prompt_time=prompt_time,
            decode_time=decode_time,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            acceptance_lengths=list(acceptance),
            cached_prompt_tokens=cached,
        )
        if finish is not None:
            return
    # generate_step stops at max_tokens by itself; make the ending explicit
    detok.finalize()


def _find_stop(done: str, segment: str, stops: Sequence[str]) -> Optional[int]:
    """Index in ``done + segment`` where the first stop string begins, if one ends in ``segment``."""
    text = done + segment
    hits = []
    for s in stops:
        i = text.find(s, max(0, len(done) - len(s) + 1))
        if i >= 0:
            hits.append(i)
    return min(hits) if hits else None


def generate(model: SpecStreamModel, tokenizer, prompt: Prompt, verbose: bool = False, **kwargs: Any) -> str:
    """The whole generated text; ``kwargs`` as for :func:`stream_generate`."""
    text = ""
    last = None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(
            f"{last.generation_tokens} tokens, {last.decode_tokens_per_sec:.1f} tokens/s, "
            f"{last.tokens_per_step:.2f} tokens/step, peak memory {last.peak_memory_gb:.3f} GB"
        )
    return text
