"""What a source builder returns: its candidate queries and what the manifest records about it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.storage import file_sha256


@dataclass
class SourceResult:
    """One source's candidate queries (query -> count, (count, pmi), views or None), the report and
    input records the manifest keeps, and warnings (a source skipped, an input not used)."""

    name: str
    entries: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def input_record(path: str | os.PathLike) -> dict:
    """``{"path", "bytes", "sha256"}`` of an input file, for the manifest."""
    p = Path(path)
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
