"""The query list's output: ``queries.parquet``, its manifest, the up-to-date check and the summary.

``queries_manifest.json`` is written last: its presence marks a complete output. A rerun reuses the
output only when it was built from the same queries config and the same input bytes.
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa

from infra.config import RESOLVED_CONFIG_NAME
from infra.storage import ObjectStore
from tasks.queries.dump_counts import DumpCounts
from tasks.queries.source import SourceResult, input_record

QUERIES_KEY = "queries.parquet"
MANIFEST_KEY = "queries_manifest.json"


def query_manifest(*, queries_config: dict, report: dict, results: Sequence[SourceResult],
                   dump_counts: DumpCounts | None, dump_paths: Sequence[str], seconds: dict[str, float]) -> dict:
    """The manifest: config, per-source counts and reports, the budget, every input's sha256, warnings."""
    warnings = [w for r in results for w in r.warnings]
    inputs = [i for r in results for i in r.inputs]
    if dump_counts is not None:
        inputs = [input_record(p) for p in dump_paths] + inputs
        if dump_counts.failed_blocks:
            warnings.append(f"dump blocks failed (not counted): {sorted(dump_counts.failed_blocks)}")
    return {
        "schema_version": report["schema_version"],
        "config": queries_config,
        "total": report["total"],
        "per_source": {s: v["selected"] for s, v in report["sources"].items()},
        "budget": {k: report[k] for k in ("max_queries", "priority")} | {"sources": report["sources"]},
        "sources": {r.name: r.report for r in results},
        "dump_counts": None if dump_counts is None else {"total_tokens": dump_counts.total_tokens,
                                                         "stats": dump_counts.stats,
                                                         "failed_blocks": dump_counts.failed_blocks},
        "inputs": inputs,
        "warnings": warnings,
        "seconds": seconds,
    }


def existing_output(store: ObjectStore, queries_config: dict) -> str | None:
    """The URI of ``queries.parquet`` under ``store`` if it was built from ``queries_config`` and
    inputs whose bytes have not changed since; else None."""
    if not (store.exists(MANIFEST_KEY) and store.exists(QUERIES_KEY)):
        return None
    try:
        manifest = store.read_json(MANIFEST_KEY)
        if manifest.get("config") != queries_config:
            return None
        for rec in manifest.get("inputs", []):
            if "bytes" in rec and input_record(rec["path"])["sha256"] != rec["sha256"]:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return store.uri(QUERIES_KEY)


def write_query_list(store: ObjectStore, table: pa.Table, manifest: dict[str, Any], resolved_config: str) -> str:
    """Write the table, the resolved config and (last) the manifest; returns the table's URI."""
    store.write_parquet(QUERIES_KEY, table)
    store.write_text(RESOLVED_CONFIG_NAME, resolved_config)
    store.write_json(MANIFEST_KEY, manifest)  # last: its presence marks a complete output
    return store.uri(QUERIES_KEY)


def summary_lines(manifest: dict, uri: str, wall_s: float) -> list[str]:
    """The per-source counts, warnings and total that ``witflow queries`` prints."""
    lines = [f"queries: warning: {w}" for w in manifest["warnings"]]
    for s, v in manifest["budget"]["sources"].items():
        lines.append(f"queries: {s:8s} {v['selected']:>8,d} selected  ({v['candidates']:,} candidates, "
                     f"{v['already_in_list']:,} already in the list, {v['cut_by_budget']:,} cut by the budget)")
    lines.append(f"queries: total {manifest['total']:,} -> {uri}  (wall {wall_s:.1f}s)")
    return lines
