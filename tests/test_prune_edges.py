"""Pruning rules on hand-made scores (exact expectations), and edges: batched direct effects against a hand-written
linearised Llama (plain autograd, MLPs cut), against the one-backward-per-target way on the embedded model, and
their invariants (conservation per target, causality, edges into the metric = scores)."""

from __future__ import annotations

import math

import pytest
import torch

from conceptfix.analyze.edges import compute_edges, compute_edges_for_model, compute_edges_one_by_one
from conceptfix.analyze.prune import prune
from conceptfix.analyze.relp import attribute_ids, attribute_neurons, make_metric
from conceptfix.analyze.types import METRIC_NODE_ID, MetricSpec, NeuronScores, embedding_node_id
from conceptfix.errors import ConceptfixError
from tests.helpers import tiny_model
from tests.relp_reference import hand_direct_effects


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------
# Pruning


def _scores(entries: dict[tuple[int, int, int], float], metric: float = -2.0, shape=(3, 4, 5)) -> NeuronScores:
    """Scores with the given (layer, position, neuron) → score entries, activation = 10 × layer + position."""
    scores = torch.zeros(shape)
    for (layer, pos, neuron), v in entries.items():
        scores[layer, pos, neuron] = v
    acts = torch.arange(shape[0])[:, None, None] * 10.0 + torch.arange(shape[1])[None, :, None] + 0.5
    acts = acts.expand(shape).clone()
    return NeuronScores(
        prompt="p", formatted_prompt="p", input_ids=list(range(shape[1])), tokens=[f"t{i}" for i in range(shape[1])],
        metric=MetricSpec(kind="contrastive", correct_token_id=1, wrong_token_id=2), metric_value=metric,
        activations=acts, scores=scores, embedding_scores=torch.zeros(shape[1]), conservation_residual=0.0,
        gradients=scores / acts)


# binary fractions: exact in fp32
ENTRIES = {(2, 3, 4): -1.5, (1, 3, 0): 0.75, (0, 1, 2): -0.5, (2, 0, 1): 0.25, (1, 2, 3): -0.125, (0, 0, 0): 0.0625}


def test_prune_tau_keeps_scores_above_threshold():
    graph = prune(_scores(ENTRIES, metric=-2.0), tau=0.1)  # threshold 0.2
    assert [(k.layer, k.position, k.neuron) for k in graph.kept] == [(2, 3, 4), (1, 3, 0), (0, 1, 2), (2, 0, 1)]
    first = graph.kept[0]
    assert (first.score, first.activation, first.token) == (-1.5, 20 + 3 + 0.5, "t3")
    assert first.node_id == "2_4_3" and first.pushes_toward == "wrong" and graph.kept[1].pushes_toward == "correct"
    assert graph.rule["threshold"] == pytest.approx(0.2)
    assert graph.explained_fraction == pytest.approx((-1.5 + 0.75 - 0.5 + 0.25) / -2.0)
    assert graph.rule["kept_score_sum"] == pytest.approx(-1.0)
    assert graph.rule["kept_at_last_position"] == 2 and graph.rule["kept_at_earlier_positions"] == 2
    assert [k.at_last_position(4) for k in graph.kept] == [True, True, False, False]
    assert graph.rule["kept_abs_mass_fraction"] == pytest.approx(3.0 / 3.1875)
    # the threshold is relative to |metric|: a metric ten times smaller keeps everything non-zero
    assert len(prune(_scores(ENTRIES, metric=0.2), tau=0.1).kept) == 6


def test_prune_top_k_cumulative_and_cap():
    s = _scores(ENTRIES)
    assert [k.score for k in prune(s, top_k=3).kept] == [-1.5, 0.75, -0.5]
    assert len(prune(s, top_k=100).kept) == 6  # exact zeros (inactive neurons) never kept
    # |score| mass of 3.1875 → cumulative 1.5 (.4706), 2.25 (.7059), 2.75 (.8627), 3.0, 3.125, 3.1875
    assert len(prune(s, cumulative=0.47).kept) == 1
    assert len(prune(s, cumulative=0.48).kept) == 2
    assert len(prune(s, cumulative=2.25 / 3.1875).kept) == 2
    assert len(prune(s, cumulative=0.8).kept) == 3
    assert len(prune(s, cumulative=1.0).kept) == 6
    capped = prune(s, tau=0.01, max_nodes=2)
    assert len(capped.kept) == 2 and capped.rule["truncated"] is True and capped.rule["max_nodes"] == 2
    assert prune(s, top_k=2, max_nodes=5).rule["truncated"] is False
    assert prune(s, top_k=2, tau=0.5).rule["method"] == "top_k"  # top_k replaces tau
    assert prune(_scores({}), top_k=3).kept == []


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 2, "cumulative": 0.5}, "not both"),
    ({"top_k": 0}, "top_k must be at least 1"),
    ({"cumulative": 0.0}, "cumulative must be in"),
    ({"cumulative": 1.5}, "cumulative must be in"),
    ({"tau": 0.0}, "tau must be > 0"),
    ({"tau": None}, "no pruning rule"),
    ({"tau": 0.1, "max_nodes": 0}, "max_nodes must be at least 1"),
])
def test_prune_bad_rules(kwargs, match):
    with pytest.raises(ConceptfixError, match=match):
        prune(_scores(ENTRIES), **kwargs)


def test_prune_on_real_attribution(embedded):
    scores = attribute_neurons(embedded, "The primary hormone regulating blood pressure is",
                               make_metric(embedded.tokenizer, " al", " ren"))
    graph = prune(scores, tau=0.05)
    threshold = 0.05 * abs(scores.metric_value)
    assert len(graph.kept) == int((scores.scores.abs() >= threshold).sum()) > 0
    assert all(abs(k.score) >= threshold for k in graph.kept)
    assert graph.kept == sorted(graph.kept, key=lambda k: -abs(k.score))
    for k in graph.kept[:20]:
        assert scores.scores[k.layer, k.position, k.neuron] == k.score
        assert scores.activations[k.layer, k.position, k.neuron] == k.activation
        assert k.token == scores.tokens[k.position]
    n = len(scores.input_ids)
    assert graph.rule["kept_at_last_position"] == sum(k.position == n - 1 for k in graph.kept)
    assert graph.explained_fraction == pytest.approx(sum(k.score for k in graph.kept) / scores.metric_value)


# ---------------------------------------------------------------------------------------------------------
# Edges


def _edge_map(edges) -> dict[tuple[str, str], float]:
    out = {}
    for s, t, w in edges:
        assert (s, t) not in out, f"duplicate edge {s}->{t}"
        out[(s, t)] = w
    return out


def test_edges_match_hand_written_direct_effects():
    model = tiny_model("llama", vocab_size=300, seed=5, num_hidden_layers=4, initializer_range=0.2).double()
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(3))
    scores = attribute_ids(model, ids, MetricSpec(kind="contrastive", correct_token_id=11, wrong_token_id=12))
    scores.tokens = [f"t{i}" for i in range(7)]
    graph = prune(scores, top_k=30)
    assert len({k.layer for k in graph.kept}) >= 3
    compute_edges_for_model(model, graph, batch_size=7)
    got = _edge_map(graph.edges)
    stats = graph.edge_stats
    assert stats["backward_passes"] == math.ceil(30 / 7) and stats["forward_passes"] == 1
    assert stats["batch_size"] == 7

    checked = 0
    for t in graph.kept:
        g = float(scores.gradients[t.layer, t.position, t.neuron])
        value, neuron_rel, emb_rel = hand_direct_effects(model, ids, t.layer, t.position, t.neuron, g)
        # the hand model conserves: all earlier neurons + embeddings carry the whole target score
        assert float(neuron_rel.sum() + emb_rel.sum()) == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert value == pytest.approx(t.score, rel=1e-5)
        assert stats["targets"][t.node_id]["residual"] < 1e-6
        scale = max(float(neuron_rel.abs().max()) if neuron_rel.numel() else 0.0, float(emb_rel.abs().max()))
        for s in graph.kept:
            w = got.get((s.node_id, t.node_id), 0.0)
            if s.layer < t.layer and s.position <= t.position:
                assert w == pytest.approx(float(neuron_rel[s.layer, s.position, s.neuron]), abs=1e-6 * scale)
                checked += w != 0.0
            else:
                assert w == 0.0
        for p in range(7):
            w = got.get((embedding_node_id(int(ids[0, p]), p), t.node_id), 0.0)
            expected = float(emb_rel[p]) if p <= t.position else 0.0
            assert w == pytest.approx(expected, abs=1e-6 * scale)
    assert checked > 20  # the comparison covered many real neuron→neuron edges


def test_edges_batched_equal_one_by_one_on_embedded(embedded):
    scores = attribute_neurons(embedded, "The primary hormone regulating blood pressure is",
                               make_metric(embedded.tokenizer, " al", " ren"))
    graph = prune(scores, top_k=24)
    compute_edges(embedded, graph, batch_size=8)
    batched = _edge_map(graph.edges)
    stats = graph.edge_stats
    assert stats["backward_passes"] == 3 and stats["batch_size"] == 8
    assert stats["max_conservation_residual"] < 1e-4

    # edges into the metric node carry the neuron's score
    for k in graph.kept:
        assert batched[(k.node_id, METRIC_NODE_ID)] == k.score
    # causality: only earlier layers, positions at or before the target's
    by_id = {k.node_id: k for k in graph.kept}
    for (s, t), w in batched.items():
        if t == METRIC_NODE_ID:
            continue
        target = by_id[t]
        if s.startswith("E_"):
            assert int(s.split("_")[2]) <= target.position
        else:
            assert by_id[s].layer < target.layer and by_id[s].position <= target.position
        assert w != 0.0

    reference = compute_edges_one_by_one(embedded.model, graph)
    assert len(reference) > 50
    scale = max(abs(w) for *_, w in reference)
    for s, t, w in reference:
        assert batched.get((s, t), 0.0) == pytest.approx(w, abs=1e-5 * scale)
    neuron_edges = {k: w for k, w in batched.items() if k[1] != METRIC_NODE_ID and not k[0].startswith("E_")}
    assert set(neuron_edges) == {(s, t) for s, t, _ in reference}

    # the batch size changes nothing but the number of backward passes
    again = prune(scores, top_k=24)
    compute_edges(embedded, again, batch_size=5, min_abs_weight=1e-3)
    assert again.edge_stats["backward_passes"] == 5
    small = _edge_map(again.edges)
    assert all(abs(w) >= 1e-3 or t == METRIC_NODE_ID for (s, t), w in small.items())
    for key, w in small.items():
        assert w == pytest.approx(batched[key], abs=1e-5 * scale)
    assert {k for k, w in batched.items() if abs(w) >= 1e-3} <= set(small)


def test_edges_edge_cases(embedded):
    scores = attribute_neurons(embedded, "The capital of France is", make_metric(embedded.tokenizer, " Paris", " Lyon"))
    empty = prune(scores, top_k=1)
    empty.kept = []
    compute_edges(embedded, empty)
    assert empty.edges == [] and empty.edge_stats["backward_passes"] == 0
    one = prune(scores, top_k=1)
    compute_edges(embedded, one)
    k = one.kept[0]
    edges = _edge_map(one.edges)
    assert edges[(k.node_id, METRIC_NODE_ID)] == k.score
    # a single target: its only kept sources are the embeddings, which with biases and all neurons conserve
    assert one.edge_stats["targets"][k.node_id]["residual"] < 1e-4
    with pytest.raises(ConceptfixError, match="batch_size"):
        compute_edges(embedded, one, batch_size=0)
