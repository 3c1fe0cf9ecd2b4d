"""Task data readers and prompt templates, pure Python (no torch, no MLX).

Shared by the trainer (``mlx_specstream.train``) and the benchmarks, so a model is trained
and evaluated on identically formatted prompts. Each reader returns :class:`Example` rows:

* ``prompt``: the fully formatted prompt text (template applied);
* ``completion``: the text the model learns to produce after it (leading space included);
* ``input``: the raw task input before the template (an E2E MR, a dialogue);
* ``references``: every reference output for that input (several for E2E test MRs,
  three for the DialogSum test split), used by ROUGE;
* ``messages``: for chat data, the conversation (the last message is the assistant's reply);
* ``ends``: whether the reply is complete, so training appends the end of sequence (EOS, or
  the chat template's end of turn) after it. False for the rows ``specstream distill`` cut at
  ``--max-tokens`` (``"finish_reason": "length"``): the model did not stop there, and a
  lossless run must not teach its streams that it did.

A trained model directory records its template as the top-level ``prompt_template`` key of
config.json (:data:`PROMPT_TEMPLATE_KEY`), a string with one ``{input}`` field that
is replaced by the raw input (plain substitution, so other braces are kept as they are;
``str.format`` gives the same result for templates without other braces); inference formats a raw input with :func:`format_prompt` and tokenizes the result
with the tokenizer's special tokens (BOS) added, exactly as training did. ``None`` there
means chat data: apply the tokenizer's chat template instead.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

PROMPT_TEMPLATE_KEY = "prompt_template"

# The completion starts with a space after the template's final colon, so byte-level BPE
# and SentencePiece tokenize prompt + completion with the prompt's tokens as a prefix.
E2E_PROMPT_TEMPLATE = "Describe the restaurant from its attributes.\nAttributes: {input}\nDescription:"
DIALOGSUM_PROMPT_TEMPLATE = "Summarize the dialogue.\n{input}\nSummary:"
PLAIN_PROMPT_TEMPLATE = "{input}"

FORMATS = ("auto", "jsonl", "e2e", "dialogsum")
SHARED_DIR_ENV = "SPECSTREAM_SHARED"


@dataclasses.dataclass(frozen=True)
class Example:
    """One training or evaluation example (see the module docstring)."""

    prompt: str
    completion: str
    input: Optional[str] = None
    references: tuple[str, ...] = ()
    messages: Optional[tuple[dict[str, str], ...]] = None
    ends: bool = True


@dataclasses.dataclass
class Dataset:
    """Examples plus the template that produced their prompts (None for chat data)."""

    examples: list[Example]
    prompt_template: Optional[str]
    format: str  # "jsonl" | "chat" | "e2e" | "dialogsum"


def format_prompt(template: str, raw_input: str) -> str:
    """Apply a ``prompt_template`` to a raw input: every ``{input}`` becomes ``raw_input``."""
    if "{input}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{input}}' field.")
    return template.replace("{input}", raw_input)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Data file not found: {p}. Pass an existing JSONL/CSV file (optionally .gz).")
    return p


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each line; every line must be one JSON object.

    Raises ValueError naming the file and 1-based line number of an empty or malformed line.
    """
    p = _check_file(path)
    with _open_text(p) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    for n, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip():
            raise ValueError(f"{p} line {n}: empty line. Remove blank lines; each line must be one JSON object.")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} line {n}: not valid JSON ({e.msg} at column {e.colno}).") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{p} line {n}: expected a JSON object, got {type(obj).__name__}.")
        yield n, obj


def _chat_messages(p: Path, n: int, messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{p} line {n}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    out = []
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{p} line {n}: every message needs string 'role' and 'content' fields.")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise ValueError(
            f"{p} line {n}: the last message must be the assistant's reply (the training target), "
            f"got role {out[-1]['role']!r}."
        )
    return tuple(out)


def row_example(obj: dict[str, Any]) -> Example:
    """The :class:`Example` of one well-formed JSONL row: ``{"prompt", "completion"}`` or
    ``{"messages": [...]}`` ending with the assistant's reply; ``"finish_reason": "length"``
    (a ``specstream distill`` reply cut at ``--max-tokens``) makes it unfinished (``ends=False``).
    Other keys are ignored."""
    ends = obj.get("finish_reason") != "length"
    if "messages" in obj:
        msgs = tuple({"role": m["role"], "content": m["content"]} for m in obj["messages"])
        return Example(prompt="", completion=msgs[-1]["content"], messages=msgs, ends=ends)
    return Example(prompt=obj["prompt"], completion=obj["completion"], input=obj["prompt"],
                   references=(obj["completion"],), ends=ends)


def read_jsonl(path: str | os.PathLike, *, limit: Optional[int] = None) -> Dataset:
    """Read ``{"prompt", "completion"}`` or ``{"messages": [...]}`` lines (not mixed).

    Prompt/completion lines are used verbatim (template ``"{input}"``); chat lines train on
    the last assistant message with the tokenizer's chat template (template ``None``). A line
    with ``"finish_reason": "length"`` (``specstream distill``) is an unfinished reply
    (``ends=False``).
    """
    p = _check_file(path)
    examples: list[Example] = []
    kind: Optional[str] = None
    for n, obj in iter_jsonl(p):
        if limit is not None and len(examples) >= limit:
            break
        if "messages" in obj:
            this = "chat"
            ex = row_example(dict(obj, messages=_chat_messages(p, n, obj["messages"])))
        elif "prompt" in obj and "completion" in obj:
            this = "jsonl"
            if not (isinstance(obj["prompt"], str) and isinstance(obj["completion"], str)):
                raise ValueError(f"{p} line {n}: 'prompt' and 'completion' must be strings.")
            if not obj["completion"]:
                raise ValueError(f"{p} line {n}: 'completion' is empty; there is nothing to train on.")
            ex = row_example(obj)
        else:
            raise ValueError(
                f"{p} line {n}: expected keys 'prompt' and 'completion', or 'messages'; got {sorted(obj)}."
            )
        if kind is not None and this != kind:
            raise ValueError(f"{p} line {n}: mixes {this} and {kind} examples; use one kind per file.")
        kind = this
        examples.append(ex)
    if not examples:
        raise ValueError(f"{p} contains no examples.")
    return Dataset(examples, PLAIN_PROMPT_TEMPLATE if kind == "jsonl" else None, kind or "jsonl")


def read_e2e(path: str | os.PathLike, *, limit: Optional[int] = None, group_references: bool = False,
             template: str = E2E_PROMPT_TEMPLATE) -> Dataset:
    """Read an E2E NLG CSV (columns ``mr``, ``ref``).

    With ``group_references`` rows sharing an MR become one example whose ``references``
    hold all their refs (in file order) and whose completion is the first; use it for
    evaluation. ``limit`` counts examples after grouping.
    """
    p = _check_file(path)
    grouped: dict[str, list[str]] = {}
    rows: list[tuple[str, str]] = []
    with _open_text(p) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
            raise ValueError(f"{p}: expected an E2E CSV with columns 'mr' and 'ref', got {reader.fieldnames}.")
        for n, row in enumerate(reader, start=2):
            mr, ref = (row.get("mr") or "").strip(), (row.get("ref") or "").strip()
            if not mr or not ref:
                raise ValueError(f"{p} line {n}: empty 'mr' or 'ref'.")
            if group_references:
                if mr not in grouped:
                    if limit is not None and len(grouped) >= limit:
                        continue
                    grouped[mr] = []
                grouped[mr].append(ref)
            else:
                if limit is not None and len(rows) >= limit:
                    break
                rows.append((mr, ref))
    pairs = [(mr, tuple(refs)) for mr, refs in grouped.items()] if group_references else [
        (mr, (ref,)) for mr, ref in rows]
    examples = [Example(prompt=format_prompt(template, mr), completion=" " + refs[0], input=mr, references=refs)
                for mr, refs in pairs]
    if not examples:
        raise ValueError(f"{p} contains no examples.")
    return Dataset(examples, template, "e2e")


def read_dialogsum(path: str | os.PathLike, *, limit: Optional[int] = None,
                   template: str = DIALOGSUM_PROMPT_TEMPLATE) -> Dataset:
    """Read DialogSum JSONL (``dialogue`` + ``summary``, or ``summary1..3`` in the test split)."""
    p = _check_file(path)
    examples: list[Example] = []
    for n, obj in iter_jsonl(p):
        if limit is not None and len(examples) >= limit:
            break
        dialogue = obj.get("dialogue")
        refs = [obj[k] for k in ("summary", "summary1", "summary2", "summary3") if isinstance(obj.get(k), str)]
        if not isinstance(dialogue, str) or not dialogue.strip() or not refs:
            raise ValueError(f"{p} line {n}: expected 'dialogue' and 'summary' (or 'summary1'..) strings.")
        dialogue = dialogue.strip()
        refs = [r.strip() for r in refs]
        examples.append(Example(prompt=format_prompt(template, dialogue), completion=" " + refs[0],
                                input=dialogue, references=tuple(refs)))
    if not examples:
        raise ValueError(f"{p} contains no examples.")
    return Dataset(examples, template, "dialogsum")


def detect_format(path: str | os.PathLike) -> str:
    """``e2e`` for .csv(.gz); for JSONL, ``dialogsum`` if the first line has 'dialogue', else ``jsonl``."""
    p = _check_file(path)
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    if name.endswith(".csv"):
        return "e2e"
    for _, obj in iter_jsonl(p):
        return "dialogsum" if "dialogue" in obj else "jsonl"
    raise ValueError(f"{p} contains no examples.")


def load_dataset(path: str | os.PathLike, format: str = "auto", *, limit: Optional[int] = None) -> Dataset:
    """Read any supported data file; ``format`` is one of :data:`FORMATS`."""
    if format not in FORMATS:
        raise ValueError(f"Unknown data format {format!r}; use one of {FORMATS}.")
    if format == "auto":
        format = detect_format(path)
    reader = {"jsonl": read_jsonl, "e2e": read_e2e, "dialogsum": read_dialogsum}[format]
    return reader(path, limit=limit)


def shared_dir() -> Optional[Path]:
    """The read-only ``shared/`` folder (data, tokenizers), or None when absent.

    ``$SPECSTREAM_SHARED`` wins; otherwise ``../shared`` beside the repository root.
    Only tests, examples and benchmarks use this; the library never needs it.
    """
    env = os.environ.get(SHARED_DIR_ENV)
    if env:
        return Path(env) if Path(env).is_dir() else None
    candidate = Path(__file__).resolve().parents[2] / "shared"
    return candidate if candidate.is_dir() else None
