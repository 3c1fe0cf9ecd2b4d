"""``specstream chat``: a multi-turn REPL with the model's chat template and streamed replies.

The conversation logic (:class:`ChatSession`) is separate from the terminal loop so it can be
tested alone; the loop itself is tested through a real pseudo-terminal (pexpect).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Iterator, Optional, TextIO

import typer

from mlx_specstream.cli.common import (
    MaxTokensOpt,
    MinPOpt,
    ModelOpt,
    SeedOpt,
    SpeculateOpt,
    StreamsOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    TreeOpt,
    context_length,
    fail,
    load_model,
)

HELP = """commands:
  /reset   forget the conversation (the system prompt stays)
  /stats   statistics of the last reply and of the session
  /help    this list
  /quit    leave (or Ctrl-D); Ctrl-C stops a reply"""


@dataclasses.dataclass
class Totals:
    replies: int = 0
    tokens: int = 0
    steps: int = 0
    decode_time: float = 0.0


class ChatSession:
    """A conversation: history, the chat template, and trimming to the context window.

    ``generate_fn(prompt_ids, **params)`` yields GenerationResponse-like objects
    (``mlx_specstream.stream_generate`` bound to a model and tokenizer).
    """

    def __init__(
        self,
        tokenizer: Any,
        generate_fn: Callable[..., Iterator[Any]],
        context: int,
        max_tokens: int,
        system: Optional[str] = None,
        template: Optional[str] = None,
        **params: Any,
    ):
        """``template``: the model's prompt template, used on the last user turn alone when the
        tokenizer has no chat template (a task model)."""
        if not getattr(tokenizer, "has_chat_template", True) and template is None:
            raise ValueError(
                "This model has neither a chat template nor a prompt template, so chat cannot format turns; "
                "use `specstream generate` instead, or add a chat_template to tokenizer_config.json."
            )
        if max_tokens >= context:
            raise ValueError(
                f"--max-tokens {max_tokens} leaves no room for the conversation in the model's "
                f"{context}-token context window; use a smaller --max-tokens."
            )
        self.tokenizer = tokenizer
        self.generate_fn = generate_fn
        self.context = context
        self.max_tokens = max_tokens
        self.system = system
        self.template = template
        self.params = params
        self.history: list[dict[str, str]] = []
        self.last: Any = None
        self.totals = Totals()

    def reset(self) -> None:
        self.history.clear()

    def messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + turns

    def encode(self, turns: list[dict[str, str]]) -> list[int]:
        from mlx_specstream.generate import encode_prompt

        return encode_prompt(self.tokenizer, self.messages(turns), self.template)

    def fit(self, user_text: str) -> tuple[list[int], int]:
        """Prompt ids for the history plus ``user_text``, dropping the oldest turns so that the
        prompt and a full reply fit the context window. Returns ``(ids, turns_dropped)``."""
        turns = self.history + [{"role": "user", "content": user_text}]
        budget = self.context - self.max_tokens
        dropped = 0
        ids = self.encode(turns)
        while len(ids) > budget and len(turns) > 1:
            # drop the oldest exchange (a user turn and the assistant reply after it)
            cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
            turns = turns[cut:]
            dropped += cut
            ids = self.encode(turns)
        if len(ids) > budget:
            raise ValueError(
                f"This message is {len(ids)} tokens with the template; at most {budget} fit beside "
                f"--max-tokens {self.max_tokens} in the {self.context}-token context. Shorten it."
            )
        self.history = turns[:-1]
        return ids, dropped

    def reply(self, user_text: str) -> Iterator[Any]:
        """Stream the reply to ``user_text``; history is updated as the reply ends (or stops)."""
        ids, _ = self.fit(user_text)
        self.history.append({"role": "user", "content": user_text})
        text = ""
        try:
            for resp in self.generate_fn(ids, max_tokens=self.max_tokens, **self.params):
                text += resp.text
                self.last = resp
                yield resp
        finally:
            # keep what was said, even when interrupted, so the conversation stays coherent
            self.history.append({"role": "assistant", "content": text})
            if self.last is not None:
                self.totals.replies += 1
                self.totals.tokens += self.last.generation_tokens
                self.totals.steps += self.last.decode_steps
                self.totals.decode_time += getattr(self.last, "decode_time", 0.0)

    def stats(self) -> str:
        if self.last is None:
            return "No replies yet."
        r, t = self.last, self.totals
        tps = (t.tokens - t.replies) / t.steps if t.steps else 0.0
        return (
            f"last reply: {r.generation_tokens} tokens, {r.decode_tokens_per_sec:.1f} tokens/s, "
            f"{r.tokens_per_step:.2f} tokens/step, prompt {r.prompt_tokens} tokens, "
            f"peak memory {r.peak_memory_gb:.3f} GB\n"
            f"session: {t.replies} replies, {t.tokens} tokens, {tps:.2f} tokens/step, "
            f"{len(self.history) // 2} exchanges in history"
        )


def run_repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The interactive loop: read a line, handle ``/commands``, stream the reply."""
    prompt = ">>> "
    if out.isatty():  # bold blue; \001 \002 tell readline the escape codes take no columns
        wrap = ("\001", "\002") if "readline" in sys.modules else ("", "")
        prompt = f"{wrap[0]}\033[1;34m{wrap[1]}>>> {wrap[0]}\033[0m{wrap[1]}"
    out.write("Chat with the model. /help for commands, /quit or Ctrl-D to leave.\n")
    while True:
        try:
            line = read(prompt)
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or /quit to leave)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/quit", "/exit", "/q"):
                return
            if command == "/reset":
                session.reset()
                out.write("Conversation cleared.\n")
            elif command == "/stats":
                out.write(session.stats() + "\n")
            elif command == "/help":
                out.write(HELP + "\n")
            else:
                out.write(f"Unknown command {command}. /help lists the commands.\n")
            continue
        _stream_reply(session, text, out)


def _stream_reply(session: ChatSession, text: str, out: TextIO) -> None:
    try:
        _, dropped = session.fit(text)
    except ValueError as exc:
        out.write(f"error: {exc}\n")
        return
    if dropped:
        out.write(f"(dropped the {dropped} oldest messages to fit the context window)\n")
    replies = session.reply(text)
    try:
        for resp in replies:
            out.write(resp.text)
            out.flush()
    except KeyboardInterrupt:
        replies.close()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()


def chat(
    model: ModelOpt = None,
    streams: StreamsOpt = None,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt for the whole conversation."),
    max_tokens: MaxTokensOpt = 512,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    tree: TreeOpt = None,
    speculate: SpeculateOpt = None,
) -> None:
    """Chat with a model in the terminal: the chat template, streamed replies, /reset and /stats.

    Example: specstream chat --model ./my-model --system "You are terse."
    """
    if not sys.stdin.isatty():
        fail("chat needs an interactive terminal; for piped input use `specstream generate --prompt -`.")
    from mlx_specstream import make_prompt_cache, stream_generate

    mdl, tokenizer = load_model(model, streams=streams)
    prompt_cache = make_prompt_cache(mdl)  # each turn prefills only what the last one did not

    def generate_fn(prompt_ids: list[int], **params: Any) -> Iterator[Any]:
        return stream_generate(mdl, tokenizer, prompt_ids, prompt_cache=prompt_cache, **params)

    from mlx_specstream.prompting import prompt_template

    session = ChatSession(
        tokenizer, generate_fn, context=context_length(mdl), max_tokens=max_tokens, system=system,
        template=prompt_template(getattr(mdl, "config", None) or {}),
        temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, tree=tree, speculate=speculate,
    )
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    run_repl(session)
