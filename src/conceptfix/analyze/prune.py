"""Pruning RelP node scores to the neurons worth looking at.

Rules (one of them):
  * ``tau``: keep neurons with ``|score| >= tau · |metric|`` (the design's default, tau = 0.05);
  * ``top_k``: the k neurons of largest ``|score|``;
  * ``cumulative``: the fewest neurons (largest ``|score|`` first) whose ``|score|`` mass reaches that fraction
    of the total ``|score|`` mass over all neurons and positions.
``max_nodes`` caps the result of any rule. ``top_k`` or ``cumulative`` replace ``tau`` when given.

Neuron scores over *all* layers do not sum to the metric (each layer's MLP sees the same signal through the
residual stream); ``explained_fraction = sum(kept scores) / metric`` is reported as the design asks, together
with the positions the kept neurons sit at (last position vs earlier ones) in ``rule``.
"""

from __future__ import annotations

import torch

from conceptfix.analyze.types import KeptNeuron, NeuronScores, PrunedGraph
from conceptfix.errors import ConceptfixError


def _validate(tau, top_k, cumulative, max_nodes) -> dict:
    if top_k is not None and cumulative is not None:
        raise ConceptfixError("give top_k or cumulative, not both", field="top_k")
    if top_k is not None:
        if top_k < 1:
            raise ConceptfixError(f"top_k must be at least 1, got {top_k}", field="top_k")
        rule = {"method": "top_k", "top_k": int(top_k)}
    elif cumulative is not None:
        if not 0.0 < cumulative <= 1.0:
            raise ConceptfixError(f"cumulative must be in (0, 1], got {cumulative}", field="cumulative")
        rule = {"method": "cumulative", "cumulative": float(cumulative)}
    elif tau is not None:
        if not tau > 0.0:
            raise ConceptfixError(f"tau must be > 0, got {tau}", field="tau", hint="the design uses 0.05")
        rule = {"method": "tau", "tau": float(tau)}
    else:
        raise ConceptfixError("no pruning rule: give tau, top_k or cumulative", field="tau")
    if max_nodes is not None:
        if max_nodes < 1:
            raise ConceptfixError(f"max_nodes must be at least 1, got {max_nodes}", field="max_nodes")
        rule["max_nodes"] = int(max_nodes)
    return rule


def prune(scores: NeuronScores, *, tau: float | None = 0.05, top_k: int | None = None,
          cumulative: float | None = None, max_nodes: int | None = None) -> PrunedGraph:
    """Kept neurons sorted by ``|score|`` (largest first), the rule used and the fraction of the metric they explain."""
    rule = _validate(tau, top_k, cumulative, max_nodes)
    flat = scores.scores.reshape(-1).float()
    magnitude = flat.abs()
    order = torch.argsort(magnitude, descending=True, stable=True)
    sorted_mag = magnitude[order]
    if rule["method"] == "top_k":
        count = min(rule["top_k"], flat.numel())
    elif rule["method"] == "cumulative":
        total = float(sorted_mag.sum())
        if total == 0.0:
            count = 0
        else:
            mass = torch.cumsum(sorted_mag.double(), 0) / total
            count = int(torch.searchsorted(mass, torch.tensor([rule["cumulative"] - 1e-12], dtype=mass.dtype))) + 1
            count = min(count, flat.numel())
    else:
        threshold = rule["tau"] * abs(scores.metric_value)
        rule["threshold"] = threshold
        count = int((sorted_mag >= threshold).sum()) if threshold > 0 else 0
    if "max_nodes" in rule:
        rule["truncated"] = count > rule["max_nodes"]
        count = min(count, rule["max_nodes"])
    # never keep exact zeros (inactive neurons) even under top_k
    keep = order[:count]
    keep = keep[magnitude[keep] > 0]

    num_layers, num_pos, num_neurons = scores.scores.shape
    layer_idx = (keep // (num_pos * num_neurons)).tolist()
    pos_idx = ((keep // num_neurons) % num_pos).tolist()
    neuron_idx = (keep % num_neurons).tolist()
    acts = scores.activations.reshape(-1)[keep].tolist()
    vals = flat[keep].tolist()
    kept = [
        KeptNeuron(layer=layer, neuron=n, position=p,
                   token=scores.tokens[p] if p < len(scores.tokens) else "",
                   activation=a, score=v)
        for layer, p, n, a, v in zip(layer_idx, pos_idx, neuron_idx, acts, vals)
    ]
    kept_sum = float(sum(vals))
    explained = kept_sum / scores.metric_value if scores.metric_value != 0 else float("nan")
    last = sum(1 for k in kept if k.at_last_position(num_pos))
    rule.update({
        "kept": len(kept),
        "kept_at_last_position": last,
        "kept_at_earlier_positions": len(kept) - last,
        "kept_score_sum": kept_sum,
        "kept_abs_mass_fraction": float(magnitude[keep].sum() / magnitude.sum()) if magnitude.sum() > 0 else 0.0,
    })
    return PrunedGraph(scores=scores, kept=kept, rule=rule, explained_fraction=explained)
