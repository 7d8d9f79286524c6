"""The paper methods as study seed strategies (search.seeding.method_strategy) against a real toy context."""

from __future__ import annotations

import types

import pytest


@pytest.mark.slow
def test_study_seeds_on_toy_context() -> None:
    import slimsearch.search.seeding  # noqa: F401  (attaches the strategy functions)
    from slimsearch.evaluators.config import EvaluatorConfig
    from slimsearch.search.seed_params import SEED_STRATEGIES
    from slimsearch.spaces.config import SpaceConfig
    from slimsearch.spaces.space import SearchSpace
    from toy import toy_context

    ectx = toy_context(steps=60, max_macs_ratio=0.5)
    space = SearchSpace.build(ectx.model, SpaceConfig(criteria=("l1", "hpc", "distfit")), ectx.input_shape)
    cfg = types.SimpleNamespace(evaluator=EvaluatorConfig(bn_batches=2), study=types.SimpleNamespace(seed=0))
    ctx = types.SimpleNamespace(eval_ctx=ectx, space=space, cfg=cfg, model=ectx.model, splits=ectx.splits)

    [abshpc] = SEED_STRATEGIES["abshpc"](ctx, {"epsilon": 0.02, "rate_resolution": 0.1})
    assert abshpc.layers and all(lp.criterion == "hpc" for lp in abshpc.layers.values())
    params = space.params_from_policy(abshpc, strict=False)
    assert any(params[f"{n}.rate"] > 0 for n in abshpc.layers)
    # the MACs gate is off for the method's own probes: light steps are accepted even above max_macs
    assert ectx.max_macs is not None

    pols = SEED_STRATEGIES["distfit"](ctx, {"rates": [0.25, 0.5]})
    assert len(pols) == 2
    for p, r in zip(pols, (0.25, 0.5), strict=True):
        assert space.params_from_policy(p, strict=True)  # uniform distfit seeds are points of the space
        assert all(abs(lp.prune_rate - r) < 0.07 for lp in p.layers.values())
