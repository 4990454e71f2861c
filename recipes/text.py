"""How much of a user's text a message, a table or a report shows.

A value can be as long as its field allows (a 10,000-character prompt) or, in a file that failed to load,
longer still. Shown whole, it buries the message that names it, and Rich folding megabytes of text into a
table cell spun for over ten minutes in ``wanctl recipe``. Every place that shows user-given text clips it
here: the head, an ellipsis and how long the whole is.
"""

from __future__ import annotations

SHOWN_CHARS = 300
"""The most characters of one value shown: a long path or two lines of a prompt, enough to recognise it."""


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text``, or its first ``limit`` characters, an ellipsis and its full length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def clip_repr(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` clipped like ``clip``; a long string is cut before repr() copies it whole."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value):,} characters)"
    return clip(repr(value), limit)
