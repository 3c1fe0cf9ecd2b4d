"""Model directories from a local path or a Hugging Face hub id, as mlx-lm takes them.

A hub id (``org/name``) is looked up in the local Hugging Face cache first; only when it is
not there, and ``HF_HUB_OFFLINE`` is not set, is it downloaded. Every failure is one line that
says what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# what generation needs: configs, weights, tokenizer files (no PyTorch weights, no images)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.endswith((".json", ".safetensors"))


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of ``repo_id``: from the cache, else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now, not at huggingface_hub's import
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True,
                                      cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise FileNotFoundError(
            f"{repo_id} is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
            "download it once with network access (huggingface-cli download), or pass a local directory."
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, cache_dir=cache_dir))
    except Exception as e:  # huggingface_hub and requests raise many kinds; all mean "not available"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"Could not get {repo_id} from the Hugging Face hub ({reason}); check the id and the network, "
            "or pass a local directory."
        ) from None
