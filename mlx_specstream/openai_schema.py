"""The OpenAI request schema this server accepts: validation of request bodies and the usage block.

Pure functions, no HTTP: :func:`parse_request` turns a JSON body into a :class:`CompletionRequest`
or raises :class:`RequestError` carrying the HTTP status (400 malformed or unknown model,
422 wrong type or out of range) and an OpenAI-style error body.

Extensions to the OpenAI schema: ``top_k``, ``min_p``, ``tree`` (draft tree spec) and
``speculate`` (false: plain autoregressive decoding; absent: the model's default). ``usage`` adds ``tokens_per_step``,
``decode_steps`` and ``decode_tokens_per_sec``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024


class RequestError(Exception):
    """Bad input: becomes an OpenAI-style JSON error with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# Request validation (pure functions: body dict in, generation request out)


@dataclasses.dataclass
class CompletionRequest:
    chat: bool
    prompt: Any  # str | list[int] | list[dict]: what encode_fn takes
    stream: bool
    include_usage: bool
    params: dict[str, Any]  # keyword arguments for generate_fn (max_tokens, temp, ...)
    max_tokens_given: bool


def _field(body: dict, name: str, kinds: tuple, default: Any = None, nullable: bool = True) -> Any:
    value = body.get(name, default)
    if value is None and nullable:
        return default
    if isinstance(value, bool) and bool not in kinds:  # bool is an int in Python: refuse it
        raise RequestError(422, f"'{name}' must be {_kind_names(kinds)}, got a boolean.", name, "invalid_type")
    if not isinstance(value, kinds):
        raise RequestError(
            422, f"'{name}' must be {_kind_names(kinds)}, got {type(value).__name__}.", name, "invalid_type"
        )
    return value


def _kind_names(kinds: tuple) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = float(_field(body, name, (int, float), default))
    if value != value or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(422, f"'{name}' must be in {bracket}{low}, {high}], got {value}.", name, "out_of_range")
    return value


def _unsupported(body: dict, name: str, allowed: tuple, what: str) -> None:
    if name in body and body[name] not in allowed:
        raise RequestError(422, f"'{name}' is not supported by this server ({what}).", name, "unsupported")


def _text_content(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(422, f"'{param}' parts must be {{'type': 'text', 'text': str}}; "
                                   "only text content is supported.", param, "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(422, f"'{param}' must be a string or a list of text parts.", param, "invalid_type")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, "'messages' must be a non-empty array of {role, content} objects.", "messages",
                           "invalid_type")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(422, f"'messages' has {len(messages)} entries; at most {MAX_MESSAGES}.", "messages",
                           "too_long")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(422, f"'messages[{i}]' must be an object.", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(422, f"'messages[{i}].role' must be one of {', '.join(ROLES)}; got {role!r}.",
                               f"messages[{i}].role", "invalid_value")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append({"role": "system" if role == "developer" else role, "content": _text_content(content, i)})
    return out


def _prompt(body: dict, vocab_size: Optional[int]) -> Any:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError(422, "'prompt' must not be empty.", "prompt", "invalid_value")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if vocab_size is not None and any(t < 0 or t >= vocab_size for t in prompt):
            raise RequestError(422, f"'prompt' token ids must be in [0, {vocab_size}).", "prompt", "out_of_range")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError(422, "'prompt' must be one string or one array of token ids; batches are not supported.",
                           "prompt", "unsupported")
    raise RequestError(422, "'prompt' must be a non-empty string or a non-empty array of token ids.", "prompt",
                       "invalid_type")


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def parse_request(
    body: Any, chat: bool, model_id: str, default_max_tokens: int, max_tokens_limit: int,
    vocab_size: Optional[int] = None,
) -> CompletionRequest:
    """Validate an OpenAI request body; raise :class:`RequestError` on anything wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.", None, "invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(422, "'model' must be a string.", "model", "invalid_type")
    if model not in (None, model_id):
        raise RequestError(400, f"The model {model!r} does not exist on this server; it serves {model_id!r}.",
                           "model", "model_not_found")
    prompt = _messages(body) if chat else _prompt(body, vocab_size)

    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, name, (int,), None)
    if max_tokens is not None and not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(422, f"'{name}' must be in [1, {max_tokens_limit}], got {max_tokens}.", name,
                           "out_of_range")

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if (not isinstance(stop, list) or len(stop) > MAX_STOP
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
            raise RequestError(422, f"'stop' must be a string or an array of at most {MAX_STOP} non-empty strings "
                               f"of at most {MAX_STOP_CHARS} characters.", "stop", "invalid_value")

    seed = _field(body, "seed", (int,), None)
    top_k = _field(body, "top_k", (int,), 0)
    if top_k < 0:
        raise RequestError(422, f"'top_k' must be >= 0, got {top_k}.", "top_k", "out_of_range")
    tree = body.get("tree")
    if tree is not None and not (isinstance(tree, str) or _int_list(tree) or (
            isinstance(tree, list) and all(_int_list(p) for p in tree))):
        raise RequestError(422, "'tree' must be a string like '4,2,1', an array of per-depth top-k, or an array "
                           "of paths (arrays of integers).", "tree", "invalid_type")

    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), {}) or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError(422, "'stream_options.include_usage' must be a boolean.", "stream_options", "invalid_type")

    _unsupported(body, "n", (None, 1), "n must be 1")
    _unsupported(body, "best_of", (None, 1), "best_of must be 1")
    _unsupported(body, "echo", (None, False), "echo must be false")
    _unsupported(body, "suffix", (None, ""), "no suffix")
    _unsupported(body, "logprobs", (None, False, 0), "no logprobs")
    _unsupported(body, "top_logprobs", (None, 0), "no logprobs")
    _unsupported(body, "tools", (None, []), "no tool calls")
    _unsupported(body, "functions", (None, []), "no function calls")
    for penalty in ("presence_penalty", "frequency_penalty"):
        _number(body, penalty, 0.0, -2.0, 2.0)
        _unsupported(body, penalty, (None, 0, 0.0), f"{penalty} must be 0")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(422, "'response_format' is not supported by this server (only {'type': 'text'}).",
                           "response_format", "unsupported")

    params = dict(
        max_tokens=max_tokens if max_tokens is not None else min(default_max_tokens, max_tokens_limit),
        temp=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=top_k,
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=seed,
        stop=stop,
        tree=tree,
        speculate=_field(body, "speculate", (bool,), None),  # None: the model's default
    )
    return CompletionRequest(chat, prompt, stream, include_usage, params, max_tokens is not None)


def usage(last: Any) -> dict[str, Any]:
    completion = int(getattr(last, "generation_tokens", 0)) if last is not None else 0
    prompt = int(getattr(last, "prompt_tokens", 0)) if last is not None else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "tokens_per_step": round(float(getattr(last, "tokens_per_step", 0.0)), 4) if last is not None else 0.0,
        "decode_steps": int(getattr(last, "decode_steps", 0)) if last is not None else 0,
        "decode_tokens_per_sec": round(float(getattr(last, "decode_tokens_per_sec", 0.0)), 2)
        if last is not None else 0.0,
    }
