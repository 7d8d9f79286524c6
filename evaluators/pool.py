"""Evaluate many policies in parallel: in-process, in local worker processes, or on Ray actors.

Every worker builds its ``EvalContext`` ONCE from a picklable ``context_factory`` (a module-level
function, or ``functools.partial`` of one with picklable arguments) and then evaluates policies sent
as JSON. Workers run torch single-threaded so that N workers use N cores. Each pool keeps a parent-side
``ResultCache`` too, so a policy evaluated before is not dispatched again.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.policy import Policy
from slimsearch.evaluators.cache import ResultCache
from slimsearch.evaluators.config import EvaluatorConfig
from slimsearch.evaluators.context import EvalContext
from slimsearch.evaluators.evaluate import EvalResult, evaluate, one_line

ContextFactory = Callable[[], EvalContext]

_WORKER_CTX: EvalContext | None = None


def _init_worker(factory: ContextFactory, threads: int) -> None:
    import torch

    global _WORKER_CTX
    torch.set_num_threads(threads)
    _WORKER_CTX = factory()


def _evaluate_in_worker(cfg: EvaluatorConfig, policy_json: str) -> dict[str, Any]:
    if _WORKER_CTX is None:
        raise RuntimeError("worker context was not initialised")
    res = evaluate(_WORKER_CTX, cfg, Policy.from_json(policy_json))
    return {**res.to_dict(), "cached": res.cached}


def _failed(policy: Policy, e: BaseException) -> EvalResult:
    return EvalResult("fail", {}, f"worker: {one_line(e)}", [], policy.hash)


class _CachedPool:
    """Shared logic: parent-side cache lookups and de-duplication around ``_submit``. The parent cache is
    keyed by config and policy only (a pool serves one context); persistent caches belong in the
    context (``build_context(cache=path)``), whose keys include the context's fingerprint."""

    cfg: EvaluatorConfig
    cache: ResultCache

    def _submit(self, policy: Policy) -> Future:
        raise NotImplementedError

    def _key(self, policy: Policy) -> str:
        return f"{self.cfg.key}-{policy.hash}"

    def submit(self, policy: Policy) -> Future:
        """A future of the ``EvalResult`` of ``policy`` (already done on a cache hit)."""
        hit = self.cache.get(self._key(policy))
        if hit is not None:
            hit.cached = True
            fut: Future = Future()
            fut.set_result(hit)
            return fut
        inner = self._submit(policy)
        out: Future = Future()

        def done(f: Future) -> None:
            try:
                res = f.result()
                res = res if isinstance(res, EvalResult) else EvalResult.from_dict(res, bool(res.get("cached")))
            except Exception as e:  # a crashed worker is a failed candidate, not a crashed search
                res = _failed(policy, e)
            self.cache.put(self._key(policy), res)
            out.set_result(res)

        inner.add_done_callback(done)
        return out

    def map(self, policies: Sequence[Policy]) -> list[EvalResult]:
        """Results in the order of ``policies``; duplicates are evaluated once."""
        futures: dict[str, Future] = {}
        for p in policies:
            if p.hash not in futures:
                futures[p.hash] = self.submit(p)
        return [futures[p.hash].result() for p in policies]

    def __enter__(self) -> _CachedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class SerialPool(_CachedPool):
    """Evaluate in this process (workers = 1): no pickling, and ``report`` callbacks work."""

    def __init__(self, context_factory: ContextFactory | EvalContext, cfg: EvaluatorConfig,
                 cache: ResultCache | None = None) -> None:  # fmt: skip
        self.ctx = context_factory if isinstance(context_factory, EvalContext) else context_factory()
        self.cfg = cfg
        self.cache = cache if cache is not None else ResultCache()

    def _submit(self, policy: Policy) -> Future:
        fut: Future = Future()
        fut.set_result(evaluate(self.ctx, self.cfg, policy))
        return fut


class LocalPool(_CachedPool):
    """``workers`` spawned processes (``ProcessPoolExecutor``, "spawn" context, 1 torch thread each)."""

    def __init__(self, context_factory: ContextFactory, cfg: EvaluatorConfig, workers: int | None = None,
                 cache: ResultCache | None = None, threads: int = 1) -> None:  # fmt: skip
        self.cfg = cfg
        self.workers = int(workers or cfg.worker_count(0))
        if self.workers < 1:
            raise SlimError(f"[evaluator] workers: expected >= 1, got {self.workers}")
        self.cache = cache if cache is not None else ResultCache()
        self._ex = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(context_factory, threads),
        )

    def _submit(self, policy: Policy) -> Future:
        return self._ex.submit(_evaluate_in_worker, self.cfg, policy.to_json())

    def close(self) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)


class _EvalActor:
    """Body of the Ray actor: one context per actor, built at start."""

    def __init__(self, factory: ContextFactory, threads: int) -> None:
        _init_worker(factory, threads)

    def evaluate(self, cfg: EvaluatorConfig, policy_json: str) -> dict[str, Any]:
        return _evaluate_in_worker(cfg, policy_json)


class RayPool(_CachedPool):
    """``workers`` Ray actors (1 CPU each). Joins the cluster at ``address`` ("auto", "ray://..."), or
    starts a local Ray with ``num_cpus`` when no address is given and Ray is not running yet."""

    def __init__(self, context_factory: ContextFactory, cfg: EvaluatorConfig, workers: int | None = None,
                 address: str | None = None, *, num_cpus: int | None = None, cache: ResultCache | None = None,
                 threads: int = 1) -> None:  # fmt: skip
        import ray  # slow import, only when Ray is used

        self.cfg = cfg
        self.workers = int(workers or cfg.worker_count(0))
        self.cache = cache if cache is not None else ResultCache()
        address = address if address is not None else cfg.ray_address
        self._started_ray = False
        if not ray.is_initialized():
            # Workers must import this package even when it is not pip-installed (run from a checkout).
            root = str(Path(__file__).resolve().parents[1])
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}}
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "runtime_env": env}
            try:
                if address is not None:
                    ray.init(address=address, **kw)
                else:
                    ray.init(num_cpus=num_cpus or self.workers, **kw)
            except ConnectionError as e:
                raise SlimError(f"[evaluator] ray_address {address!r}: cannot connect ({one_line(e)})") from None
            self._started_ray = True
        actor_cls = ray.remote(num_cpus=1)(_EvalActor)
        self._actors = [actor_cls.remote(context_factory, threads) for _ in range(self.workers)]
        self._pending = [0] * self.workers
        self._lock = threading.Lock()

    def _submit(self, policy: Policy) -> Future:
        with self._lock:  # the least busy actor takes the next policy
            i = min(range(len(self._actors)), key=self._pending.__getitem__)
            self._pending[i] += 1
        fut = self._actors[i].evaluate.remote(self.cfg, policy.to_json()).future()

        def release(_: Future) -> None:
            with self._lock:
                self._pending[i] -= 1

        fut.add_done_callback(release)
        return fut

    def close(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []
        if self._started_ray:
            ray.shutdown()


def make_pool(context_factory: ContextFactory, cfg: EvaluatorConfig, cache: ResultCache | None = None) -> _CachedPool:
    """The pool ``cfg`` asks for: Ray when ``ray_address`` is set, processes when ``workers > 1``, else serial."""
    if cfg.ray_address is not None:
        return RayPool(context_factory, cfg, cache=cache)
    if cfg.worker_count(0) > 1:  # "per-gpu" here: one worker (the pool's processes share this process's device)
        return LocalPool(context_factory, cfg, workers=cfg.worker_count(0), cache=cache)
    return SerialPool(context_factory, cfg, cache=cache)


def context_factory(fn: Callable[..., EvalContext], *args: Any, **kwargs: Any) -> ContextFactory:
    """A picklable zero-argument factory from a module-level ``fn`` and picklable arguments."""
    return functools.partial(fn, *args, **kwargs)
