"""What the CIFAR benchmark scripts share: where ../shared and the adapted checkpoints are, the data splits."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from slimsearch.core.data import Dataset, DataSplits, load_splits, split_train_val
from slimsearch.core.models import build_model, load_checkpoint

CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
SHAPE = (1, 3, 32, 32)


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """Exit with ``main()``'s code; bad input (a message given to SystemExit, or a SlimError) -> that one line
    on stderr and exit code 2, the project's convention, instead of 1 or a traceback."""
    from slimsearch.core.errors import SlimError

    try:
        code = main()
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        raise SystemExit(2) from None
    except SlimError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)


def shared_root() -> str:
    """``$SLIMSEARCH_SHARED`` or the ``shared`` folder beside the repo."""
    return os.environ.get("SLIMSEARCH_SHARED") or str(Path(__file__).resolve().parents[2] / "shared")


def adapted_dir() -> Path:
    """Where adapt_baselines.py writes (and the comparisons read) the JPEG-adapted checkpoints: never the repo."""
    env = os.environ.get("SLIMSEARCH_ADAPTED")
    return Path(env) if env else Path.home() / ".cache" / "slimsearch" / "adapted"


def load_cifar(shared: str | Path, log: Callable[[str], None] = print) -> DataSplits:
    """The JPEG archive as 45k train / 5k val (seed 0) / 10k test, ImageNet mean/std."""
    t = time.perf_counter()
    splits = load_splits("cifar10", root=Path(shared) / "data" / "cifar10-jpeg.tar.gz", val_size=5000, seed=0)
    log(f"data loaded in {time.perf_counter() - t:.0f} s")
    return splits


def load_adapted(name: str, ckpt_dir: str | Path | None = None) -> torch.nn.Module:
    """The adapted checkpoint of ``name`` (eval mode); a clear SystemExit when adapt_baselines.py has not run."""
    path = Path(ckpt_dir or adapted_dir()) / f"{name}-jpeg.th"
    if not path.is_file():
        raise SystemExit(f"{path}: no adapted checkpoint; run benchmarks/adapt_baselines.py --models {name} first")
    return load_checkpoint(build_model(name), path).eval()


def machine() -> dict:
    """Facts that make a timing interpretable."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def stratified_subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` images with every class in proportion (the archive's test split is stored class by class, so its
    first ``n`` images are one or two classes only). The whole set when ``n >= len(ds)``."""
    if n >= len(ds):
        return ds
    return split_train_val(ds, n, seed)[1]


def parse_evaluator(spec: str, flag: str = "--evaluator") -> tuple[str, dict[str, Any]]:
    """ "proxy" or "finetune:<steps>" -> (label, [evaluator] keys of a study file)."""
    kind, _, steps = spec.strip().partition(":")
    if kind == "proxy" and not steps:
        return "proxy", {"kind": "proxy"}
    if kind == "finetune" and steps.isdigit() and int(steps) > 0:
        return f"finetune-{int(steps)}", {"kind": "finetune", "steps": int(steps)}
    raise SystemExit(f"{flag}: expected proxy or finetune:<steps>, got {spec!r}")


def log(msg: str) -> None:
    """A timestamped progress line (flushed, so a log tail shows where a run is)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_results(out: Path, stem: str, result: dict, md: str) -> None:
    """``<out>/<stem>.json`` and the generated ``<stem>.md``; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {out / stem}.json and .md")
