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
import sys
import time
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlx_specstream.streams import SpecStreamModel
from mlx_specstream.train_common.data import load_splits, plan_steps, tokenize_splits
from mlx_specstream.train_common.files import latest_checkpoint, run_paths, run_records
from mlx_specstream.train_common.metrics import add_into, eval_at, postfix, run_metrics, stream_names, summarize
from mlx_specstream.train_common.options import RunOptions, lr_factor

from . import checkpoint as ckpt
from .data import collate
from .loss import Options, batch_loss, count_targets
from .params import attention_linears, freeze_for_lossless, prepare_model
from .shared import attach_shared_lora, freeze_for_shared, fuse_shared_lora


@dataclasses.dataclass
class TrainOptions(RunOptions):
    """Every option of ``specstream train`` (the PyTorch trainer's names and defaults, see
    :class:`~mlx_specstream.train_common.options.RunOptions`), plus the MLX trainer's own:
    ``chunk_size`` (positions whose streams run together) and ``prefill_chunk`` (main tokens
    per prefill piece). As there, ``grad_accumulation_steps`` micro-batches make one optimizer
    step with exactly the gradient of one batch holding them all, ``batch_tokens`` fills
    micro-batches to a token budget, ``dtype`` is the frozen weights' dtype (trainable ones stay
    float32), ``grad_checkpoint`` recomputes each MSA layer of the stream chunks in the backward
    pass. ``device``: ``cpu`` runs MLX on the CPU, the others on MLX's default device (the GPU
    where there is one). ``num_threads`` is accepted and ignored (MLX picks its own)."""

    model_kind = "a model directory (Hugging Face or MLX, float or quantized)"

    chunk_size: int = 64
    prefill_chunk: int = 512

    def _at_least_one(self) -> tuple[str, ...]:
        return super()._at_least_one() + ("chunk_size", "prefill_chunk")

    def validate(self) -> None:
        super().validate()
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


def lr_schedule(lr: float, warmup: int, total: int):
    """The PyTorch trainer's schedule, as a function of the optimizer's step (0 at the first
    update): linear warmup over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def f(step: mx.array) -> mx.array:
        return mx.array(lr * lr_factor(step.item(), warmup, total), dtype=mx.float32)
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
        add_into(totals, {k: v.item() for k, v in sums.items()})
        if g is not None:
            grads = g if grads is None else tree_map(lambda x, y: x + y, grads, g)
    return loss, totals, counts, grads


def evaluate(model: SpecStreamModel, examples: list, *, batch_size: int, pad_id: int,
             max_batches: Optional[int] = None, opts: Optional[Options] = None) -> dict[str, float]:
    """Per-stream ``{name}.loss`` / ``{name}.acc`` over ``examples`` (sorted by length, no shuffling)."""
    opts = opts or Options()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    totals: dict[str, float] = {}
    for n, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        ids, labels = collate([examples[i] for i in order[start: start + batch_size]], pad_id)
        counts = count_targets([labels], model.num_streams, model.has_pruning)
        _, sums, _ = batch_loss(model, ids, labels, counts, opts, grads=False)
        add_into(totals, {k: v.item() for k, v in sums.items()})
        add_into(totals, {f"{k}.count": v for k, v in counts.items()})
    return summarize(totals)


def build_for_training(args: TrainOptions) -> tuple[SpecStreamModel, list[str]]:
    """``args.model`` with the run's streams, its trainable parameters unfrozen as ``args.mode``
    wants; returns the model and the extras warm-started from the directory (see
    :func:`~.params.prepare_model`)."""
    def spec_fn(base):
        return args.spec(len(base.layers), lambda first_msa: attention_linears(base, first_msa))

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    model, _, warm = prepare_model(args.model, spec_fn, args.seed, dtype=args.dtype)
    if args.mode == "shared":
        attach_shared_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.seed)
        freeze_for_shared(model)
    else:
        freeze_for_lossless(model)
    return model, warm


def run_training(args: TrainOptions) -> TrainResult:
    """Fine-tune ``args.model`` on ``args.data`` and write ``args.output`` (see the module docstring)."""
    from transformers import AutoTokenizer

    args.validate()
    out_dir, ck_dir, resume_from = run_paths(args)
    # Data first: a bad file should fail before the model loads.
    train_set, train_raw, eval_raw = load_splits(args)
    tok = tokenize_splits(AutoTokenizer.from_pretrained(args.model), train_raw, eval_raw, args.max_length)
    train_tok, eval_tok, pad_id = tok.train, tok.eval, tok.pad_id

    model, warm = build_for_training(args)
    if warm:
        print(f"Warm start from {args.model}: {', '.join(warm)}.", file=sys.stderr)
    spec = model.spec

    lengths = [len(e.input_ids) for e in train_tok]
    plan = plan_steps(lengths, args)
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    optimizer = make_optimizer(args, total_steps)
    optimizer.init(model.trainable_parameters())
    opts = Options(chunk_size=args.chunk_size, prefill_chunk=args.prefill_chunk,
                   grad_checkpoint=args.grad_checkpoint, prune_loss_weight=args.prune_loss_weight)

    fingerprint = args.fingerprint(backend="mlx")
    start_step, history = 0, []
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer)
        args.check_resume(fingerprint, state["fingerprint"], resume_from)
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
                epoch_plan = (epoch, plan.epoch(lengths, epoch))
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
            add_into(window, sums)
            add_into(window, {f"{k}.count": v for k, v in counts.items()})
            add_into(window, {"loss_sum": loss, "steps": 1.0})
            window_tokens += float(sum(len(train_tok[j].input_ids) for idx in epoch_plan[1][i] for j in idx))
            bar.update(1)

            if plan.log_due(step):
                add_into(run_totals, window)
                summary = summarize(window)
                tok_s = window_tokens / max(1e-9, time.perf_counter() - window_start)
                bar.set_postfix(postfix(summary, names, tok_s), refresh=False)
                history.append({"step": step, "train": summary,
                                "lr": args.lr * lr_factor(step, args.warmup_steps, total_steps),
                                "tokens_per_s": tok_s})
                window, window_tokens, window_start = {}, 0.0, time.perf_counter()
            if eval_tok and plan.eval_due(step):
                history.append({"step": step, "eval": evaluate(model, eval_tok, **eval_kw)})
            if plan.save_due(step):
                ckpt.save_checkpoint(ck_dir, step, model, optimizer, {"fingerprint": fingerprint, "history": history},
                                     keep=args.keep_checkpoints)
    except KeyboardInterrupt:
        bar.close()
        print(f"\nInterrupted at step {step}. Last complete checkpoint: {latest_checkpoint(ck_dir) or 'none'} "
              "(continue with --resume).", flush=True)
        raise
    bar.close()

    final_eval = eval_at(history, step)
    if eval_tok and final_eval is None:
        final_eval = evaluate(model, eval_tok, **eval_kw)
    steps_run = step - start_step
    metrics = run_metrics(
        step=step, totals=run_totals, history=history, final_eval=final_eval,
        parameters=(sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
                    sum(v.size for _, v in tree_flatten(model.parameters()))),
        examples=(len(train_tok), tok.dropped, len(eval_tok)),
        seconds_per_step=train_seconds / steps_run if steps_run else None, peak_memory_bytes=mx.get_peak_memory())
    run_args = dict(dataclasses.asdict(args), backend="mlx", prompt_template=train_set.prompt_template,
                    speculative_streaming=spec.to_dict(), total_steps=total_steps)
    records = run_records(run_args, metrics, history)
    model.eval()
    if args.mode == "shared":
        fuse_shared_lora(model)
    ckpt.write_model_dir(out_dir, Path(args.model), model, train_set.prompt_template, records,
                         overwrite=args.overwrite, new_base=args.mode == "shared")
    return TrainResult(output_dir=out_dir, steps=step, metrics=metrics, history=history, model=model)
