"""File and record helpers shared by the rooms: content hashes and timestamps."""
from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in blocks (hashlib.file_digest): the content id of a knowledge base's
    files and the check of a model pack's downloads."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def now_iso() -> str:
    """The current UTC time as ISO 8601 to the second, e.g. 2026-12-02T05:40:00+00:00 (manifests, job records)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
