"""Progress written to a file or a pipe: a line per task every so often while the work runs, not
only the final bars at the end; on a terminal rich's live bars as before."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

from domaintune.progress import Progress


def _work(console: Console, every: float) -> list[str]:
    seen = []
    with Progress(TextColumn("data: {task.description}"), MofNCompleteColumn(), console=console, every=every) as bars:
        task = bars.add_task("duplicates", total=4)
        for _ in range(4):
            bars.advance(task)
            seen.append(console.file.getvalue())
    return seen


def test_a_log_file_gets_progress_lines_while_the_work_runs():
    seen = _work(Console(file=io.StringIO(), width=80), every=0.0)
    assert [text.count("\n") for text in seen] == [1, 2, 3, 4]
    assert seen[1].splitlines() == ["data: duplicates 1/4", "data: duplicates 2/4"]


def test_a_log_line_keeps_long_counts_whole():
    console = Console(file=io.StringIO())  # no terminal: rich assumes 80 columns
    with Progress(TextColumn("data: {task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                  every=0.0) as bars:
        task = bars.add_task("train: a-file-with-a-long-name-of-a-gigabyte.jsonl", total=4_738_453)
        bars.advance(task, 218_112)
        assert "218112/4738453" in console.file.getvalue()


def test_lines_come_no_more_often_than_asked():
    seen = _work(Console(file=io.StringIO(), width=80), every=3600.0)
    assert seen == ["", "", "", ""]  # the bars are shown once, when the work ends


def test_a_terminal_keeps_the_live_bars_and_a_quiet_console_gets_nothing():
    terminal = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    _work(terminal, every=0.0)
    assert "data: duplicates 4/4" in terminal.file.getvalue()
    # redrawn in place by rich (a few times a second), not printed at every step
    assert sum(f"data: duplicates {k}/4" in terminal.file.getvalue() for k in (1, 2, 3)) < 3
    quiet = Console(file=io.StringIO(), width=80, quiet=True)
    assert _work(quiet, every=0.0) == ["", "", "", ""] and quiet.file.getvalue() == ""
