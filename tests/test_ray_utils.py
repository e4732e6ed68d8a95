"""Fan-out: results in input order, one failing shard reported (not raised), progress callbacks."""

from __future__ import annotations

import pytest

from infra.ray_utils import map_shards


def square_or_fail(x: int) -> int:
    if x == 3:
        raise ValueError("bad shard 3")
    return x * x


@pytest.mark.parametrize("use_ray", [False, True])
def test_a_failing_shard_costs_only_itself(use_ray, request):
    if use_ray:
        request.getfixturevalue("ray_local")
    done = []
    items = [(f"s{i}", (i,)) for i in range(6)]
    results = map_shards(square_or_fail, items, desc="test", use_ray=use_ray,
                         on_done=lambda d, t: done.append((d, t)))
    assert [r.key for r in results] == [f"s{i}" for i in range(6)]
    assert [r.value for r in results if r.ok] == [0, 1, 4, 16, 25]
    failed = [r for r in results if not r.ok]
    assert [r.key for r in failed] == ["s3"] and failed[0].error.startswith("ValueError: bad shard 3")
    assert done[-1] == (6, 6) and [d for d, _ in done] == list(range(1, 7))
