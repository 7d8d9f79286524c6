"""``EvalResult``: what one evaluation of a policy gives (status, metrics, reason), as the evaluator returns it
and the result cache stores it. Its own module so the cache needs nothing else of the evaluator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalResult:
    """Outcome of one evaluation. ``metrics``: val_acc (ok/pruned), macs, flops (= 2·MACs), params,
    macs_ratio, params_ratio, macs_violation (macs - max_macs, when bounded), latency_pred_ms (measured
    where the table cannot predict), latency_ratio and latency_violation (ms over the bound; with a latency
    bound), latency_ms (when measured: the TorchScript program, conv weights in the context's
    ``latency_memory_format``, as exported) and the time split apply_s, cost_s, train_s, eval_s, wall_s.
    ``intermediate``: (step, val_acc) of the fine-tune's periodic evaluations. ``model_digest``:
    ``core.apply.model_digest`` of the network built (empty when none was). ``cached``: served from the cache,
    by policy or by network."""

    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    intermediate: list[tuple[int, float]] = field(default_factory=list)
    policy_hash: str = ""
    cached: bool = False
    model_digest: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "metrics": dict(self.metrics),
            "reason": self.reason,
            "intermediate": [[int(s), float(a)] for s, a in self.intermediate],
            "policy_hash": self.policy_hash,
            "model_digest": self.model_digest,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], cached: bool = False) -> EvalResult:
        return cls(
            status=d["status"],
            metrics={k: float(v) for k, v in d.get("metrics", {}).items()},
            reason=d.get("reason", ""),
            intermediate=[(int(s), float(a)) for s, a in d.get("intermediate", [])],
            policy_hash=d.get("policy_hash", ""),
            cached=cached,
            model_digest=d.get("model_digest", ""),
        )
