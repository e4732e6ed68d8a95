"""Drop accounting shared by every stage: rows in, each drop reason, rows out.

A filter is a function ``caption -> None | reason`` (or a vectorised mask + reasons); the funnel
counts ``dropped[reason]`` and can keep the dropped rows aside for inspection, as datatrove does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pyarrow as pa

from infra.schema import STATS_SCHEMA


@dataclass
class StageStats:
    stage: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "in": self.rows_in, "out": self.rows_out,
                "dropped": dict(sorted(self.dropped.items(), key=lambda kv: -kv[1]))}


class Funnel:
    """Per-stage counts; mergeable across shards and workers (``merge``), JSON-serialisable."""

    def __init__(self) -> None:
        self.stages: dict[str, StageStats] = {}

    def stage(self, name: str) -> StageStats:
        if name not in self.stages:
            self.stages[name] = StageStats(name)
        return self.stages[name]

    def record(self, stage: str, rows_in: int, rows_out: int, reasons: Iterable[str] = ()) -> None:
        s = self.stage(stage)
        s.rows_in += rows_in
        s.rows_out += rows_out
        s.dropped.update(r for r in reasons if r)

    def apply(self, stage: str, table: pa.Table, reasons: Sequence[str | None]) -> pa.Table:
        """Keep the rows whose reason is None; count the rest by reason."""
        if len(reasons) != table.num_rows:
            raise ValueError(f"{stage}: {len(reasons)} reasons for {table.num_rows} rows")
        keep = pa.array([r is None for r in reasons], pa.bool_())
        out = table.filter(keep)
        self.record(stage, table.num_rows, out.num_rows, (r for r in reasons if r is not None))
        return out

    def apply_mask(self, stage: str, table: pa.Table, keep: pa.Array, reason: str) -> pa.Table:
        """Vectorised form: one reason for every row where ``keep`` is false."""
        out = table.filter(keep)
        s = self.stage(stage)
        s.rows_in += table.num_rows
        s.rows_out += out.num_rows
        dropped = table.num_rows - out.num_rows
        if dropped:
            s.dropped[reason] += dropped
        return out

    def merge(self, other: "Funnel") -> "Funnel":
        for name, s in other.stages.items():
            mine = self.stage(name)
            mine.rows_in += s.rows_in
            mine.rows_out += s.rows_out
            mine.dropped.update(s.dropped)
        return self

    def to_dict(self) -> dict:
        return {"stages": [s.to_dict() for s in self.stages.values()]}

    def to_table(self) -> pa.Table:
        """One row per (stage, reason) — ``in``, ``out`` and each drop reason (infra.schema.STATS_SCHEMA)."""
        rows = [(s.stage, reason, n) for s in self.stages.values()
                for reason, n in [("in", s.rows_in), *sorted(s.dropped.items()), ("out", s.rows_out)]]
        return pa.table({"stage": [r[0] for r in rows], "reason": [r[1] for r in rows],
                         "count": pa.array([r[2] for r in rows], pa.int64())}, schema=STATS_SCHEMA)

    @classmethod
    def from_dict(cls, data: dict) -> "Funnel":
        f = cls()
        for s in data.get("stages", []):
            st = f.stage(s["stage"])
            st.rows_in, st.rows_out = int(s["in"]), int(s["out"])
            st.dropped.update({k: int(v) for k, v in s.get("dropped", {}).items()})
        return f

    def to_markdown(self) -> str:
        lines = ["| stage | in | dropped (reason: count) | out |", "|---|---:|---|---:|"]
        for s in self.stages.values():
            drops = ", ".join(f"{k}: {v}" for k, v in sorted(s.dropped.items(), key=lambda kv: -kv[1])) or "—"
            lines.append(f"| {s.stage} | {s.rows_in} | {drops} | {s.rows_out} |")
        return "\n".join(lines)

