"""Edges between kept neurons: direct effects in the linearised model, a batch of targets per backward.

Definition. Let ``t`` be a kept neuron (layer ``l_t``, position ``p_t``) with activation ``h_t``, modified gradient
``g_t`` (from :func:`relp.attribute_neurons`) and score ``S_t = g_t · h_t``. Treat ``g_t`` as a constant and trace
``O_t = g_t · h_t`` back through the RelP-linearised model *with every MLP cut at its down_proj input*
(so MLPs between source and target pass nothing on: only the residual stream, norms with frozen scale and
attention with frozen pattern carry the effect). The edge weight from source neuron ``s`` (``l_s < l_t``,
``p_s <= p_t``) is::

    w(s → t) = h_s · ∂O_t/∂h_s        (direct effect of s on t's score)

and from the embedding at position ``p``: ``sum_d e_{p,d} · ∂O_t/∂e_{p,d}``. Because the cut model is linear in
(embeddings, all neurons, biases), the weights from *all* neurons of earlier layers, all embeddings and the
biases sum to ``S_t``; each run checks this per target (``graph.edge_stats``) and reports how much of
``S_t`` the kept sources and embeddings carry. Edges into the metric node carry the neuron's score.

Batching. The targets of one batch are placed on ``B`` copies of the prompt, one target per copy; one
forward (stopped after the deepest target layer) and ONE backward of ``sum_b O_{t_b}`` give every copy's
gradients at once, since the copies do not interact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from conceptfix.analyze.relp import capturing, linearized
from conceptfix.analyze.types import METRIC_NODE_ID, KeptNeuron, PrunedGraph, embedding_node_id
from conceptfix.errors import ConceptfixError
from conceptfix.progress import track

if TYPE_CHECKING:
    from conceptfix.models import LoadedModel


class _StopForward(Exception):
    """Raised after the deepest target's down_proj input is captured: later layers are not needed."""


def compute_edges(loaded: LoadedModel, graph: PrunedGraph, *, batch_size: int = 32,
                  min_abs_weight: float = 0.0, progress: bool | None = None) -> PrunedGraph:
    """Fill ``graph.edges`` (source id, target id, weight) and ``graph.edge_stats``; returns the same graph."""
    return compute_edges_for_model(loaded.model, graph, batch_size=batch_size, min_abs_weight=min_abs_weight,
                                   progress=progress)


def _gradients(graph: PrunedGraph, kept: list[KeptNeuron]) -> list[float]:
    g = graph.scores.gradients
    if g is not None:
        return [float(g[k.layer, k.position, k.neuron]) for k in kept]
    return [k.score / k.activation for k in kept]  # kept neurons have non-zero scores, hence activations


def _forward_cut(model: torch.nn.Module, input_ids: torch.Tensor, max_layer: int):
    """Linearised forward of ``input_ids`` [B, T] with neurons cut, stopped after layer ``max_layer``'s MLP input.

    Returns (capture, adapter) and leaves the autograd graph alive; the caller runs the backward.
    """
    lin = linearized(model)
    adapter = lin.__enter__()
    try:
        cap_cm = capturing(adapter, cut_neurons=True)
        cap = cap_cm.__enter__()
        try:
            def stop(module, args):
                raise _StopForward

            handle = adapter.down_proj(max_layer).register_forward_pre_hook(stop)
            try:
                adapter.decoder(input_ids=input_ids, use_cache=False)
            except _StopForward:
                pass
            finally:
                handle.remove()
        finally:
            cap_cm.__exit__(None, None, None)
    finally:
        lin.__exit__(None, None, None)
    return cap, adapter


def compute_edges_for_model(model: torch.nn.Module, graph: PrunedGraph, *, batch_size: int = 32,
                            min_abs_weight: float = 0.0, progress: bool | None = None) -> PrunedGraph:
    """:func:`compute_edges` on a bare model (token ids come from ``graph.scores``)."""
    if batch_size < 1:
        raise ConceptfixError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
    scores = graph.scores
    kept = sorted(graph.kept, key=lambda k: (k.layer, k.position, k.neuron))
    grads = dict(zip((k.node_id for k in kept), _gradients(graph, kept)))
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([scores.input_ids], dtype=torch.long, device=device)
    num_pos = ids.shape[1]

    edges: list[tuple[str, str, float]] = [(k.node_id, METRIC_NODE_ID, k.score) for k in graph.kept]
    per_target: dict[str, dict] = {}
    batches = [kept[i:i + batch_size] for i in range(0, len(kept), batch_size)]
    with torch.inference_mode(False), torch.enable_grad():
        for batch in track(batches, total=len(batches), description="edges", enabled=progress):
            edges += _batch_edges(model, ids, batch, kept, grads, num_pos, min_abs_weight, per_target)
    residuals = [v["residual"] for v in per_target.values()]
    graph.edges = edges
    graph.edge_stats = {
        "definition": "w(s->t) = h_s * d(g_t h_t)/d h_s in the linearised model, MLPs cut at down_proj inputs",
        "batch_size": batch_size,
        "backward_passes": len(batches),
        "min_abs_weight": min_abs_weight,
        "max_conservation_residual": max(residuals) if residuals else 0.0,
        "targets": per_target,
    }
    return graph


def _batch_edges(model, ids, batch: list[KeptNeuron], kept: list[KeptNeuron], grads: dict[str, float],
                 num_pos: int, min_abs_weight: float, per_target: dict) -> list[tuple[str, str, float]]:
    size = len(batch)
    max_layer = max(k.layer for k in batch)
    cap, adapter = _forward_cut(model, ids.expand(size, num_pos), max_layer)
    objectives = []
    for b, t in enumerate(batch):
        h = cap.neurons[-1 - t.layer]
        objectives.append(h[b, t.position, t.neuron].float() * grads[t.node_id])
    objective_values = [float(o.detach()) for o in objectives]
    leaves = [cap.neurons[layer] for layer in range(max_layer)]
    inputs = [cap.embeddings] + leaves
    got = torch.autograd.grad(torch.stack(objectives).sum(), inputs, allow_unused=True)
    emb_grad, leaf_grads = got[0], got[1:]

    # relevance of every input, per copy: embeddings per position, all neurons per layer, biases
    emb_rel = (cap.embeddings.detach().float() * emb_grad.float()).sum(-1).cpu()  # [B, T]
    total = emb_rel.sum(-1)
    neuron_rel: dict[int, torch.Tensor] = {}
    for layer, (leaf, g) in enumerate(zip(leaves, leaf_grads)):
        if g is None:
            continue
        rel = leaf.detach().float() * g.float()  # [B, T, N]
        total += rel.sum(dim=(1, 2)).cpu()
        neuron_rel[layer] = rel
    for term in cap.bias_terms:
        total += term
    del got, leaves, inputs, cap

    sources_by_layer: dict[int, list[KeptNeuron]] = {}
    for s in kept:
        if s.layer < max_layer:
            sources_by_layer.setdefault(s.layer, []).append(s)
    out: list[tuple[str, str, float]] = []
    kept_weight = torch.zeros(size)
    for layer, sources in sources_by_layer.items():
        if layer not in neuron_rel:
            continue
        pos = torch.tensor([s.position for s in sources], device=neuron_rel[layer].device)
        nrn = torch.tensor([s.neuron for s in sources], device=neuron_rel[layer].device)
        weights = neuron_rel[layer][:, pos, nrn].cpu()  # [B, S]
        for b, t in enumerate(batch):
            for j, s in enumerate(sources):
                if s.layer >= t.layer or s.position > t.position:
                    continue
                w = float(weights[b, j])
                kept_weight[b] += w
                if w != 0.0 and abs(w) >= min_abs_weight:
                    out.append((s.node_id, t.node_id, w))
    tokens = ids[0].tolist()
    for b, t in enumerate(batch):
        for p in range(t.position + 1):
            w = float(emb_rel[b, p])
            kept_weight[b] += w
            if w != 0.0 and abs(w) >= min_abs_weight:
                out.append((embedding_node_id(tokens[p], p), t.node_id, w))
        value = objective_values[b]
        per_target[t.node_id] = {
            "score": value,
            "sum_all_sources": float(total[b]),
            "residual": abs(float(total[b]) - value) / max(abs(value), 1e-12),
            "kept_source_fraction": float(kept_weight[b]) / value if value != 0 else float("nan"),
        }
    return out


def compute_edges_one_by_one(model: torch.nn.Module, graph: PrunedGraph,
                             targets: list[KeptNeuron] | None = None) -> list[tuple[str, str, float]]:
    """Reference: one backward per target neuron on one copy of the prompt (for tests and the benchmark).

    Returns only neuron → neuron edges (no threshold) for ``targets`` (default: all kept neurons).
    """
    scores = graph.scores
    kept = sorted(graph.kept, key=lambda k: (k.layer, k.position, k.neuron))
    targets = kept if targets is None else targets
    grads = dict(zip((k.node_id for k in kept), _gradients(graph, kept)))
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([scores.input_ids], dtype=torch.long, device=device)
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        cap, _ = _forward_cut(model, ids, max(t.layer for t in targets))
        for t in targets:
            sources = [s for s in kept if s.layer < t.layer and s.position <= t.position]
            objective = cap.neurons[-1 - t.layer][0, t.position, t.neuron].float() * grads[t.node_id]
            layers = sorted({s.layer for s in sources})
            if not layers:
                continue
            got = torch.autograd.grad(objective, [cap.neurons[layer] for layer in layers], retain_graph=True,
                                      allow_unused=True)
            by_layer = dict(zip(layers, got))
            for s in sources:
                g = by_layer[s.layer]
                w = 0.0 if g is None else float(cap.neurons[s.layer][0, s.position, s.neuron].float()
                                                 * g[0, s.position, s.neuron].float())
                if w != 0.0:
                    out.append((s.node_id, t.node_id, w))
    return out
