"""Bad values in error messages: repeated whole when short, cut with their length when long.

A status message travels in a gRPC trailer, which clients limit to 8-16 KiB,
and rejections are logged, so a long bad value must not be repeated whole.
Only the standard library is imported here, so the in-process tokenizer can use it.
"""

from __future__ import annotations

from typing import Any

# Characters of a bad value's repr that an error message repeats; the rest is cut.
MAX_VALUE_CHARS = 64


def shorten_value(value: Any) -> str:
    """Return repr(value), cut to MAX_VALUE_CHARS with the value's length added when longer."""
    text = repr(value)
    if len(text) <= MAX_VALUE_CHARS:
        return text
    length = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:MAX_VALUE_CHARS]}...{length}"
