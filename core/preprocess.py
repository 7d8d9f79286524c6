"""What a deployed model must do to an image before calling the exported program, as plain JSON.

An export records it in ``manifest.json`` under ``"preprocessing"`` (``core.export.export_model``), so the
program can be fed exactly as during the search: decode to the channel order, resize to the input size,
scale pixels to [0, 1], subtract ``mean`` and divide by ``std`` per channel, NCHW float32. For an image
folder the mean/std are the user's own training images' statistics, saved nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CHANNEL_ORDER = {1: "L", 3: "RGB"}  # PIL mode names: what ``Image.convert`` takes


def preprocessing(
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    dataset: str,
    data_root: str | None = None,
) -> dict[str, Any]:
    """The manifest's ``preprocessing`` record for a model taking ``input_shape`` (N, C, H, W or C, H, W)."""
    c, h, w = (int(v) for v in tuple(input_shape)[-3:])
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {c} channels")
    return {
        "input_shape": [c, h, w],
        "layout": "NCHW",
        "dtype": "float32",
        "channel_order": CHANNEL_ORDER.get(c, f"{c} channels"),
        "resize": [h, w],
        "scale": 1 / 255,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "class_names": [str(n) for n in class_names],
        "dataset": dataset,
        "data_root": data_root,
        "formula": "x = (pixels / 255 - mean) / std, per channel, pixels resized to resize=[H, W] (bilinear)",
    }
