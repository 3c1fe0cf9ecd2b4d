"""The one exception type of the converter: what went wrong and what to do about it."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint could not be converted. The message names the files/tensors and a fix."""


def name_list(names, limit: int = 20) -> str:
    """``['a', 'b', ...]`` capped at ``limit`` entries, with the count of the rest."""
    names = list(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown
