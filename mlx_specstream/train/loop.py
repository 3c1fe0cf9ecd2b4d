"""``run_training``: the fine-tuning recipe end to end (data -> model -> loop -> model directory).

The output directory follows the checkpoint convention (HF base weights, merged in shared
mode; config.json with the ``speculative_streaming`` block and ``prompt_template``;
``speculative_streams.safetensors``; tokenizer files) plus ``training_args.json`` and
``train_metrics.json`` (per-stream loss and accuracy). Resume checkpoints go to
``{output}.checkpoints/`` unless ``checkpoint_dir`` says otherwise.

Scale: one process trains on ``--device`` (:func:`.dist.resolve_device`), or one GPU per rank
under torchrun; ``--dtype`` holds frozen weights in bfloat16/float16 (:mod:`.precision`);
a step accumulates ``--grad-accumulation-steps`` micro-batches (:func:`accumulate_gradients`,
exact); ``--grad-checkpoint`` recomputes layers in backward; ``--batch-tokens`` fills
micro-batches to a token budget (:func:`.data.token_batches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mlx_specstream.config import EXTRAS_FILE, SpecStreamConfig, read_config, spec_config_from
from mlx_specstream.datasets import FORMATS, PROMPT_TEMPLATE_KEY, load_dataset

from . import checkpoint as ckpt
from .backbone import check_model_type
from .data import collate, epoch_steps, tokenize_all
from .dist import DEVICES, DistContext
from .layout import stream_targets
from .loss import PRUNE_LOSS_WEIGHT, stream_names, summarize, target_counts
from .modes import build_spec_config, count_parameters, merge_for_save, prepare
from .model import SpecStreamLM
from .precision import DTYPES, autocast, grad_scaler, parse_dtype, upcast_trainable

# Arguments that change the result: a resumed run must use the same values.
FINGERPRINT_KEYS = (
    "model", "data", "data_format", "max_examples", "eval_data", "eval_examples", "mode", "streams",
    "msa_layers", "lora_rank", "lora_alpha", "lora_targets", "stream_init", "stream_init_rank",
    "pruning_rank", "pruning_threshold", "prune_loss_weight", "stream_loss_weight", "epochs", "max_steps",
    "lr", "warmup_steps", "weight_decay", "batch_size", "max_length", "seed", "grad_clip", "dtype",
    "grad_accumulation_steps", "batch_tokens",
)


@dataclasses.dataclass
class TrainArgs:
    """Every option of ``specstream train`` (same names, same defaults)."""

    model: str
    data: str
    output: str
    mode: str = "shared"
    streams: int = 4
    msa_layers: Optional[int] = None  # None: half the layers
    lora_rank: int = 8  # shared: peft LoRA rank (0 = full fine-tuning); lossless: stream-only LoRA rank
    lora_alpha: Optional[float] = None  # None: 2 * rank
    lora_targets: Optional[tuple[str, ...]] = None  # None: peft's / the family's attention projections
    stream_init: str = "identity"
    stream_init_rank: Optional[int] = None
    pruning_rank: int = 8  # 0: no pruning adapter
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
    grad_accumulation_steps: int = 1  # micro-batches of batch_size per optimizer step
    batch_tokens: int = 0  # > 0: micro-batches of similar-length examples up to this many padded tokens
    max_length: int = 512
    data_format: str = "auto"
    max_examples: Optional[int] = None
    eval_data: Optional[str] = None
    eval_examples: int = 0  # hold out this many training examples when eval_data is None, else subsample it
    eval_every: int = 0  # steps; 0: at the end of each epoch
    eval_batches: Optional[int] = None
    save_every: int = 0  # steps; 0: at the end of each epoch
    keep_checkpoints: int = 2
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    num_threads: Optional[int] = None
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cuda, mps or cpu
    dtype: str = "float32"  # frozen weights' dtype and autocast dtype; trainables stay float32
    grad_checkpoint: bool = False  # recompute each layer in backward (less memory, same gradients)
    progress: bool = True
    log_every: int = 10

    def validate(self) -> None:
        if not Path(self.model).is_dir():
            raise FileNotFoundError(f"Model directory not found: {self.model}. Pass a Hugging Face model directory.")
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"Data file not found: {value} (--{name.replace('_', '-')}).")
        if self.data_format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {self.data_format!r}.")
        for name in ("batch_size", "max_length", "epochs", "grad_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.streams < 0:
            raise ValueError(f"--streams must be >= 0, got {self.streams}.")
        if self.lora_rank < 0 or self.pruning_rank < 0:
            raise ValueError("--lora-rank and --pruning-rank must be >= 0.")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}.")
        if self.batch_tokens < 0:
            raise ValueError(f"--batch-tokens must be >= 0, got {self.batch_tokens}.")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")


@dataclasses.dataclass
class TrainResult:
    """What a run produced. ``output_dir`` is None on ranks other than 0."""

    output_dir: Optional[Path]
    steps: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model: SpecStreamLM


def _checkpoint_dir(args: TrainArgs) -> Path:
    if args.checkpoint_dir:
        return Path(args.checkpoint_dir)
    out = Path(args.output)
    return out.parent / f"{out.name}.checkpoints"


def _fingerprint(args: TrainArgs, world_size: int) -> dict[str, Any]:
    d = dataclasses.asdict(args)
    fp = {k: d[k] for k in FINGERPRINT_KEYS}
    fp["lora_targets"] = list(fp["lora_targets"]) if fp["lora_targets"] else None
    fp["world_size"] = world_size
    return fp


def _fingerprint_diff(current: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Keys whose values differ; a key a checkpoint predates counts as its default value."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}
    return sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k, defaults.get(k)))


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


@torch.no_grad()
def evaluate(model: SpecStreamLM, examples: list, *, batch_size: int, pad_id: int, device: torch.device,
             max_batches: Optional[int] = None, prune_loss_weight: float = PRUNE_LOSS_WEIGHT,
             dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Per-stream ``{name}.loss`` / ``{name}.acc`` over ``examples`` (sorted by length, no shuffling),
    the forward under autocast in ``dtype``."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    totals: dict[str, float] = {}
    for n, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in order[start: start + batch_size]],
                                                      pad_id).items()}
        with autocast(device, dtype):
            out = model(**batch, prune_loss_weight=prune_loss_weight)
        for k, v in out.metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    model.train(was_training)
    return summarize(totals)


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


def _prepare_paths(args: TrainArgs, dist: DistContext) -> tuple[Path, Path, Optional[Path]]:
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
        dist.barrier()
        if dist.is_main:
            shutil.rmtree(ck_dir)
        dist.barrier()
    return out, ck_dir, None


def spec_for(args: TrainArgs, hf_config: dict) -> SpecStreamConfig:
    """The run's ``speculative_streaming`` block, validated against the model's config."""
    return build_spec_config(
        family=check_model_type(hf_config.get("model_type")), num_layers=int(hf_config.get("num_hidden_layers") or 0),
        mode=args.mode, streams=args.streams, msa_layers=args.msa_layers, stream_init=args.stream_init,
        stream_init_rank=args.stream_init_rank, pruning_rank=args.pruning_rank,
        pruning_threshold=args.pruning_threshold, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets, stream_loss_weight=args.stream_loss_weight)


def load_for_training(args: TrainArgs, spec: SpecStreamConfig):
    """``args.model`` wrapped for training in ``spec``'s mode: (SpecStreamLM, peft model or None).

    The weights load in ``args.dtype``; trainable parameters are then held in float32.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=parse_dtype(args.dtype), attn_implementation="sdpa")
    model, peft_model = prepare(hf, spec, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                lora_targets=args.lora_targets, seed=args.seed)
    upcast_trainable(model)
    return model, peft_model


def write_model_dir(out_dir: Path, model: SpecStreamLM, tokenizer, prompt_template: str, run_args: dict,
                    metrics: dict, history: list, *, overwrite: bool) -> None:
    """The final model directory (checkpoint convention + run records), written atomically."""
    with ckpt.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, config_updates={PROMPT_TEMPLATE_KEY: prompt_template})
        tokenizer.save_pretrained(tmp)
        (tmp / "training_args.json").write_text(json.dumps(run_args, indent=2, default=str) + "\n")
        (tmp / "train_metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(_json_safe(h)) + "\n" for h in history))


def warm_start_extras(model: SpecStreamLM, model_dir: str, saved: Optional[SpecStreamConfig]) -> list[str]:
    """Load the model directory's extras that fit this run; returns the names loaded.

    The same block: every extra (continue a run). The same streams and MSA layers in another
    mode or with other adapters (e.g. lossless stream training on top of a shared-mode
    checkpoint): the stream embeddings and adapters whose names and shapes match; new
    adapters (stream LoRA) start from their usual initialisation.
    """
    spec = model.spec
    path = Path(model_dir) / EXTRAS_FILE
    if saved is None or not spec.num_streams or not path.is_file():
        return []
    if (saved.num_streams, saved.num_msa_layers, saved.stream_init) != (
            spec.num_streams, spec.num_msa_layers, spec.stream_init):
        return []
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if saved == spec:
        model.load_extras(tensors)
        return sorted(tensors)
    own = model.extras_state_dict()
    fit = {k: v for k, v in tensors.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(fit, strict=False)
    return sorted(fit)


def accumulate_gradients(run_model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], *,
                         num_streams: int, pruning: bool, prune_loss_weight: float = PRUNE_LOSS_WEIGHT,
                         dist: Optional[DistContext] = None, dtype: torch.dtype = torch.float32,
                         scaler: Optional[Any] = None, grad_checkpoint: bool = False) -> tuple[float, dict[str, float]]:
    """Forward and backward of one optimizer step's micro-batches; gradients add up in ``.grad``.

    Every loss term is divided by the step's total target count (over micro-batches and DDP
    ranks), so the accumulated gradient is exactly that of one batch holding them all. DDP
    averages gradients over ranks, hence the loss is scaled by the world size there, and ranks
    synchronise only on the last micro-batch. Returns this rank's share of the step's loss and
    the summed metrics (``{name}.{ce_sum,correct,count}``).
    """
    dist = dist or DistContext()
    device = dist.device
    totals: dict[str, float] = {}
    for b in micro_batches:
        for k, v in target_counts(stream_targets(b["labels"], num_streams), pruning).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    totals = dist.all_reduce_sum(totals)
    counts = {k: torch.tensor(v, device=device) for k, v in totals.items()}
    loss_part, metrics = 0.0, {}
    for m, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        last = m == len(micro_batches) - 1
        sync = run_model.no_sync() if dist.enabled and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, dtype):
                out = run_model(**batch, prune_loss_weight=prune_loss_weight, loss_counts=counts,
                                grad_checkpoint=grad_checkpoint)
            loss = out.loss * dist.world_size if dist.enabled else out.loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_part += float(out.loss.detach())
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    return loss_part, metrics


def run_training(args: TrainArgs) -> TrainResult:
    """Fine-tune ``args.model`` on ``args.data`` and write ``args.output`` (see the module docstring).

    Runs as one process or under ``torchrun`` (DDP). Raises FileNotFoundError / FileExistsError /
    ValueError with a message saying what to fix; Ctrl-C (KeyboardInterrupt) propagates after
    leaving every complete checkpoint intact.
    """
    args.validate()
    dist = DistContext.from_env(args.device)
    try:
        return _run(args, dist)
    finally:
        dist.close()


def _run(args: TrainArgs, dist: DistContext) -> TrainResult:
    from transformers import AutoTokenizer

    torch.set_num_threads(args.num_threads or max(1, (os.cpu_count() or 1) // dist.local_world_size))
    out_dir, ck_dir, resume_from = _prepare_paths(args, dist)
    hf_config = read_config(args.model)
    spec = spec_for(args, hf_config)

    # Data first: a bad file should fail before minutes of model loading.
    train_set = load_dataset(args.data, args.data_format, limit=args.max_examples)
    eval_raw = load_dataset(args.eval_data, args.data_format).examples if args.eval_data else []
    if args.eval_data and args.eval_examples and args.eval_examples < len(eval_raw):
        # evenly spaced, so files sorted by input (E2E: by MR) are still covered
        stride = len(eval_raw) / args.eval_examples
        eval_raw = [eval_raw[int(i * stride)] for i in range(args.eval_examples)]
    train_raw = train_set.examples
    if not args.eval_data and args.eval_examples:
        if args.eval_examples >= len(train_raw):
            raise ValueError(f"--eval-examples {args.eval_examples} leaves no training data "
                             f"({len(train_raw)} examples).")
        train_raw, eval_raw = train_raw[: -args.eval_examples], train_raw[-args.eval_examples:]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    train_tok, dropped = tokenize_all(tokenizer, train_raw, args.max_length)
    eval_tok, _ = tokenize_all(tokenizer, eval_raw, args.max_length)
    if not train_tok:
        raise ValueError(f"No training example keeps a completion token within --max-length {args.max_length}.")
    if dropped and dist.is_main:
        print(f"Skipped {dropped} examples whose prompt fills --max-length {args.max_length}.", file=sys.stderr)

    torch.manual_seed(args.seed)
    dtype = parse_dtype(args.dtype)
    model, peft_model = load_for_training(args, spec)
    warm = warm_start_extras(model, args.model, spec_config_from(hf_config))
    if warm and dist.is_main:
        print(f"Warm start from {args.model}: {', '.join(warm)}.", file=sys.stderr)
    model.to(dist.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scaler = grad_scaler(dist.device, dtype)

    lengths = [len(e.input_ids) for e in train_tok]
    plan_kw = dict(batch_size=args.batch_size, seed=args.seed, world_size=dist.world_size,
                   accumulation=args.grad_accumulation_steps, batch_tokens=args.batch_tokens)
    # Token budgets give each epoch its own number of steps: every epoch runs the fewest.
    counted = range(args.epochs) if args.batch_tokens else range(1)
    steps_per_epoch = min(len(epoch_steps(lengths, epoch=e, **plan_kw)) for e in counted) // dist.world_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_tok)} examples make no full step for {dist.world_size} rank(s) x "
                         f"{args.grad_accumulation_steps} micro-batch(es); lower --batch-size or add data.")
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.warmup_steps, total_steps))

    fingerprint = _fingerprint(args, dist.world_size)
    start_step, history = 0, []
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, scaler=scaler)
        diff = _fingerprint_diff(fingerprint, state["fingerprint"])
        if diff:
            raise ValueError(f"--resume: {diff} differ from the checkpoint in {resume_from}; "
                             "resume with the original arguments.")
        start_step, history = state["step"], state.get("history", [])

    run_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run_model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
                        broadcast_buffers=False)

    names = stream_names(spec.num_streams, spec.pruning is not None)
    eval_kw = dict(batch_size=args.batch_size, pad_id=pad_id, device=dist.device, max_batches=args.eval_batches,
                   prune_loss_weight=args.prune_loss_weight, dtype=dtype)
    step_kw = dict(num_streams=spec.num_streams, pruning=spec.pruning is not None,
                   prune_loss_weight=args.prune_loss_weight, dist=dist, dtype=dtype, scaler=scaler,
                   grad_checkpoint=args.grad_checkpoint)
    trainable, total = count_parameters(model)
    if dist.is_main and start_step == 0 and eval_tok:
        history.append({"step": 0, "eval": evaluate(model, eval_tok, **eval_kw)})

    def save(step: int) -> None:
        if dist.is_main:
            ckpt.save_checkpoint(ck_dir, step, model, optimizer, scheduler,
                                 {"fingerprint": fingerprint, "history": history}, keep=args.keep_checkpoints,
                                 scaler=scaler)
        dist.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not (args.progress and dist.is_main),
               desc=f"train {args.mode} γ={spec.num_streams}", unit="step", dynamic_ncols=True)
    window: dict[str, float] = {}
    run_totals: dict[str, float] = {}
    window_tokens, window_start = 0.0, time.perf_counter()
    postfix: dict[str, str] = {}
    epoch_plan: tuple[int, list] = (-1, [])
    step = start_step
    try:
        while step < total_steps:
            epoch, i = divmod(step, steps_per_epoch)
            if epoch_plan[0] != epoch:
                epoch_plan = (epoch, epoch_steps(lengths, epoch=epoch, **plan_kw))
            micro = [collate([train_tok[j] for j in idx], pad_id)
                     for idx in epoch_plan[1][i * dist.world_size + dist.rank]]
            optimizer.zero_grad(set_to_none=True)
            loss_part, metrics = accumulate_gradients(run_model, micro, **step_kw)
            if args.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
            # Each rank's loss is its share of the step's loss: summed over ranks, one step counted once.
            window["loss_sum"] = window.get("loss_sum", 0.0) + loss_part
            window["steps"] = window.get("steps", 0.0) + (1.0 if dist.is_main else 0.0)
            window_tokens += float(sum(b["attention_mask"].sum() for b in micro))
            # tqdm shows the ETA; tokens/s (all ranks, estimated from this one) refreshes every step.
            postfix["tok/s"] = f"{window_tokens * dist.world_size / max(1e-9, time.perf_counter() - window_start):.0f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)

            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if step % args.log_every == 0 or step == total_steps:
                reduced = dist.all_reduce_sum(dict(window, tokens=window_tokens))
                for k, v in reduced.items():
                    run_totals[k] = run_totals.get(k, 0.0) + v
                summary = dict(summarize(reduced), loss=reduced["loss_sum"] / reduced["steps"])
                tok_s = reduced["tokens"] / max(1e-9, time.perf_counter() - window_start)
                postfix = _postfix(summary, names, tok_s)
                bar.set_postfix(postfix, refresh=False)
                history.append({"step": step, "train": summary, "lr": scheduler.get_last_lr()[0],
                                "tokens_per_s": tok_s})
                window, window_tokens, window_start = {}, 0.0, time.perf_counter()
            if eval_tok and ((args.eval_every and step % args.eval_every == 0) or
                             (not args.eval_every and end_of_epoch)):
                if dist.is_main:
                    history.append({"step": step, "eval": evaluate(model, eval_tok, **eval_kw)})
                dist.barrier()
            if (args.save_every and step % args.save_every == 0) or (not args.save_every and end_of_epoch):
                if step < total_steps:  # the final state goes to the output directory instead
                    save(step)
    except KeyboardInterrupt:
        bar.close()
        last = ckpt.latest_checkpoint(ck_dir)
        if dist.is_main:
            print(f"\nInterrupted at step {step}. Last complete checkpoint: {last or 'none'} "
                  f"(continue with --resume).", flush=True)
        raise
    bar.close()

    final_eval = next((h["eval"] for h in reversed(history) if "eval" in h and h["step"] == step), None)
    if eval_tok and final_eval is None and dist.is_main:
        final_eval = evaluate(model, eval_tok, **eval_kw)
    metrics = {
        "steps": step,
        "train": dict(summarize(run_totals), loss=run_totals.get("loss_sum", float("nan")) /
                      max(1.0, run_totals.get("steps", 0.0))) if run_totals else {},
        "eval": final_eval,
        "initial_eval": next((h["eval"] for h in history if "eval" in h and h["step"] == 0), None),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_examples": len(train_tok),
        "dropped_examples": dropped,
        "eval_examples": len(eval_tok),
    }

    merge_for_save(model, peft_model, dtype=dtype)
    model.eval()
    output_dir = None
    if dist.is_main:
        run_args = dict(dataclasses.asdict(args), world_size=dist.world_size, prompt_template=train_set.prompt_template,
                        speculative_streaming=spec.to_dict(), total_steps=total_steps)
        write_model_dir(out_dir, model, tokenizer, train_set.prompt_template, run_args, metrics, history,
                        overwrite=args.overwrite)
        output_dir = out_dir
    dist.barrier()
    return TrainResult(output_dir=output_dir, steps=step, metrics=metrics, history=history, model=model)
