"""Logging set-up: a log line goes to the stderr of the moment, so an entrypoint that ran under a
replaced (and since closed) stderr never breaks later logging."""

from __future__ import annotations

import io
import logging
import sys

from infra.log import log_event, setup_logging


def test_log_lines_follow_the_current_stderr(capsys):
    replaced = io.StringIO()
    saved = sys.stderr
    sys.stderr = replaced
    try:
        setup_logging("INFO")
        log_event(logging.getLogger("witflow.test"), "first", shard="s0")
    finally:
        sys.stderr = saved
    assert "first shard=s0" in replaced.getvalue()
    replaced.close()
    log_event(logging.getLogger("witflow.test"), "second")  # before the fix: ValueError on a closed file
    err = capsys.readouterr().err
    assert "witflow.test: second" in err and "Logging error" not in err
