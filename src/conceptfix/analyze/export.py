"""Analysis outputs: graph.json (circuit-tracer / Neuronpedia schema v1), attribution.json, faithfulness.json,
faithfulness.png and a self-contained graph.html. Formats are documented in docs/graph_schema.md.

graph.html is one file: inline CSS, inline JS, the graph as JSON in ``<script type="application/json">`` with
``<``, ``>`` and ``&`` escaped, a Content-Security-Policy that forbids every network fetch, and all text put
into the page via ``textContent`` (JS) or ``html.escape`` (the static table) — never parsed as HTML.
"""

from __future__ import annotations

import html
import json
import math
import re
from importlib import resources
from typing import Any

from conceptfix.analyze.faithfulness import FaithfulnessReport
from conceptfix.analyze.labels import NeuronLabel, primary_label
from conceptfix.analyze.types import METRIC_NODE_ID, PrunedGraph, embedding_node_id
from conceptfix.errors import ConceptfixError

GRAPH_SCHEMA_VERSION = 1
FEATURE_TYPE_NEURON = "mlp neuron"
FEATURE_TYPE_EMBEDDING = "embedding"
FEATURE_TYPE_LOGIT = "logit"

Labels = dict[tuple[int, int], list[NeuronLabel]]


def graph_schema() -> dict:
    """The JSON Schema of graph.json (src/conceptfix/data/graph_schema_v1.json)."""
    return json.loads(resources.files("conceptfix").joinpath("data/graph_schema_v1.json").read_text(encoding="utf-8"))


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:60].strip("-") or "graph"


# ---------------------------------------------------------------------------------------------- graph.json

def graph_json(graph: PrunedGraph, labels: Labels, *, scan: str, slug: str, num_layers: int,
               correct_prob: float | None = None, extra_metadata: dict | None = None, pinned: int = 10) -> dict:
    """circuit-tracer's graph format (schema_version 1) with MLP neurons as features.

    node_id: neuron ``"{layer}_{neuron}_{position}"``, embedding ``"E_{token_id}_{position}"``, metric ``"L_metric"``.
    ``influence`` is the node's signed RelP attribution to the metric (for embeddings, the embedding's share).
    """
    scores = graph.scores
    positions = len(scores.input_ids)
    nodes: list[dict] = []
    for pos, token_id in enumerate(scores.input_ids):
        nodes.append({
            "node_id": embedding_node_id(token_id, pos), "feature": pos, "layer": "E", "ctx_idx": pos,
            "feature_type": FEATURE_TYPE_EMBEDDING, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": positions - 1 - pos, "jsNodeId": f"E_{token_id}-{pos}",
            "clerp": f"Emb: {scores.tokens[pos]!r}", "influence": _num(scores.embedding_scores[pos]), "activation": None,
        })
    for k in graph.kept:
        nodes.append({
            "node_id": k.node_id, "feature": k.neuron, "layer": str(k.layer), "ctx_idx": k.position,
            "feature_type": FEATURE_TYPE_NEURON, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": positions - 1 - k.position, "jsNodeId": f"{k.layer}_{k.neuron}-{k.position}",
            "clerp": primary_label(labels.get((k.layer, k.neuron))), "influence": _num(k.score),
            "activation": _num(k.activation),
        })
    metric = scores.metric
    metric_pos = metric.position % positions
    nodes.append({
        "node_id": METRIC_NODE_ID, "feature": int(metric.correct_token_id if metric.correct_token_id is not None else -1),
        "layer": str(num_layers + 1), "ctx_idx": metric_pos, "feature_type": FEATURE_TYPE_LOGIT,
        "token_prob": _clip01(correct_prob), "is_target_logit": True, "run_idx": 0,
        "reverse_ctx_idx": positions - 1 - metric_pos, "jsNodeId": f"L_metric-{metric_pos}",
        "clerp": f"{metric.describe()} = {scores.metric_value:.3f}", "influence": _num(scores.metric_value),
        "activation": None,
    })
    ids = {n["node_id"] for n in nodes}
    links = [{"source": s, "target": t, "weight": _num(w)} for s, t, w in graph.edges if s in ids and t in ids]
    link_kind = "edges"
    if not graph.edges:
        # Edges were not computed: link every kept neuron straight to the metric with its score.
        links = [{"source": k.node_id, "target": METRIC_NODE_ID, "weight": _num(k.score)} for k in graph.kept]
        link_kind = "scores-to-metric"
    top = sorted(graph.kept, key=lambda k: abs(k.score), reverse=True)[:pinned]
    return {
        "metadata": {
            "slug": slugify(slug), "scan": scan, "transcoder_list": [], "prompt_tokens": list(scores.tokens),
            "prompt": scores.formatted_prompt, "node_threshold": graph.rule.get("tau"),
            "schema_version": GRAPH_SCHEMA_VERSION,
            "conceptfix": {"node_id_format": {"neuron": "{layer}_{neuron}_{position}",
                                              "embedding": "E_{token_id}_{position}", "metric": METRIC_NODE_ID},
                           "metric": metric.describe(), "metric_value": scores.metric_value,
                           "link_kind": link_kind, "pruning": graph.rule, **(extra_metadata or {})},
        },
        "qParams": {"pinnedIds": [k.node_id for k in top] + [METRIC_NODE_ID], "supernodes": [], "linkType": "both",
                    "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


def check_graph_json(data: dict) -> None:
    """Checks the schema cannot express: unique node ids, links between existing nodes, finite numbers."""
    seen = set()
    for node in data["nodes"]:
        if node["node_id"] in seen:
            raise ConceptfixError(f"duplicate node_id {node['node_id']}", field="graph.json")
        seen.add(node["node_id"])
    for link in data["links"]:
        if link["source"] not in seen or link["target"] not in seen:
            raise ConceptfixError(f"link {link['source']} → {link['target']} names a missing node", field="graph.json")
        if not math.isfinite(link["weight"]):
            raise ConceptfixError(f"link {link['source']} → {link['target']} has weight {link['weight']}",
                                  field="graph.json")


# ----------------------------------------------------------------------------------------- attribution.json

def attribution_json(graph: PrunedGraph, labels: Labels, *, model: str, provenance: dict) -> dict:
    scores = graph.scores
    metric = scores.metric
    pushes = {"correct": metric.correct_token, "wrong": metric.wrong_token}
    neurons = []
    for k in sorted(graph.kept, key=lambda k: abs(k.score), reverse=True):
        own = labels.get((k.layer, k.neuron), [])
        neurons.append({
            "node_id": k.node_id, "layer": k.layer, "neuron": k.neuron, "position": k.position, "token": k.token,
            "activation": k.activation, "score": k.score, "influence_sign": "+" if k.score > 0 else "-",
            "pushes_toward": k.pushes_toward, "pushes_toward_token": pushes[k.pushes_toward],
            "label": primary_label(own), "labels": [lab.to_dict() for lab in own],
        })
    return {
        "model": model,
        "prompt": scores.prompt,
        "formatted_prompt": scores.formatted_prompt,
        "input_ids": list(scores.input_ids),
        "tokens": list(scores.tokens),
        "metric": {"kind": metric.kind, "description": metric.describe(), "value": scores.metric_value,
                   "correct_token": metric.correct_token, "correct_token_id": metric.correct_token_id,
                   "wrong_token": metric.wrong_token, "wrong_token_id": metric.wrong_token_id,
                   "position": metric.position},
        "conservation_residual": scores.conservation_residual,
        "bias_contribution": getattr(scores, "bias_contribution", 0.0),
        "embedding_scores": [float(x) for x in scores.embedding_scores],
        "explained_fraction": graph.explained_fraction,
        "pruning": graph.rule,
        "edge_stats": getattr(graph, "edge_stats", {}),
        "neurons": neurons,
        "edges": [{"source": s, "target": t, "weight": float(w)} for s, t, w in graph.edges],
        "provenance": provenance,
    }


# ---------------------------------------------------------------------------------------- faithfulness.png

def faithfulness_png(report: FaithfulnessReport, title: str, *, correct: str | None = None,
                     wrong: str | None = None) -> bytes:
    """Six panels: the three ablation curves (real vs predicted vs random bands, log N), single neurons (real vs
    predicted), completeness, and the flip sweep (probabilities of the two answers as wrong-pushers go)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    correct = correct or "correct"
    wrong = wrong or "wrong"
    fig = Figure(figsize=(15, 8.6), dpi=100)
    axes = fig.subplots(2, 3)
    base = report.unablated_metric
    panels = [
        (axes[0, 0], report.curve_wrong, f"ablate top-N pushing toward {wrong!r}\n(should raise the metric)"),
        (axes[0, 1], report.curve_correct, f"ablate top-N pushing toward {correct!r}\n(should lower the metric)"),
        (axes[0, 2], report.curve, "ablate top-N by |score|, both signs\n(opposing effects partly cancel)"),
    ]
    for ax, points, name in panels:
        _curve_panel(ax, points, name, flip_at=-base)
    axes[0, 0].legend(fontsize=7, loc="best")

    ax = axes[1, 0]
    if report.singles:
        pred = [p.predicted_change for p in report.singles]
        real = [p.change for p in report.singles]
        colors = ["#2166ac" if p.score > 0 else "#b2182b" for p in report.singles]
        ax.scatter(pred, real, c=colors, s=22, zorder=3)
        lim = max(max(map(abs, pred)), max(map(abs, real))) * 1.15 or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.6, ls=":", label="real = predicted")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        for p in report.singles[:6]:
            ax.annotate(f"L{p.layer}/N{p.neuron}@{p.position}", (p.predicted_change, p.change), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.legend(fontsize=7, loc="upper left")
    ax.axhline(0, color="black", lw=0.4)
    ax.axvline(0, color="black", lw=0.4)
    ax.set_xlabel("predicted change (attribution)")
    ax.set_ylabel("real change")
    ax.set_title(f"single neurons: top {len(report.singles)} by |score|\n(blue → {correct!r}, red → {wrong!r})",
                 fontsize=9)

    ax = axes[1, 1]
    comp = [p for p in report.completeness if p.n > 0]
    if comp:
        ax.plot([p.n for p in comp], [p.normalized for p in comp], "o-", color="#2b8a3e", label="top-N kept")
        ax.set_xscale("log")
    ax.axhline(1, color="black", lw=0.6, ls=":", label="unablated model")
    ax.axhline(0, color="black", lw=0.4, label="all neurons ablated")
    ax.set_xlabel("N top neurons kept (every other neuron ablated)")
    ax.set_ylabel("metric recovered (normalised)")
    ax.set_title("completeness", fontsize=9)
    ax.legend(fontsize=7, loc="best")

    ax = axes[1, 2]
    sweep = report.flip_sweep
    if sweep:
        ns = [p.n for p in sweep]
        ax.plot(ns, [p.correct_prob for p in sweep], "o-", color="#2166ac", label=f"p({correct!r})")
        ax.plot(ns, [p.wrong_prob for p in sweep], "s-", color="#b2182b", label=f"p({wrong!r})")
        flipped = [p for p in sweep if p.flipped]
        if flipped:
            ax.scatter([p.n for p in flipped], [p.correct_prob for p in flipped], s=120, facecolors="none",
                       edgecolors="#2b8a3e", linewidths=1.5, zorder=4, label=f"{correct!r} is top-1")
        for p in sweep:
            ax.annotate(repr(p.top1_token), (p.n, max(p.correct_prob, p.wrong_prob)), fontsize=6,
                        xytext=(0, 6), textcoords="offset points", ha="center")
        ax.set_xscale("log")
    ax.axhline(report.unablated.correct_prob, color="#2166ac", lw=0.6, ls=":")
    ax.axhline(report.unablated.wrong_prob, color="#b2182b", lw=0.6, ls=":")
    ax.set_xlabel(f"N top neurons pushing toward {wrong!r} ablated")
    ax.set_ylabel("probability (dotted: unablated)")
    ax.set_title("flip test (labels: top-1 token)", fontsize=9)
    ax.legend(fontsize=7, loc="best")

    fig.suptitle(f"{title[:140]}\n{report.ablation} ablation · unablated metric {base:+.3f} · "
                 f"random: {report.random_draws} draws per N", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _curve_panel(ax, points, name: str, *, flip_at: float) -> None:
    ax.axhline(0, color="black", lw=0.4)
    if points:
        ns = [p.n for p in points]
        for kind, color, label in (("uniform", "#888888", "N uniform random neurons (mean ± std)"),
                                   ("matched", "#d9822b", "N random, same (layer, position) slots")):
            mean = [getattr(p, f"{kind}_random_change_mean") for p in points]
            if any(m is None for m in mean):
                continue
            std = [getattr(p, f"{kind}_random_change_std") or 0.0 for p in points]
            ax.fill_between(ns, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.25, lw=0)
            ax.plot(ns, mean, ":", color=color, lw=1, label=label)
        ax.plot(ns, [p.predicted_change for p in points], "s--", color="#7f9fdf", ms=4, label="predicted (−Σ score)")
        ax.plot(ns, [p.change for p in points], "o-", color="#1f3f8f", ms=5, label="real (ablated forward pass)")
        ax.set_xscale("log")
        # Where logit(correct) = logit(wrong): a change past this line flips the pair.
        ax.axhline(flip_at, color="#2b8a3e", lw=0.7, ls="-.", label="change that equalises the pair")
    else:
        ax.text(0.5, 0.5, "no such neurons kept", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("N neurons ablated")
    ax.set_ylabel("metric change")
    ax.set_title(name, fontsize=9)


# ------------------------------------------------------------------------------------------------ graph.html

def json_for_script(data: Any) -> str:
    """JSON safe to place inside <script type="application/json">: no '<', '>' or '&' survive literally."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def graph_html(graph_data: dict, attribution: dict, faithfulness: dict | None, *, title: str,
               faithfulness_png: bytes | None = None) -> str:
    """A self-contained page: layers (y) × token positions (x), nodes coloured by which answer they push;
    the faithfulness plot inline (data: URI), the top neurons as a table. Nothing is fetched from the network."""
    payload = {
        "graph": graph_data,
        "neurons": {n["node_id"]: {"labels": n["labels"], "pushes_toward_token": n["pushes_toward_token"]}
                    for n in attribution["neurons"]},
        "metric": attribution["metric"],
    }
    e = html.escape
    rows = []
    for n in attribution["neurons"][:40]:
        rows.append(
            f"<tr class=\"{'pos' if n['score'] > 0 else 'neg'}\"><td>L{n['layer']}/N{n['neuron']}</td>"
            f"<td>{n['position']} {e(repr(n['token']))}</td><td>{n['score']:+.3f}</td><td>{n['activation']:+.3f}</td>"
            f"<td>{e(str(n['pushes_toward_token']))}</td><td>{e(n['label'])}</td></tr>")
    metric = attribution["metric"]
    summary = [f"metric {e(metric['description'])} = {metric['value']:.3f}",
               f"conservation residual {attribution['conservation_residual']:.2e}",
               f"explained fraction {attribution['explained_fraction']:.3f}",
               f"{len(attribution['neurons'])} neurons kept"]
    if faithfulness and faithfulness.get("flip_test"):
        flip = faithfulness["flip_test"]
        first = faithfulness.get("first_flip_n")
        summary.append(f"flip test: ablating {flip['n']} wrong-pushing neurons → top-1 {e(repr(flip['top1_token']))} "
                       f"({'flipped' if flip['flipped'] else 'not flipped'}"
                       + (f"; correct token top-1 from N={first}" if first is not None else "") + ")")
    plot = ""
    if faithfulness_png:
        import base64

        plot = (f'<h2>Faithfulness</h2><img class="plot" alt="faithfulness curves" '
                f'src="data:image/png;base64,{base64.b64encode(faithfulness_png).decode("ascii")}">')
    return _HTML_TEMPLATE.format(
        title=e(title), prompt=e(attribution["formatted_prompt"]), summary=" · ".join(summary),
        rows="\n".join(rows), data=json_for_script(payload), plot=plot,
    )


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _clip01(value: float | None) -> float:
    if value is None or not math.isfinite(value):
        return 0.0
    return min(1.0, max(0.0, float(value)))


_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>{title}</title>
<script>
// Script errors and blocked fetches are recorded as attributes of the html element (data-error,
// data-csp-violation), so a headless-browser test can see them in the dumped DOM.
window.onerror = function (msg, src, line) {{
  document.documentElement.setAttribute("data-error", String(msg) + " (line " + line + ")");
}};
document.addEventListener("securitypolicyviolation", function (ev) {{
  document.documentElement.setAttribute("data-csp-violation", String(ev.blockedURI || ev.violatedDirective));
}});
</script>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px; color: #222; background: #fff; }}
h1 {{ font-size: 18px; margin: 0 0 4px 0; }}
.prompt {{ font-family: ui-monospace, Menlo, monospace; background: #f4f4f4; padding: 4px 8px; white-space: pre-wrap; }}
.summary {{ color: #555; font-size: 13px; margin: 6px 0 10px 0; }}
.legend span {{ display: inline-block; margin-right: 14px; font-size: 12px; }}
.swatch {{ display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 4px; vertical-align: middle; }}
#graph-wrap {{ overflow-x: auto; border: 1px solid #ddd; }}
svg text {{ font-size: 11px; fill: #333; }}
svg .axis {{ fill: #777; }}
svg .node {{ cursor: pointer; stroke: #333; stroke-width: 0.6; }}
svg .node:hover, svg .node.sel {{ stroke-width: 2.5; }}
#tip {{ position: fixed; pointer-events: none; background: #fffff0; border: 1px solid #999; padding: 6px 8px;
        font-size: 12px; max-width: 460px; display: none; box-shadow: 0 2px 6px rgba(0,0,0,.2); white-space: pre-wrap; }}
h2 {{ font-size: 15px; margin: 18px 0 6px 0; }}
img.plot {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 12px; margin-top: 12px; }}
td, th {{ border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; vertical-align: top; }}
tr.pos td:first-child {{ border-left: 4px solid #2166ac; }}
tr.neg td:first-child {{ border-left: 4px solid #b2182b; }}
</style>
</head>
<body>
<h1>{title}</h1>
<div class="prompt">{prompt}</div>
<div class="summary">{summary}</div>
<div class="legend"><span><i class="swatch" style="background:#2166ac"></i>pushes toward the correct token</span>
<span><i class="swatch" style="background:#b2182b"></i>pushes toward the wrong token</span>
<span>node area ∝ |score| · edge width ∝ |weight| (blue +, red −) · hover a node for its labels</span></div>
<div id="graph-wrap"><svg id="graph"></svg></div>
<div id="tip"></div>
<table>
<thead><tr><th>neuron</th><th>position</th><th>score</th><th>activation</th><th>pushes toward</th><th>label</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{plot}
<script type="application/json" id="graph-data">{data}</script>
<script>
(function () {{
  "use strict";
  var payload = JSON.parse(document.getElementById("graph-data").textContent);
  var g = payload.graph, NS = "http://www.w3.org/2000/svg";
  var svg = document.getElementById("graph"), tip = document.getElementById("tip");
  var tokens = g.metadata.prompt_tokens, T = tokens.length;
  var layerNums = g.nodes.filter(function (n) {{ return n.feature_type === "mlp neuron"; }})
                         .map(function (n) {{ return +n.layer; }});
  var metricNode = g.nodes.filter(function (n) {{ return n.feature_type === "logit"; }})[0];
  var topLayer = metricNode ? +metricNode.layer : (layerNums.length ? Math.max.apply(null, layerNums) + 2 : 2);
  var rowH = 18, left = 44, top = 20, bottom = 70, step = 13;
  var rows = topLayer + 1;  // E row, layers 0..topLayer-2, metric row
  function rowOf(n) {{
    if (n.feature_type === "embedding") return 0;
    if (n.feature_type === "logit") return rows - 1;
    return +n.layer + 1;
  }}
  // Neurons sharing a (layer, position) cell sit side by side; a position's column is as wide as its fullest cell.
  var cells = {{}}, pos = {{}}, fullest = [];
  for (var p = 0; p < T; p++) fullest.push(1);
  g.nodes.forEach(function (n) {{
    var key = rowOf(n) + ":" + n.ctx_idx;
    (cells[key] = cells[key] || []).push(n);
    fullest[n.ctx_idx] = Math.max(fullest[n.ctx_idx], cells[key].length);
  }});
  var colX = [], colW = [], x0 = left;
  for (p = 0; p < T; p++) {{ colX.push(x0); colW.push(Math.max(96, step * fullest[p] + 16)); x0 += colW[p]; }}
  var width = x0 + 20, height = top + rowH * rows + bottom;
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  function el(name, attrs, text) {{
    var e = document.createElementNS(NS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }}
  function y(row) {{ return top + rowH * (rows - 1 - row) + rowH / 2; }}
  // Background grid: one band per layer, one column per position.
  for (var r = 0; r < rows; r++) {{
    if (r % 2 === 0) svg.appendChild(el("rect", {{x: left, y: y(r) - rowH / 2, width: x0 - left, height: rowH, fill: "#fafafa"}}));
    var name = r === 0 ? "E" : (r === rows - 1 ? "logit" : (r - 1) % 2 === 0 ? "L" + (r - 1) : "");
    if (name) svg.appendChild(el("text", {{x: 4, y: y(r) + 4, "class": "axis"}}, name));
  }}
  for (p = 0; p < T; p++) {{
    svg.appendChild(el("line", {{x1: colX[p], x2: colX[p], y1: top, y2: top + rowH * rows, stroke: "#eee"}}));
    svg.appendChild(el("text", {{x: colX[p] + colW[p] / 2, y: top + rowH * rows + 14, "text-anchor": "middle"}},
                       p + ": " + JSON.stringify(tokens[p]).slice(0, 14)));
  }}
  Object.keys(cells).forEach(function (key) {{
    var list = cells[key];
    list.sort(function (a, b) {{ return Math.abs(b.influence || 0) - Math.abs(a.influence || 0); }});
    list.forEach(function (n, i) {{
      var cx = colX[n.ctx_idx] + colW[n.ctx_idx] / 2 + (i - (list.length - 1) / 2) * step;
      pos[n.node_id] = {{x: cx, y: y(rowOf(n))}};
    }});
  }});
  var maxW = 0, maxS = 0;
  g.links.forEach(function (l) {{ maxW = Math.max(maxW, Math.abs(l.weight)); }});
  g.nodes.forEach(function (n) {{ if (n.feature_type === "mlp neuron") maxS = Math.max(maxS, Math.abs(n.influence || 0)); }});
  var edgeLayer = el("g", {{}}), nodeLayer = el("g", {{}});
  svg.appendChild(edgeLayer); svg.appendChild(nodeLayer);
  var edgesByNode = {{}};
  g.links.forEach(function (l) {{
    var a = pos[l.source], b = pos[l.target];
    if (!a || !b || !maxW) return;
    var w = Math.abs(l.weight) / maxW;
    if (w < 0.02) return;
    var line = el("line", {{x1: a.x, y1: a.y, x2: b.x, y2: b.y, stroke: l.weight > 0 ? "#2166ac" : "#b2182b",
                           "stroke-width": (0.4 + 4 * w).toFixed(2), "stroke-opacity": (0.15 + 0.5 * w).toFixed(2)}});
    edgeLayer.appendChild(line);
    [l.source, l.target].forEach(function (id) {{ (edgesByNode[id] = edgesByNode[id] || []).push(line); }});
  }});
  function describe(n) {{
    var lines = [];
    if (n.feature_type === "mlp neuron") {{
      lines.push("L" + n.layer + "/N" + n.feature + "  pos " + n.ctx_idx + " " + JSON.stringify(tokens[n.ctx_idx]));
      lines.push("score " + (n.influence || 0).toFixed(4) + "   activation " + (n.activation || 0).toFixed(4));
      var info = payload.neurons[n.node_id];
      if (info) {{
        lines.push("pushes toward " + JSON.stringify(info.pushes_toward_token));
        info.labels.forEach(function (lab) {{ lines.push("[" + lab.source + "] " + lab.text); }});
      }}
    }} else {{
      lines.push(n.clerp);
      if (n.influence !== null && n.influence !== undefined) lines.push("attribution " + n.influence.toFixed(4));
    }}
    return lines.join("\\n");
  }}
  g.nodes.forEach(function (n) {{
    var p = pos[n.node_id];
    var r = n.feature_type === "mlp neuron" ? 2 + 4.5 * Math.sqrt(Math.abs(n.influence || 0) / (maxS || 1)) : 5;
    var fill = n.feature_type === "logit" ? "#444" : n.feature_type === "embedding" ? "#bbb"
             : (n.influence || 0) > 0 ? "#2166ac" : "#b2182b";
    var c = el("circle", {{cx: p.x, cy: p.y, r: r.toFixed(2), fill: fill, "class": "node", "data-node-id": n.node_id}});
    c.addEventListener("mousemove", function (ev) {{
      tip.textContent = describe(n);
      tip.style.display = "block";
      tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 10) + "px";
      (edgesByNode[n.node_id] || []).forEach(function (line) {{ line.setAttribute("data-hl", "1"); line.style.strokeOpacity = 0.95; }});
    }});
    c.addEventListener("mouseleave", function () {{
      tip.style.display = "none";
      (edgesByNode[n.node_id] || []).forEach(function (line) {{ line.style.strokeOpacity = ""; }});
    }});
    nodeLayer.appendChild(c);
  }});
  svg.setAttribute("data-rendered-nodes", String(nodeLayer.childNodes.length));
  svg.setAttribute("data-rendered-edges", String(edgeLayer.childNodes.length));
  document.documentElement.setAttribute("data-rendered", "1");
}})();
</script>
</body>
</html>
"""
