"""Training cost of Speculative Streaming against a plain PEFT LoRA fine-tune of the same model.

For each sequence length T, two runs on the same random tokens (every token a target), each
in its own process so peak memory is its own:

* ``specstream``: ``specstream train``'s step (``SpecStreamLM`` in shared mode, peft LoRA on
  q/k/v/o, γ streams in the top N/2 layers, pruning adapter, AdamW on float32 trainables,
  autocast in ``--dtype``; the same :func:`accumulate_gradients` ``run_training`` calls);
* ``peft``: the Hugging Face model with the same peft LoRA, loss from ``model(ids, labels=ids)``.

Random weights from a config (no download). Prints one table: training tokens/s (input tokens,
after ``--warmup`` steps) and peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU:
the process's peak RSS, and its growth over the loaded model), and the ratios.

    python examples/gpu/train_check.py                      # CUDA, Qwen2-0.5B-shaped, bf16, T = 512, 2048
    python examples/gpu/train_check.py --device cpu --preset tiny --lengths 64,128   # dry run
    python examples/gpu/train_check.py --device cpu --preset llama-30m --dtype float32 --steps 2
    python examples/gpu/train_check.py --device cpu --preset llama-30m --dtype float32 --interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PRESETS = {
    # Qwen2-0.5B's shape: 24 layers, hidden 896, 14 heads / 2 KV heads (head_dim 64), vocab 151,936.
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                 tie_word_embeddings=True)),
    # ~35M-parameter Llama: 6 layers, hidden 384, 6 heads (head_dim 64), vocab 32,000, untied head.
    "llama-30m": ("llama", dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                num_attention_heads=6, num_key_value_heads=6, vocab_size=32000,
                                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
                           rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


def build_model(preset: str, dtype):
    import torch
    import transformers as tf

    family, kw = PRESETS[preset]
    cfg = (tf.Qwen2Config if family == "qwen2" else tf.LlamaConfig)(**kw)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")


def make_step(a: argparse.Namespace, method: str):
    """(one optimizer step on a fresh random batch, the HF model) for ``method`` on ``a``'s device."""
    import torch

    from mlx_specstream.train.dist import resolve_device
    from mlx_specstream.train.loop import accumulate_gradients
    from mlx_specstream.train.modes import prepare
    from mlx_specstream.train_common.options import build_spec
    from mlx_specstream.train.precision import autocast, parse_dtype, upcast_trainable

    device, dtype = resolve_device(a.device), parse_dtype(a.dtype)
    if device.type == "cpu" and a.threads:
        torch.set_num_threads(a.threads)
    hf = build_model(a.preset, dtype)
    n_layers = hf.config.num_hidden_layers
    lora = dict(lora_rank=a.lora_rank, lora_alpha=None, lora_targets=None, seed=0)
    if method == "specstream":
        spec = build_spec(num_layers=n_layers, mode="shared", streams=a.streams, msa_layers=n_layers // 2)
        model, _ = prepare(hf, spec, **lora)
    else:
        spec = build_spec(num_layers=n_layers, mode="shared", streams=0, msa_layers=None)
        _, model = prepare(hf, spec, **lora)  # the peft model
        if a.grad_checkpoint:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.enable_input_require_grads()
    upcast_trainable(model)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    dist = _dist(device)

    def step(length: int) -> None:
        ids = torch.randint(0, hf.config.vocab_size, (a.batch_size, length), generator=gen)
        opt.zero_grad(set_to_none=True)
        if method == "specstream":
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            accumulate_gradients(model, [batch], num_streams=a.streams, pruning=True, dtype=dtype,
                                 grad_checkpoint=a.grad_checkpoint, dist=dist)
        else:
            ids = ids.to(device)
            with autocast(device, dtype):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, hf, device


def worker(a: argparse.Namespace) -> dict:
    """Time ``a.steps`` steps of ``a.method`` at ``a.length`` after ``a.warmup``; peak memory."""
    import torch

    step, hf, device = make_step(a, a.method)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, cpu = [], []
    for i in range(a.warmup + a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(a.length)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    tokens = a.batch_size * a.length * len(times)
    out = {"method": a.method, "T": a.length, "tok_s": tokens / sum(times), "step_s": sum(times) / len(times),
           "params_m": sum(p.numel() for p in hf.parameters()) / 1e6,
           # CPU seconds of all threads: on a shared machine, less sensitive to other load than wall time
           "tok_per_cpu_s": tokens / sum(cpu)}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        out["peak_mib"], out["growth_mib"] = peak, peak - loaded_rss
    return out


def interleaved(a: argparse.Namespace) -> None:
    """Speed only, both methods in one process, steps alternating (peft, specstream, peft, ...), so
    a machine whose speed drifts slows both alike; median step time per (T, method)."""
    import statistics

    steps = {m: make_step(a, m)[0] for m in ("peft", "specstream")}
    print(f"\n{a.preset}, {a.dtype}, batch {a.batch_size}, γ={a.streams}, N_s=N/2; interleaved, median of "
          f"{a.steps} steps each\n\n| T | peft tokens/s | specstream tokens/s | ratio |\n|---|---|---|---|")
    for T in [int(t) for t in a.lengths.split(",")]:
        times: dict[str, list] = {"peft": [], "specstream": []}
        for i in range(a.warmup + a.steps):
            for m, step in steps.items():
                t0 = time.perf_counter()
                step(T)
                if i >= a.warmup:
                    times[m].append(time.perf_counter() - t0)
        tok = {m: a.batch_size * T / statistics.median(v) for m, v in times.items()}
        print(f"| {T} | {tok['peft']:.0f} | {tok['specstream']:.0f} | {tok['specstream'] / tok['peft']:.2f} |",
              flush=True)


def _dist(device):
    from mlx_specstream.train.dist import DistContext

    import torch

    return DistContext(device=torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2-0.5b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--lengths", default="512,2048", help="comma-separated sequence lengths")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="interleaved repeats of every run (median)")
    p.add_argument("--interleaved", action="store_true", help="speed only: both methods in one process, "
                   "alternating steps")
    p.add_argument("--grad-checkpoint", action="store_true", help="both methods")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--worker", choices=["specstream", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.method = a.worker
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    if a.interleaved:
        interleaved(a)
        return

    rows = []
    base = [sys.executable, str(Path(__file__).resolve()), "--preset", a.preset, "--device", a.device,
            "--dtype", a.dtype, "--batch-size", str(a.batch_size), "--streams", str(a.streams),
            "--lora-rank", str(a.lora_rank), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--threads", str(a.threads)] + (["--grad-checkpoint"] if a.grad_checkpoint else [])
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # Rounds interleave the runs (peft, specstream, peft, ...), so a machine whose speed drifts
    # affects both alike; the table shows each run's median tokens/s and largest peak.
    for r in range(a.rounds):
        for T in [int(t) for t in a.lengths.split(",")]:
            for method in ("peft", "specstream"):
                proc = subprocess.run(base + ["--worker", method, "--length", str(T)], capture_output=True,
                                      text=True, env=env)
                line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    print(f"{method} T={T}: failed: {' | '.join(tail)}", file=sys.stderr)
                    rows.append({"method": method, "T": T, "error": tail[-1] if tail else "failed"})
                    continue
                rows.append(dict(json.loads(line[len("RESULT "):]), round=r))
                print(f"  round {r + 1}: {method} T={T}: {rows[-1]['tok_s']:.0f} tokens/s", file=sys.stderr,
                      flush=True)
    _print_table(a, _median_rows(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


def _median_rows(rows: list[dict]) -> list[dict]:
    """One row per (T, method): median tokens/s, largest peak memory (an error if every run failed)."""
    import statistics

    out = []
    for key in sorted({(r["T"], r["method"]) for r in rows}):
        ok = [r for r in rows if (r["T"], r["method"]) == key and "error" not in r]
        if not ok:
            out.append(next(r for r in rows if (r["T"], r["method"]) == key))
            continue
        merged = dict(ok[0], tok_s=statistics.median(r["tok_s"] for r in ok), runs=len(ok),
                      tok_per_cpu_s=statistics.median(r["tok_per_cpu_s"] for r in ok))
        for k in ("peak_mib", "growth_mib"):
            if k in ok[0]:
                merged[k] = max(r[k] for r in ok)
        out.append(merged)
    return out


def _print_table(a, rows) -> None:
    import torch

    where = torch.cuda.get_device_name() if a.device in ("cuda", "auto") and torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    mem = "peak MiB" if a.device != "cpu" else "peak RSS MiB (growth)"
    params = next((f"{r['params_m']:.1f}M parameters, " for r in rows if "params_m" in r), "")
    print(f"\n{a.preset} ({params}random weights), {a.dtype}, batch {a.batch_size}, LoRA r={a.lora_rank}, γ={a.streams}, N_s=N/2, "
          f"grad checkpoint {'on' if a.grad_checkpoint else 'off'}, {a.steps} timed steps x {a.rounds} round(s); "
          f"{where}\n")
    cpu = a.device == "cpu"
    print(f"| T | method | tokens/s |{' tokens/CPU-s |' if cpu else ''} {mem} | tokens/s ratio |"
          f"{' tokens/CPU-s ratio |' if cpu else ''} memory ratio |")
    print("|---|---|---|---|---|---|" + ("---|---|" if cpu else ""))
    by = {(r["T"], r["method"]): r for r in rows}
    for T in sorted({r["T"] for r in rows}):
        ref = by.get((T, "peft"), {})
        for method in ("peft", "specstream"):
            r = by.get((T, method))
            if r is None or "error" in r:
                print(f"| {T} | {method} | failed | {r.get('error', '') if r else ''} |")
                continue
            m = f"{r['peak_mib']:.0f}" + (f" ({r['growth_mib']:.0f})" if "growth_mib" in r else "")
            ratio_t = r["tok_s"] / ref["tok_s"] if "tok_s" in ref else float("nan")
            key = "growth_mib" if "growth_mib" in r else "peak_mib"
            ratio_m = r[key] / ref[key] if key in ref and ref[key] else float("nan")
            if cpu:
                ratio_c = r["tok_per_cpu_s"] / ref["tok_per_cpu_s"] if "tok_per_cpu_s" in ref else float("nan")
                print(f"| {T} | {method} | {r['tok_s']:.0f} | {r['tok_per_cpu_s']:.0f} | {m} | {ratio_t:.2f} | "
                      f"{ratio_c:.2f} | {ratio_m:.2f} |")
            else:
                print(f"| {T} | {method} | {r['tok_s']:.0f} | {m} | {ratio_t:.2f} | {ratio_m:.2f} |")


if __name__ == "__main__":
    main()
