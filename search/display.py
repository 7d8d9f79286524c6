"""The terminal view of a running Optuna study: a rich progress bar (trials done/total, best so far, ETA)
plus one line per finished trial."""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from slimsearch.search.optuna_study import is_counted, record_from_trial
from slimsearch.search.records import best, trial_line


class Display:
    """rich progress bar (trials done/total, best so far, ETA) plus one line per finished trial."""

    def __init__(self, total: int, done: int, progress: bool) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self.seen: set[int] = set()
        self.prog = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not (progress and self.console.is_terminal),
        )  # fmt: skip
        self.task = self.prog.add_task("trials", total=total, completed=done, best="-")

    def __enter__(self) -> Display:
        self.prog.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.prog.__exit__(*exc)

    def update(self, trials: Sequence[FrozenTrial], total: int) -> None:
        for t in sorted(trials, key=lambda t: t.number):
            if t.number in self.seen or not t.state.is_finished():
                continue
            self.seen.add(t.number)
            self.console.print(trial_line(record_from_trial(t)), markup=False)
        b = best([record_from_trial(t) for t in trials])
        label = f"{b.metric('val_acc'):.4f} (#{b.number})" if b else "-"
        self.prog.update(self.task, total=total, completed=sum(is_counted(t) for t in trials), best=label)
