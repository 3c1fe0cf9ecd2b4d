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
import functools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mlx_specstream.config import EXTRAS_FILE, SpecStreamConfig, read_config, spec_config_from
from mlx_specstream.datasets import PROMPT_TEMPLATE_KEY
from mlx_specstream.train_common.data import load_splits, plan_steps, tokenize_splits
from mlx_specstream.train_common.files import atomic_directory, latest_checkpoint, run_paths, run_records
from mlx_specstream.train_common.metrics import (PRUNE_LOSS_WEIGHT, add_into, eval_at, postfix, run_metrics,
                                                  stream_names, summarize)
from mlx_specstream.train_common.options import RunOptions, lr_factor

from . import checkpoint as ckpt
from .backbone import DEFAULT_ATTENTION_TARGETS, check_model_type
from .data import collate
from .dist import DistContext
from .layout import stream_targets
from .loss import target_counts
from .modes import count_parameters, merge_for_save, prepare
from .model import SpecStreamLM
from .precision import autocast, grad_scaler, parse_dtype, upcast_trainable


@dataclasses.dataclass
class TrainArgs(RunOptions):
    """Every option of ``specstream train`` (same names, same defaults); see
    :class:`~mlx_specstream.train_common.options.RunOptions`."""

    model_kind = "a Hugging Face model directory"


@dataclasses.dataclass
class TrainResult:
    """What a run produced. ``output_dir`` is None on ranks other than 0."""

    output_dir: Optional[Path]
    steps: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model: SpecStreamLM


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


def spec_for(args: TrainArgs, hf_config: dict) -> SpecStreamConfig:
    """The run's ``speculative_streaming`` block, validated against the model's config."""
    family = check_model_type(hf_config.get("model_type"))
    return args.spec(int(hf_config.get("num_hidden_layers") or 0), DEFAULT_ATTENTION_TARGETS[family])


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
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, config_updates={PROMPT_TEMPLATE_KEY: prompt_template})
        tokenizer.save_pretrained(tmp)
        for name, text in run_records(run_args, metrics, history).items():
            (tmp / name).write_text(text)


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

    def clear(ck_dir: Path) -> None:  # every rank has seen the old checkpoints before rank 0 deletes them
        dist.barrier()
        if dist.is_main:
            shutil.rmtree(ck_dir)
        dist.barrier()

    out_dir, ck_dir, resume_from = run_paths(args, clear=clear)
    hf_config = read_config(args.model)
    spec = spec_for(args, hf_config)

    # Data first: a bad file should fail before minutes of model loading.
    train_set, train_raw, eval_raw = load_splits(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tok = tokenize_splits(tokenizer, train_raw, eval_raw, args.max_length, report=dist.is_main)
    train_tok, eval_tok, pad_id = tok.train, tok.eval, tok.pad_id

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
    plan = plan_steps(lengths, args, world_size=dist.world_size)
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=args.warmup_steps, total=total_steps))

    fingerprint = args.fingerprint(world_size=dist.world_size)
    start_step, history = 0, []
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, scaler=scaler)
        args.check_resume(fingerprint, state["fingerprint"], resume_from)
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
    bar_fields: dict[str, str] = {}
    epoch_plan: tuple[int, list] = (-1, [])
    step = start_step
    try:
        while step < total_steps:
            epoch, i = divmod(step, steps_per_epoch)
            if epoch_plan[0] != epoch:
                epoch_plan = (epoch, plan.epoch(lengths, epoch))
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
            add_into(window, metrics)
            # Each rank's loss is its share of the step's loss: summed over ranks, one step counted once.
            add_into(window, {"loss_sum": loss_part, "steps": 1.0 if dist.is_main else 0.0})
            window_tokens += float(sum(b["attention_mask"].sum() for b in micro))
            # tqdm shows the ETA; tokens/s (all ranks, estimated from this one) refreshes every step.
            bar_fields["tok/s"] = f"{window_tokens * dist.world_size / max(1e-9, time.perf_counter() - window_start):.0f}"
            bar.set_postfix(bar_fields, refresh=False)
            bar.update(1)

            if plan.log_due(step):
                reduced = dist.all_reduce_sum(dict(window, tokens=window_tokens))
                add_into(run_totals, reduced)
                summary = summarize(reduced)
                tok_s = reduced["tokens"] / max(1e-9, time.perf_counter() - window_start)
                bar_fields = postfix(summary, names, tok_s)
                bar.set_postfix(bar_fields, refresh=False)
                history.append({"step": step, "train": summary, "lr": scheduler.get_last_lr()[0],
                                "tokens_per_s": tok_s})
                window, window_tokens, window_start = {}, 0.0, time.perf_counter()
            if eval_tok and plan.eval_due(step):
                if dist.is_main:
                    history.append({"step": step, "eval": evaluate(model, eval_tok, **eval_kw)})
                dist.barrier()
            if plan.save_due(step):
                save(step)
    except KeyboardInterrupt:
        bar.close()
        last = latest_checkpoint(ck_dir)
        if dist.is_main:
            print(f"\nInterrupted at step {step}. Last complete checkpoint: {last or 'none'} "
                  f"(continue with --resume).", flush=True)
        raise
    bar.close()

    final_eval = eval_at(history, step)
    if eval_tok and final_eval is None and dist.is_main:
        final_eval = evaluate(model, eval_tok, **eval_kw)
    metrics = run_metrics(step=step, totals=run_totals, history=history, final_eval=final_eval,
                          parameters=count_parameters(model), examples=(len(train_tok), tok.dropped, len(eval_tok)))

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
