"""What a build of N candidate pairs costs: hours and nodes, projected from measured per-core rates.

The benches measure each stage's throughput per core on this machine and record it in
``bench/rates.json`` (``bench/rates.py``): the text stage (filters + English + query match, per
candidate), fetch + validate + resize + hashes + encode (per fetched image), the global stages
(counts, caps, within-dataset dedup, hold-out, output plan, per row that reaches them) and the shard
writer (per MB written). A build's cost follows its funnel: every candidate goes through the text
stage; only the pairs that survive it and balancing are fetched; only fetched images reach the
global stages and the shards. Fetching is bound by whichever is slowest of the CPUs, the nodes'
bandwidth and the connections in flight (each waits a round trip); the other stages by CPU.

The projection assumes the rates scale with cores (the per-shard stages are independent by
construction; ``bench/scale.py`` measures how close the global stages come) and ignores start-up
and stragglers: treat it as a lower bound on hours.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

# The rates a plan needs, by the name the benches record them under.
RATE_NAMES = {"text_stage": "candidates/s/core", "fetch_images_hash": "images/s/core",
              "global_stages": "candidates/s/core", "shard_write": "MB/s/core"}


class PlanError(ValueError):
    """A plan cannot be made (a rate is missing, an input is out of range); says which."""


@dataclass(frozen=True)
class Funnel:
    """The fractions of a build's funnel (defaults: a web alt-text pool; or a build's manifest)."""

    text_pass: float = 0.5  # candidates that pass the text filters and match a query
    balance_keep: float = 0.6  # of those, kept by balancing (fetched)
    image_pass: float = 0.97  # of the fetched, valid images (size, aspect, decodable)
    source: str = "defaults"

    @classmethod
    def from_manifest_funnel(cls, funnel: Mapping, source: str) -> "Funnel":
        """Fractions from a manifest's ``funnel`` (``infra.funnel.Funnel.to_dict`` form)."""
        stages = {s["stage"]: s for s in funnel.get("stages", [])}

        def kept(*names: str) -> float:
            found = [stages[n] for n in names if n in stages and stages[n]["in"]]
            return math.prod(s["out"] / s["in"] for s in found) if found else 1.0
        gather = stages.get("gather")
        image_pass = kept("images")
        return cls(kept("text_filter", "query_match"), kept("balance"), image_pass,
                   source if gather else f"{source} (no fetch stage: image fractions from defaults)")


@dataclass(frozen=True)
class Network:
    """What fetching meets: each node's bandwidth, the fetch success rate and the mean fetched size."""

    bandwidth_gbps: float = 10.0  # per node
    fetch_success: float = 0.7  # of the URLs tried, the share that returns an image (web: 0.6–0.9)
    fetched_kb: float = 150.0  # mean body of a fetched image (originals, before resizing)
    stored_kb: float = 25.0  # mean stored image (256 px JPEG q95) plus its row
    latency_s: float = 0.5  # mean time one fetch holds a connection
    connections_per_core: int = 64  # gather.concurrency: one gather call per core


@dataclass(frozen=True)
class StageCost:
    stage: str
    items: float  # what the stage processes (candidates, images, rows, MB)
    unit: str
    rate_per_core: float
    core_hours: float
    hours: float  # on the cluster
    bound: str  # what limits it: cpu, bandwidth or connections


@dataclass(frozen=True)
class Plan:
    candidates: float
    nodes: int
    cores_per_node: int
    stages: tuple[StageCost, ...]
    fetched: float
    rows_out: float
    notes: tuple[str, ...] = field(default=())

    @property
    def hours(self) -> float:
        return sum(s.hours for s in self.stages)


def load_rates(path: str | Path) -> dict[str, float]:
    """The per-core rates of ``bench/rates.json``; a missing one is a :class:`PlanError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no rates file (run the benches: bench/text_filter.py, bench/gather.py, "
                        f"bench/scale.py, bench/shards.py)")
    data = json.loads(path.read_text())
    missing = [n for n in RATE_NAMES if n not in data]
    if missing:
        raise PlanError(f"{path}: no rate for {', '.join(missing)} (its bench has not recorded one)")
    for name, unit in RATE_NAMES.items():
        if data[name].get("unit") != unit:
            raise PlanError(f"{path}: {name} is in {data[name].get('unit')!r}, expected {unit!r}")
    return {name: float(data[name]["value"]) for name in RATE_NAMES}


def project(candidates: float, nodes: int, cores_per_node: int, rates: Mapping[str, float], *,
            funnel: Funnel = Funnel(), network: Network = Network()) -> Plan:
    """Hours of each stage of a build of ``candidates`` pairs on ``nodes`` × ``cores_per_node``."""
    if candidates <= 0 or nodes < 1 or cores_per_node < 1:
        raise PlanError("candidates, nodes and cores per node must be positive")
    for name, value in (("fetch success", network.fetch_success), ("text pass", funnel.text_pass),
                        ("balance keep", funnel.balance_keep), ("image pass", funnel.image_pass)):
        if not 0 < value <= 1:
            raise PlanError(f"{name} must be in (0, 1], got {value}")
    cores = nodes * cores_per_node
    tried = candidates * funnel.text_pass * funnel.balance_keep
    fetched = tried * network.fetch_success
    rows = fetched * funnel.image_pass
    out_mb = rows * network.stored_kb / 1024

    def cpu(stage: str, items: float, unit: str, rate: float) -> StageCost:
        core_hours = items / rate / 3600
        return StageCost(stage, items, unit, rate, core_hours, core_hours / cores, "cpu")

    text = cpu("text filters + query match", candidates, "candidates", rates["text_stage"])
    fetch = cpu("fetch + images + hashes", fetched, "images", rates["fetch_images_hash"])
    # Fetching also waits: on the bytes (every node's link), and on round trips (connections in flight).
    bandwidth_h = fetched * network.fetched_kb * 1024 * 8 / (network.bandwidth_gbps * 1e9 * nodes) / 3600
    connections_h = tried * network.latency_s / (network.connections_per_core * cores) / 3600
    bound, hours = max((("cpu", fetch.hours), ("bandwidth", bandwidth_h), ("connections", connections_h)),
                       key=lambda kv: kv[1])
    fetch = StageCost(fetch.stage, fetch.items, fetch.unit, fetch.rate_per_core, fetch.core_hours, hours, bound)
    global_ = cpu("global stages (counts, caps, dedup, hold-out)", rows, "rows", rates["global_stages"])
    shards = cpu("shard writing", out_mb, "MB", rates["shard_write"])
    notes = (f"funnel from {funnel.source}: text pass {funnel.text_pass:.2f}, balancing keeps "
             f"{funnel.balance_keep:.2f}, fetch success {network.fetch_success:.2f}, valid images "
             f"{funnel.image_pass:.2f}",
             f"fetching would take {bandwidth_h:.1f} h on {network.bandwidth_gbps:g} Gbit/s per node "
             f"({network.fetched_kb:g} KB a fetch) and {connections_h:.1f} h on round trips "
             f"({network.connections_per_core} connections a core, {network.latency_s:g} s each)")
    return Plan(candidates, nodes, cores_per_node, (text, fetch, global_, shards), fetched, rows, notes)


def nodes_for(hours: float, candidates: float, cores_per_node: int, rates: Mapping[str, float], *,
              funnel: Funnel = Funnel(), network: Network = Network(), max_nodes: int = 100_000) -> int:
    """The fewest nodes that finish the build within ``hours`` (every stage scales with nodes)."""
    one = project(candidates, 1, cores_per_node, rates, funnel=funnel, network=network).hours
    nodes = max(1, math.ceil(one / hours))
    while nodes < max_nodes and project(candidates, nodes, cores_per_node, rates, funnel=funnel,
                                        network=network).hours > hours:
        nodes += 1
    return nodes


def render(plans: Sequence[Plan], deadline_h: float | None = None, deadline_nodes: int | None = None) -> str:
    """The plans as a text table, one column of hours per cluster size."""
    first = plans[0]
    head = f"{first.candidates:,.0f} candidate pairs -> {first.fetched:,.0f} images fetched -> {first.rows_out:,.0f} rows"
    width = max(len(s.stage) for s in first.stages)
    cols = "".join(f"{f'{p.nodes}x{p.cores_per_node} h':>12}" for p in plans)
    lines = [head, "", f"{'stage':<{width}} {'items':>15} {'per core/s':>11} {'core-hours':>11}{cols}  bound"]
    for i, s in enumerate(first.stages):
        hours = "".join(f"{p.stages[i].hours:>12.2f}" for p in plans)
        bounds = "/".join(sorted({p.stages[i].bound for p in plans}))
        lines.append(f"{s.stage:<{width}} {s.items:>15,.0f} {s.rate_per_core:>11,.0f} {s.core_hours:>11,.0f}"
                     f"{hours}  {bounds}")
    lines.append(f"{'total':<{width}} {'':>15} {'':>11} {sum(s.core_hours for s in first.stages):>11,.0f}"
                 + "".join(f"{p.hours:>12.2f}" for p in plans))
    lines += ["", *first.notes]
    if deadline_h is not None and deadline_nodes is not None:
        lines.append(f"to finish within {deadline_h:g} h: {deadline_nodes} nodes of {first.cores_per_node} cores")
    return "\n".join(lines)
