"""Resolve ``--hf-path``: a local checkpoint directory, or a Hugging Face Hub repo id
downloaded through ``huggingface_hub`` (only the files a conversion needs)."""

from __future__ import annotations

import re
from pathlib import Path

from mlx_specstream.config import EXTRAS_FILE
from mlx_specstream.loading import TOKENIZER_FILES  # one list for the loader and the converter

from .errors import ConversionError

# What a conversion reads: configs, safetensors weights, stream extras, tokenizer files.
_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "adapter_model.safetensors",
    EXTRAS_FILE,
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
_BIN_PATTERNS = ["pytorch_model*.bin", "adapter_model.bin"]  # only when a repo has no safetensors
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")



def resolve_source(path_or_id: str | Path) -> Path:
    """A local directory as is; otherwise a Hub repo id, downloaded (or found in the cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{path} is a file; pass the checkpoint directory that contains config.json.")
    text = str(path_or_id)
    if not _REPO_ID.match(text) or text.startswith((".", "~")):
        raise ConversionError(f"{text} does not exist; pass a local checkpoint directory or a Hub repo id (owner/name).")
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        root = Path(snapshot_download(repo_id, allow_patterns=_PATTERNS))
        if not any(root.glob("model*.safetensors")) and not (root / "adapter_model.safetensors").is_file():
            root = Path(snapshot_download(repo_id, allow_patterns=_PATTERNS + _BIN_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise ConversionError(
            f"{repo_id} is not a local directory, and the Hugging Face Hub cannot be reached (offline?) "
            "with no cached copy. Download the checkpoint elsewhere and pass its local path as --hf-path."
        ) from e
    except HFValidationError as e:
        raise ConversionError(f"{repo_id} is neither a local directory nor a valid Hub repo id ({e}).") from e
    except HfHubHTTPError as e:
        raise ConversionError(
            f"Could not download {repo_id} from the Hugging Face Hub ({e}). Check the repo id and your "
            "access (huggingface-cli login for gated repos), or pass a local path as --hf-path."
        ) from e
    return root


def tokenizer_files(*dirs: Path) -> dict[str, Path]:
    """Files to copy beside the weights: the tokenizer files of the first directory that has
    any (never a mix of two tokenizers), and the first ``generation_config.json``."""
    found: dict[str, Path] = {}
    for d in dirs:
        names = [n for n in TOKENIZER_FILES if n != "generation_config.json" and (d / n).is_file()]
        names += [p.name for p in sorted(d.glob("*.tiktoken"))]
        if names:
            found = {n: d / n for n in names}
            break
    for d in dirs:
        if (d / "generation_config.json").is_file():
            found["generation_config.json"] = d / "generation_config.json"
            break
    return found
