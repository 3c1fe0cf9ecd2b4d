"""Self-distillation data for stories260K: story openings and the model's own continuations.

    python examples/stories260k/make_distill_data.py --model runs/stories260k/base \
        --output runs/stories260k/data

Streams trained in lossless mode learn to predict what the frozen model itself will say, so
the targets are the model's own outputs:

1. Openings. Sample stories from the bare BOS (temperature 1.0, one seed per run) and cut
   each into a prompt: its first sentence, or its first k words (k = 2..12), at random.
2. Completions. The model's greedy continuation of each prompt (``--temperature`` > 0 samples
   instead), up to ``--max-new-tokens`` tokens or the end of the story. The model marks the
   end of a story with BOS (id 1; llama2.c's convention) or EOS; neither is kept.
3. Only rows whose text re-tokenizes to exactly the generated ids are kept
   (``encode(prompt + completion) == prompt ids + completion ids``), so a trainer that
   tokenizes the text sees the model's own token sequence.

Writes ``train.jsonl`` ({"prompt", "completion"}; the completion starts with its space) and
``heldout_prompts.jsonl`` ({"prompt"}, ``--num-heldout`` openings from other seeds that
never occur in train.jsonl), for the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

BOS_ID, EOS_ID = 1, 2
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def opening(text: str, rng: random.Random) -> str | None:
    """A story opening cut from ``text``: the first sentence or the first 2-12 words."""
    text = text.split("\n")[0].strip()
    words = text.split()
    if len(words) < 4:
        return None
    end = SENTENCE_END.search(text)
    if rng.random() < 0.5 and end is not None and len(text[:end.end()].split()) <= 25:
        prompt = text[:end.end()]
    else:
        prompt = " ".join(words[:rng.randint(2, min(12, len(words) - 1))])
    return prompt if prompt != text else None


@torch.no_grad()
def sample_from_bos(model, count: int, max_new_tokens: int, seed: int, batch_size: int) -> list[list[int]]:
    """``count`` sampled token sequences (BOS excluded), ``seed`` fixing the whole set."""
    torch.manual_seed(seed)
    out = []
    while len(out) < count:
        n = min(batch_size, count - len(out))
        ids = torch.full((n, 1), BOS_ID, dtype=torch.long)
        gen = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, eos_token_id=[BOS_ID, EOS_ID], pad_token_id=EOS_ID)
        out += [row[1:].tolist() for row in gen]
    return out


def cut_at_end(ids: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in (BOS_ID, EOS_ID):
            return ids[:i]
    return ids


def openings(model, tokenizer, count: int, seed: int, batch_size: int, exclude: set[str]) -> list[str]:
    """``count`` distinct story openings not in ``exclude``."""
    rng = random.Random(seed)
    found: dict[str, None] = {}
    round_ = 0
    while len(found) < count:
        if round_ >= 50:
            raise RuntimeError(f"found only {len(found)} distinct openings after {round_} rounds; lower the count.")
        want = max(batch_size, int(1.3 * (count - len(found))))
        for ids in sample_from_bos(model, want, 48, seed * 1000 + round_, batch_size):
            text = tokenizer.decode(cut_at_end(ids), skip_special_tokens=True)
            prompt = opening(text, rng)
            if prompt and prompt not in exclude and prompt not in found and len(found) < count:
                found[prompt] = None
        round_ += 1
    return list(found)


@torch.no_grad()
def continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                  seed: int, batch_size: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per prompt. Prompts of equal token length share a batch,
    so there is no padding and each row computes exactly as it would alone."""
    torch.manual_seed(seed)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_len = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out: list = [None] * len(prompts)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {
        "do_sample": False}
    for length, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            rows = idx[s:s + batch_size]
            ids = torch.tensor([encoded[i] for i in rows])
            gen = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=[BOS_ID, EOS_ID],
                                 pad_token_id=EOS_ID, **sampling)
            for r, i in enumerate(rows):
                out[i] = (encoded[i], cut_at_end(gen[r, length:].tolist()))
    return out


def make_rows(tokenizer, prompts: list[str], pairs) -> tuple[list[dict], int]:
    """{"prompt", "completion"} rows whose text round-trips to the generated ids; (rows, dropped)."""
    rows, dropped = [], 0
    for prompt, (prompt_ids, completion_ids) in zip(prompts, pairs):
        full = tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True)
        if not completion_ids or not full.startswith(prompt) or len(full) == len(prompt):
            dropped += 1
            continue
        completion = full[len(prompt):]
        if tokenizer(prompt + completion)["input_ids"] != prompt_ids + completion_ids:
            dropped += 1
            continue
        rows.append({"prompt": prompt, "completion": completion})
    return rows, dropped


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="directory from import_llama2c.py")
    ap.add_argument("--output", required=True, help="directory for train.jsonl and heldout_prompts.jsonl")
    ap.add_argument("--num-train", type=int, default=5000)
    ap.add_argument("--num-heldout", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy completions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--force", action="store_true", help="overwrite existing files")
    args = ap.parse_args(argv)

    out = Path(args.output)
    files = (out / "train.jsonl", out / "heldout_prompts.jsonl")
    if any(f.exists() for f in files) and not args.force:
        sys.exit(f"error: {out} already holds train.jsonl / heldout_prompts.jsonl; pass --force to replace them.")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()

    t0 = time.time()
    # Held-out openings come from seeds the training openings never use.
    heldout = openings(model, tokenizer, args.num_heldout, 2 * args.seed + 1, args.batch_size, set())
    train_prompts = openings(model, tokenizer, args.num_train, 2 * args.seed + 2, args.batch_size, set(heldout))
    print(f"{len(train_prompts)} train + {len(heldout)} held-out openings in {time.time() - t0:.0f}s", flush=True)

    pairs = continuations(model, tokenizer, train_prompts, args.max_new_tokens, args.temperature,
                          args.seed, args.batch_size)
    rows, dropped = make_rows(tokenizer, train_prompts, pairs)
    n_tokens = sum(len(c) for _, c in pairs)
    print(f"{len(rows)} rows ({dropped} dropped: empty or not round-tripping), {n_tokens} completion tokens, "
          f"{time.time() - t0:.0f}s", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(files[0], rows)
    write_jsonl(files[1], [{"prompt": p} for p in heldout])
    print(f"wrote {files[0]} and {files[1]}")


if __name__ == "__main__":
    main()
