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

Speed (``_ShapeForward``): the counted forward skips convolution arithmetic. A counted op's MACs depend only
on the shapes of its inputs and output, so a convolution call that is certain to succeed (``conv_zeros``)
returns zeros of its exact output shape and is counted with flop_counter's convolution formula; every other
op runs for real, matrix multiplies under the aten-level counter. The counts equal a real forward's unless
the model's control flow depends on activation values (arbitrary anyway on the zeros input counted); tests
compare the two on the model zoo. Models with modules from outside torch.nn / core.models, or whose fast
forward raises, are counted by the reference: the aten-level counter over a real forward.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from slimsearch.core.errors import SlimError
from slimsearch.core.train import preserved_modes
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper

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


_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_CONV_DTYPES = (torch.float32, torch.float64)


def conv_zeros(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor | None:
    """Zeros shaped like the output of ``F.conv2d``/``aten.convolution`` (not transposed) on these arguments
    when that call is certain to succeed, else None: then run the real kernel, which raises its own error.

    Only plain, contiguous float32/float64 tensors on one device, under ``no_grad``, qualify; for those this
    mirrors ATen's checks (``check_shape_forward``: ranks, channels vs groups, bias size, kernel not larger
    than the padded input) and its output-size formula. Anything unusual returns None.
    """
    if torch.is_grad_enabled() or not (type(x) in _PLAIN_TENSORS and type(weight) in _PLAIN_TENSORS):
        return None
    n = x.dim() - 2
    params = (stride, padding, dilation)
    if (
        n < 1
        or weight.dim() != x.dim()
        or x.dtype not in _CONV_DTYPES
        or weight.dtype != x.dtype
        or weight.device != x.device
        or x.layout != torch.strided
        or weight.layout != torch.strided
        or not (x.is_contiguous() and weight.is_contiguous())
        or not all(isinstance(v, (tuple, list)) and len(v) == n and all(type(i) is int for i in v) for v in params)
        or type(groups) is not int
        or groups < 1
    ):
        return None
    if bias is not None and not (
        type(bias) in _PLAIN_TENSORS
        and bias.dtype == x.dtype
        and bias.device == x.device
        and bias.dim() == 1
        and bias.shape[0] == weight.shape[0]
    ):
        return None
    if x.numel() == 0 or weight.numel() == 0 or x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        return None
    out = [x.shape[0], weight.shape[0]]
    for size, s, p, d, k in zip(x.shape[2:], stride, padding, dilation, weight.shape[2:], strict=True):
        span = size + 2 * p - d * (k - 1) - 1  # ATen: "Kernel size can't be greater than actual input size"
        if s < 1 or p < 0 or d < 1 or span < 0:
            return None
        out.append(span // s + 1)
    return torch.zeros(out, dtype=x.dtype, device=x.device)


class _FlopCounter(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s own per-op formulas (``flop_registry``) over every aten op.

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
            self.flops += _apply_formula(formula, args, kwargs, out)
        return out


# ``flop_counter.shape_wrapper`` maps every tensor in (args, kwargs, out) to its shape with a pytree walk,
# half of the counter's cost on a CNN. For flat arguments (no tensor inside a container) we do that mapping
# with a comprehension and call the wrapped formula itself: the same formula on the same shapes.
_SHAPE_WRAPPER_CODE = shape_wrapper(lambda: None).__code__


def _apply_formula(formula: Any, args: tuple, kwargs: dict, out: Any) -> int:
    raw = getattr(formula, "__wrapped__", None)
    if (
        raw is None
        or getattr(formula, "__code__", None) is not _SHAPE_WRAPPER_CODE
        or not isinstance(out, torch.Tensor)
        or any(isinstance(v, _CONTAINERS) and _has_tensor(v) for v in (*args, *kwargs.values()))
    ):
        return formula(*args, **kwargs, out_val=out)
    shapes = [a.shape if isinstance(a, torch.Tensor) else a for a in args]
    kw = {k: v.shape if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return raw(*shapes, out_shape=out.shape, **kw)


_CONTAINERS = (list, tuple, dict)


def _has_tensor(v: list | tuple | dict) -> bool:
    items = v.values() if isinstance(v, dict) else v
    return any(isinstance(x, torch.Tensor) or (isinstance(x, _CONTAINERS) and _has_tensor(x)) for x in items)


# Torch functions that reach no op of ``flop_registry`` (verified in tests/test_cost.py): the fast counter runs
# them as they are. Python's arithmetic operators arrive as the Tensor methods (``x + y`` as Tensor.add).
_FLOP_FREE = frozenset(
    {
        F.relu, F.relu6, F.batch_norm, F.pad, F.adaptive_avg_pool2d, F.max_pool2d, F.avg_pool2d, F.dropout,
        torch.relu, torch.add, torch.flatten, torch.cat,
        torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__getitem__, torch.Tensor.dim, torch.Tensor.size,
        torch.Tensor.flatten, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.mean, torch.Tensor.relu,
    }
)  # fmt: skip
_CONV_FORMULA = flop_registry[torch.ops.aten.convolution]
_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def _conv2d_call(args: tuple, kwargs: dict) -> tuple | None:
    """``torch.conv2d``'s arguments in order, int stride/padding/dilation as pairs; None if unusual."""
    n = len(args)
    if n > 7 or not set(kwargs) <= set(_CONV2D_ARGS[n:]):
        return None
    rest = dict(zip(_CONV2D_ARGS[n:], _CONV2D_DEFAULTS[n:], strict=True))
    rest.update(kwargs)
    vals = [*args, *rest.values()]
    for i in (3, 4, 5):
        if type(vals[i]) is int:
            vals[i] = (vals[i], vals[i])
    return tuple(vals)


class _ShapeForward(TorchFunctionMode):
    """Counts a forward's MACs like ``_FlopCounter`` without doing its convolution arithmetic.

    Intercepts torch functions (thread-local, so other threads are not affected): ``torch.conv2d`` calls
    that ``conv_zeros`` vouches for return zeros of their exact output shape, counted with the registry's
    own convolution formula on the very shapes ``aten.convolution`` would see; ``_FLOP_FREE`` functions run
    as they are; every other function (linear, matmul, anything unknown, a conv ``conv_zeros`` declines)
    runs under a ``_FlopCounter``, which counts its aten ops exactly as before.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_flops = 0
        self.aten = _FlopCounter()

    @property
    def flops(self) -> int:
        return self.conv_flops + self.aten.flops

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FLOP_FREE:
            return func(*args, **kwargs)
        if func is torch.conv2d and (call := _conv2d_call(args, kwargs)) is not None:
            x, w, b, stride, padding, dilation, groups = call
            out = conv_zeros(x, w, b, stride, padding, dilation, groups)
            if out is not None:
                aten_args = (x, w, b, list(stride), list(padding), list(dilation), False, [0, 0], groups)
                self.conv_flops += _apply_formula(_CONV_FORMULA, aten_args, {}, out)
                return out
        with self.aten:
            return func(*args, **kwargs)


# Classes whose forward calls torch only through its public, torch-function-aware API (no ``torch.ops`` calls,
# which a TorchFunctionMode would not see): the fast counter is used only when every module is one of them.
_KNOWN_CODE = ("torch.nn.modules.", "slimsearch.core.models.")


def _fast_countable(model: nn.Module) -> bool:
    return all(f"{type(m).__module__}.".startswith(_KNOWN_CODE) for m in model.modules())


def _counted_forward(
    model: nn.Module, input_shape: tuple[int, ...], per_layer: bool = False, fast: bool = True
) -> tuple[int, dict[str, int]]:
    """Run one batch-1 eval forward under the FLOP counter; total MACs and (optionally) MACs per conv/linear.

    ``fast`` (where ``_fast_countable``): ``_ShapeForward``; if that raises, the reference below runs. The
    reference, ``_FlopCounter`` over a real forward, is what ``fast`` is tested against.
    """
    x = _example_input(model, input_shape, 1)
    if fast and _fast_countable(model):
        try:
            return _counted_forward_once(model, x, per_layer, _ShapeForward())
        except Exception:
            pass
    return _counted_forward_once(model, x, per_layer, _FlopCounter())


def _counted_forward_once(
    model: nn.Module, x: torch.Tensor, per_layer: bool, counter: _ShapeForward | _FlopCounter
) -> tuple[int, dict[str, int]]:
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
    # Most models counted (apply_policy's) are in eval mode already; switching and restoring modes costs walks.
    training = any(getattr(m, "training", False) for m in model.modules())  # frozen programs have no flag
    try:
        with preserved_modes(model) if training else nullcontext(), torch.no_grad(), counter:
            if training:
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
        # A frozen TorchScript program (``torch.jit.freeze``) has no train/eval flags: it is inference-only.
        modal = hasattr(model, "training")
        with preserved_modes(model) if modal else nullcontext(), torch.inference_mode():
            if modal:
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
