"""The one stage protocol (datatrove's shape): a step takes a table and returns a :class:`StepOutput`.

``table`` holds the rows the step kept, ``funnel`` counts rows in, out and every drop by reason,
and ``side`` names the step's side outputs (fetch failures, eval-set matches, ...), which the
build runner writes to the work directory under the same names. A new stage needs no new glue:
:func:`run_steps` chains any steps and merges what they return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyarrow as pa

from infra.funnel import Funnel


@dataclass
class StepOutput:
    table: pa.Table
    funnel: Funnel = field(default_factory=Funnel)
    side: dict[str, pa.Table] = field(default_factory=dict)


Step = Callable[[pa.Table], StepOutput]


def run_steps(table: pa.Table, steps: Sequence[Step], funnel: Funnel | None = None) -> StepOutput:
    """Apply ``steps`` in order; funnels merged into ``funnel`` (or a new one), side outputs of the
    same name concatenated."""
    funnel = funnel if funnel is not None else Funnel()
    side: dict[str, pa.Table] = {}
    for step in steps:
        out = step(table)
        table = out.table
        funnel.merge(out.funnel)
        for name, rows in out.side.items():
            side[name] = pa.concat_tables([side[name], rows], promote_options="default") if name in side else rows
    return StepOutput(table, funnel, side)
