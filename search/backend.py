"""The backend seam: one ``Backend`` protocol (``run``, ``records``, ``info``) with an Optuna and a Ray Tune
implementation, and ``backend_for(cfg)``, the one place that decides which a study uses.

Status, report and export read a study only through ``records()`` (``TrialRecord``s) and ``info()``
(``StudyInfo``), so they work the same whichever backend ran it. Both backends evaluate a trial with the same
core (``search.trial``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from slimsearch.search.optuna_study import load_optuna_study, record_from_trial, tally
from slimsearch.search.ray_results import _read_meta, ray_experiment_dir, ray_meta_path, records_from_table
from slimsearch.search.records import RunSummary, StudyInfo, TrialRecord, by_state
from slimsearch.search.runner import run_study
from slimsearch.search.storage import open_storage, storage_exists
from slimsearch.search.storage_hint import dashboard_command
from slimsearch.search.study import StudyConfig, mask_url

Log = Callable[[str], None]


class Backend(Protocol):
    """How a study runs and how its results are read back."""

    cfg: StudyConfig

    @property
    def dashboard(self) -> str | None:
        """A command that opens the study in a dashboard, where the backend has one."""
        ...

    @property
    def driver_needs_device(self) -> bool:
        """Whether the process that runs the study evaluates trials on [study] device itself."""
        ...

    def run(
        self, *, workers: int | None = None, progress: bool = True, log: Log | None = None, threads: int | None = None
    ) -> RunSummary:
        """Create or resume the study and run it to n_trials counted trials."""
        ...

    def records(self) -> list[TrialRecord]:
        """Every trial so far (read-only; a study that never ran is a ``SlimError``)."""
        ...

    def info(self) -> StudyInfo:
        """Storage, target, objectives, seeds, counts by state and the recorded baseline info (read-only)."""
        ...


@dataclass
class OptunaBackend:
    """Trials in an Optuna RDB storage, evaluated by this process and ``slimsearch worker`` processes."""

    cfg: StudyConfig

    @property
    def dashboard(self) -> str | None:
        return dashboard_command(self.cfg.study.storage)  # the password from the environment, never printed

    @property
    def driver_needs_device(self) -> bool:
        return True

    def run(
        self, *, workers: int | None = None, progress: bool = True, log: Log | None = None, threads: int | None = None
    ) -> RunSummary:
        return run_study(self.cfg, workers=workers, progress=progress, log=log, threads=threads)

    def _trials(self) -> tuple[dict, list]:
        study = load_optuna_study(self.cfg, open_storage(self.cfg, create=False))
        return dict(study.user_attrs), study.get_trials(deepcopy=False)

    def records(self) -> list[TrialRecord]:
        return [record_from_trial(t) for t in self._trials()[1]]

    def info(self) -> StudyInfo:
        attrs, trials = self._trials()
        cfg = self.cfg
        return StudyInfo(
            name=cfg.name, storage=mask_url(cfg.study.storage), n_trials=int(attrs.get("n_trials", cfg.study.n_trials)),
            objectives=list(attrs.get("objectives", [o.spec for o in cfg.study.objectives])),
            seeds=list(attrs.get("seeds_enqueued", [])), by_state=tally(trials).by_state,
            baseline=dict(attrs.get("slimsearch", {})),
        )  # fmt: skip


@dataclass
class RayBackend:
    """A Ray Tune experiment under ``<workdir>/ray`` (``search.ray_runner``; Ray is imported only here, and only
    when a method needs it: importing it takes seconds). ``address``: the cluster to run on."""

    cfg: StudyConfig
    address: str | None = None
    _records: list[TrialRecord] | None = field(default=None, init=False, repr=False)

    @property
    def dashboard(self) -> str | None:
        return None

    @property
    def driver_needs_device(self) -> bool:
        return False  # trials ask Ray for their GPUs (search.placement.ray_trial_resources)

    def run(
        self, *, workers: int | None = None, progress: bool = True, log: Log | None = None, threads: int | None = None
    ) -> RunSummary:
        from slimsearch.search.ray_runner import run_ray

        return run_ray(self.cfg, address=self.address, progress=progress, log=log)

    def records(self) -> list[TrialRecord]:
        if self._records is None:
            from slimsearch.search.ray_runner import ray_trials

            self._records = records_from_table(ray_trials(self.cfg))
        return self._records

    def info(self) -> StudyInfo:
        records = self.records()  # a study that never ran: SlimError
        cfg = self.cfg
        meta = _read_meta(ray_meta_path(cfg))
        by = by_state(records, "status")
        return StudyInfo(
            name=cfg.name, storage=f"ray: {ray_experiment_dir(cfg)}", n_trials=int(meta.get("n_trials", cfg.study.n_trials)),
            objectives=list(meta.get("objectives", [o.spec for o in cfg.study.objectives])),
            seeds=sorted({r.seed for r in records if r.seed}), by_state=by, baseline=meta,
        )  # fmt: skip


def uses_ray(cfg: StudyConfig) -> bool:
    """Whether the study's results are Ray Tune's: backend "ray", or an Optuna-backend study that was only ever
    run on Ray (``run --ray-address``: Ray results exist, its SQLite file does not)."""
    if cfg.study.backend == "ray":
        return True
    return not storage_exists(cfg) and ray_meta_path(cfg).is_file()


def backend_for(cfg: StudyConfig, *, ray_address: str | None = None, to_run: bool = False) -> Backend:
    """The study's backend. ``ray_address`` (``run --ray-address``) runs it on that Ray cluster. Reading
    (``to_run`` False) follows where its results are (``uses_ray``); a run follows [study] backend."""
    if ray_address is not None or (uses_ray(cfg) if not to_run else cfg.study.backend == "ray"):
        return RayBackend(cfg, ray_address)
    return OptunaBackend(cfg)


__all__ = ["Backend", "OptunaBackend", "RayBackend", "backend_for", "uses_ray"]
