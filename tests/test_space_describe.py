"""Say what is searched: excluded layers and why (printed once by run), `slimsearch space`, the policy chart."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.search.cli import main
from slimsearch.search.report import policy_figure, policy_rows
from slimsearch.spaces.config import SpaceConfig
from slimsearch.spaces.describe import describe_space, exclusion_lines, exclusions
from slimsearch.spaces.space import SearchSpace

# The custom net: concat branches, a depthwise conv, a grouped conv, a residual add with a 1x1 projection.
CUSTOM = """\
import torch
from torch import nn


class Custom(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.mix = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU())
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.a = nn.Conv2d(16, 8, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)
        self.proj = nn.Conv2d(16, 24, 1)
        self.c = nn.Conv2d(16, 24, 3, padding=1)
        self.head = nn.Conv2d(24, 24, 1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        h = self.dw(self.mix(self.stem(x)))
        h = torch.relu(torch.cat([self.a(h), self.b(h)], 1))
        h = torch.relu(self.proj(h) + self.c(h))
        return self.fc(torch.relu(self.head(h)).mean((2, 3)))


def build(num_classes, in_channels):
    return Custom(num_classes, in_channels)
"""


@pytest.fixture
def custom(tmp_path: Path):
    (tmp_path / "customnet_sd.py").write_text(CUSTOM)
    sys.path.append(str(tmp_path))
    import customnet_sd

    yield customnet_sd, tmp_path
    sys.modules.pop("customnet_sd", None)
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def _space(mod, **kw) -> SearchSpace:
    cfg = SpaceConfig(decomposition=("none", "tucker"), criteria=("l1", "fpgm"), rate_step=0.1, **kw)
    return SearchSpace.build(mod.build(3, 3), cfg, (1, 3, 8, 8))


def test_every_left_out_layer_has_its_reason(custom) -> None:
    space = _space(custom[0], exclude=("head",))
    ex = exclusions(space)
    assert list(ex) == ["mix.0", "dw", "head"]  # forward order
    assert "grouped conv" in ex["mix.0"] and "groups=4" in ex["mix.0"]
    assert ex["head"] == "[space] exclude 'head'"
    assert set(ex).isdisjoint(space.layer_names) and len(ex) + len(space.layers) == len(space.all_layers) == 8
    lines = exclusion_lines(space)
    assert lines[0] == "excluded from the search: 3 of 8 conv layers"
    assert any(line.startswith("  stem: ") for line in lines)  # searched, but only for decomposition
    assert exclusion_lines(SearchSpace.build(torch.nn.Conv2d(3, 4, 3), SpaceConfig(), (1, 3, 8, 8))) == []


def test_describe_space_lists_units_groups_choices(custom) -> None:
    space = _space(custom[0])
    text = describe_space(space)
    assert text.splitlines()[0].startswith(f"search space: {len(space.params)} parameters over 6 of 8 conv layers")
    assert "rate 0.00-0.80 step 0.1  criterion l1 | fpgm  layers: proj, c" in text  # the residual add's group
    assert "none | tucker  rank_ratio 0.10-0.90" in text
    assert "mix.0: " in text and "excluded from the search: 2 of 8 conv layers" in text


def test_policy_chart_marks_excluded_layers_and_stays_readable_at_60_layers() -> None:
    layers = [{"name": f"stage{i // 10}.block{i % 10}.conv", "out_channels": 64,
               "excluded": "grouped conv (groups=4) shares its channels" if i % 7 == 3 else None} for i in range(60)]  # fmt: skip
    policy = Policy({d["name"]: LayerPolicy(prune_rate=0.0 if i % 2 else 0.5)
                     for i, d in enumerate(layers) if d["excluded"] is None})  # fmt: skip
    rows = policy_rows(policy, layers)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("excluded") == 9 and kinds.count("none") == 51
    assert rows[3]["reason"].startswith("grouped conv") and rows[1]["rate"] == 0.0 and rows[1]["kind"] == "none"
    fig = policy_figure(rows, "t")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert len(boxes) == 60
    assert all(a.y0 >= b.y1 - 0.5 or b.y0 >= a.y1 - 0.5 for a, b in zip(boxes, boxes[1:], strict=False)), (
        "tick labels overlap"
    )
    grey = [t.get_color() for t in ax.get_yticklabels()]
    assert grey.count("0.45") == 9
    assert len(ax.containers) == 51  # a bar per searched layer (0 % ones too), none for an excluded one


STUDY = """\
[study]
name = "custom"
n_trials = 2
n_startup_trials = 2

[model]
factory = "customnet_sd:build"
pretrain_epochs = 0.1

[data]
dataset = "digits"
val_size = 200

[space]
prune_rate = [0.0, 0.5]
rate_step = 0.1
exclude = ["head"]

[evaluator]
kind = "proxy"
bn_batches = 2
batch_size = 64
"""


def test_run_prints_exclusions_once_and_space_prints_the_space(tmp_path: Path, monkeypatch, capsys) -> None:
    case = tmp_path / "case"
    case.mkdir()
    (case / "customnet_sd.py").write_text(CUSTOM)
    (case / "study.toml").write_text(STUDY)
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["space", str(case / "study.toml")]) == 0
        out = capsys.readouterr().out
        assert "model customnet_sd:build, input 1x8x8" in out and "head: [space] exclude 'head'" in out
        assert not (tmp_path / "runs").exists()  # describing the space writes nothing
        assert main(["run", str(case / "study.toml"), "--no-progress", "--workers", "1"]) == 0
        out = capsys.readouterr().out
        assert out.count("excluded from the search: 4 of 8 conv layers") == 1
        assert (
            "  stem: grouped conv" in out and "  mix.0: grouped conv" in out and "  head: [space] exclude 'head'" in out
        )
    finally:
        sys.modules.pop("customnet_sd", None)
        while str(case) in sys.path:
            sys.path.remove(str(case))
