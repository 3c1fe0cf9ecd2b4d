"""Atomic directories, the checkpoint directory of a run, and the run's records.

A directory is written under a hidden temporary name and renamed into place only when
complete, so an interrupted run (Ctrl-C, crash) never leaves a half-written checkpoint or
output: the last complete one stays intact. Resume checkpoints live in
``{checkpoint_dir}/step-{N:08d}/``, each with a ``state.json``; what else a checkpoint holds
is the trainer's (``mlx_specstream.train.checkpoint``, ``mlx_specstream.mlx_train.checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

CHECKPOINT_PREFIX = "step-"
RUN_RECORDS = ("training_args.json", "train_metrics.json", "train_log.jsonl")


@contextlib.contextmanager
def atomic_directory(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` when the block succeeds.

    An existing ``final`` is replaced only with ``overwrite``; on any exception (including
    KeyboardInterrupt) the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_path(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not Path(checkpoint_dir).is_dir():
        return []
    found = [p for p in Path(checkpoint_dir).iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def keep_newest(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep`` <= 0 keeps them all)."""
    for old in list_checkpoints(checkpoint_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def write_state(directory: Path, state: dict[str, Any], step: int) -> None:
    (Path(directory) / "state.json").write_text(json.dumps(dict(state, step=step), indent=2, sort_keys=True) + "\n")


def run_paths(args: Any, *, clear: Callable[[Path], None] = shutil.rmtree) -> tuple[Path, Path, Optional[Path]]:
    """``(output, checkpoint_dir, checkpoint to resume from or None)`` for a run's options
    (``output``, ``checkpoint_dir``, ``resume``, ``overwrite``), after checking them: an
    existing output or an earlier run's checkpoints are replaced only with ``overwrite``
    (``clear`` deletes the checkpoints; DDP passes one that synchronises the ranks)."""
    out = Path(args.output)
    ck_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.parent / f"{out.name}.checkpoints"
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"Output directory {out} already exists; pass --overwrite to replace it.")
    existing = latest_checkpoint(ck_dir)
    if args.resume:
        if existing is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {ck_dir}.")
        return out, ck_dir, existing
    if existing is not None:
        if not args.overwrite:
            raise FileExistsError(f"{ck_dir} holds checkpoints of an earlier run; pass --resume to continue it "
                                  "or --overwrite to start over.")
        clear(ck_dir)
    return out, ck_dir, None


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, so the metrics files are strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def run_records(run_args: dict[str, Any], metrics: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, str]:
    """The run's records, file name -> text: ``training_args.json``, ``train_metrics.json``
    and ``train_log.jsonl`` (one line per logged step or evaluation)."""
    return {
        "training_args.json": json.dumps(run_args, indent=2, default=str) + "\n",
        "train_metrics.json": json.dumps(json_safe(metrics), indent=2) + "\n",
        "train_log.jsonl": "".join(json.dumps(json_safe(h)) + "\n" for h in history),
    }


def read_checkpoint(checkpoint: Path, needs: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state.json, the run's recorded arguments)`` of a training checkpoint directory that
    holds ``needs`` (file names) besides its state; FileNotFoundError with what to pass else."""
    ck = Path(checkpoint)
    state_file = ck / "state.json"
    if not state_file.is_file() or not all((ck / n).is_file() for n in needs):
        raise FileNotFoundError(
            f"{ck} is not a training checkpoint (no {' / '.join(('state.json',) + tuple(needs))}); pass a "
            "step-NNNNNNNN directory from the run's .checkpoints folder.")
    state = json.loads(state_file.read_text())
    return state, dict(state.get("fingerprint", {}))


def checkpoint_backend(checkpoint: Path) -> str:
    """``"mlx"`` or ``"torch"``: which trainer wrote a checkpoint directory."""
    return read_checkpoint(checkpoint, ())[1].get("backend", "torch")


def exported_records(args: Any, state: dict[str, Any], checkpoint: Path, template: Optional[str],
                     spec_dict: dict[str, Any], **extra: Any) -> tuple[dict[str, Any], dict[str, Any], list]:
    """``(run arguments, metrics, history)`` of a model exported from a checkpoint: the run's
    arguments plus where and at which step it was exported, the last evaluation before it."""
    history = state.get("history", [])
    run_args = dict(dataclasses.asdict(args), **extra, prompt_template=template, speculative_streaming=spec_dict,
                    exported_from=str(checkpoint), step=state["step"])
    metrics = {"step": state["step"], "eval": next((h["eval"] for h in reversed(history) if "eval" in h), None)}
    return run_args, metrics, history
