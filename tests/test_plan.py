"""``witflow plan`` (infra/plan.py): a build's hours and nodes from the benches' per-core rates."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from infra.plan import Funnel, Network, PlanError, load_rates, nodes_for, project

RATES = {"text_stage": ("candidates/s/core", 2000.0), "fetch_images_hash": ("images/s/core", 200.0),
         "global_stages": ("candidates/s/core", 20000.0), "shard_write": ("MB/s/core", 300.0)}


@pytest.fixture
def rates_file(tmp_path):
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({k: {"value": v, "unit": u, "note": "test"} for k, (u, v) in RATES.items()}))
    return path


def test_stages_follow_the_funnel_and_scale_with_nodes(rates_file):
    rates = load_rates(rates_file)
    funnel, network = Funnel(text_pass=0.5, balance_keep=0.5, image_pass=1.0), Network(fetch_success=0.8, latency_s=0.05)
    small, big = (project(1e9, n, 16, rates, funnel=funnel, network=network) for n in (16, 64))
    assert small.fetched == pytest.approx(1e9 * 0.5 * 0.5 * 0.8) and small.rows_out == pytest.approx(small.fetched)
    text = small.stages[0]
    assert text.core_hours == pytest.approx(1e9 / 2000 / 3600) and text.hours == pytest.approx(text.core_hours / 256)
    assert big.hours == pytest.approx(small.hours / 4)  # every bound scales with the nodes
    assert {s.stage: s.bound for s in small.stages}["fetch + images + hashes"] == "cpu"


def test_fetching_can_be_bandwidth_or_round_trip_bound(rates_file):
    rates = load_rates(rates_file)
    thin = project(1e9, 16, 16, rates, network=Network(bandwidth_gbps=0.1))
    assert thin.stages[1].bound == "bandwidth" and thin.stages[1].hours > thin.stages[1].core_hours / 256
    slow = project(1e9, 16, 16, rates, network=Network(latency_s=60.0))
    assert slow.stages[1].bound == "connections"


def test_nodes_for_a_deadline_is_the_fewest_that_make_it(rates_file):
    rates = load_rates(rates_file)
    n = nodes_for(12.0, 4e8, 16, rates)
    assert project(4e8, n, 16, rates).hours <= 12.0 < project(4e8, n - 1, 16, rates).hours


def test_a_funnel_from_a_manifest():
    funnel = Funnel.from_manifest_funnel({"stages": [
        {"stage": "text_filter", "in": 100, "out": 80}, {"stage": "query_match", "in": 80, "out": 40},
        {"stage": "balance", "in": 40, "out": 30}, {"stage": "gather", "in": 30, "out": 30},
        {"stage": "images", "in": 30, "out": 27}]}, "m.json")
    assert (funnel.text_pass, funnel.balance_keep, funnel.image_pass) == (0.4, 0.75, 0.9)


def test_missing_or_mislabelled_rates_name_what_is_wrong(tmp_path, rates_file):
    with pytest.raises(PlanError, match="no rates file"):
        load_rates(tmp_path / "none.json")
    data = json.loads(rates_file.read_text())
    del data["shard_write"]
    data["text_stage"]["unit"] = "captions/hour"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="shard_write"):
        load_rates(broken)
    data["shard_write"] = {"value": 1, "unit": "MB/s/core"}
    broken.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="text_stage is in 'captions/hour'"):
        load_rates(broken)
    with pytest.raises(PlanError, match="fetch success"):
        project(1e6, 1, 1, load_rates(rates_file), network=Network(fetch_success=0))


def test_the_plan_command(rates_file, tmp_path, capsys):
    assert main(["plan", "--candidates", "400e6", "--nodes", "16", "--nodes", "64", "--rates", str(rates_file)]) == 0
    out = capsys.readouterr().out
    assert "400,000,000 candidate pairs" in out and "16x16 h" in out and "64x16 h" in out
    assert "to finish within 24 h:" in out and "shard writing" in out
    assert main(["plan", "--candidates", "1e6", "--rates", str(tmp_path / "none.json")]) == 2
    assert "witflow plan: " in capsys.readouterr().err
