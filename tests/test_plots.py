"""Curves a person looks at: infra/plots.py and the training curve that follows a running training
(trainer/run.py: training_curve_png, watch_train_log)."""

from __future__ import annotations

import io
import json
import time
import threading

import numpy as np
from PIL import Image

from infra.plots import curves_png
from trainer.run import planned_steps, training_curve_png, watch_train_log
from trainer.train import LOG_NAME, RUN_CONFIG_NAME


def _records(n: int) -> list[dict]:
    return [{"step": s, "loss": 4.0 / s, "lr": 1e-3 * min(1, s / 3), "logit_scale": 14.3 + s / 10}
            for s in range(1, n + 1)]


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_the_training_curve_draws_three_panels_of_the_logged_values():
    png = training_curve_png(_records(40), "demo")
    image = _image(png)
    assert png.startswith(b"\x89PNG") and image.shape[0] > image.shape[1] / 2  # stacked panels: tall
    # More steps draw more: the plot is of the records, not a fixed picture.
    assert not np.array_equal(image, _image(training_curve_png(_records(10), "demo")))


def test_curves_skip_missing_points_and_draw_a_reference_line():
    png = curves_png([1, 2, 3], {"zero-shot top-1": {"set a": [0.1, None, 0.3], "set b": [0.2, 0.25, float("nan")]}},
                     title="zero-shot during training", reference={"zero-shot top-1": 0.1})
    with_reference = _image(png)
    without = _image(curves_png([1, 2, 3], {"zero-shot top-1": {"set a": [0.1, None, 0.3], "set b": [0.2, 0.25, 1.0]}},
                                title="zero-shot during training"))
    assert with_reference.shape == without.shape and not np.array_equal(with_reference, without)


def test_the_watcher_follows_the_log_while_the_block_runs_and_once_at_the_end(tmp_path):
    updates: list[tuple[int, int | None]] = []
    seen = threading.Event()

    def on_update(records: list[dict], total: int | None) -> None:
        updates.append((records[-1]["step"], total))
        seen.set()

    log = tmp_path / LOG_NAME
    with watch_train_log(tmp_path, on_update, every_s=0.05):
        (tmp_path / RUN_CONFIG_NAME).write_text(json.dumps({"total_steps": 9}))
        log.write_text("".join(json.dumps(r) + "\n" for r in _records(3)))
        assert seen.wait(30), "the watcher never published"
        seen.clear()
        with log.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in _records(9)[3:]))
        assert seen.wait(30)
    assert updates[0] == (3, 9) and updates[-1] == (9, 9)
    assert len(updates) == len(set(updates))  # published only when there were new steps
    assert planned_steps(tmp_path / "nothing") is None


def test_a_failing_publisher_never_stops_the_training(tmp_path):
    (tmp_path / LOG_NAME).write_text(json.dumps(_records(1)[0]) + "\n")

    calls: list[int] = []

    def broken(records: list[dict], total: int | None) -> None:
        calls.append(len(records))
        raise RuntimeError("the API is down")

    finished = False
    with watch_train_log(tmp_path, broken, every_s=0.01):
        deadline = time.monotonic() + 30  # a deadline for the watcher's thread, not a speed assertion
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        finished = True
    # The publisher ran on the log and raised, yet nothing escaped: the block (the training) ended.
    assert calls and calls[0] == 1 and finished
