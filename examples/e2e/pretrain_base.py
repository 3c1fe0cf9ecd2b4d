"""Pretrain a small Llama base model from scratch on E2E NLG or DialogSum text (PyTorch, CPU).

    python examples/e2e/pretrain_base.py --tokenizer runs/e2e_tokenizer --output runs/e2e_base
    python examples/e2e/pretrain_base.py --format dialogsum --tokenizer runs/dialogsum_tokenizer \
        --output runs/dialogsum_base

Each training example is one task row formatted exactly as the fine-tune will see it
(``mlx_specstream.datasets.read_e2e`` / ``read_dialogsum``): ``<s> prompt + completion </s>``,
e.g. for E2E prompt is ``E2E_PROMPT_TEMPLATE`` around the MR and completion is " " + ref, with
the loss on every token (a base model learns the whole text; the fine-tunes later put the loss
on the reference). ``--format`` picks the reader, the default data files and the default model
size (:data:`PRESETS`); flags given explicitly win.
Rows are batched by similar length and right-padded (padding is causal-invisible and
excluded from the loss), so every example starts at position 0 exactly as at inference.

The output directory is a Hugging Face model directory (config.json, model.safetensors,
tokenizer files) once training ends; meanwhile ``checkpoints/step-NNNNNN/`` hold complete
model directories plus optimizer state, each written to a temporary directory and renamed,
and a rerun of the same command resumes from the newest. ``--measure N`` times N steps and
prints tokens/s and the projected time per epoch, to size ``--epochs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tokenizer import TASKS, default_shared  # noqa: E402

from mlx_specstream.datasets import PROMPT_TEMPLATE_KEY, Example  # noqa: E402

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_MODEL_BYTES = 16_000_000  # the E2E model is the package's bundled demo model
MODEL_BYTE_LIMITS = {"e2e": MAX_MODEL_BYTES}

# Per-task defaults, sized in each recipe's README (E2E: 2 epochs ~35 min on one quiet core,
# within the 16 MB demo budget; DialogSum: 2 epochs ~1.1 h). Max positions = the tokenizer's
# model_max_length, so every example fits.
PRESETS = {
    "e2e": dict(hidden=256, layers=6, heads=4, kv_heads=2, intermediate=512,
                max_positions=TASKS["e2e"].model_max_length, batch_size=32),
    "dialogsum": dict(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=768,
                      max_positions=TASKS["dialogsum"].model_max_length, batch_size=16),
}


def build_config(args, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
    )


def tokenize_examples(tokenizer, examples: list[Example], max_len: int) -> list[list[int]]:
    """BOS + prompt + completion + EOS token ids per example."""
    ids = tokenizer([e.prompt + e.completion for e in examples], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    out = [x + [eos] for x in ids]
    too_long = sum(len(x) > max_len for x in out)
    if too_long:
        raise ValueError(f"{too_long} examples exceed --max-positions {max_len} tokens "
                         f"(longest {max(len(x) for x in out)}); raise --max-positions.")
    return out


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic batches of example indices for one epoch: shuffle, sort by length inside
    pools of 64 batches (little padding), then shuffle the batches."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 64
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, x in enumerate(examples):
        input_ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(x)] = torch.tensor(x)
    return input_ids, labels


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, examples: list[list[int]], batch_size: int, pad_id: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        input_ids, labels = collate(examples[i:i + batch_size], pad_id)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=input_ids, labels=labels).loss) * n
        count += n
    model.train()
    return total / count


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int = 60) -> str:
    model.eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model.train()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def save_model_dir(model, tokenizer_dir: Path, out_dir: Path, extra: dict) -> None:
    """Write a Hugging Face model directory (config.json, model.safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    # transformers >= 5 reads rope_parameters; mlx-lm and transformers 4 read rope_theta.
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    config[PROMPT_TEMPLATE_KEY] = extra["prompt_template"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
    (out_dir / "training_args.json").write_text(json.dumps(extra, indent=2) + "\n")


def atomic_dir(parent: Path, name: str, write) -> Path:
    """Create ``parent/name`` by writing into a temporary sibling and renaming it."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        final = parent / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(model, optimizer, step: int, ckpt_root: Path, tokenizer_dir: Path, extra: dict,
                    keep: int = 2) -> Path:
    def write(tmp: Path) -> None:
        save_model_dir(model, tokenizer_dir, tmp, extra)
        torch.save({"optimizer": optimizer.state_dict(), "step": step,
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")

    path = atomic_dir(ckpt_root, f"step-{step:06d}", write)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return path


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = [p for p in sorted(ckpt_root.glob("step-*")) if (p / "trainer_state.pt").is_file()]
    return done[-1] if done else None


ARCH_KEYS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "max_positions",
             "batch_size", "epochs", "seed", "lr", "warmup", "format")
# Keys added to ARCH_KEYS later, with the value that runs saved before them implicitly used,
# so those runs still resume.
LEGACY_ARCH_DEFAULTS = {"format": "e2e"}


def changed_settings(saved: dict, args) -> dict:
    """``{key: (saved, now)}`` for every ARCH_KEYS setting that differs from a checkpoint's."""
    changed = {}
    for key in ARCH_KEYS:
        before = saved.get(key, LEGACY_ARCH_DEFAULTS.get(key))
        if before != getattr(args, key):
            changed[key] = (before, getattr(args, key))
    return changed


def shorten(text: str, limit: int = 200) -> str:
    """A log-sized excerpt: DialogSum dialogues run to thousands of characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="directory from train_tokenizer.py")
    ap.add_argument("--output", required=True, help="run / model directory")
    ap.add_argument("--format", default="e2e", choices=sorted(TASKS), help="task data (default e2e)")
    ap.add_argument("--train-data", "--train-csv", dest="train_data",
                    help="train split (default: the task's file under the shared folder)")
    ap.add_argument("--dev-data", "--dev-csv", dest="dev_data", help="dev split (default: the task's)")
    # Model size and batch: None = the task's preset (PRESETS).
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--max-positions", type=int)
    ap.add_argument("--batch-size", type=int, help="examples per step")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--eval-examples", type=int, default=512)
    ap.add_argument("--checkpoint-minutes", type=float, default=10.0)
    ap.add_argument("--measure", type=int, default=0, metavar="N",
                    help="time N training steps, print throughput, write nothing")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.format].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    task = TASKS[args.format]
    args.train_data = args.train_data or str(default_shared() / task.train)
    args.dev_data = args.dev_data or str(default_shared() / task.dev)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = Path(args.output)
    tokenizer_dir = Path(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)

    if not args.measure:
        out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        if not args.measure:
            with open(out / "train.log", "a", encoding="utf-8") as f:
                f.write(line + "\n")

    config = build_config(args, len(tokenizer))
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    limit = MODEL_BYTE_LIMITS.get(args.format)
    if limit is not None and 4 * n_params > limit:
        raise SystemExit(f"error: {n_params:,} parameters = {4 * n_params / 1e6:.1f} MB in float32, "
                         f"over the {limit / 1e6:.0f} MB budget; shrink --hidden/--layers/--intermediate.")

    read = TASKS[args.format].read
    train_set = read(args.train_data)
    template = train_set.prompt_template
    train = tokenize_examples(tokenizer, train_set.examples, args.max_positions)
    dev_examples = read(args.dev_data).examples
    dev = tokenize_examples(tokenizer, dev_examples, args.max_positions)
    dev = [dev[i] for i in random.Random(1).sample(range(len(dev)), min(args.eval_examples, len(dev)))]
    lengths = [len(x) for x in train]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    extra = {k: v for k, v in vars(args).items() if k not in ("measure",)}
    extra.update(prompt_template=template, parameters=n_params, total_steps=total_steps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay)
    ckpt_root = out / "checkpoints"
    step = 0
    resume = None if args.measure else latest_checkpoint(ckpt_root)
    if resume is not None:
        changed = changed_settings(json.loads((resume / "training_args.json").read_text()), args)
        if changed:
            raise SystemExit(f"error: {resume} was trained with different settings {changed} (saved, now); "
                             "use the same arguments or a new --output.")
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(str(resume / "model.safetensors")), strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
        model.tie_weights()
        state = torch.load(resume / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log(f"resumed from {resume} at step {step}")
    if step >= total_steps and (out / "model.safetensors").is_file():
        log(f"already finished ({step}/{total_steps} steps); nothing to do")
        return

    mean_len = sum(lengths) / len(lengths)
    log(f"model: {n_params:,} parameters ({4 * n_params / 1e6:.2f} MB float32), hidden {args.hidden}, "
        f"{args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, intermediate {args.intermediate}, "
        f"vocab {len(tokenizer)}; threads {torch.get_num_threads()}")
    log(f"data: {len(train)} train examples, {sum(lengths):,} tokens (mean {mean_len:.1f}); "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps for {args.epochs} epochs; "
        f"prompt template {template!r}")

    model.train()
    step0 = step
    epoch = step // steps_per_epoch
    batches = epoch_batches(lengths, args.batch_size, args.seed, epoch)
    t_start = time.time()
    t_window, tok_window, loss_window = time.time(), 0, []
    last_ckpt = time.time()
    while step < total_steps:
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            batches = epoch_batches(lengths, args.batch_size, args.seed, epoch)
        input_ids, labels = collate([train[i] for i in batches[step % steps_per_epoch]], tokenizer.eos_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, args)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        tok_window += int((labels != -100).sum())
        loss_window.append(loss.item())

        if args.measure and step >= args.measure:
            elapsed = time.time() - t_start
            tps = tok_window / (time.time() - t_window)
            epoch_tokens = sum(lengths)
            print(json.dumps({"steps": step, "seconds": round(elapsed, 1), "tokens_per_sec": round(tps, 1),
                              "sec_per_step": round(elapsed / step, 3), "parameters": n_params,
                              "epoch_tokens": epoch_tokens,
                              "projected_minutes_per_epoch": round(epoch_tokens / tps / 60, 1),
                              "loss": round(float(loss), 3)}))
            return
        if step % args.log_every == 0 or step == total_steps:
            now = time.time()
            tps = tok_window / (now - t_window)
            eta_min = (total_steps - step) * (now - t_start) / (step - step0) / 60
            log(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} "
                f"loss {sum(loss_window) / len(loss_window):.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"grad_norm {float(grad_norm):.2f} tok/s {tps:.0f} eta {eta_min:.0f} min")
            t_window, tok_window, loss_window = now, 0, []
        if step % args.eval_every == 0 or step == total_steps:
            dev_loss = evaluate(model, dev, 2 * args.batch_size, tokenizer.eos_token_id)
            log(f"eval step {step} dev_loss {dev_loss:.4f} ppl {math.exp(dev_loss):.2f}")
            sample = greedy_sample(model, tokenizer, dev_examples[0].prompt)
            log(f"sample: {shorten(dev_examples[0].input)!r} -> {sample!r}")
        if time.time() - last_ckpt > 60 * args.checkpoint_minutes or step == total_steps:
            path = save_checkpoint(model, optimizer, step, ckpt_root, tokenizer_dir, extra)
            log(f"checkpoint {path}")
            last_ckpt = time.time()

    # The finished model: the newest checkpoint's model files, moved into the run directory.
    final = latest_checkpoint(ckpt_root)
    for name in ("config.json", "model.safetensors", "training_args.json") + TOKENIZER_FILES:
        if (final / name).is_file():
            tmp = out / f".{name}.tmp"
            shutil.copyfile(final / name, tmp)
            os.replace(tmp, out / name)
    log(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; model directory {out}")


if __name__ == "__main__":
    main()
