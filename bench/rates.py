"""The per-core rates the benches measured, kept in ``bench/rates.json`` for ``witflow plan``.

Each bench that measures a stage's throughput records it here (``record``); ``witflow plan``
(``infra/plan.py``) projects a build's hours and nodes from this file. An entry says what was
measured, on how many cores, when, and the machine's load average then.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RATES_FILE = Path(__file__).resolve().parent / "rates.json"


def record(name: str, value: float, unit: str, note: str, path: Path = RATES_FILE) -> None:
    """Set ``name`` to ``value`` (``unit``) in the rates file, keeping every other entry."""
    rates = json.loads(path.read_text()) if path.exists() else {}
    rates[name] = {"value": round(float(value), 3), "unit": unit, "note": note,
                   "measured": time.strftime("%Y-%m-%d"), "load": round(os.getloadavg()[0], 1),
                   "cpus": os.cpu_count()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rates, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
