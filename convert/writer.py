"""Write the output directory atomically, with mlx-lm-compatible weight file names.

Files are written into a hidden temporary directory beside the destination, which is
renamed into place only when everything succeeded: a failed or interrupted conversion
leaves no partial model (a process killed with SIGKILL can leave the hidden
``.NAME.partial-*`` directory, never a half-written NAME). An existing destination is
refused unless ``force``; then it is replaced only after the new one is complete.

Base weights go to ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` above the shard size limit: the names ``mlx_lm.load``
globs (``model*.safetensors``), so the extras file never matches.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .errors import ConversionError

SINGLE_FILE = "model.safetensors"
SHARD_FILE = "model-{:05d}-of-{:05d}.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # mlx-lm's default


def check_destination(dst: Path, force: bool, sources: list[Path]) -> None:
    """Refuse an existing destination (unless ``force``) and any destination that would
    overwrite or contain a source directory."""
    dst = dst.expanduser().resolve()
    for src in sources:
        src = src.resolve()
        if dst == src or dst in src.parents:
            raise ConversionError(
                f"--mlx-path {dst} would overwrite the source checkpoint {src}; choose another output directory."
            )
    if dst.exists():
        if not dst.is_dir():
            raise ConversionError(f"{dst} exists and is a file; choose another --mlx-path.")
        if not force:
            raise ConversionError(
                f"{dst} already exists; pass --force (force=True) to replace it, or choose another --mlx-path."
            )


@contextlib.contextmanager
def staged_directory(dst: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary directory; on normal exit it becomes ``dst``."""
    dst = dst.expanduser().resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dst, "partial")
    try:
        yield tmp
        _move_into_place(tmp, dst, force)
    finally:  # also on KeyboardInterrupt; after a successful move tmp no longer exists
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, dst: Path, force: bool) -> None:
    if not dst.exists():
        os.replace(tmp, dst)
        return
    if not force:  # appeared while we were converting
        raise ConversionError(f"{dst} appeared during the conversion; pass --force to replace it.")
    old = _sibling(dst, "old")
    os.replace(dst, old / "model")
    try:
        os.replace(tmp, dst)
    except OSError:
        os.replace(old / "model", dst)  # put the previous model back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _sibling(dst: Path, kind: str) -> Path:
    """A new hidden directory beside ``dst`` (mkdir, not mkdtemp: normal umask permissions)."""
    path = dst.parent / f".{dst.name}.{kind}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group tensors (in order) into shards of at most ``max_bytes`` each.

    ``sizes``: group name -> bytes, where a group is one target tensor with its quantization
    companions; a group larger than the limit gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [SHARD_FILE.format(i + 1, count) for i in range(count)]


def write_index(root: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
