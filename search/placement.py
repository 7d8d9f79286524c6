"""Where a study's trials run: local worker processes on GPUs, and the resources of one Ray trial.

Pure functions of the study's device, its worker setting and the GPUs a machine (or cluster) has, so the
placement is unit-tested with faked GPU counts. Local workers each see only their own GPU:
``CUDA_VISIBLE_DEVICES`` is set in the worker's environment before it starts (and so before it imports torch),
and the worker runs on ``cuda`` (its one visible GPU). A Ray trial asks for ``{"cpu": c, "gpu": g}``
(``tune.with_resources``); Ray then sets ``CUDA_VISIBLE_DEVICES`` for it, and the driver needs no GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from slimsearch.core.errors import SlimError
from slimsearch.evaluators.config import PER_GPU

CUDA_ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Placement:
    """One local worker: its 1-based ``index``, the ``device`` it runs on (as ``--device``) and the
    ``CUDA_VISIBLE_DEVICES`` of its environment (None: inherited unchanged)."""

    index: int
    device: str
    cuda_visible: str | None = None


def visible_gpus(env: Mapping[str, str], count: int) -> list[str]:
    """The GPU ids this process can hand to workers, as ``CUDA_VISIBLE_DEVICES`` entries: the entries of its own
    ``CUDA_VISIBLE_DEVICES`` when set (the first ``count``, the GPUs torch sees), else ``0..count-1``."""
    given = env.get(CUDA_ENV)
    if given is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in given.split(",") if g.strip()][:count]


def plan_workers(device: str, workers: int | str, gpus: Sequence[str]) -> list[Placement]:
    """The local workers of a study on ``device`` (auto | cpu | cuda | cuda:N) with ``workers`` (a count or
    "per-gpu") on a machine whose visible GPUs are ``gpus``.

    cuda / auto with GPUs: round-robin, worker i on ``gpus[(i - 1) % G]``; cuda:N: every worker on GPU N;
    "per-gpu": one worker per visible GPU (one CPU worker where there is none, or the device is cpu).
    cpu / auto without GPUs: CPU workers, environment unchanged.
    """
    on_gpu = device != "cpu" and bool(gpus)
    if device.startswith("cuda") and not gpus:
        raise SlimError(f"device {device}: CUDA is not available on this machine (use cpu or auto)")
    if workers == PER_GPU:
        n = len(gpus) if on_gpu and device in ("auto", "cuda") else 1
    elif isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SlimError(f'workers: expected an integer >= 1 or "{PER_GPU}", got {workers!r}')
    else:
        n = workers
    if not on_gpu:
        return [Placement(i, "cpu" if device == "cpu" else device) for i in range(1, n + 1)]
    if device.startswith("cuda:"):
        k = int(device.split(":")[1])
        if k >= len(gpus):
            raise SlimError(
                f"device {device}: this machine has {len(gpus)} CUDA device(s), cuda:0..cuda:{len(gpus) - 1}"
            )
        return [Placement(i, "cuda", gpus[k]) for i in range(1, n + 1)]
    return [Placement(i, "cuda", gpus[(i - 1) % len(gpus)]) for i in range(1, n + 1)]


def worker_env(base: Mapping[str, str], placement: Placement) -> dict[str, str]:
    """The environment of ``placement``'s worker process: ``base`` with its ``CUDA_VISIBLE_DEVICES``."""
    env = dict(base)
    if placement.cuda_visible is not None:
        env[CUDA_ENV] = placement.cuda_visible
    return env


def local_gpus(device: str) -> list[str]:
    """The GPUs of this machine that a study on ``device`` may use (none for cpu; torch is asked otherwise)."""
    if device == "cpu":
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return visible_gpus(os.environ, count)


def ray_trial_resources(
    device: str, cpus_per_trial: int, gpus_per_trial: float | None, cluster_gpus: float
) -> dict[str, float]:
    """The resources one Ray trial requests (``tune.with_resources``): ``{"cpu": c, "gpu": g}``.

    ``gpus_per_trial`` None: 1 GPU for device cuda, for auto 1 where the cluster has GPUs, else 0; a fraction
    (0.25) packs that many trials on one GPU. A GPU request the cluster cannot meet, and a GPU request on device
    cpu, are ``SlimError``s (a trial would wait forever, or hold a GPU it never uses).
    """
    if isinstance(cpus_per_trial, bool) or not isinstance(cpus_per_trial, int) or cpus_per_trial < 1:
        raise SlimError(f"[evaluator] cpus_per_trial: expected an integer >= 1, got {cpus_per_trial!r}")
    if gpus_per_trial is None:
        gpu = 1.0 if device.startswith("cuda") or (device == "auto" and cluster_gpus > 0) else 0.0
    else:
        gpu = float(gpus_per_trial)
        if not gpu >= 0:
            raise SlimError(f"[evaluator] gpus_per_trial: expected a number >= 0, got {gpus_per_trial!r}")
    if device == "cpu" and gpu > 0:
        raise SlimError(f"[evaluator] gpus_per_trial = {gpu:g} with [study] device = cpu: the trials would hold GPUs "
                        "they never use (set gpus_per_trial = 0, or device = auto / cuda)")  # fmt: skip
    if device.startswith("cuda") and gpu == 0:
        raise SlimError(f"[study] device = {device} with [evaluator] gpus_per_trial = 0: Ray gives a trial only the "
                        "GPUs it requests (set gpus_per_trial > 0, or device = auto / cpu)")  # fmt: skip
    if gpu > 0 and cluster_gpus < gpu:
        raise SlimError(f"[evaluator] gpus_per_trial = {gpu:g}, but the Ray cluster has {cluster_gpus:g} GPUs: no "
                        "trial could start (add GPU nodes, or set [study] device = cpu)")  # fmt: skip
    return {"cpu": float(cpus_per_trial), "gpu": gpu}


def ray_trial_device(resources: Mapping[str, float]) -> str:
    """The device of a Ray trial with ``resources``: its GPU (Ray makes it ``cuda``) when it requested one."""
    return "cuda" if resources.get("gpu", 0) > 0 else "cpu"
