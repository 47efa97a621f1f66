"""The root of medtl's exceptions.

``models/`` is the lowest layer (``tasks -> pipeline -> models``), so the base class every medtl error
derives from lives here and ``pipeline.errors`` re-exports it; ``models/`` never imports ``pipeline``.
"""

from __future__ import annotations

__all__ = ["MedtlError", "WeightsError"]


class MedtlError(Exception):
    """Base class of every error medtl raises on purpose.

    Args:
        message: Names the file or field, the value and what was expected.
        code: Short stable machine-readable code (``"weights_missing"``, ``"truncated"``, ...), set where
            the error is raised and kept when the error is pickled into another process.
    """

    default_code = "error"

    def __init__(self, message: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code

    def __reduce__(self):
        # Exceptions pickle as ``cls(*args)``: pass the code too, so it survives worker processes.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls, args, state):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class WeightsError(MedtlError):
    """Pretrained weights are missing, corrupt (sha256 mismatch) or do not fit the network."""

    default_code = "weights"
