"""Self-distillation data: a model's own replies to prompts, the data lossless mode trains on.

:func:`distill` generates a reply to every row of a prompts file (JSONL) and writes rows that
``specstream train`` reads (:func:`mlx_specstream.datasets.read_jsonl`):

* ``{"prompt": p}`` -> ``{"index": i, "prompt": P, "completion": c, "finish_reason": ..., "exact": ...}``,
  P being p in the model's ``prompt_template`` as ``specstream generate`` formats it (``raw``
  keeps p as it is);
* ``{"messages": [...]}`` -> ``{"index": i, "messages": [..., {"role": "assistant", "content": c}], ...}``,
  generated after the chat template with the generation prompt. A trailing assistant message
  of the input is replaced (and a prompt row's ``completion`` ignored), so a training file
  can be distilled again.

**Exactness.** Lossless training should see the tokens the model generated, but the trainer
re-tokenizes text (:mod:`mlx_specstream.train_common.data`: prompt ids, completion ids, then EOS
if the reply is finished).
A row is ``"exact"`` when that tokenization gives the prompt's ids followed by exactly the
generated ids and, if the model stopped, its stop token (the chat template may add its own
tokens after that). Text is decoded in context (the prompt's decoding is cut off the
prompt + reply's), then alone; a reply cut at ``max_tokens`` inside a multi-byte character
loses its last (at most 3) tokens. Rows that stay inexact (e.g. invalid UTF-8 bytes) are
kept with ``"exact": false`` and counted, or with ``exact_only`` moved to the rejects file,
``<output stem>.rejected.jsonl``. That file also takes rows the trainer cannot read at all:
an empty completion of a prompt row, a chat template that does not render the prompt as a
prefix of the whole conversation. Rows of ``"finish_reason": "length"`` were cut at
``max_tokens``: the trainer appends no EOS (nor a chat template's end of turn) to them.

**Batching.** MLX: mlx-lm's continuous batching (:class:`mlx_lm.generate.BatchGenerator`) on
mlx-lm's own model (``model.base``; streams play no part): in float32 its greedy output
equals one prompt at a time, and ``specstream generate``'s. PyTorch (``backend="torch"``): transformers' ``generate`` on
left-padded batches. Rows are written in prompt order, complete lines appended, flushed and
fsynced as they finish; running again on the same output appends only the missing prompts
(a partly written last line is dropped), and a finished output is kept unless ``overwrite``.
Resuming reproduces the file of one uninterrupted run for greedy decoding; a sampled run
draws other samples for the prompts it resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from .datasets import format_prompt, iter_jsonl, row_example
from .prompting import TEMPLATE_KEY, prompt_template
from .sampling import SamplingParams
from .train_common.data import training_ids as trainer_ids
from .train_common.options import DEVICES

PathLike = Union[str, Path]
BACKENDS = ("mlx", "torch")
MAX_TRIM = 3  # tokens a cut-off reply may lose to end on a whole character (UTF-8: <= 3 pending bytes)


@dataclasses.dataclass
class DistillResult:
    """What :func:`distill` did; the counts are of this run's rows (``resumed`` were there before)."""

    output: Path
    rejected_path: Path
    total: int  # prompts in the prompts file
    resumed: int  # prompts whose rows the output (or rejects file) already held
    written: int  # rows appended to the output
    rejected: int  # rows written to the rejects file
    inexact: int  # rows whose text does not re-tokenize to the generated ids (kept unless exact_only)
    truncated: int  # rows cut at max_tokens
    tokens: int  # tokens generated, stop tokens included
    seconds: float

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class PromptRow:
    """One prompt of a prompts file."""

    index: int  # 0-based row of the prompts file (the key of its output row)
    line: int
    text: Optional[str] = None  # a plain prompt, before the template
    messages: Optional[list[dict[str, str]]] = None  # a chat prompt, without a reply


@dataclasses.dataclass
class _Job:
    prompt: PromptRow
    text: str  # exactly what the trainer will tokenize as the prompt
    ids: list[int]


@dataclasses.dataclass
class _Generated:
    index: int
    tokens: list[int]  # generated ids, the stop token excluded
    stop: Optional[int]  # the EOS id that ended it; None when cut at max_tokens


def rejected_path_for(output: PathLike) -> Path:
    """Where rows that are not written to ``output`` go: ``out.jsonl`` -> ``out.rejected.jsonl``."""
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".rejected.jsonl")


def read_prompts(path: PathLike) -> list[PromptRow]:
    """The prompts of a JSONL file: ``{"prompt": str}`` rows or ``{"messages": [...]}`` rows, not mixed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Prompts file not found: {p}. Pass a JSONL file of {{\"prompt\": ...}} "
                                "or {\"messages\": [...]} rows.")
    out: list[PromptRow] = []
    for n, obj in iter_jsonl(p):  # names the line of malformed JSON
        if "messages" in obj:
            msgs = obj["messages"]
            if not (isinstance(msgs, list) and msgs and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs)):
                raise ValueError(f"{p} line {n}: 'messages' must be a non-empty list of objects with string "
                                 "'role' and 'content'.")
            msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]  # a training row: its reply is generated again
            if not msgs:
                raise ValueError(f"{p} line {n}: no message before the assistant's reply to generate from.")
            item = PromptRow(len(out), n, messages=msgs)
        elif "prompt" in obj:
            if not isinstance(obj["prompt"], str):
                raise ValueError(f"{p} line {n}: 'prompt' must be a string.")
            item = PromptRow(len(out), n, text=obj["prompt"])
        else:
            raise ValueError(f"{p} line {n}: expected a 'prompt' string or a 'messages' list; got keys {sorted(obj)}.")
        if out and (item.messages is None) != (out[0].messages is None):
            raise ValueError(f"{p} line {n}: mixes chat ('messages') and 'prompt' rows; the trainer takes one "
                             "kind per file, so split them into two files.")
        out.append(item)
    if not out:
        raise ValueError(f"{p} contains no prompts.")
    return out


def training_ids(tokenizer: Any, row: dict) -> tuple[list[int], list[int]]:
    """``(prompt ids, completion ids)`` of an output row as the trainer tokenizes it (EOS appended
    unless ``"finish_reason"`` is ``"length"``; :func:`mlx_specstream.train_common.data.training_ids`).
    Raises ValueError where the trainer would."""
    return trainer_ids(tokenizer, row_example(row))


def _make_job(tokenizer: Any, item: PromptRow, template: Optional[str], where: str) -> _Job:
    if item.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where}: chat ('messages') rows need a tokenizer with a chat template and this "
                             "model's has none; use {\"prompt\": ...} rows.")
        text = tokenizer.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = item.text if template is None else format_prompt(template, item.text)
        ids = tokenizer(text)["input_ids"]  # special tokens (BOS) added, as training and inference do
    if not ids:
        raise ValueError(f"{where}: the prompt encodes to no tokens; give a non-empty prompt.")
    return _Job(item, text, list(ids))


def _row(job: _Job, completion: str) -> dict:
    if job.prompt.messages is not None:
        return {"index": job.prompt.index,
                "messages": job.prompt.messages + [{"role": "assistant", "content": completion}]}
    return {"index": job.prompt.index, "prompt": job.text, "completion": completion}


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _candidate_texts(tokenizer: Any, prompt_ids: list[int], tokens: list[int]) -> list[str]:
    """The reply's text in context (SentencePiece drops a leading space of a first token), then alone."""
    out = []
    before, whole = _decode(tokenizer, prompt_ids), _decode(tokenizer, prompt_ids + tokens)
    if whole.startswith(before):
        out.append(whole[len(before):])
    alone = _decode(tokenizer, tokens)
    if alone not in out:
        out.append(alone)
    return out


def make_row(tokenizer: Any, job: _Job, gen: _Generated) -> tuple[dict, Optional[str]]:
    """``(row, why the trainer could not read it, or None)`` for one generation: the first
    exact text of the candidates (:func:`_candidate_texts`, then shorter cut-off replies),
    else the first candidate, flagged ``"exact": false``."""
    finish = "stop" if gen.stop is not None else "length"
    trims = range(min(MAX_TRIM, len(gen.tokens) - 1) + 1) if finish == "length" else range(1)
    first: Optional[tuple[dict, Optional[str]]] = None
    for trim in trims:
        tokens = gen.tokens[: len(gen.tokens) - trim]
        want = tokens + ([gen.stop] if gen.stop is not None else [])
        for text in _candidate_texts(tokenizer, job.ids, tokens):
            row = _row(job, text)
            try:
                p_ids, c_ids = training_ids(tokenizer, dict(row, finish_reason=finish))
            except ValueError as e:
                first = first or (row, f"untrainable: {e}")
                continue
            if "completion" in row and not text:
                first = first or (row, "empty completion")  # the trainer refuses those rows
                continue
            # A stopped reply may be followed by the template's own end-of-turn tokens; a cut one by nothing.
            if p_ids == job.ids and (c_ids[: len(want)] if finish == "stop" else c_ids) == want:
                return dict(row, finish_reason=finish, exact=True), None
            first = first or (row, None)
    row, reason = first
    return dict(row, finish_reason=finish, exact=False), reason


# ---------------------------------------------------------------------------------------------
# Backends: load -> (model, Hugging Face tokenizer, EOS ids, prompt template, context length),
# then generate -> finished generations, in any order.


@dataclasses.dataclass
class _Backend:
    model: Any
    tokenizer: Any  # the Hugging Face tokenizer, as the trainer loads it
    eos: list[int]
    template: Optional[str]
    max_positions: Optional[int]
    device: Any = None


def _load_mlx(model: Optional[PathLike], dtype: Optional[str]) -> _Backend:
    from .loading import load

    spec_model, wrapper = load(model, dtype=dtype)
    # mlx-lm's wrapper holds the Hugging Face tokenizer the trainer also uses; its own
    # apply_chat_template adds arguments the trainer's does not pass
    return _Backend(spec_model.base, wrapper._tokenizer, sorted(wrapper.eos_token_ids),
                    prompt_template(spec_model.config or {}), spec_model.max_positions)


def _generate_mlx(backend: _Backend, jobs: list[_Job], *, max_tokens: int, sampling: SamplingParams,
                  batch_size: int) -> Iterator[list[_Generated]]:
    from mlx_lm.generate import BatchGenerator

    from .sampling import make_sampler

    gen = BatchGenerator(backend.model, max_tokens=max_tokens, stop_tokens=[[t] for t in backend.eos],
                         sampler=make_sampler(sampling), completion_batch_size=batch_size,
                         prefill_batch_size=batch_size)
    try:
        uids = gen.insert([job.ids for job in jobs], [max_tokens] * len(jobs))
        index = {uid: job.prompt.index for uid, job in zip(uids, jobs)}
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            done = []
            for r in responses:
                if r.finish_reason == "stop":  # the stop token is not part of the reply
                    done.append(_Generated(index[r.uid], tokens.pop(r.uid), r.token))
                    continue
                tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    done.append(_Generated(index[r.uid], tokens.pop(r.uid), None))
            yield done
    finally:
        gen.close()


def _torch_device(device: str) -> Any:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: PyTorch sees no CUDA GPU here; use --device auto or cpu.")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: PyTorch has no MPS (Apple GPU) here; use --device auto or cpu.")
    return torch.device(device)


def _load_torch(model: Optional[PathLike], dtype: Optional[str], device: str) -> _Backend:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import resolve_model_path

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if (dtype or "float32") not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}.")
    dev = _torch_device(device)
    # a local directory (the bundled demo model by default) or a Hugging Face Hub id
    source = str(resolve_model_path(None) if model is None else model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtypes[dtype or "float32"]).to(dev).eval()
    eos = set()
    for ids in (hf.config.eos_token_id, getattr(hf.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        eos |= set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    template = prompt_template({TEMPLATE_KEY: getattr(hf.config, TEMPLATE_KEY, None)})
    return _Backend(hf, tokenizer, sorted(eos), template, getattr(hf.config, "max_position_embeddings", None), dev)


def _generate_torch(backend: _Backend, jobs: list[_Job], *, max_tokens: int, sampling: SamplingParams,
                    batch_size: int) -> Iterator[list[_Generated]]:
    import torch
    from transformers import GenerationConfig

    eos = backend.eos
    pad = backend.tokenizer.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    sample = {} if sampling.greedy else dict(temperature=sampling.temp, top_p=sampling.top_p, top_k=sampling.top_k,
                                             min_p=sampling.min_p or None)
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=not sampling.greedy, eos_token_id=eos or None,
                              pad_token_id=pad, **sample)
    # transformers fills what `config` leaves unset from the checkpoint's generation_config.json
    # (repetition penalty, default sampling); the MLX runtime ignores that file, so do we
    backend.model.generation_config = GenerationConfig(eos_token_id=eos or None, pad_token_id=pad)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start: start + batch_size]
        width = max(len(j.ids) for j in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, job in enumerate(chunk):  # left padding: every reply starts at column `width`
            ids[b, width - len(job.ids):] = torch.tensor(job.ids)
            mask[b, width - len(job.ids):] = 1
        with torch.no_grad():
            out = backend.model.generate(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device),
                                         generation_config=config)
        done = []
        for job, new in zip(chunk, out[:, width:].tolist()):
            stop = next((i for i, t in enumerate(new) if t in eos), None)
            if stop is None:
                done.append(_Generated(job.prompt.index, new[:max_tokens], None))
            else:
                done.append(_Generated(job.prompt.index, new[:stop], new[stop]))
        yield done


# ---------------------------------------------------------------------------------------------
# Output files


def _read_rows(path: Path) -> list[dict]:
    """The rows of an output file; a partly written last line (an interrupted write) is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    rows = []
    for n, line in enumerate(data[:end].decode("utf-8").split("\n")[:-1], start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}); it is not a distill output. "
                             "Pass --overwrite to replace it or choose another --output.") from None
        if not isinstance(row, dict) or not isinstance(row.get("index"), int):
            raise ValueError(f"{path} line {n}: no 'index' field; it is not a distill output. "
                             "Pass --overwrite to replace it or choose another --output.")
        rows.append(row)
    if end < len(data):  # cut only once the rest shows the file is a distill output
        if not data[end:].startswith(b'{"index": '):  # how every row begins
            raise ValueError(f"{path} ends in a line that is not a distill row; pass --overwrite to replace it or "
                             "choose another --output.")
        warnings.warn(f"{path}: dropping a partly written last line (an interrupted run); its prompt is "
                      "generated again.", stacklevel=3)
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return rows


def _done_rows(output: Path, rejected: Path, prompts: list[PromptRow]) -> dict[int, dict]:
    """The rows already written to the output and the rejects file, by prompt index."""
    done: dict[int, dict] = {}
    for path in (output, rejected):
        for row in _read_rows(path):
            i = row["index"]
            if not 0 <= i < len(prompts):
                raise ValueError(f"{path} has a row for prompt index {i} but the prompts file has {len(prompts)} "
                                 "prompts; it was written from other prompts. Pass --overwrite or choose another "
                                 "--output.")
            if i in done:
                raise ValueError(f"{path} repeats the row of prompt index {i}; it is not one distill output. "
                                 "Pass --overwrite or choose another --output.")
            done[i] = row
    return done


def _check_matches(done: dict[int, dict], jobs: dict[int, _Job], output: Path) -> None:
    """Resuming on another prompts file (or template) would mix two data sets: refuse."""
    for i, row in done.items():
        job = jobs[i]
        same = (row.get("messages", [None])[:-1] == job.prompt.messages if job.prompt.messages is not None
                else row.get("prompt") == job.text)
        if not same:
            raise ValueError(f"{output}: the row of prompt index {i} was generated from another prompt than "
                             f"line {job.prompt.line} of the prompts file. Pass --overwrite to start again or "
                             "choose another --output.")


class _Appender:
    """Appends complete lines to a file: one write, flush and fsync per call."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def write(self, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not text:
            return
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(text)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Progress:
    """``distill: rows done/total, tokens/s`` on stderr, at most once a second (and at the end)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = self.last = time.perf_counter()

    def show(self, done: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < 1.0):
            return
        self.last = now
        rate = tokens / (now - self.start) if now > self.start else 0.0
        print(f"distill: {done}/{self.total} rows, {rate:.1f} tokens/s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------


def distill(
    model: Optional[PathLike],
    prompts: PathLike,
    output: PathLike,
    *,
    backend: str = "mlx",
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: Optional[str] = None,
    raw: bool = False,
    exact_only: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> DistillResult:
    """Write the ``model``'s replies to every prompt of ``prompts`` to ``output`` (see the module docstring).

    ``model``: a model directory (None: the bundled demo model; with ``backend="torch"`` also a
    Hugging Face Hub id). Generation stops at an EOS token or after ``max_tokens`` tokens;
    greedy unless ``temp`` > 0 (``top_p``, ``top_k``, ``min_p``, ``seed`` as in
    :func:`mlx_specstream.stream_generate`). ``batch_size`` prompts generate together.
    ``device`` (auto, cuda, mps, cpu) is for PyTorch; ``dtype`` (float32, float16, bfloat16)
    casts the model (default: MLX keeps the stored dtype, PyTorch uses float32). ``raw``: do
    not apply the model's ``prompt_template`` to plain prompts. ``exact_only``: move inexact
    rows to the rejects file. An existing output is resumed; one that holds every prompt
    is refused unless ``overwrite``, which starts again. ``progress``: report on stderr.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}.")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    sampling = SamplingParams(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    sampling.validate()
    items = read_prompts(prompts)
    output = Path(output)
    rejected_path = rejected_path_for(output)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"Folder {output.parent} does not exist; create it or write {output.name} elsewhere.")
    done = {} if overwrite else _done_rows(output, rejected_path, items)
    if len(done) == len(items):
        raise FileExistsError(f"{output} already holds the rows of all {len(items)} prompts; pass --overwrite "
                              "(overwrite=True) to generate them again, or choose another --output.")

    loaded = _load_torch(model, dtype, device) if backend == "torch" else _load_mlx(model, dtype)
    template = None if raw else loaded.template
    jobs = {}
    for item in items:
        where = f"{prompts} line {item.line}"
        job = jobs[item.index] = _make_job(loaded.tokenizer, item, template, where)
        if loaded.max_positions and len(job.ids) + max_tokens > loaded.max_positions:
            raise ValueError(f"{where}: the prompt's {len(job.ids)} tokens + max_tokens {max_tokens} exceed the "
                             f"model's context of {loaded.max_positions}; lower --max-tokens or shorten the prompt.")
    _check_matches(done, jobs, output)

    pending = [jobs[i] for i in sorted(set(jobs) - set(done))]
    if seed is not None:
        _seed(backend, seed)
    generate = _generate_torch if backend == "torch" else _generate_mlx
    result = DistillResult(output, rejected_path, len(items), len(done), 0, 0, 0, 0, 0, 0.0)
    if overwrite:
        rejected_path.unlink(missing_ok=True)
        output.write_bytes(b"")
    output.touch()  # the output exists from the start: an interrupted run is resumed, not refused
    writer = _OrderedWriter([job.prompt.index for job in pending], output, rejected_path)
    bar = _Progress(len(items), progress)
    start = time.perf_counter()
    try:
        for finished in generate(loaded, pending, max_tokens=max_tokens, sampling=sampling, batch_size=batch_size):
            for gen in finished:
                row, reason = make_row(loaded.tokenizer, jobs[gen.index], gen)
                if reason is None and exact_only and not row["exact"]:
                    reason = "inexact"
                writer.add(gen, row, reason)
            writer.flush(result)
            bar.show(result.resumed + result.written + result.rejected, result.tokens)
    finally:
        writer.close()
        result.seconds = time.perf_counter() - start
    bar.show(result.resumed + result.written + result.rejected, result.tokens, final=True)
    return result


class _OrderedWriter:
    """Writes rows in prompt order, whatever order they finish in, so a resumed file equals an
    uninterrupted one: trainable rows to the output, the others to the rejects file."""

    def __init__(self, order: list[int], output: Path, rejected: Path):
        self.order, self.next = order, 0
        self.ready: dict[int, tuple[dict, Optional[str]]] = {}
        self.out, self.rej = _Appender(output), _Appender(rejected)
        self.tokens = 0

    def add(self, gen: _Generated, row: dict, reason: Optional[str]) -> None:
        if reason is not None:
            row = dict(row, reason=reason, token_ids=gen.tokens, stop_token=gen.stop)
        self.ready[gen.index] = (row, reason)
        self.tokens += len(gen.tokens) + (gen.stop is not None)

    def flush(self, result: DistillResult) -> None:
        """Write the rows ready in order; count them into ``result``."""
        keep, drop = [], []
        while self.next < len(self.order) and self.order[self.next] in self.ready:
            row, reason = self.ready.pop(self.order[self.next])
            (drop if reason is not None else keep).append(row)
            result.inexact += not row["exact"] and reason in (None, "inexact")
            result.truncated += row["finish_reason"] == "length"
            self.next += 1
        self.out.write(keep)
        self.rej.write(drop)
        result.written += len(keep)
        result.rejected += len(drop)
        result.tokens = self.tokens

    def close(self) -> None:
        self.out.close()
        self.rej.close()


def _seed(backend: str, seed: int) -> None:
    if backend == "torch":
        import torch

        torch.manual_seed(seed)
    else:
        import mlx.core as mx

        mx.random.seed(seed)
