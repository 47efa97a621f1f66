"""Pseudonyms and the workspace's secret key.

Cases are keyed by a pseudonym: a keyed HMAC-SHA256 of the raw identifier (normally DICOM PatientID
(0010,0020)). Without the key the pseudonym cannot be reversed or recomputed from a guessed PatientID.
The key comes from the config (``deid.key_env`` names an environment variable) or is created once in the
workspace's ``private/`` folder (mode 0600) with a warning; it is never written anywhere else.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.io import write_text

log = logging.getLogger(__name__)

KEY_FILE = "pseudonym.key"
PSEUDONYM_LEN = 16  # hex characters: 64 bits, collision-free for any realistic hospital export


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (mode 0700) if needed and return it; tighten its mode if it is looser."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def load_or_create_key(private_dir: str | os.PathLike[str], env_var: str | None = None) -> bytes:
    """Return the pseudonymisation key.

    Args:
        private_dir: The workspace's private folder; the key file lives there when no environment
            variable provides it.
        env_var: Name of an environment variable holding the key (at least 16 characters). When set in
            the config, the variable must exist.

    Returns:
        The key bytes.

    Raises:
        ConfigError: ``env_var`` is configured but unset or too short.
    """
    if env_var:
        value = os.environ.get(env_var)
        if value is None:
            raise ConfigError(
                f"deid.key_env: environment variable {env_var!r} is not set; expected it to hold the "
                "pseudonymisation key (at least 16 characters), or remove deid.key_env to use a key file "
                "in the workspace's private folder"
            )
        if len(value) < 16:
            raise ConfigError(
                f"deid.key_env: environment variable {env_var!r} holds {len(value)} characters; expected "
                "at least 16"
            )
        return value.encode("utf-8")
    private_dir = ensure_private_dir(private_dir)
    key_path = private_dir / KEY_FILE
    if key_path.exists():
        return key_path.read_bytes().strip()
    key = secrets.token_hex(32).encode("ascii")
    write_text(key_path, key.decode("ascii") + "\n", mode=0o600)
    log.warning(
        "Created a new pseudonymisation key in %s (mode 0600). Back it up: pseudonyms of future runs "
        "match earlier ones only with the same key.",
        key_path,
    )
    return key


def pseudonym(value: str, key: bytes, prefix: str = "P") -> str:
    """Return the pseudonym of a raw identifier: ``prefix`` + 16 hex characters of HMAC-SHA256.

    Args:
        value: Raw identifier (e.g. PatientID). Leading/trailing whitespace is ignored, as DICOM pads
            values with spaces.
        key: Secret key from :func:`load_or_create_key`.
        prefix: One letter telling what was hashed (``P`` patient, ``S`` study, ``C`` case).
    """
    digest = hmac.new(key, value.strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:PSEUDONYM_LEN]}"


def key_fingerprint(key: bytes) -> str:
    """A short, non-reversible fingerprint of the key, safe to hash into stage folder names."""
    return hmac.new(key, b"medtl-key-fingerprint", hashlib.sha256).hexdigest()[:12]
