"""Data passed between the analysis steps (attribution → pruning → edges → labels → faithfulness → export).

Node ids (also used in graph.json):
  neuron     ``"{layer}_{neuron}_{position}"``   e.g. ``"22_13255_7"``
  embedding  ``"E_{token_id}_{position}"``
  logit      ``"L_metric"`` (the contrastive metric node; one per graph)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


def neuron_node_id(layer: int, neuron: int, position: int) -> str:
    return f"{layer}_{neuron}_{position}"


def embedding_node_id(token_id: int, position: int) -> str:
    return f"E_{token_id}_{position}"


METRIC_NODE_ID = "L_metric"


@dataclass
class MetricSpec:
    """What is attributed: logit(correct) − logit(wrong), one logit, or a custom direction at one position."""

    kind: Literal["contrastive", "logit", "direction"]
    correct_token_id: int | None = None
    wrong_token_id: int | None = None
    correct_token: str | None = None
    wrong_token: str | None = None
    direction: torch.Tensor | None = None  # [d_model] applied to the final residual (after the final norm)
    position: int = -1

    def describe(self) -> str:
        if self.kind == "contrastive":
            return f"logit({self.correct_token!r}) - logit({self.wrong_token!r})"
        if self.kind == "logit":
            return f"logit({self.correct_token!r})"
        return "custom direction"


@dataclass
class NeuronScores:
    """RelP node attributions for every MLP neuron at every position, from one backward pass."""

    prompt: str
    formatted_prompt: str
    input_ids: list[int]
    tokens: list[str]
    metric: MetricSpec
    metric_value: float            # the real (unmodified) forward value of the metric
    activations: torch.Tensor      # [layers, positions, neurons] fp32 cpu, input of down_proj
    scores: torch.Tensor           # [layers, positions, neurons] activation × modified gradient
    embedding_scores: torch.Tensor  # [positions] sum over d_model of embedding × modified gradient
    conservation_residual: float   # |sum(embedding_scores) + bias_contribution − metric_value| / |metric_value|
    gradients: torch.Tensor | None = None  # [layers, positions, neurons] the modified gradient (scores / activations)
    bias_contribution: float = 0.0  # relevance of constant biases (Qwen2 v_proj, lm_head ...); 0 for Llama


@dataclass
class KeptNeuron:
    layer: int
    neuron: int
    position: int
    token: str
    activation: float
    score: float

    @property
    def node_id(self) -> str:
        return neuron_node_id(self.layer, self.neuron, self.position)

    @property
    def pushes_toward(self) -> Literal["correct", "wrong"]:
        """Positive score raises logit(correct) − logit(wrong)."""
        return "correct" if self.score > 0 else "wrong"

    def at_last_position(self, num_positions: int) -> bool:
        return self.position == num_positions - 1


@dataclass
class PrunedGraph:
    """Neurons kept by pruning, with the edges between them and into the metric."""

    scores: NeuronScores
    kept: list[KeptNeuron]
    rule: dict                      # e.g. {"method": "tau", "tau": 0.05}
    explained_fraction: float       # sum(kept scores) / metric_value
    edges: list[tuple[str, str, float]] = field(default_factory=list)  # (source id, target id, weight)
    edge_stats: dict = field(default_factory=dict)  # per-target conservation of edge weights (see edges.py)
