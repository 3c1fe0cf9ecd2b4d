"""Self-distillation data for the E2E streams: each train MR with the fine-tuned model's own
greedy description, as an E2E CSV.

    python examples/e2e/distill_data.py --model runs/e2e_ss_mlx --output runs/e2e_distill/train.csv.gz

Why: drafts are accepted when they equal the main stream's greedy choice, but the shared-mode
fine-tune teaches the streams the human references, which vary wildly for one MR (8.7
references per MR on average, different wordings). Trained on the model's own greedy
outputs, the streams learn the one continuation they are judged against. `run_all.sh` uses
the file twice: a further shared-mode fine-tune on it (the bundled demo; the main stream
trains too, so its outputs may change and quality is re-measured), and optionally a
lossless-mode stream training (main stream frozen, outputs exactly the fine-tuned model's).

Reads the distinct MRs of the train split, generates each description with the model in
``--model`` (greedy; speculative decoding is lossless, so the text is the plain greedy text),
and writes ``mr,ref`` rows (gzip) that ``specstream train --format e2e`` reads with the E2E
prompt template. The file is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tokenizer import default_shared  # noqa: E402

import mlx.core as mx  # noqa: E402

from mlx_specstream import load  # noqa: E402
from mlx_specstream.datasets import read_e2e  # noqa: E402
from mlx_specstream.generate import generate_step  # noqa: E402


def greedy_text(model, tokenizer, prompt: str, max_tokens: int, tree: str = "1,1") -> str:
    """The model's greedy continuation of ``prompt`` up to EOS, as text (speculative decoding
    with ``tree`` when the model has streams: lossless, so the same text, just sooner)."""
    eos = set(tokenizer.eos_token_ids)
    ids: list[int] = []
    prompt_ids = mx.array(tokenizer.encode(prompt), dtype=mx.int32)
    for step in generate_step(model, prompt_ids, max_tokens=max_tokens, tree=tree if model.num_streams else None):
        ids.extend(step.tokens)
        if eos & set(step.tokens) or len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    ids = ids[: next((k for k, t in enumerate(ids) if t in eos), len(ids))]
    return tokenizer.decode(ids).strip()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="converted MLX model directory (the fine-tuned model)")
    ap.add_argument("--output", required=True, help="CSV (.csv or .csv.gz) to write")
    ap.add_argument("--train-csv", default=str(default_shared() / "data/e2e/trainset.csv.gz"))
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, help="only the first N distinct MRs")
    ap.add_argument("--tree", default="1,1", help="draft tree for generating (speed only; output is greedy)")
    ap.add_argument("--force", action="store_true", help="replace an existing output file")
    args = ap.parse_args(argv)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} exists; pass --force to replace it.")
    model, tokenizer = load(args.model)
    template = (getattr(model, "config", None) or {}).get("prompt_template")
    examples = read_e2e(args.train_csv, group_references=True, limit=args.limit).examples
    rows, empty, start = [], 0, time.perf_counter()
    for n, ex in enumerate(examples, 1):
        prompt = template.replace("{input}", ex.input) if template else ex.prompt
        text = greedy_text(model, tokenizer, prompt, args.max_tokens, args.tree)
        if text:
            rows.append((ex.input, text))
        else:
            empty += 1
        if n % 500 == 0:
            print(f"{n}/{len(examples)} MRs, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        opener = gzip.open if out.suffix == ".gz" else open
        with opener(tmp, "wt", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["mr", "ref"])
            writer.writerows(rows)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {out}: {len(rows)} MRs ({empty} empty outputs dropped) in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
