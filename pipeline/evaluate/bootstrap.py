"""Transitional alias of :mod:`pipeline.stats.bootstrap` (the bootstrap moved to the base layer so training
can use it); import from ``pipeline.stats.bootstrap``."""

from pipeline.stats.bootstrap import *  # noqa: F401,F403
from pipeline.stats.bootstrap import __all__  # noqa: F401
