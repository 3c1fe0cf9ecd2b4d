"""Prompt templates recorded in a model directory, so raw task inputs are formatted as in training."""

from __future__ import annotations

from typing import Any, Optional

TEMPLATE_KEY = "prompt_template"  # top-level key of config.json: a str.format string with {input}


def prompt_template(config: dict[str, Any]) -> Optional[str]:
    template = config.get(TEMPLATE_KEY)
    if template is not None and "{input}" not in template:
        raise ValueError(f"config.json's {TEMPLATE_KEY!r} must contain '{{input}}', got {template!r}.")
    return template


def format_prompt(model, text: str) -> str:
    """Wrap ``text`` in the model's template; unchanged when the model has none."""
    template = prompt_template(getattr(model, "config", None) or {})
    return text if template is None else template.replace("{input}", text)
