"""Exceptions shared by every stage.

Every message names what was wrong (the file, field or argument), the bad value and what was expected,
so an operator can fix the input without reading code.
"""

from __future__ import annotations

from models.errors import MedtlError, WeightsError

__all__ = ["MedtlError", "ConfigError", "IngestError", "WeightsError"]


class ConfigError(MedtlError):
    """A configuration file or value is invalid."""

    default_code = "config"


class IngestError(MedtlError):
    """One input (file, series or label row) cannot be ingested.

    Args:
        reason: Human-readable reason naming the field, the value and what was expected.
        code: Short stable machine-readable code (e.g. ``"truncated"``, ``"no_pixel_data"``) used to
            tabulate reasons in the ingestion report.
    """

    default_code = "unreadable"

    def __init__(self, reason: str, code: str = "unreadable") -> None:
        super().__init__(reason, code)
        self.reason = reason
