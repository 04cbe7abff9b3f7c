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

Batching. The prompt is run ONCE through the linearised, cut model as ``B`` identical copies (stopped after the
deepest kept layer) and the graph is kept. Each batch of up to ``B`` targets then takes ONE backward of
``sum_b O_{t_b}`` with target ``t_b`` on copy ``b``: the copies do not interact, so every copy's gradients
are that target's alone. ``len(kept) / B`` backward passes in all, against one per target for the naive way
(:func:`compute_edges_one_by_one`, the reference used by the tests and the benchmark).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from conceptfix.analyze.relp import capturing, frozen_parameters, linearized
from conceptfix.analyze.types import METRIC_NODE_ID, KeptNeuron, PrunedGraph, embedding_node_id
from conceptfix.errors import ConceptfixError
from conceptfix.progress import track

if TYPE_CHECKING:
    from conceptfix.models import LoadedModel


class _StopForward(Exception):
    """Raised after the deepest target's down_proj input is captured: later layers are not needed."""


def default_batch_size(device: torch.device) -> int:
    """Copies of the prompt per backward. On a GPU copies are nearly free (measured on an H100 with a Llama-3.1-8B
    shape: 16-64 copies of a 20-64 token prompt in bf16, 5-8x faster than one backward per target, see
    benchmarks/RESULTS.md); on a CPU every copy costs a full forward, and 4-8 copies was the best measured."""
    return 32 if device.type == "cuda" else 8


def compute_edges(loaded: LoadedModel, graph: PrunedGraph, *, batch_size: int | None = None,
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

    Returns the capture and leaves the autograd graph alive; the caller runs the backward passes.
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
                with frozen_parameters(model):
                    adapter.decoder(input_ids=input_ids, use_cache=False)
            except _StopForward:
                pass
            finally:
                handle.remove()
        finally:
            cap_cm.__exit__(None, None, None)
    finally:
        lin.__exit__(None, None, None)
    return cap


def compute_edges_for_model(model: torch.nn.Module, graph: PrunedGraph, *, batch_size: int | None = None,
                            min_abs_weight: float = 0.0, progress: bool | None = None) -> PrunedGraph:
    """:func:`compute_edges` on a bare model (token ids come from ``graph.scores``).

    ``batch_size`` (targets per backward = copies of the prompt in the one forward): default
    :func:`default_batch_size` for the model's device.
    """
    device = model.get_input_embeddings().weight.device
    if batch_size is None:
        batch_size = default_batch_size(device)
    if batch_size < 1:
        raise ConceptfixError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
    scores = graph.scores
    kept = sorted(graph.kept, key=lambda k: (k.layer, k.position, k.neuron))
    grads = dict(zip((k.node_id for k in kept), _gradients(graph, kept)))
    ids = torch.tensor([scores.input_ids], dtype=torch.long, device=device)
    num_pos = ids.shape[1]

    edges: list[tuple[str, str, float]] = [(k.node_id, METRIC_NODE_ID, k.score) for k in graph.kept]
    per_target: dict[str, dict] = {}
    copies = min(batch_size, len(kept))
    batches = [kept[i:i + copies] for i in range(0, len(kept), copies)] if kept else []
    if batches:
        with torch.inference_mode(False), torch.enable_grad():
            cap = _forward_cut(model, ids.expand(copies, num_pos), max(k.layer for k in kept))
            for i, batch in enumerate(track(batches, total=len(batches), description="edges", enabled=progress)):
                edges += _batch_edges(cap, ids, batch, kept, grads, min_abs_weight, per_target,
                                      last=i == len(batches) - 1)
            del cap
    residuals = [v["residual"] for v in per_target.values()]
    graph.edges = edges
    graph.edge_stats = {
        "definition": "w(s->t) = h_s * d(g_t h_t)/d h_s in the linearised model, MLPs cut at down_proj inputs",
        "batch_size": copies,
        "forward_passes": 1 if batches else 0,
        "backward_passes": len(batches),
        "min_abs_weight": min_abs_weight,
        "max_conservation_residual": max(residuals) if residuals else 0.0,
        "targets": per_target,
    }
    return graph


def _batch_edges(cap, ids, batch: list[KeptNeuron], kept: list[KeptNeuron], grads: dict[str, float],
                 min_abs_weight: float, per_target: dict, *, last: bool = True) -> list[tuple[str, str, float]]:
    """One backward for ``batch`` (target ``b`` on copy ``b`` of the captured forward); returns its edges."""
    size = len(batch)
    num_pos = ids.shape[1]
    max_layer = max(k.layer for k in batch)
    objectives = []
    for b, t in enumerate(batch):
        h = cap.neurons[-1 - t.layer]
        objectives.append(h[b, t.position, t.neuron].double() * grads[t.node_id])
    objective_values = [float(o.detach()) for o in objectives]
    leaves = [cap.neurons[layer] for layer in range(max_layer)]
    cap.bias_terms.clear()  # the bias gradient hooks append again on every backward
    got = torch.autograd.grad(torch.stack(objectives).sum(), [cap.embeddings] + leaves, allow_unused=True,
                              retain_graph=not last)
    emb_grad, leaf_grads = got[0][:size], [None if g is None else g[:size] for g in got[1:]]
    embeddings = cap.embeddings.detach()[:size]
    bias_terms = [t[:size] for t in cap.bias_terms]
    leaves = [leaf.detach()[:size] for leaf in leaves]
    del objectives, got

    # Relevance of every input, per copy: the sum over all of them must equal the target's score (conservation);
    # of the neurons only the kept sources' entries are kept (gathered layer by layer, no [B, T, N] per layer held).
    emb_rel = (embeddings.double() * emb_grad.double()).sum(-1).cpu()  # [B, T]
    total = emb_rel.sum(-1)
    for term in bias_terms:
        total += term.double()
    sources = [s for s in kept if s.layer < max_layer]
    src_weight = torch.zeros(size, len(sources), dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for j, s in enumerate(sources):
        by_layer.setdefault(s.layer, []).append(j)
    for layer, (leaf, g) in enumerate(zip(leaves, leaf_grads)):
        if g is None:
            continue
        rel = leaf.double() * g.double()  # [B, T, N]
        total += rel.sum(dim=(1, 2)).cpu()
        cols = by_layer.get(layer)
        if cols:
            pos = torch.tensor([sources[j].position for j in cols], device=rel.device)
            nrn = torch.tensor([sources[j].neuron for j in cols], device=rel.device)
            src_weight[:, cols] = rel[:, pos, nrn].cpu()
        del rel
    del leaves, leaf_grads, emb_grad

    # A source feeds a target only from an earlier layer and a position at or before the target's.
    t_layer = torch.tensor([t.layer for t in batch])[:, None]
    t_pos = torch.tensor([t.position for t in batch])[:, None]
    s_layer = torch.tensor([s.layer for s in sources], dtype=torch.long)[None, :]
    s_pos = torch.tensor([s.position for s in sources], dtype=torch.long)[None, :]
    src_weight = src_weight * ((s_layer < t_layer) & (s_pos <= t_pos))
    positions = torch.arange(num_pos)[None, :]
    emb_weight = emb_rel * (positions <= t_pos)
    kept_weight = src_weight.sum(-1) + emb_weight.sum(-1)

    out: list[tuple[str, str, float]] = []
    for weights, names in ((src_weight, [s.node_id for s in sources]),
                           (emb_weight, [embedding_node_id(tok, p) for p, tok in enumerate(ids[0].tolist())])):
        keep = (weights != 0) & (weights.abs() >= min_abs_weight)
        for b, j in keep.nonzero().tolist():
            out.append((names[j], batch[b].node_id, float(weights[b, j])))
    for b, t in enumerate(batch):
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
        cap = _forward_cut(model, ids, max(t.layer for t in targets))
        for t in targets:
            sources = [s for s in kept if s.layer < t.layer and s.position <= t.position]
            objective = cap.neurons[-1 - t.layer][0, t.position, t.neuron].double() * grads[t.node_id]
            layers = sorted({s.layer for s in sources})
            if not layers:
                continue
            got = torch.autograd.grad(objective, [cap.neurons[layer] for layer in layers], retain_graph=True,
                                      allow_unused=True)
            by_layer = dict(zip(layers, got))
            for s in sources:
                g = by_layer[s.layer]
                w = 0.0 if g is None else float(cap.neurons[s.layer][0, s.position, s.neuron].detach().double()
                                                 * g[0, s.position, s.neuron].double())
                if w != 0.0:
                    out.append((s.node_id, t.node_id, w))
    return out
