"""Progress bars that also report when nobody watches a terminal.

rich redraws its bars in place on a terminal; writing to a file or a pipe (a batch job, CI, ``2>log``)
it shows them once, at the end, so an hour of work would print nothing until it is over. There this
``Progress`` prints each task's line every ``every`` seconds instead.
"""

from __future__ import annotations

import time

from rich import progress


class Progress(progress.Progress):
    def __init__(self, *columns, every: float = 30.0, **kwargs):
        super().__init__(*columns, **kwargs)
        self._every = every
        self._printed: dict[progress.TaskID, float] = {}

    def add_task(self, *args, **kwargs) -> progress.TaskID:
        task = super().add_task(*args, **kwargs)
        self._printed[task] = time.monotonic()  # the first line after ``every`` seconds of work
        return task

    def advance(self, task_id: progress.TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def update(self, task_id: progress.TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def _report(self, task_id: progress.TaskID) -> None:
        if self.disable or self.console.is_terminal or self.console.quiet:
            return
        now = time.monotonic()
        if now - self._printed.get(task_id, now) < self._every:
            return
        self._printed[task_id] = now
        with self._lock:
            task = self._tasks[task_id]
        # rich assumes 80 columns without a terminal, which cuts the counts short; a log line may be longer
        self.console.width = max(self.console.width, 160)
        self.console.print(self.make_tasks_table([task]))
