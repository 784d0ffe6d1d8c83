"""One line of an exception's text, for the one-line errors every command prints."""

from __future__ import annotations


def error_line(error: BaseException, last: bool = False) -> str:
    """The first non-empty line of `error`'s text (the last with ``last=True``: SimpleITK puts its reason there,
    after the C++ source location), or the exception's type name when the text is empty. A KeyError gives its
    key's text without the quotes ``str(KeyError)`` adds."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if last else lines[0]
