"""Per-case notes of care-anonymize: what it worked around, in fixed words, never a value from the files.

pydicom warns about what it reads and writes (some warnings quote UIDs, names or other header values).
care-anonymize records them instead of letting them reach the terminal, and `warning_note` turns each into one
of the fixed sentences below; a tag number or a VR may be named, a value never. Warnings that say nothing a
user could act on (deprecations inside the library) are dropped. `--debug` shows the raw messages on stderr.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator

_TAG = r"\(([0-9A-Fa-f]{4}), ?([0-9A-Fa-f]{4})\)"
_VR = r"\b([A-Z]{2})\b"

# (pattern on the warning's message, note); a note may use the pattern's groups {0}, {1}, ... which the
# patterns only give for tag numbers and VRs
_NOTES: tuple[tuple[str, str], ...] = (
    (r"Invalid value for VR " + _VR, "a value not valid for its VR {0} was read as it is"),
    (r"value length \(\d+\) exceeds the maximum length of \d+ allowed for VR " + _VR,
     "a value longer than its VR {0} allows was read as it is"),
    (r"Expected (explicit|implicit) VR, but found (explicit|implicit) VR",
     "a data set was encoded in {1} VR while its transfer syntax says {0} VR: read as {1} VR"),
    (r"VR lookup failed for the raw element with tag " + _TAG,
     "element ({0},{1}) is in no dictionary and was read without a VR (UN)"),
    (r"Unknown DICOM tag " + _TAG, "element ({0},{1}) is in no dictionary and was read without a VR (UN)"),
    (r"Unknown encoding|for Specific Character Set|cannot be used as code extension",
     "the Specific Character Set (0008,0005) is not one DICOM defines: text was read with the default "
     "character set"),
    (r"Failed to decode byte string|Failed to encode value|replacement characters",
     "text that its Specific Character Set cannot represent was read or written with replacement characters"),
    (r"doesn't allow a value of '60'", "a time with 60 seconds was read as 59 seconds"),
    (r"Deferred read warning", "a file changed while it was being read: rerun to copy what it holds now"),
    (r"exceeds the size of 64 kByte", "a value too long for an explicit VR transfer syntax was written"),
)
_DROPPED = ("will be removed in v4.0", "is deprecated", "deepcopy the buffer-like")


def warning_note(message: str, category: type[Warning] | None = None) -> str | None:
    """The fixed note for one library warning, None for one that is dropped (module docstring)."""
    if category is not None and issubclass(category, (DeprecationWarning, PendingDeprecationWarning)):
        return None
    if any(part in message for part in _DROPPED):
        return None
    for pattern, note in _NOTES:
        found = re.search(pattern, message)
        if found:
            return note.format(*found.groups())
    kind = category.__name__ if category is not None else "Warning"
    return f"pydicom warned of something it read ({kind}); rerun with --debug to see its message"


class CaseNotes:
    """Notes of one case, counted: `lines()` gives "note" or "note (N times)" in the order first seen."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, note: str | None, times: int = 1) -> None:
        if note:
            self._counts[note] += times

    def add_warning(self, message: str, category: type[Warning] | None = None) -> None:
        self.add(warning_note(message, category))

    def lines(self) -> list[str]:
        return [note if n == 1 else f"{note} ({n} times)" for note, n in self._counts.items()]


@contextlib.contextmanager
def quiet_library_loggers(debug: bool = False) -> Iterator[None]:
    """pydicom logs each warning it issues too, and nibabel logs what it fixes in a header through a handler of
    its own (some of it quotes header values): while raw files are read these loggers stay silent (unless --debug), even where a handler is
    configured."""
    loggers = [logging.getLogger(name) for name in ("pydicom", "nibabel", "nibabel.global")]
    before = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = not debug
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, before):
            logger.disabled = disabled
