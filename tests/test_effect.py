"""The paired two-level bootstrap of one prompt variant against another (trainer/effect.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from infra.storage import ObjectStore
from trainer.effect import EffectError, SetPredictions, load_predictions, main, paired_effects
from trainer.results import write_outputs


def _set(labels, bare, ensemble, name="s") -> SetPredictions:
    labels = np.asarray(labels)
    return SetPredictions(name, tuple(f"i{j:04d}" for j in range(len(labels))), labels,
                          {"bare": np.atleast_2d(bare), "ensemble": np.atleast_2d(ensemble)})


def test_all_right_against_all_wrong_and_equal_variants_are_exact() -> None:
    labels = np.repeat(np.arange(20), 5)
    wrong = (labels + 1) % 20
    [e] = paired_effects([_set(labels, np.stack([wrong, wrong]), np.stack([labels, labels]))], draws=500)
    assert (e.a, e.b, e.diff, e.low, e.high, e.share_at_or_below_zero) == (0.0, 1.0, 1.0, 1.0, 1.0, 0.0)
    assert (e.classes, e.images, e.runs, e.runs_b_ahead, e.runs_level) == (20, 100, 2, 2, 0)
    [e] = paired_effects([_set(labels, labels, labels)], draws=500)
    assert (e.diff, e.low, e.high, e.share_at_or_below_zero, e.runs_level) == (0.0, 0.0, 0.0, 1.0, 1)


def test_the_interval_resamples_classes_then_images() -> None:
    rng = np.random.default_rng(1)
    # Level 1 alone: every image of a class agrees, so only the draw of classes varies.
    k, n = 200, 4
    labels = np.repeat(np.arange(k), n)
    class_better = rng.random(k) < 0.6
    ens = labels.copy()
    bare = np.where(np.repeat(class_better, n), (labels + 1) % k, labels)
    [e] = paired_effects([_set(labels, bare, ens)], draws=4000, seed=3)
    assert e.diff == pytest.approx(class_better.mean())
    se = class_better.std() / np.sqrt(k)
    assert (e.high - e.low) / (2 * 1.96) == pytest.approx(se, rel=0.1)
    # Level 2 alone: one class, so only the draw of its images varies.
    m = 400
    labels = np.zeros(m, np.int64)
    right = rng.random(m) < 0.3
    [e] = paired_effects([_set(labels, np.ones(m, np.int64), np.where(right, 0, 1))], draws=4000, seed=3)
    assert e.diff == pytest.approx(right.mean())
    assert (e.high - e.low) / (2 * 1.96) == pytest.approx(right.std() / np.sqrt(m), rel=0.1)


def test_pooling_weighs_every_class_of_every_set_once() -> None:
    small = _set(np.arange(4), np.arange(4), np.arange(4), "small")  # level on 4 classes
    labels = np.arange(12)
    big = _set(labels, (labels + 1) % 12, labels, "big")  # ahead by 1 on 12 classes
    *_, pooled = paired_effects([small, big], draws=300)
    assert pooled.name == "pooled" and pooled.classes == 16 and pooled.diff == pytest.approx(12 / 16)
    assert pooled.a == pytest.approx(4 / 16) and pooled.b == pytest.approx(1.0)
    with pytest.raises(EffectError, match="different numbers of runs"):
        paired_effects([small, _set(labels, np.stack([labels, labels]), np.stack([labels, labels]), "two")])


def _write_run(root: Path, name: str, ids, labels, bare, ensemble) -> Path:
    store = ObjectStore(str(root))
    write_outputs(store, {"model_id": root.name, "eval_sets": {}},
                  {name: {"id": list(ids), "label": list(labels), "bare": list(bare), "single": list(bare),
                          "ensemble": list(ensemble)}})
    return root


def test_command_line_reads_eval_outputs_and_refuses_other_images(tmp_path: Path, capsys) -> None:
    ids = [f"img{j}" for j in range(6)]
    labels = [0, 0, 1, 1, 2, 2]
    r1 = _write_run(tmp_path / "r1", "set", ids, labels, [1, 0, 0, 1, 2, 0], labels)
    # The same images in another order: aligned by id.
    r2 = _write_run(tmp_path / "r2", "set", ids[::-1], labels[::-1], [0, 0, 1, 1, 0, 2][::-1], labels[::-1])
    assert main([str(r1), str(r2), "--sets", "set", "--json", str(tmp_path / "e.json"),
                 "--plot", str(tmp_path / "e.png"), "--draws", "200"]) == 0
    out = capsys.readouterr().out
    assert "| set | 3 | 6 | 2 |" in out
    [e] = json.loads((tmp_path / "e.json").read_text())["effects"]
    # bare: run 1 is right on 1 of 2 per class (0.5); run 2 on 1, 1, 0.5: mean 5/6. Ensemble: 1.
    assert e["a"] == pytest.approx((0.5 + 5 / 6) / 2) and e["b"] == 1.0
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    r3 = _write_run(tmp_path / "r3", "set", ids, [0, 0, 1, 1, 2, 1], labels, labels)
    with pytest.raises(EffectError, match="r3/predictions/set.parquet: other images or labels"):
        load_predictions([r1, r3], "set", ("bare", "ensemble"))
    assert main([str(r1), str(tmp_path / "nowhere"), "--sets", "set"]) == 2
    assert "nowhere/results.json: not an evaluation's results" in capsys.readouterr().err
    with pytest.raises(EffectError, match="r1/results.json: the same model"):
        load_predictions([r1, r1], "set", ("bare", "ensemble"))
    # A later evaluation that did not score the set: its earlier predictions file is not used.
    write_outputs(ObjectStore(str(r2)), {"model_id": "r2", "eval_sets": {}})
    assert (r2 / "predictions" / "set.parquet").is_file()
    with pytest.raises(EffectError, match="r2/predictions/set.parquet: no predictions for eval set 'set'"):
        load_predictions([r1, r2], "set", ("bare", "ensemble"))
