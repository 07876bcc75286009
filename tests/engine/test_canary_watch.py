"""The live view of a canary in ``castiron deploy --watch``: plain lines without a terminal
(at most one a second, plus each verdict), a rich table on one."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from castiron.cli.commands.canary_cmd import WatchObserver
from castiron.cli.observer import CliObserver
from castiron.engine.canary import CanaryProgress, WindowStats


def progress(state: str, step: int = 1) -> CanaryProgress:
    return CanaryProgress(
        step=step,
        steps=2,
        weight=20,
        state=state,
        elapsed=1.5,
        pause=2.0,
        canary=WindowStats("rel-new", 1.5, 30, 6, 12.5),
        stable=WindowStats("rel-old", 1.5, 120, 0, 4.0),
    )


def test_plain_lines_are_throttled_and_carry_each_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    watch = WatchObserver(CliObserver(tmp_path, None), None)
    for _ in range(5):
        watch.canary(progress("holding"))
    watch.canary(progress("passed"))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert "step 1/2 weight 20% (holding, 1.5s): canary 20.0 req/s, 20.0% errors" in lines[0]
    assert "p95 12.5 ms | stable 80.0 req/s, 0.0% errors, p95 4.0 ms" in lines[0]
    assert "(passed" in lines[1]


def test_a_terminal_gets_a_live_table_that_stops_at_the_verdict(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, no_color=True)
    watch = WatchObserver(CliObserver(tmp_path, None), console)
    watch.canary(progress("holding"))
    assert watch.live is not None
    watch.progress("a line above the table")
    watch.canary(progress("aborted"))
    assert watch.live is None
    text = out.getvalue()
    assert "canary step 1/2: weight 20%, aborted" in text
    assert "rel-new" in text and "rel-old" in text and "20.00%" in text
    assert "a line above the table" in text
