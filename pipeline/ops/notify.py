"""End-of-run notification: a command and/or a webhook receive the run summary as JSON.

A hook that fails (non-zero exit, timeout, unreachable URL, HTTP error) is logged as a warning and reported
in the return value; it never changes the run's exit status. The summary holds aggregates only (status,
promotion decision, headline metrics, stage digests): no identifiers, paths of source data or free text.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import tempfile
import urllib.error
import urllib.request
from typing import Any

from pipeline.config import NotifyConfig

log = logging.getLogger(__name__)


def notify(cfg: NotifyConfig, summary: dict[str, Any]) -> list[str]:
    """Call the configured hooks with ``summary``.

    Returns:
        Warnings, one per failed hook (empty when every hook succeeded or none is configured).
    """
    payload = json.dumps(summary, sort_keys=True, default=str).encode("utf-8")
    warnings = []
    if cfg.command:
        argv = shlex.split(cfg.command) if isinstance(cfg.command, str) else list(cfg.command)
        with tempfile.NamedTemporaryFile("wb", suffix=".json", prefix="medtl-summary-", delete=False) as fh:
            fh.write(payload)
        try:
            proc = subprocess.run(
                argv,
                input=payload,
                capture_output=True,
                timeout=cfg.timeout_s,
                check=False,
                env={**os.environ, "MEDTL_SUMMARY": fh.name, "MEDTL_STATUS": str(summary.get("status", ""))},
            )
            if proc.returncode != 0:
                warnings.append(
                    f"notify.command {argv[0]!r} exited with status {proc.returncode}: "
                    f"{proc.stderr.decode(errors='replace').strip()[:200]}"
                )
        except (OSError, subprocess.TimeoutExpired) as err:
            warnings.append(f"notify.command {argv[0]!r} could not run: {err}")
        finally:
            os.unlink(fh.name)
    if cfg.webhook:
        req = urllib.request.Request(
            cfg.webhook,
            data=payload,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "medtl"},
        )
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:  # noqa: S310 (URL from the config)
                if resp.status >= 300:
                    warnings.append(f"notify.webhook answered HTTP {resp.status}")
        except (urllib.error.URLError, OSError, ValueError) as err:
            warnings.append(f"notify.webhook {_redact_url(cfg.webhook)} failed: {err}")
    for w in warnings:
        log.warning("Notification failed (the run's status is unchanged): %s", w)
    return warnings


def _redact_url(url: str) -> str:
    """Scheme, host and port only: webhook paths and queries often carry tokens."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}/..."
