"""Tokenization, data splits and the order of batches, for both trainers.

Each :class:`~mlx_specstream.datasets.Example` becomes ``input_ids`` plus ``labels`` (the
token id at completion tokens, :data:`IGNORE_INDEX` at prompt tokens). The prompt is
tokenized exactly as inference will tokenize it (special tokens, i.e. BOS, added); a finished
completion ends with EOS so the model learns to stop (a reply cut at a token limit does not,
:attr:`~mlx_specstream.datasets.Example.ends`). Batches group examples of similar
length (bucketing), so time is not spent on padding; with a token budget (``--batch-tokens``)
each batch takes as many similar-length examples as fit the budget, so every batch is about
equally full (many short examples, or a few long ones) and a GPU is neither idle on short
batches nor out of memory on long ones.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from typing import Any, Optional, Sequence

from mlx_specstream.datasets import Dataset, Example, load_dataset

IGNORE_INDEX = -100


@dataclasses.dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # == input_ids at completion tokens, IGNORE_INDEX elsewhere


def training_ids(tokenizer: Any, ex: Example) -> tuple[list[int], list[int]]:
    """``(prompt ids, completion ids)`` of an example as the trainers see it.

    The prompt is tokenized with special tokens (BOS) as inference tokenizes it; a chat
    example's prompt is the conversation without its last reply, rendered with the generation
    prompt, and its completion what the full conversation adds to that. A complete reply
    (``ex.ends``) ends with EOS (chat: with the template's end of turn, then EOS if the template
    adds none); an unfinished one (a distilled reply cut at its token limit) ends with its last
    generated token.
    """
    if ex.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("Chat ('messages') data needs a tokenizer with a chat template; "
                             "use {'prompt', 'completion'} lines instead.")
        msgs = [dict(m) for m in ex.messages]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt):
            raise ValueError("The chat template does not render the conversation without its last reply as a "
                             "prefix of the whole; train on {'prompt', 'completion'} lines instead.")
        reply = full[len(prompt):]
        if not ex.ends:  # drop the end of turn the template writes after the reply
            content = msgs[-1]["content"]
            at = reply.rfind(content) if content else -1
            if at < 0:
                raise ValueError("The chat template does not render the unfinished reply's text; train on "
                                 "{'prompt', 'completion'} lines instead.")
            reply = reply[: at + len(content)]
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    else:
        p_ids = tokenizer(ex.prompt)["input_ids"]
        full_ids = tokenizer(ex.prompt + ex.completion)["input_ids"]
        if full_ids[: len(p_ids)] == p_ids:  # the usual case: tokens do not merge across the boundary
            c_ids = full_ids[len(p_ids):]
        else:
            c_ids = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if ex.ends and eos is not None and (not c_ids or c_ids[-1] != eos):
        c_ids = c_ids + [eos]
    return list(p_ids), list(c_ids)


def tokenize_example(tokenizer: Any, ex: Example, max_length: int) -> Optional[TokenizedExample]:
    """Tokenize one example, truncated to ``max_length``; None if no completion token survives."""
    p_ids, c_ids = training_ids(tokenizer, ex)
    ids = (p_ids + c_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + c_ids)[:max_length]
    if all(x == IGNORE_INDEX for x in labels[1:]):  # the first token is never a target
        return None
    return TokenizedExample(ids, labels)


def tokenize_all(tokenizer: Any, examples: Sequence[Example], max_length: int) -> tuple[list[TokenizedExample], int]:
    """Tokenize every example; returns the kept ones and how many were dropped (prompt too long)."""
    kept = [t for t in (tokenize_example(tokenizer, ex, max_length) for ex in examples) if t is not None]
    return kept, len(examples) - len(kept)


@dataclasses.dataclass
class TokenizedSplits:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    dropped: int  # training examples whose prompt fills max_length
    pad_id: int


def tokenize_splits(tokenizer: Any, train_raw: Sequence[Example], eval_raw: Sequence[Example], max_length: int,
                    *, report: bool = True) -> TokenizedSplits:
    """Tokenize a run's training and evaluation examples (:func:`tokenize_all`); the padding id
    is the tokenizer's pad, else EOS, else 0. Fails when no training example keeps a target;
    with ``report``, says on stderr how many were dropped."""
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    train_tok, dropped = tokenize_all(tokenizer, train_raw, max_length)
    eval_tok, _ = tokenize_all(tokenizer, eval_raw, max_length)
    if not train_tok:
        raise ValueError(f"No training example keeps a completion token within --max-length {max_length}.")
    if dropped and report:
        print(f"Skipped {dropped} examples whose prompt fills --max-length {max_length}.", file=sys.stderr)
    return TokenizedSplits(train_tok, eval_tok, dropped, pad_id)


def load_splits(args: Any) -> tuple[Dataset, list[Example], list[Example]]:
    """``(train_set, train examples, eval examples)`` from a run's options (``data``,
    ``data_format``, ``max_examples``, ``eval_data``, ``eval_examples``).

    Without ``eval_data``, ``eval_examples`` are held out from the end of the training data;
    with it, ``eval_examples`` subsamples it evenly, so files sorted by input (E2E: by MR) are
    still covered.
    """
    train_set = load_dataset(args.data, args.data_format, limit=args.max_examples)
    eval_raw = load_dataset(args.eval_data, args.data_format).examples if args.eval_data else []
    if args.eval_data and args.eval_examples and args.eval_examples < len(eval_raw):
        stride = len(eval_raw) / args.eval_examples
        eval_raw = [eval_raw[int(i * stride)] for i in range(args.eval_examples)]
    train_raw = train_set.examples
    if not args.eval_data and args.eval_examples:
        if args.eval_examples >= len(train_raw):
            raise ValueError(f"--eval-examples {args.eval_examples} leaves no training data "
                             f"({len(train_raw)} examples).")
        train_raw, eval_raw = train_raw[: -args.eval_examples], train_raw[-args.eval_examples:]
    return train_set, train_raw, eval_raw


def bucketed_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                     world_size: int = 1, bucket_factor: int = 32) -> list[list[int]]:
    """One epoch's batches of example indices, deterministic in ``(seed, epoch)``.

    Shuffle, sort each window of ``batch_size * bucket_factor`` examples by length, cut it
    into batches, shuffle the batches. The count is a multiple of ``world_size`` (DDP ranks
    take ``batches[rank::world_size]`` and must step together); the remainder is dropped.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_factor
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    usable = len(batches) // world_size * world_size
    return batches[:usable]


def token_batches(lengths: Sequence[int], max_tokens: int, *, seed: int, epoch: int,
                  window: int = 4096) -> list[list[int]]:
    """One epoch's batches of example indices holding at most ``max_tokens`` padded tokens each.

    Shuffle, sort each window of ``window`` examples by length, cut it greedily into batches
    whose ``count x longest`` stays within ``max_tokens`` (an example longer than the budget
    goes alone), shuffle the batches. Deterministic in ``(seed, epoch)``.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        current: list[int] = []
        for i in sorted(order[start: start + window], key=lambda i: lengths[i]):
            if current and (len(current) + 1) * lengths[i] > max_tokens:  # sorted: lengths[i] is the longest
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


def epoch_steps(lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int, world_size: int = 1,
                accumulation: int = 1, batch_tokens: int = 0) -> list[list[list[int]]]:
    """One epoch as a list of optimizer steps of every rank: entry ``step * world_size + rank``
    holds that rank's ``accumulation`` micro-batches (lists of example indices).

    With ``batch_tokens`` the micro-batches come from :func:`token_batches`, taken
    ``accumulation`` at a time. Otherwise each step's examples are one bucketed batch of
    ``batch_size x accumulation`` (:func:`bucketed_batches`), cut (length-sorted) into
    ``accumulation`` micro-batches of ``batch_size``: the same examples per step as a run with
    ``accumulation`` times the batch size, so the two compute the same gradients.
    """
    if batch_tokens:
        micro = token_batches(lengths, batch_tokens, seed=seed, epoch=epoch)
        per = accumulation * world_size
        micro = micro[: len(micro) // per * per]
        return [micro[i: i + accumulation] for i in range(0, len(micro), accumulation)]
    big = bucketed_batches(lengths, batch_size * accumulation, seed=seed, epoch=epoch, world_size=world_size)
    out = []
    for b in big:
        b = sorted(b, key=lambda i: lengths[i]) if accumulation > 1 else b
        out.append([b[i: i + batch_size] for i in range(0, len(b), batch_size)])
    return out


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How a run's steps map onto epochs and what happens after each: ``epoch_steps(lengths,
    epoch=e, **kwargs)`` is epoch ``e``'s plan; every epoch runs ``steps_per_epoch`` steps,
    ``total_steps`` in all. Metrics are logged every ``log_every`` steps; evaluation and
    checkpoints come every ``eval_every`` / ``save_every`` steps, or at the end of each epoch
    when that is 0."""

    kwargs: dict
    steps_per_epoch: int
    total_steps: int
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0

    def epoch(self, lengths: Sequence[int], epoch: int) -> list[list[list[int]]]:
        return epoch_steps(lengths, epoch=epoch, **self.kwargs)

    def end_of_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def log_due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def eval_due(self, step: int) -> bool:
        return step % self.eval_every == 0 if self.eval_every else self.end_of_epoch(step)

    def save_due(self, step: int) -> bool:
        """A checkpoint after ``step``; never after the last (its state goes to the output)."""
        due = step % self.save_every == 0 if self.save_every else self.end_of_epoch(step)
        return due and step < self.total_steps


def plan_steps(lengths: Sequence[int], args: Any, *, world_size: int = 1) -> StepPlan:
    """The run's :class:`StepPlan` from its options (``batch_size``, ``seed``,
    ``grad_accumulation_steps``, ``batch_tokens``, ``epochs``, ``max_steps``, ``log_every``,
    ``eval_every``, ``save_every``).

    Token budgets give each epoch its own number of steps: every epoch runs the fewest.
    """
    kwargs = dict(batch_size=args.batch_size, seed=args.seed, world_size=world_size,
                  accumulation=args.grad_accumulation_steps, batch_tokens=args.batch_tokens)
    counted = range(args.epochs) if args.batch_tokens else range(1)
    per_epoch = min(len(epoch_steps(lengths, epoch=e, **kwargs)) for e in counted) // world_size
    if per_epoch == 0:
        raise ValueError(f"{len(lengths)} examples make no full step for {world_size} rank(s) x "
                         f"{args.grad_accumulation_steps} micro-batch(es) of {args.batch_size}; lower --batch-size "
                         "or --grad-accumulation-steps, or add data.")
    total = per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    return StepPlan(kwargs, per_epoch, total, log_every=max(1, args.log_every), eval_every=args.eval_every,
                    save_every=args.save_every)
