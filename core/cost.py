"""Model cost: MACs, FLOPs, parameters (``torch.utils.flop_counter``) and CPU latency.

What is counted: one batch-1 forward pass in eval mode under ``no_grad``, through
``torch.utils.flop_counter``'s per-op formulas, which count the matrix-multiply family only — convolutions (any groups:
the cost comes from the weight shape, so depthwise/grouped convs cost ``out·(C_in/groups)·k²``
MACs per image), linear layers (``mm``/``addmm``), ``bmm``/``baddbmm`` and attention.
Not counted: bias adds, BatchNorm, ReLU and other activations, pooling (incl. global average
pooling), residual/element-wise adds, channel padding (option-A shortcuts), reshapes.
This is the convention of the CIFAR compression papers, where "FLOPs" means these MACs
(ResNet-56 = 125.49 M MACs, 0.85 M params). ``Cost.flops`` is 2·MACs and always labelled as such.
Params: ``sum(p.numel() for p in model.parameters())`` (shared parameters once; BN affine
included; buffers such as BN running stats excluded).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from core.errors import SlimError
from core.train import preserved_modes

DEFAULT_INPUT = (1, 3, 32, 32)


@dataclass(frozen=True)
class Cost:
    """Per-image multiply-accumulates and parameter count of a model."""

    macs: int
    params: int

    @property
    def flops(self) -> int:
        """FLOPs = 2 × MACs (one multiply + one add per MAC)."""
        return 2 * self.macs

    def as_dict(self) -> dict[str, int]:
        return {"macs": self.macs, "flops": self.flops, "params": self.params}


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock time of one forward pass of a ``batch_size`` batch, in milliseconds."""

    median_ms: float
    p90_ms: float
    batch_size: int
    threads: int


def _example_input(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> torch.Tensor:
    """Zeros of ``input_shape`` with its leading (batch) dimension replaced by ``batch_size``."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros((batch_size, *tuple(input_shape)[1:]), device=device, dtype=dtype)


class _FlopCounter(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s own per-op formulas (``flop_registry``) over a forward pass.

    ``FlopCounterMode`` itself also tracks the module hierarchy with global hooks, which costs about
    40 % more per call; apply+cost sits on every trial's hot path, and we only need the total.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            shape_args, shape_kwargs = tree_map(lambda a: a.shape if isinstance(a, torch.Tensor) else a, (args, kwargs))
            self.flops += formula(*shape_args, **shape_kwargs, out_val=out)
        return out


def _counted_forward(
    model: nn.Module, input_shape: tuple[int, ...], per_layer: bool = False
) -> tuple[int, dict[str, int]]:
    """Run one batch-1 eval forward under the FLOP counter; total MACs and (optionally) MACs per conv/linear."""
    counter = _FlopCounter()
    layers: dict[str, int] = defaultdict(int)
    start: dict[nn.Module, int] = {}
    # Hooks read the counter's running total around each layer, so the per-layer numbers come from the
    # same counter as the total and do not depend on module naming (or on layer reuse).
    handles = []
    for name, m in model.named_modules() if per_layer else ():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):

            def pre(mod: nn.Module, _args: object) -> None:
                start[mod] = counter.flops

            def post(mod: nn.Module, _args: object, _out: object, name: str = name) -> None:
                layers[name] += (counter.flops - start.pop(mod)) // 2

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    x = _example_input(model, input_shape, 1)
    try:
        with preserved_modes(model), torch.no_grad(), counter:
            model.eval()
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counter.flops // 2, dict(layers)


def count_cost(model: nn.Module, input_shape: tuple[int, ...] = DEFAULT_INPUT) -> Cost:
    """MACs of one image (batch 1, eval mode; see the module docstring) and the parameter count.

    ``input_shape`` includes a batch dimension, which is ignored (always 1). The model's
    train/eval modes are restored afterwards.
    """
    macs, _ = _counted_forward(model, input_shape)
    return Cost(macs=int(macs), params=sum(p.numel() for p in model.parameters()))


def layer_macs(model: nn.Module, input_shape: tuple[int, ...] = DEFAULT_INPUT) -> dict[str, int]:
    """Per-image MACs of each conv/linear module, keyed by its ``named_modules`` name (forward order).

    Modules that did not run in the forward pass are absent. Their sum equals ``count_cost``'s MACs
    unless the model does matrix multiplies outside conv/linear modules.
    """
    return _counted_forward(model, input_shape, per_layer=True)[1]


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...] = DEFAULT_INPUT,
    batch_size: int = 1,
    threads: int = 1,
    repeats: int = 30,
    warmup: int = 5,
) -> LatencyResult:
    """Median and 90th-percentile time of a forward pass (eval mode, ``inference_mode``).

    Runs with ``torch.set_num_threads(threads)``; the previous thread count and the model's
    modes are restored afterwards. ``input_shape``'s batch dimension is replaced by ``batch_size``.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1 or threads < 1:
        raise SlimError(
            f"measure_latency: need repeats>=1, warmup>=0, batch_size>=1, threads>=1; "
            f"got repeats={repeats}, warmup={warmup}, batch_size={batch_size}, threads={threads}"
        )
    x = _example_input(model, input_shape, batch_size)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    previous = torch.get_num_threads()
    times: list[float] = []
    try:
        torch.set_num_threads(threads)
        with preserved_modes(model), torch.inference_mode():
            model.eval()
            for i in range(warmup + repeats):
                sync()
                t0 = time.perf_counter()
                model(x)
                sync()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else times[0]
    return LatencyResult(median_ms=statistics.median(times), p90_ms=p90, batch_size=batch_size, threads=threads)
