"""Exceptions shared by every stage.

Every message names what was wrong (the file, field or argument), the bad value and what was expected,
so an operator can fix the input without reading code.
"""

from __future__ import annotations


class MedtlError(Exception):
    """Base class of every error medtl raises on purpose."""


class ConfigError(MedtlError):
    """A configuration file or value is invalid."""


class IngestError(MedtlError):
    """One input (file, series or label row) cannot be ingested.

    Args:
        reason: Human-readable reason naming the field, the value and what was expected.
        code: Short stable machine-readable code (e.g. ``"truncated"``, ``"no_pixel_data"``) used to
            tabulate reasons in the ingestion report.
    """

    def __init__(self, reason: str, code: str = "unreadable") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class WeightsError(MedtlError):
    """Pretrained weights are missing, corrupt (sha256 mismatch) or do not fit the network."""
