"""The one error care-export reports: one line, no identifying value."""

from __future__ import annotations


class ExportError(ValueError):
    """A converted folder or an output place care-export cannot use; the message is one line for the user."""
