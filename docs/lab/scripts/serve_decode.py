"""Decode speed of a running ``specstream serve``, as its responses report it.

Sends the first N prompts of a benchmark file, one request at a time (greedy, the model's
prompt template applied here), and prints the decode tokens/s over all requests: the decode
tokens of each response's ``usage`` over the decode time its ``decode_tokens_per_sec`` implies
(prefill and HTTP excluded, which dominate end-to-end times on a small model). Start the
server first, e.g. ``specstream serve --port 8093 &`` (``SPECSTREAM_BLAS=openblas`` to compare):

    python docs/lab/scripts/serve_decode.py [--port 8093] [--model-dir DIR] [--data CSV] [--num-samples 60]
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

from mlx_specstream.bench.data import load_bench_data
from mlx_specstream.config import read_config
from mlx_specstream.prompting import prompt_template

DEMO = Path(__file__).resolve().parents[3] / "mlx_specstream" / "demo"


def complete(port: int, model_id: str, prompt: str, max_tokens: int) -> dict:
    """The ``usage`` block of one greedy completion."""
    body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["usage"]


def decode_rate(usages: list[dict]) -> float:
    """Decode tokens/s over all responses (each response's first token is the prefill's)."""
    tokens = seconds = 0.0
    for u in usages:
        decoded = u["completion_tokens"] - 1
        if decoded > 0 and u["decode_tokens_per_sec"] > 0:
            tokens += decoded
            seconds += decoded / u["decode_tokens_per_sec"]
    return tokens / seconds if seconds else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--model-dir", default=str(DEMO), help="the served model's directory (for its prompt template)")
    ap.add_argument("--model-id", help="the id the server serves (default: the directory's name)")
    ap.add_argument("--data", default="../shared/data/e2e/devset.csv.gz")
    ap.add_argument("--num-samples", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    template = prompt_template(read_config(args.model_dir)) or "{input}"
    model_id = args.model_id or Path(args.model_dir).resolve().name
    prompts = [template.replace("{input}", ex.prompt) for ex in load_bench_data(args.data, args.num_samples).examples]
    usages = [complete(args.port, model_id, p, args.max_tokens) for p in prompts]
    print(f"decode tokens/s over {len(usages)} requests: {decode_rate(usages):.1f}")


if __name__ == "__main__":
    main()
