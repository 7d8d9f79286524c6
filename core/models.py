"""Model zoo: CIFAR ResNets (option-A shortcut), VGG-BN, AlexNet-32, a small CNN, user factories.

The ResNets are state-dict compatible with the public akamaster/pytorch_resnet_cifar10
checkpoints once the ``module.`` prefix is stripped (see ``load_checkpoint``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from slimsearch.core.errors import SlimError
from torch import nn


class OptionAShortcut(nn.Module):
    """Parameter-free downsampling shortcut: stride-2 subsampling, then input channel ``src[i]`` becomes output
    channel ``dst[i]`` and every other output channel is zero. Built as He et al.'s option A: ``out_channels``
    = ``in_channels`` + 2·``pad_channels``, input channel c on output channel c + ``pad_channels``.

    A real module rather than the original lambda, so that the model pickles, scripts and exports. The channel
    map is explicit so that pruning can remove channels on either side (the residual streams of both stages):
    it implements ``core.graph.ChannelMap`` (``as_conv``, ``remove_channels``, ``mask_out_channels``).
    Torch-Pruning cannot prune through the original ``F.pad``: it traces it as element-wise, which ties
    channel c of one stage to channel c (not c + pad) of the next. The forward pads when the kept map is
    contiguous (as built) and gathers/scatters only where pruning made it irregular.
    """

    def __init__(self, pad_channels: int, in_channels: int) -> None:
        super().__init__()
        src = list(range(in_channels))
        self._set_map(src, [c + pad_channels for c in src], in_channels, in_channels + 2 * pad_channels)

    def _set_map(self, src: list[int], dst: list[int], in_channels: int, out_channels: int) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.register_buffer("src", torch.tensor(src, dtype=torch.long), persistent=False)
        self.register_buffer("dst", torch.tensor(dst, dtype=torch.long), persistent=False)
        self.select = src != list(range(in_channels))  # not every input channel, in order
        first = dst[0] if dst else 0
        self.scatter = dst != list(range(first, first + len(dst)))
        self.pad_before, self.pad_after = first, out_channels - first - len(dst)

    def pairs(self) -> list[tuple[int, int]]:
        """(input channel, output channel) of every channel carried over."""
        return list(zip(self.src.tolist(), self.dst.tolist(), strict=True))

    def as_conv(self) -> nn.Conv2d:
        """The same map as a 1x1 stride-2 conv with 0/1 weights (what ``core.graph`` traces in its place)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, 1, 2, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            for s, d in self.pairs():
                conv.weight[d, s] = 1.0
        return conv.to(self.src.device)

    def remove_channels(self, removed: list[int], out_side: bool) -> None:
        """Drop input (or output) channels ``removed`` (current indexing) and the map entries through them."""
        gone = set(removed)
        n = self.out_channels if out_side else self.in_channels
        renumber = {c: i for i, c in enumerate(c for c in range(n) if c not in gone)}
        pairs = [(s, d) for s, d in self.pairs() if (d if out_side else s) not in gone]
        src = [s if out_side else renumber[s] for s, _ in pairs]
        dst = [renumber[d] if out_side else d for _, d in pairs]
        self._set_map(src, dst, self.in_channels - (0 if out_side else len(gone)),
                      self.out_channels - (len(gone) if out_side else 0))  # fmt: skip

    def mask_out_channels(self, masked: list[int]) -> None:
        """Output channels ``masked`` become zero (the shapes stay): what removing them leaves of the rest."""
        gone = set(masked)
        pairs = [(s, d) for s, d in self.pairs() if d not in gone]
        self._set_map([s for s, _ in pairs], [d for _, d in pairs], self.in_channels, self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x[:, :, ::2, ::2]
        if self.select:
            y = y.index_select(1, self.src)
        if self.scatter:
            out = y.new_zeros([y.shape[0], self.out_channels, y.shape[2], y.shape[3]])
            return out.index_copy(1, self.dst, y)
        return F.pad(y, (0, 0, 0, 0, self.pad_before, self.pad_after), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, {len(self.src)} channels carried"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = OptionAShortcut(planes // 4, in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet (depth = 6n+2), 16/32/64 channels, option-A shortcut."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise SlimError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


VGG_CFG: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: conv features, global pool, one linear classifier."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG_CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [
                    nn.Conv2d(c, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=True),
                ]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


class AlexNetCifar(nn.Module):
    """AlexNet shape adapted to 32x32 inputs (5 convs, 3 pools, 3 linears), with BatchNorm."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, 64, 5), nn.MaxPool2d(3, 2),
            *block(64, 192, 5), nn.MaxPool2d(3, 2),
            *block(192, 384, 3), *block(384, 256, 3), *block(256, 256, 3), nn.MaxPool2d(3, 2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(256 * 3 * 3, 1024), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(inplace=True), nn.Linear(1024, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """Four-conv CNN sized for 8x8 digits (the embedded default); trains in seconds on a CPU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w)
        )
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _resnet(depth: int) -> Callable[..., nn.Module]:
    return lambda num_classes=10, in_channels=3: CifarResNet(depth, num_classes, in_channels)


def _vgg(depth: int) -> Callable[..., nn.Module]:
    return lambda num_classes=10, in_channels=3: VGG(depth, num_classes, in_channels)


ZOO: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": _resnet(d) for d in (20, 32, 44, 56, 110)},
    **{f"vgg{d}": _vgg(d) for d in (11, 13, 16, 19)},
    "alexnet": lambda num_classes=10, in_channels=3: AlexNetCifar(num_classes, in_channels),
    "smallcnn": lambda num_classes=10, in_channels=1: SmallCNN(num_classes, in_channels),
}


FACTORY_PARAMS = ("num_classes", "in_channels", "input_size")  # what a user factory may declare


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    search_dir: str | Path | None = None,
) -> nn.Module:
    """Build a zoo model by name, or call a user factory given as ``"pkg.module:fn"``.

    A factory gets exactly the parameters of ``FACTORY_PARAMS`` its signature declares (``num_classes``,
    ``in_channels``, ``input_size``: an int side, or ``(H, W)`` when not square), so a factory that cannot
    size its head is never silently called without the class count. ``search_dir`` (the study file's
    folder) is appended to the END of ``sys.path`` before importing, so a local module never shadows a library.
    """
    if ":" in name:
        values = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
        return call_factory(name, values, search_dir)
    if name not in ZOO:
        raise SlimError(f"unknown model {name!r}; known: {', '.join(sorted(ZOO))} or 'pkg.module:fn'")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    return ZOO[name](**kwargs)


@contextlib.contextmanager
def _user_code(spec: str, doing: str, what: str = "model factory") -> Iterator[None]:
    """Run the user's code; a ``SystemExit`` (a module parsing ``sys.argv`` at import, a ``sys.exit`` in the
    function) is a one-line ``SlimError`` naming it, with the last line it printed to stderr instead of its usage
    text (which would otherwise be printed, and pass ``except Exception``). What it prints while working is kept."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            yield
    except SystemExit as e:
        said = (err.getvalue().strip().splitlines() or [""])[-1][:200]
        raise SlimError(f"{what} {spec!r}: {doing} called sys.exit({e.code!r})"
                        + (f" ({said})" if said else "") + " (does it parse command-line arguments?)") from None  # fmt: skip
    if err.getvalue():
        sys.stderr.write(err.getvalue())
        sys.stderr.flush()


def import_factory(spec: str, search_dir: str | Path | None = None, what: str = "model factory") -> Callable[..., Any]:
    """The callable named by ``"pkg.module:fn"``, importable from ``sys.path`` or, after it, ``search_dir``
    (``what`` names it in errors: model factory, data factory, custom evaluator)."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise SlimError(f"{what} {spec!r}: expected 'pkg.module:fn'")
    if search_dir is not None:
        folder = str(Path(search_dir).resolve())
        if folder not in sys.path:
            sys.path.append(folder)  # last: a local module never shadows an installed one
    try:
        with _user_code(spec, f"importing {mod_name!r}", what):
            module = importlib.import_module(mod_name)
    except SlimError:
        raise
    except Exception as e:  # any import-time failure is the user's factory, not us
        raise SlimError(f"{what} {spec!r}: cannot import {mod_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SlimError(f"{what} {spec!r}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def factory_kwargs(
    spec: str, fn: Callable[..., Any], values: dict[str, Any], what: str = "model factory"
) -> dict[str, Any]:
    """The keyword arguments ``fn`` declares among ``values`` (``FACTORY_PARAMS``), and nothing else.

    A declared parameter without a default that slimsearch cannot supply (unknown name, or a value not
    known here) is a ``SlimError`` before the call, rather than a ``TypeError`` from inside it.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins/extension callables: nothing to inspect, pass nothing
        return {}
    out: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = values.get(p.name)
        if p.name in values and value is not None and p.kind != p.POSITIONAL_ONLY:
            out[p.name] = value
        elif p.default is p.empty:
            why = "its value is not known here" if p.name in values else "slimsearch does not supply it"
            raise SlimError(f"{what} {spec!r} requires parameter {p.name!r}, but {why} "
                            f"(it may declare {', '.join(values)}; give others defaults)")  # fmt: skip
    return out


def user_frame(tb: TracebackType | None) -> str:
    """' at FILE:LINE' of the innermost traceback frame in the user's code: outside slimsearch, the standard
    library and installed packages (else the innermost frame)."""
    root = Path(__file__).resolve().parents[1]  # the folder of core/, spaces/, evaluators/, search/
    ours = tuple(f"{root / d}/" for d in ("core", "spaces", "evaluators", "search", "slimsearch"))
    skip = (*ours, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"])
    frames = [(frame.f_code.co_filename, line) for frame, line in traceback.walk_tb(tb)]
    mine = [(f, n) for f, n in frames if not str(Path(f).resolve()).startswith(skip)]
    if not (mine or frames):
        return ""
    f, n = (mine or frames)[-1]
    return f" at {Path(f).name}:{n}"


def call_factory(spec: str, values: dict[str, Any], search_dir: str | Path | None = None) -> nn.Module:
    """Import and call a user factory with the parameters it declares (``factory_kwargs``).

    An exception raised inside the factory is never retried or replaced by another call: it is reported as a
    ``SlimError`` with its type, message and the file:line where it was raised (chained, for the traceback).
    """
    fn = import_factory(spec, search_dir)
    kwargs = factory_kwargs(spec, fn, values)
    try:
        with _user_code(spec, f"calling {spec.partition(':')[2]!r}"):
            model = fn(**kwargs)
    except SlimError:
        raise
    except Exception as e:  # the user's code: report it as their input, in one line
        msg = " ".join(str(e).split())[:200]
        raise SlimError(f"model factory {spec!r} raised {type(e).__name__}{user_frame(e.__traceback__)}: {msg}") from e
    if not isinstance(model, nn.Module):
        raise SlimError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def check_num_classes(out_features: int, num_classes: int, spec: str) -> None:
    """One line naming ``[model] factory`` and both numbers when the model's output size is not the class count."""
    if out_features != num_classes:
        raise SlimError(
            f"[model] factory {spec!r} outputs {out_features} classes but the data has {num_classes}; "
            f"declare a num_classes parameter in the factory (it is passed {num_classes}) or set [model] num_classes"
        )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``) and return a plain, prefix-free state dict."""
    p = Path(path)
    if not p.is_file():
        raise SlimError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimError(f"checkpoint {p} is corrupt or not a safe torch checkpoint: {first[:200]}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SlimError(f"checkpoint {p} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into ``model`` (in place) and return it; mismatches are a ``SlimError``."""
    sd = read_state_dict(path)
    own = model.state_dict()
    # Checkpoints from older torch lack BN's num_batches_tracked counters; they are not weights.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise SlimError(f"checkpoint {path} does not fit model {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=False)
    return model
