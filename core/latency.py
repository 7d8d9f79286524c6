"""Predicted CPU latency of a policy without building its model: a lookup table of measured layer times.

MACs are a poor stand-in for latency on small CPUs: on the CIFAR ResNets at batch 1 a 3x3 conv's time falls
much slower than its channel count, the residual stream's elementwise ops shrink only where the stream itself
is pruned (they are part of ``other_ms`` and ``scale`` below, fitted with every group, streams included, at half
width), and a Tucker-2 stack's two extra 1x1 convs are memory-bound (``benchmarks/README.md``). So a search that must
deliver a latency gets a bound on latency itself, predicted the way NetAdapt and AMC do it: every conv/linear
call of the architecture is timed alone at the shape the policy leaves it (``core.macs``'s table says which:
channels removed per layer, decomposed layers), memoised per shape. A policy's prediction is
``other_ms + scale x (its layers' times)``, with ``other_ms`` (elementwise ops, pooling, the interpreter) and
``scale`` (layers timed alone run a little faster or slower than inside the model) fitted to two measured
models: the baseline and the baseline with every prunable group at half its filters. The baseline's
prediction is its measurement.

The table is measured by the process that first needs a shape (single thread by default; TorchScript
programs, as the default export ships, or eager modules; conv weights in the ``memory_format`` the export will
have, since channels_last programs run NHWC end to end and time differently): predictions carry that machine's timing noise, a few
percent per layer. A search stores it in its workdir, so its workers and a resumed run share one measurement
per shape and judge a policy alike. ``benchmarks/bench_latency.py`` checks predictions against measured
exports.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from slimsearch.core.apply import structure_only
from slimsearch.core.budget import prunable_leaders
from slimsearch.core.cost import measure_latency
from slimsearch.core.errors import SlimError
from slimsearch.core.export import MEMORY_FORMATS, torchscript_program
from slimsearch.core.graph import ModelGraph
from slimsearch.core.macs import Call, MacsTable, macs_table
from slimsearch.core.policy import LayerPolicy, Policy, rate_for_removed
from torch import nn

__all__ = ["MODES", "RUNTIMES", "LatencyTable", "latency_table", "policy_latency", "timed_program"]

# "torchscript": the baseline and every layer are timed as TorchScript programs (the default export);
# "onnxruntime": as ONNX Runtime sessions of their ONNX export (``core.onnx_export``, the slimsearch[onnx] extra);
# "eager": as nn.Modules (what ``measure_latency`` times on a model apply_policy returns).
MODES = ("torchscript", "onnxruntime", "eager")
RUNTIMES = ("torchscript", "onnxruntime")  # what a study's [export] runtime may name
ORT_ROUNDS = 5  # alternating rounds of the baseline and half-width timings in ONNX Runtime (_time_base_and_half)


class LatencyTable:
    """Measured layer times of one architecture at one batch size; ``predict(policy)`` in milliseconds."""

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        batch_size: int = 1,
        threads: int = 1,
        repeats: int = 10,
        mode: str = "torchscript",
        path: str | Path | None = None,
        memory_format: str = "contiguous",
    ) -> None:
        if mode not in MODES:
            raise SlimError(f"latency table: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if memory_format not in MEMORY_FORMATS:
            raise SlimError(f"latency table: memory_format must be one of {', '.join(MEMORY_FORMATS)}, got "
                            f"{memory_format!r}")  # fmt: skip
        if mode == "onnxruntime":  # ORT picks its own blocked layout: the weights' torch layout means nothing there
            memory_format = "contiguous"
        if batch_size < 1 or threads < 1 or repeats < 1:
            raise SlimError(
                f"latency table: need batch_size, threads, repeats >= 1; got {batch_size}, {threads}, {repeats}"
            )
        self.shape = tuple(input_shape)
        self.batch_size, self.threads, self.repeats, self.mode = batch_size, threads, repeats, mode
        self.memory_format = memory_format
        self.macs: MacsTable = macs_table(model, self.shape)
        self.path = Path(path) if path is not None else None
        self._ops: dict[str, float] = {}
        self._lock = threading.Lock()
        self._ready = False  # nothing is stored before the baseline and the rest are known
        self._dirty = False  # shapes timed since the last store
        self.exact = self.macs.exact
        stored = self._read()
        if stored is not None:
            self._adopt(stored)
            self._ready = True
            return
        ref: float | None = None
        if self.mode == "onnxruntime" and self.exact:
            self.base_ms, ref = self._time_base_and_half(model)
        else:
            self.base_ms = self._time(model, self.shape, rounds=3)
        self.scale, self.other_ms = self._calibrate(model, ref) if self.exact else (1.0, self.base_ms)
        self._ready = True
        with self._lock:
            self._save()

    def predict(self, model: nn.Module, policy: Policy) -> float | None:
        """Predicted latency (ms) of ``policy`` applied to ``model``; None when the table cannot tell (EVBMF
        ranks, an architecture ``core.macs`` does not cover). Bad policies raise ``SlimError``."""
        layers = self.layers_ms(model, policy)
        return None if layers is None else self.other_ms + self.scale * layers

    def layers_ms(self, model: nn.Module, policy: Policy) -> float | None:
        """The sum of the policy's layers' own times (ms, uncalibrated); None as for ``predict``."""
        layout = self.macs.layout(model, policy)
        if layout is None:
            return None
        ms = self._layers(*layout)
        self._flush()
        return ms

    def warm(
        self,
        model: nn.Module,
        groups: Sequence[Sequence[str]],
        max_rate: float = 1.0,
        budget_s: float = 60.0,
        round_to: int | None = None,
    ) -> int:
        """Time ahead every shape that pruning one group alone can give (``groups``: the layer names of each
        prunable unit; every keep count ``max_rate`` allows), within ``budget_s`` seconds; returns how many
        shapes were timed. A search calls it before its workers start, so most shapes are measured on a quiet
        machine instead of beside a training worker. Shapes that depend on two groups at once (a plain chain's
        conv between two pruned ones) and decomposed stacks are still timed when first needed. ``round_to`` N: only
        the counts ``core.rounding`` leaves (multiples of N) are timed."""
        from slimsearch.core.rounding import round_count

        t0, before = time.perf_counter(), self.size
        g = self.macs.graph
        one_group = (
            Policy({m: LayerPolicy(prune_rate=rate_for_removed(n - k, n)) for m in names})
            for names in groups
            for n in [g.layers[names[0]].out_channels]
            for k in range(n - 1, max(1, n - math.floor(max_rate * n + 1e-9)) - 1, -1)
            if round_count(k, n, round_to or 1) == k
        )
        for policy in one_group if self.exact else ():
            if time.perf_counter() - t0 > budget_s:
                break
            self._layers(*self.macs.layout(model, policy))  # type: ignore[misc]
        self._flush()
        return self.size - before

    def measure(self, model: nn.Module) -> float:
        """Measured latency (ms) of a built model under this table's settings (for what ``predict`` cannot
        tell); comparable with ``base_ms``."""
        return self._time(model, self.shape, rounds=3)

    @property
    def size(self) -> int:
        """Distinct layer shapes timed so far."""
        return len(self._ops)

    def _half(self, model: nn.Module) -> Policy:
        return Policy({n: LayerPolicy(prune_rate=0.5) for n in prunable_leaders(model, self.shape)})

    def _time_base_and_half(self, model: nn.Module) -> tuple[float, float | None]:
        """ONNX Runtime: the baseline's and the half-width model's times, best median of ``ORT_ROUNDS`` rounds
        that alternate between the two, so a slow spell of a few seconds (common on a shared machine) cannot set
        the baseline every policy is judged against (benchmarks/README.md, bench_runtime.py)."""
        half = self._half(model)
        layout = self.macs.layout(model, half) if half.layers else None
        programs = [timed_program(model, self.mode, self.memory_format, threads=self.threads, input_shape=self.shape)]
        if layout is not None:
            ref_model = structure_only(model, half, input_shape=self.shape)
            programs.append(timed_program(ref_model, self.mode, self.memory_format, threads=self.threads,
                                          input_shape=self.shape))  # fmt: skip
        best = [math.inf] * len(programs)
        for _ in range(ORT_ROUNDS):
            for i, program in enumerate(programs):
                ms = measure_latency(program, self.shape, self.batch_size, self.threads, repeats=self.repeats,
                                     warmup=2).median_ms  # fmt: skip
                best[i] = min(best[i], ms)
        return best[0], (best[1] if layout is not None else None)

    def _calibrate(self, model: nn.Module, ref: float | None = None) -> tuple[float, float]:
        """``(scale, other_ms)`` of ``latency = other_ms + scale x (sum of the layers' own times)``, fitted to the
        baseline and to the baseline with every prunable group at half its filters (measured as built).

        Layers timed alone can run a few percent slower or faster than inside the model (their inputs are not
        in cache, the program around them differs); the second point is meant to take that out where searches
        operate. A fit that makes no sense (a scale outside [0.5, 2] or a rest below minus half the baseline,
        from timing noise) falls back to scale 1 with the rest = baseline minus its layers (at least 0)."""
        full = self._layers({}, {})
        fallback = (1.0, max(0.0, self.base_ms - full))
        half = self._half(model)
        layout = self.macs.layout(model, half) if half.layers else None
        if layout is None:
            return fallback
        ref_ms = ref if ref is not None else self._time(structure_only(model, half, input_shape=self.shape),
                                                        self.shape, rounds=3)  # fmt: skip
        span = full - self._layers(*layout)
        if span <= 0:
            return fallback
        scale = (self.base_ms - ref_ms) / span
        # The rest may come out negative: each layer timed alone pays a program call that the model's single
        # program does not (tens of microseconds at batch 1), the same number of calls for every prune-only
        # policy.
        other = self.base_ms - scale * full
        # ONNX Runtime's whole-model session transforms layouts around its blocked (NCHWc) convs, which single-layer
        # sessions do not, so the scale may stray further from 1 there.
        top = 6.0 if self.mode == "onnxruntime" else 2.0
        return (scale, other) if 0.5 <= scale <= top and other > -0.5 * self.base_ms else fallback

    def _adopt(self, stored: dict) -> None:
        """Take a stored table's baseline, calibration and entries (the first stored value of each wins)."""
        self.base_ms, self.other_ms = float(stored["base_ms"]), float(stored["other_ms"])
        self.scale = float(stored["scale"])
        self._ops.update(stored["ops"])

    def _layers(self, removed: dict[tuple[str, bool], int], decomposed: dict[str, LayerPolicy]) -> float:
        total = 0.0
        for c in self.macs.calls or ():
            out = c.out - removed.get((c.name, True), 0)
            inp = c.inp - removed.get((c.name, False), 0)
            total += self._op(c, inp, out, decomposed.get(c.name))
        return total

    def _op(self, c: Call, inp: int, out: int, lp: LayerPolicy | None) -> float:
        """Measured time (ms) of call ``c`` at ``inp`` -> ``out`` channels, as a conv, a linear or the decomposed
        stack ``lp`` gives (memoised by shape)."""
        mod = self.macs.graph.template.get_submodule(c.name)
        dec = (lp.decomposition, lp.rank, lp.rank_ratio) if lp is not None else None
        if isinstance(mod, nn.Linear):
            key = repr(("linear", inp, out, c.positions, mod.bias is not None))
        else:
            key = repr(("conv", inp, out, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                        out if c.depthwise else c.groups, mod.bias is not None, mod.padding_mode, c.in_hw, dec))  # fmt: skip
        with self._lock:
            hit = self._ops.get(key)
            if hit is not None:
                return hit
            if isinstance(mod, nn.Linear):
                layer: nn.Module = nn.Linear(inp, out, bias=mod.bias is not None)
                shape: tuple[int, ...] = (1, inp) if c.positions == 1 else (1, c.positions, inp)
            else:
                shape = (1, inp, *c.in_hw)  # type: ignore[misc]
                if lp is not None:
                    layer = self.macs.stack(c, inp, out, lp)
                else:
                    groups = out if c.depthwise else c.groups
                    layer = nn.Conv2d(inp, out, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
                                      bias=mod.bias is not None, padding_mode=mod.padding_mode)  # fmt: skip
            ms = self._time(layer.eval(), shape)
            if self.mode == "onnxruntime":  # a session call costs ~10 us that the model's one session pays once
                ms = max(0.0, ms - self._call_ms(shape))
            self._ops[key] = ms
            self._dirty = True
            return self._ops[key]

    def _call_ms(self, shape: tuple[int, ...]) -> float:
        """The time of an ONNX Runtime session call that only copies its input (``shape``): what timing a layer
        in a session of its own adds to the layer's time inside the model's session. Memoised like a layer.
        Caller holds the lock."""
        key = repr(("ort-call", shape))
        if key not in self._ops:
            from slimsearch.core.cost import measure_latency
            from slimsearch.core.onnx_export import OrtProgram, identity_onnx_bytes, ort_session

            program = OrtProgram(ort_session(identity_onnx_bytes(shape), self.threads))
            self._ops[key] = min(measure_latency(program, shape, self.batch_size, self.threads,  # type: ignore[arg-type]
                                                 repeats=self.repeats, warmup=2).median_ms for _ in range(3))  # fmt: skip
        return self._ops[key]

    def _settings(self) -> dict[str, object]:
        """What a stored table must match: the architecture's calls and the timing settings."""
        calls = hashlib.sha256(repr((self.shape, self.macs.calls)).encode()).hexdigest()[:16]
        settings: dict[str, object] = {"calls": calls, "batch_size": self.batch_size, "threads": self.threads,
                                       "mode": self.mode, "repeats": self.repeats}  # fmt: skip
        if self.memory_format != "contiguous":  # absent for contiguous: tables stored before it stay valid
            settings["memory_format"] = self.memory_format
        return settings

    def _read(self) -> dict | None:
        """The stored table at ``path`` (None when there is none); a corrupt one or one of another
        architecture or settings is a ``SlimError``."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text())
            ok = isinstance(data, dict) and isinstance(data.get("ops"), dict)
            ok = ok and all(isinstance(data.get(k), (int, float)) for k in ("base_ms", "other_ms", "scale"))
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise SlimError(f"{self.path}: corrupt latency table; delete it to measure again")
        if data.get("settings") != self._settings():
            raise SlimError(f"{self.path}: latency table of another model or timing settings; delete it to "
                            f"measure again")  # fmt: skip
        return data

    def _flush(self) -> None:
        """Store the shapes timed since the last store (once per prediction or warm-up, not per shape)."""
        with self._lock:
            if self._dirty:
                self._save()
                self._dirty = False

    def _save(self) -> None:
        """Merge with the stored table (an entry already stored wins, so every process sharing the file
        converges on one measurement per shape) and replace it atomically. Caller holds the lock."""
        if self.path is None or not self._ready:
            return
        try:
            stored = self._read()
        except SlimError:
            stored = None  # a half-written file is replaced by this complete one
        if stored is not None:
            self._adopt(stored)
        data = {"settings": self._settings(), "base_ms": self.base_ms, "other_ms": self.other_ms,
                "scale": self.scale, "host": platform.node(), "ops": self._ops}  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, self.path)

    def _time(self, module: nn.Module, shape: tuple[int, ...], rounds: int = 1) -> float:
        """Best median of ``rounds`` timings of ``module`` (in the table's memory format; scripted in torchscript
        mode) at ``shape`` with the table's batch size; inputs stay NCHW, as an exported program gets them."""
        program = timed_program(module, self.mode, self.memory_format, threads=self.threads, input_shape=shape)
        return min(
            measure_latency(program, shape, self.batch_size, self.threads, repeats=self.repeats, warmup=2).median_ms
            for _ in range(rounds)
        )


def timed_program(
    module: nn.Module,
    mode: str = "torchscript",
    memory_format: str = "contiguous",
    *,
    threads: int = 1,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """What to time for ``module``: in torchscript mode the program ``core.export`` ships
    (``torchscript_program``: a copy, conv weights in ``memory_format``); in onnxruntime mode an ONNX Runtime
    session (``threads`` intra-op threads, graph optimisations on) of its ONNX export at ``input_shape`` (a lone
    conv/linear/decomposed stack is built node by node: ``layer_onnx_bytes``); in eager mode the module in that
    layout (a copy unless contiguous). A module that neither scripts nor traces is timed eager, so prediction still
    works for models only the eager and pt2 exports handle. ``measure_latency``'s thread count does not reach an
    ORT session: ``threads`` here does."""
    if mode == "onnxruntime":
        from slimsearch.core.graph import example_input_for
        from slimsearch.core.onnx_export import OrtProgram, layer_onnx_bytes, onnx_bytes, ort_session

        m = copy.deepcopy(module).eval()
        x = example_input_for(m, input_shape)
        data = layer_onnx_bytes(m, tuple(x.shape)) or onnx_bytes(m, x)
        return OrtProgram(ort_session(data, threads))  # type: ignore[return-value]
    if mode == "torchscript":
        try:
            return torchscript_program(module, memory_format=memory_format)
        except Exception:  # no TorchScript program: time the eager module instead
            pass
    if memory_format == "contiguous":
        return module
    return copy.deepcopy(module).eval().to(memory_format=MEMORY_FORMATS[memory_format])


_TABLES: weakref.WeakKeyDictionary[ModelGraph, dict[tuple, LatencyTable]] = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def latency_table(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    threads: int = 1,
    mode: str = "torchscript",
    folder: str | Path | None = None,
    memory_format: str = "contiguous",
) -> LatencyTable:
    """The latency table of ``model``'s architecture (cached per dependency graph, settings and folder); with
    ``folder`` it is stored there as ``latency_b<batch>_t<threads>_<mode>[_<memory_format>].json`` (no suffix for
    contiguous) and shared by every process using that folder (a study's workers, a resumed study)."""
    graph = macs_table(model, tuple(input_shape)).graph
    suffix = "" if memory_format == "contiguous" else f"_{memory_format}"
    name = f"latency_b{batch_size}_t{threads}_{mode}{suffix}.json"
    path = Path(folder) / name if folder is not None else None
    key = (batch_size, threads, mode, memory_format, str(path))
    with _TABLES_LOCK:
        table = _TABLES.setdefault(graph, {}).get(key)
    if table is None:
        table = LatencyTable(model, input_shape, batch_size, threads, mode=mode, path=path, memory_format=memory_format)
        with _TABLES_LOCK:
            table = _TABLES[graph].setdefault(key, table)
    return table


def policy_latency(
    model: nn.Module,
    policy: Policy,
    input_shape: Sequence[int],
    batch_size: int = 1,
    threads: int = 1,
    mode: str = "torchscript",
    memory_format: str = "contiguous",
) -> float | None:
    """Predicted latency (ms) of ``policy`` applied to ``model`` at ``batch_size``; None when not predictable."""
    table = latency_table(model, input_shape, batch_size, threads, mode, memory_format=memory_format)
    return table.predict(model, policy)
