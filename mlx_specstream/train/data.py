"""Tokenization, length bucketing and collation for training.

Each :class:`~mlx_specstream.datasets.Example` becomes ``input_ids`` plus ``labels`` (the
token id at completion tokens, -100 at prompt tokens). The prompt is tokenized exactly as
inference will tokenize it (special tokens, i.e. BOS, added); the completion ends with EOS
so the model learns to stop. Batches group examples of similar length (bucketing), so time
is not spent on padding; with a token budget (``--batch-tokens``) each batch takes as many
similar-length examples as fit the budget, so every batch is about equally full (many short
examples, or a few long ones) and a GPU is neither idle on short batches nor out of memory on
long ones.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Optional, Sequence

import torch

from mlx_specstream.datasets import Example

from .layout import IGNORE_INDEX


@dataclasses.dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # == input_ids at completion tokens, IGNORE_INDEX elsewhere


def _prompt_and_completion_ids(tokenizer: Any, ex: Example) -> tuple[list[int], list[int]]:
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
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        return p_ids, c_ids
    p_ids = tokenizer(ex.prompt)["input_ids"]
    full_ids = tokenizer(ex.prompt + ex.completion)["input_ids"]
    if full_ids[: len(p_ids)] == p_ids:  # the usual case: tokens do not merge across the boundary
        return p_ids, full_ids[len(p_ids):]
    return p_ids, tokenizer(ex.completion, add_special_tokens=False)["input_ids"]


def tokenize_example(tokenizer: Any, ex: Example, max_length: int) -> Optional[TokenizedExample]:
    """Tokenize one example, truncated to ``max_length``; None if no completion token survives."""
    p_ids, c_ids = _prompt_and_completion_ids(tokenizer, ex)
    eos = tokenizer.eos_token_id
    if eos is not None and (not c_ids or c_ids[-1] != eos):
        c_ids = c_ids + [eos]
    ids = (p_ids + c_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + c_ids)[:max_length]
    if all(x == IGNORE_INDEX for x in labels[1:]):  # the first token is never a target
        return None
    return TokenizedExample(ids, labels)


def tokenize_all(tokenizer: Any, examples: Sequence[Example], max_length: int) -> tuple[list[TokenizedExample], int]:
    """Tokenize every example; returns the kept ones and how many were dropped (prompt too long)."""
    kept = []
    for ex in examples:
        tok = tokenize_example(tokenizer, ex, max_length)
        if tok is not None:
            kept.append(tok)
    return kept, len(examples) - len(kept)


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


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: ``input_ids``, ``attention_mask``, ``labels``, each ``[B, T]``."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
