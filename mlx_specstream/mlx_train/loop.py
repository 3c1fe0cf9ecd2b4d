"""``train``: the MLX fine-tuning recipe end to end (data -> model -> loop -> model directory).

The PyTorch trainer's recipe (``mlx_specstream.train.loop``) with the same options, data
order, loss, optimizer (AdamW with bias correction, linear warmup and decay, global-norm
clipping), records and checkpoint convention, on MLX: any model directory the runtime loads
(float or 4/8-bit quantized, any family mlx-lm builds) trains in place. Output: a model
directory :func:`mlx_specstream.load` reads (base files linked unchanged, the run's
``speculative_streaming`` block, ``speculative_streams.safetensors``) plus
``training_args.json``, ``train_metrics.json`` and ``train_log.jsonl``. Resume checkpoints
go to ``{output}.checkpoints/`` unless ``checkpoint_dir`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlx_specstream.datasets import FORMATS, load_dataset
from mlx_specstream.streams import SpecStreamModel

from . import checkpoint as ckpt
from .data import collate, epoch_steps, tokenize_all
from .loss import PRUNE_LOSS_WEIGHT, Options, batch_loss, count_targets, stream_names, summarize
from .params import build_spec, freeze_for_lossless, prepare_model
from .shared import attach_shared_lora, freeze_for_shared, fuse_shared_lora

# Arguments that change the result: a resumed run must use the same values.
FINGERPRINT_KEYS = (
    "model", "data", "data_format", "max_examples", "eval_data", "eval_examples", "mode", "streams",
    "msa_layers", "lora_rank", "lora_alpha", "lora_targets", "stream_init", "stream_init_rank",
    "pruning_rank", "pruning_threshold", "prune_loss_weight", "stream_loss_weight", "epochs", "max_steps",
    "lr", "warmup_steps", "weight_decay", "batch_size", "max_length", "seed", "grad_clip", "dtype",
    "grad_accumulation_steps", "batch_tokens",
)
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cuda", "mps", "cpu")


@dataclasses.dataclass
class TrainOptions:
    """Every option of ``specstream train`` (the PyTorch trainer's names and defaults), plus
    the MLX trainer's own: ``chunk_size`` (positions whose streams run together) and
    ``prefill_chunk`` (main tokens per prefill piece). As there, ``grad_accumulation_steps``
    micro-batches make one optimizer step with exactly the gradient of one batch holding them
    all, ``batch_tokens`` fills micro-batches to a token budget, ``dtype`` is the frozen
    weights' dtype (trainable ones stay float32), ``grad_checkpoint`` recomputes each MSA layer
    of the stream chunks in the backward pass. ``device``: ``cpu`` runs MLX on the CPU, the
    others on MLX's default device (the GPU where there is one). ``num_threads`` is accepted
    and ignored (MLX picks its own)."""

    model: str
    data: str
    output: str
    mode: str = "shared"
    streams: int = 4
    msa_layers: Optional[int] = None
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    lora_targets: Optional[tuple[str, ...]] = None
    stream_init: str = "identity"
    stream_init_rank: Optional[int] = None
    pruning_rank: int = 8
    pruning_threshold: float = 0.0
    prune_loss_weight: float = PRUNE_LOSS_WEIGHT
    stream_loss_weight: float = 0.1
    epochs: int = 1
    max_steps: Optional[int] = None
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    max_length: int = 512
    data_format: str = "auto"
    max_examples: Optional[int] = None
    eval_data: Optional[str] = None
    eval_examples: int = 0
    eval_every: int = 0
    eval_batches: Optional[int] = None
    save_every: int = 0
    keep_checkpoints: int = 2
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    num_threads: Optional[int] = None
    progress: bool = True
    log_every: int = 10
    grad_accumulation_steps: int = 1
    batch_tokens: int = 0
    device: str = "auto"
    dtype: str = "float32"
    grad_checkpoint: bool = False
    chunk_size: int = 64
    prefill_chunk: int = 512

    def validate(self) -> None:
        if not Path(self.model).is_dir():
            raise FileNotFoundError(f"Model directory not found: {self.model}. Pass a model directory "
                                    "(Hugging Face or MLX, float or quantized).")
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"Data file not found: {value} (--{name.replace('_', '-')}).")
        if self.data_format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {self.data_format!r}.")
        for name in ("batch_size", "max_length", "epochs", "grad_accumulation_steps", "chunk_size",
                     "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.batch_tokens < 0:
            raise ValueError(f"--batch-tokens must be >= 0, got {self.batch_tokens}.")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.streams < 0:
            raise ValueError(f"--streams must be >= 0, got {self.streams}.")
        if self.lora_rank < 0 or self.pruning_rank < 0:
            raise ValueError("--lora-rank and --pruning-rank must be >= 0.")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}.")
        if self.mode == "shared" and self.lora_rank == 0:
            raise ValueError("The MLX trainer's shared mode trains LoRA (--lora-rank >= 1); full fine-tuning "
                             "(--lora-rank 0) is the PyTorch trainer's.")


@dataclasses.dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    steps: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model: SpecStreamModel


def train(model: str, data: str, output: str, **options: Any) -> TrainResult:
    """Train speculative streams on ``model`` (a model directory) with ``data`` and write the
    model directory ``output``; ``options``: the fields of :class:`TrainOptions`.

    Raises FileNotFoundError / FileExistsError / ValueError with a message saying what to fix;
    Ctrl-C (KeyboardInterrupt) propagates after leaving every complete checkpoint intact.
    """
    return run_training(TrainOptions(model=str(model), data=str(data), output=str(output), **options))


def _checkpoint_dir(args: TrainOptions) -> Path:
    if args.checkpoint_dir:
        return Path(args.checkpoint_dir)
    out = Path(args.output)
    return out.parent / f"{out.name}.checkpoints"


def _prepare_paths(args: TrainOptions) -> tuple[Path, Path, Optional[Path]]:
    out, ck_dir = Path(args.output), _checkpoint_dir(args)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"Output directory {out} already exists; pass --overwrite to replace it.")
    existing = ckpt.latest_checkpoint(ck_dir)
    if args.resume:
        if existing is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {ck_dir}.")
        return out, ck_dir, existing
    if existing is not None:
        if not args.overwrite:
            raise FileExistsError(f"{ck_dir} holds checkpoints of an earlier run; pass --resume to continue it "
                                  "or --overwrite to start over.")
        shutil.rmtree(ck_dir)
    return out, ck_dir, None


def _fingerprint(args: TrainOptions) -> dict[str, Any]:
    d = dataclasses.asdict(args)
    fp = {k: d[k] for k in FINGERPRINT_KEYS}
    fp["lora_targets"] = list(fp["lora_targets"]) if fp["lora_targets"] else None
    fp["backend"] = "mlx"
    return fp


def _fingerprint_diff(current: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Keys whose values differ; a key a checkpoint predates counts as its default value."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    return sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k, defaults.get(k)))


def lr_schedule(lr: float, warmup: int, total: int):
    """The PyTorch trainer's schedule, as a function of the optimizer's step (0 at the first
    update): linear warmup over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def f(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        decay = mx.maximum(0.0, (total - step) / max(1, total - warmup))
        if not warmup:
            return lr * decay
        return lr * mx.where(step < warmup, (step + 1) / warmup, decay)
    return f


def make_optimizer(args: TrainOptions, total_steps: int) -> optim.Optimizer:
    """torch.optim.AdamW's update (bias-corrected, decoupled decay) under the run's schedule."""
    return optim.AdamW(learning_rate=lr_schedule(args.lr, args.warmup_steps, total_steps), betas=[0.9, 0.999],
                       eps=1e-8, weight_decay=args.weight_decay, bias_correction=True)


def step_gradients(model: SpecStreamModel, micro_batches: list[tuple], opts: Options):
    """Loss, metric sums, target counts and gradients of one optimizer step made of
    ``micro_batches`` ``[(ids, labels), ...]`` (numpy ``[B, T]`` each), normalised over all of them."""
    counts = count_targets([lab for _, lab in micro_batches], model.num_streams, model.has_pruning)
    loss, totals, grads = 0.0, {}, None
    for ids, labels in micro_batches:
        part, sums, g = batch_loss(model, ids, labels, counts, opts)
        loss += part.item()
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v.item()
        if g is not None:
            grads = g if grads is None else tree_map(lambda x, y: x + y, grads, g)
    return loss, totals, counts, grads


def evaluate(model: SpecStreamModel, examples: list, *, batch_size: int, pad_id: int,
             max_batches: Optional[int] = None, opts: Optional[Options] = None) -> dict[str, float]:
    """Per-stream ``{name}.loss`` / ``{name}.acc`` over ``examples`` (sorted by length, no shuffling)."""
    opts = opts or Options()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    totals: dict[str, float] = {}
    counts_all: dict[str, float] = {}
    for n, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        ids, labels = collate([examples[i] for i in order[start: start + batch_size]], pad_id)
        counts = count_targets([labels], model.num_streams, model.has_pruning)
        _, sums, _ = batch_loss(model, ids, labels, counts, opts, grads=False)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v.item()
        for k, v in counts.items():
            counts_all[k] = counts_all.get(k, 0) + v
    return summarize(totals, counts_all)


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, so the metrics files are strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _postfix(summary: dict[str, float], names: list[str], tok_s: float) -> dict[str, str]:
    accs = "/".join(f"{summary.get(f'{n}.acc', float('nan')):.2f}" for n in names if n != "prune")
    return {"loss": f"{summary.get('loss', float('nan')):.3f}", "acc": accs, "tok/s": f"{tok_s:.0f}"}


def _load_examples(args: TrainOptions):
    train_set = load_dataset(args.data, args.data_format, limit=args.max_examples)
    eval_raw = load_dataset(args.eval_data, args.data_format).examples if args.eval_data else []
    if args.eval_data and args.eval_examples and args.eval_examples < len(eval_raw):
        stride = len(eval_raw) / args.eval_examples  # evenly spaced: files sorted by input stay covered
        eval_raw = [eval_raw[int(i * stride)] for i in range(args.eval_examples)]
    train_raw = train_set.examples
    if not args.eval_data and args.eval_examples:
        if args.eval_examples >= len(train_raw):
            raise ValueError(f"--eval-examples {args.eval_examples} leaves no training data "
                             f"({len(train_raw)} examples).")
        train_raw, eval_raw = train_raw[: -args.eval_examples], train_raw[-args.eval_examples:]
    return train_set, train_raw, eval_raw


def run_training(args: TrainOptions) -> TrainResult:
    """Fine-tune ``args.model`` on ``args.data`` and write ``args.output`` (see the module docstring)."""
    from transformers import AutoTokenizer

    args.validate()
    out_dir, ck_dir, resume_from = _prepare_paths(args)
    # Data first: a bad file should fail before the model loads.
    train_set, train_raw, eval_raw = _load_examples(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    train_tok, dropped = tokenize_all(tokenizer, train_raw, args.max_length)
    eval_tok, _ = tokenize_all(tokenizer, eval_raw, args.max_length)
    if not train_tok:
        raise ValueError(f"No training example keeps a completion token within --max-length {args.max_length}.")
    if dropped:
        print(f"Skipped {dropped} examples whose prompt fills --max-length {args.max_length}.", file=sys.stderr)

    def spec_fn(base):
        return build_spec(base, mode=args.mode, streams=args.streams, msa_layers=args.msa_layers,
                          stream_init=args.stream_init, stream_init_rank=args.stream_init_rank,
                          pruning_rank=args.pruning_rank, pruning_threshold=args.pruning_threshold,
                          lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                          stream_loss_weight=args.stream_loss_weight)

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    model, _, warm = prepare_model(args.model, spec_fn, args.seed, dtype=args.dtype)
    if warm:
        print(f"Warm start from {args.model}: {', '.join(warm)}.", file=sys.stderr)
    if args.mode == "shared":
        attach_shared_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.seed)
        freeze_for_shared(model)
    else:
        freeze_for_lossless(model)
    spec = model.spec

    accum = args.grad_accumulation_steps
    lengths = [len(e.input_ids) for e in train_tok]
    plan_kw = dict(batch_size=args.batch_size, seed=args.seed, accumulation=accum, batch_tokens=args.batch_tokens)
    # Token budgets give each epoch its own number of steps: every epoch runs the fewest.
    counted = range(args.epochs) if args.batch_tokens else range(1)
    steps_per_epoch = min(len(epoch_steps(lengths, epoch=e, **plan_kw)) for e in counted)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_tok)} examples make no full step of {accum} batch(es) of {args.batch_size}; "
                         "lower --batch-size or --grad-accumulation-steps, or add data.")
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    optimizer = make_optimizer(args, total_steps)
    schedule = lr_schedule(args.lr, args.warmup_steps, total_steps)
    optimizer.init(model.trainable_parameters())
    opts = Options(chunk_size=args.chunk_size, prefill_chunk=args.prefill_chunk,
                   grad_checkpoint=args.grad_checkpoint, prune_loss_weight=args.prune_loss_weight)

    fingerprint = _fingerprint(args)
    start_step, history = 0, []
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer)
        diff = _fingerprint_diff(fingerprint, state["fingerprint"])
        if diff:
            raise ValueError(f"--resume: {diff} differ from the checkpoint in {resume_from}; "
                             "resume with the original arguments.")
        start_step, history = state["step"], state.get("history", [])

    names = stream_names(spec.num_streams, spec.pruning is not None)
    eval_kw = dict(batch_size=args.batch_size, pad_id=pad_id, max_batches=args.eval_batches, opts=opts)
    if start_step == 0 and eval_tok:
        history.append({"step": 0, "eval": evaluate(model, eval_tok, **eval_kw)})

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not args.progress,
               desc=f"train {args.mode} γ={spec.num_streams} (mlx)", dynamic_ncols=True)
    window: dict[str, float] = {}
    run_totals: dict[str, float] = {}
    window_tokens, window_start, train_seconds = 0.0, time.perf_counter(), 0.0
    epoch_plan: tuple[int, list] = (-1, [])
    step = start_step
    mx.reset_peak_memory()
    try:
        while step < total_steps:
            epoch, i = divmod(step, steps_per_epoch)
            if epoch_plan[0] != epoch:
                epoch_plan = (epoch, epoch_steps(lengths, epoch=epoch, **plan_kw))
            t0 = time.perf_counter()
            micro = [collate([train_tok[j] for j in idx], pad_id) for idx in epoch_plan[1][i]]
            loss, sums, counts, grads = step_gradients(model, micro, opts)
            if grads is None:  # no target in the whole step: nothing to learn from it
                grads = tree_map(mx.zeros_like, model.trainable_parameters())
            if args.grad_clip:
                grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state)
            train_seconds += time.perf_counter() - t0
            step += 1
            for k, v in sums.items():
                window[k] = window.get(k, 0.0) + v
            for k, v in counts.items():
                window[f"{k}.count"] = window.get(f"{k}.count", 0.0) + v
            window["loss_sum"] = window.get("loss_sum", 0.0) + loss
            window["steps"] = window.get("steps", 0.0) + 1
            window_tokens += float(sum(len(train_tok[j].input_ids) for idx in epoch_plan[1][i] for j in idx))
            bar.update(1)

            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if step % args.log_every == 0 or step == total_steps:
                for k, v in window.items():
                    run_totals[k] = run_totals.get(k, 0.0) + v
                summary = dict(_summary(window), loss=window["loss_sum"] / window["steps"])
                tok_s = window_tokens / max(1e-9, time.perf_counter() - window_start)
                bar.set_postfix(_postfix(summary, names, tok_s), refresh=False)
                history.append({"step": step, "train": summary, "lr": schedule(mx.array(step)).item(),
                                "tokens_per_s": tok_s})
                window, window_tokens, window_start = {}, 0.0, time.perf_counter()
            if eval_tok and ((args.eval_every and step % args.eval_every == 0) or
                             (not args.eval_every and end_of_epoch)):
                history.append({"step": step, "eval": evaluate(model, eval_tok, **eval_kw)})
            if (args.save_every and step % args.save_every == 0) or (not args.save_every and end_of_epoch):
                if step < total_steps:  # the final state goes to the output directory instead
                    ckpt.save_checkpoint(ck_dir, step, model, optimizer, {"fingerprint": fingerprint,
                                                                          "history": history},
                                         keep=args.keep_checkpoints)
    except KeyboardInterrupt:
        bar.close()
        print(f"\nInterrupted at step {step}. Last complete checkpoint: {ckpt.latest_checkpoint(ck_dir) or 'none'} "
              "(continue with --resume).", flush=True)
        raise
    bar.close()

    final_eval = next((h["eval"] for h in reversed(history) if "eval" in h and h["step"] == step), None)
    if eval_tok and final_eval is None:
        final_eval = evaluate(model, eval_tok, **eval_kw)
    steps_run = step - start_step
    metrics = {
        "steps": step,
        "train": dict(_summary(run_totals), loss=run_totals.get("loss_sum", float("nan")) /
                      max(1.0, run_totals.get("steps", 0.0))) if run_totals else {},
        "eval": final_eval,
        "initial_eval": next((h["eval"] for h in history if "eval" in h and h["step"] == 0), None),
        "trainable_parameters": sum(v.size for _, v in _flat(model.trainable_parameters())),
        "total_parameters": sum(v.size for _, v in _flat(model.parameters())),
        "train_examples": len(train_tok),
        "dropped_examples": dropped,
        "eval_examples": len(eval_tok),
        "seconds_per_step": train_seconds / steps_run if steps_run else None,
        "peak_memory_bytes": mx.get_peak_memory(),
    }
    run_args = dict(dataclasses.asdict(args), backend="mlx", prompt_template=train_set.prompt_template,
                    speculative_streaming=spec.to_dict(), total_steps=total_steps)
    records = {
        "training_args.json": json.dumps(run_args, indent=2, default=str) + "\n",
        "train_metrics.json": json.dumps(_json_safe(metrics), indent=2) + "\n",
        "train_log.jsonl": "".join(json.dumps(_json_safe(h)) + "\n" for h in history),
    }
    model.eval()
    if args.mode == "shared":
        fuse_shared_lora(model)
    ckpt.write_model_dir(out_dir, Path(args.model), model, train_set.prompt_template, records,
                         overwrite=args.overwrite, new_base=args.mode == "shared")
    return TrainResult(output_dir=out_dir, steps=step, metrics=metrics, history=history, model=model)


def _summary(sums: dict[str, float]) -> dict[str, float]:
    counts = {k[: -len(".count")]: v for k, v in sums.items() if k.endswith(".count")}
    return summarize(sums, counts)


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)
