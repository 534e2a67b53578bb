"""Progress display for long steps: a spinner per step and a bar for counted work (rich).

``NullProgress`` is used by the API, ``--quiet``, ``--json`` and when stderr is not a terminal,
so pipelines get clean logs.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator


#: whether native libraries' own console output (QNN's log lines) reaches stderr: ``--debug``
SHOW_LIBRARY_OUTPUT = False


@contextlib.contextmanager
def library_output() -> Iterator[None]:
    """Native libraries print to file descriptors 1 and 2 directly: inside this block both go to
    /dev/null (stdout stays clean for ``--json``, stderr keeps one line per error); with
    ``--debug`` (:data:`SHOW_LIBRARY_OUTPUT`) their output goes to stderr."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    try:
        if SHOW_LIBRARY_OUTPUT:
            os.dup2(2, 1)
        else:
            sink = os.open(os.devnull, os.O_WRONLY)
            os.dup2(sink, 1)
            os.dup2(sink, 2)
            os.close(sink)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


class NullProgress:
    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def bar(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None


class RichProgress(NullProgress):
    def __init__(self, console):
        self.console = console

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        with self.console.status(f"[bold]{name}[/bold]…", spinner="dots"):
            yield
        self.console.print(f"[green]✓[/green] {name}")

    @contextlib.contextmanager
    def bar(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True) as progress:
            task = progress.add_task(name, total=total)
            yield lambda: progress.advance(task)
        self.console.print(f"[green]✓[/green] {name}")


class TimedSteps:
    """Named steps shown on ``progress`` (None: nothing shown), each one's seconds recorded in ``timings``."""

    def __init__(self, progress=None, timings: dict[str, float] | None = None):
        self.progress = progress or NullProgress()
        self.timings = {} if timings is None else timings

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.progress.step(name):
            yield
        self.timings[name] = round(time.perf_counter() - start, 4)
