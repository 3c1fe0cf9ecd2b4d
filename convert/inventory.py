"""Find and index the weight files of a checkpoint directory (no tensor data is read).

Looks for, in order: ``{stem}.safetensors.index.json`` (sharded safetensors),
``{stem}.safetensors``, then the PyTorch equivalents ``{bin_stem}.bin.index.json`` and
``{bin_stem}.bin``. Every shard an index names must exist and hold the tensors it claims.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConversionError, name_list
from .safetensors_io import safetensors_refs
from .tensors import TensorRef
from .torch_pickle import torch_bin_refs


def file_refs(path: Path) -> dict[str, TensorRef]:
    """Tensors of one weight file, by its suffix."""
    if path.suffix == ".safetensors":
        return safetensors_refs(path)
    if path.suffix == ".bin":
        return torch_bin_refs(path)
    raise ConversionError(f"Unknown weight file type {path.name}; expected .safetensors or .bin.")


def weight_refs(root: Path, stem: str = "model", bin_stem: str = "pytorch_model") -> tuple[dict[str, TensorRef], list[Path]]:
    """``(name -> TensorRef, weight files used)`` for the checkpoint in ``root``."""
    for candidate in (f"{stem}.safetensors.index.json", f"{stem}.safetensors", f"{bin_stem}.bin.index.json", f"{bin_stem}.bin"):
        path = root / candidate
        if path.is_file():
            return _sharded(path) if candidate.endswith(".index.json") else (file_refs(path), [path])
    orphans = sorted(p.name for p in root.glob(f"{stem}-*-of-*.safetensors")) + sorted(
        p.name for p in root.glob(f"{bin_stem}-*-of-*.bin")
    )
    if orphans:
        raise ConversionError(
            f"{root} has weight shards ({name_list(orphans, 4)}) but no index json; copy the "
            f"{stem}.safetensors.index.json (or {bin_stem}.bin.index.json) that came with them."
        )
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise ConversionError(
        f"No weights found in {root}: expected {stem}.safetensors, {bin_stem}.bin or a sharded "
        f"index of either. The directory holds: {name_list(present, 12) or 'nothing'}."
    )


def _sharded(index_path: Path) -> tuple[dict[str, TensorRef], list[Path]]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index_path} is not a valid weight index ({e!r}); re-download it.") from e
    root = index_path.parent
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise ConversionError(
            f"{index_path.name} lists {len(shards)} shards but {name_list(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {root}; download every shard."
        )
    refs: dict[str, TensorRef] = {}
    for shard in shards:
        shard_refs = file_refs(root / shard)
        claimed = [k for k, v in weight_map.items() if v == shard and k not in shard_refs]
        if claimed:
            raise ConversionError(
                f"{index_path.name} says {name_list(claimed)} are in {shard}, but that file does not "
                "hold them; the index and shards do not belong together, re-download them."
            )
        dupes = sorted(set(refs) & set(shard_refs))
        if dupes:
            raise ConversionError(f"Tensors {name_list(dupes)} appear in more than one shard of {root}.")
        refs.update(shard_refs)
    return refs, [root / s for s in shards]
