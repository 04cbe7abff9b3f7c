"""Stage 3 end to end: attribution → pruning → edges → labels → faithfulness → files in the output directory.

``analyze(loaded, prompt, correct=" al", wrong=" ren", output_dir=...)`` writes graph.json, attribution.json,
faithfulness.json, faithfulness.png, graph.html and manifest.json (each atomically). The manifest holds a hash
of everything that determines the result (model, profile, prompt, pair, options); re-running the same analysis
into the same directory reuses the files, a different analysis there needs ``overwrite=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conceptfix.artifacts import atomic_write_bytes, atomic_write_text, content_hash, provenance, write_json
from conceptfix.errors import ConceptfixError

OUTPUT_FILES = ("graph.json", "attribution.json", "faithfulness.json", "faithfulness.png", "graph.html")
MANIFEST = "manifest.json"


@dataclass
class AnalysisResult:
    output_dir: Path
    attribution: dict            # attribution.json
    faithfulness: dict           # faithfulness.json
    graph: dict                  # graph.json
    cached: bool = False         # the files were already there for this exact analysis
    files: dict[str, Path] = field(default_factory=dict)

    def summary_lines(self, top: int = 10) -> list[str]:
        return summary_lines(self.attribution, self.faithfulness, top=top)


def analysis_config(loaded, prompt: str, *, correct: str, wrong: str, tau: float | None, top_k: int | None,
                    max_nodes: int | None, edges: bool, labels_file: str | None, corpus: str | None,
                    ablation: str, counterfactual_prompt: str | None, no_llm: bool, llm_model: str | None,
                    base_url: str | None, random_draws: int, seed: int) -> dict:
    """Everything that determines the result (hashed for caching)."""
    labels_hash = content_hash(Path(labels_file).read_text(encoding="utf-8", errors="replace")) if labels_file else None
    corpus_hash = content_hash(Path(corpus).read_text(encoding="utf-8", errors="replace")) if corpus else None
    return {
        "model": loaded.spec, "checkpoint": str(loaded.checkpoint), "dtype": str(loaded.dtype).replace("torch.", ""),
        "profile": loaded.profile.model_dump(), "prompt": prompt, "correct": correct, "wrong": wrong,
        "tau": tau, "top_k": top_k, "max_nodes": max_nodes, "edges": edges,
        "labels_file": str(labels_file) if labels_file else None, "labels_file_sha256": labels_hash,
        "corpus": str(corpus) if corpus else "builtin", "corpus_sha256": corpus_hash,
        "ablation": ablation, "counterfactual_prompt": counterfactual_prompt,
        "llm": None if no_llm else {"model": llm_model, "base_url": base_url},
        "random_draws": random_draws, "seed": seed,
    }


def analyze(loaded, prompt: str, *, correct: str, wrong: str, output_dir: str | Path, tau: float | None = 0.05,
            top_k: int | None = None, max_nodes: int | None = 200, edges: bool = True, no_llm: bool = True,
            labels_file: str | Path | None = None, corpus: str | Path | None = None,
            ablation: Literal["zero", "mean", "counterfactual"] = "zero", counterfactual_prompt: str | None = None,
            llm_model: str = "gpt-4o", base_url: str | None = None, llm_client=None, random_draws: int = 8,
            seed: int = 0, overwrite: bool = False, batch_size: int = 32,
            progress: bool | None = None) -> AnalysisResult:
    """Run stage 3 on one prompt and contrastive pair; see the module docstring for the files written."""
    from conceptfix.analyze import labels as L
    from conceptfix.analyze.edges import compute_edges
    from conceptfix.analyze.export import (attribution_json, check_graph_json, faithfulness_png, graph_html,
                                           graph_json)
    from conceptfix.analyze.faithfulness import evaluate_faithfulness
    from conceptfix.analyze.prune import prune
    from conceptfix.analyze.relp import attribute_neurons, make_metric
    from conceptfix.tokens import resolve_contrastive_token

    if not prompt or not prompt.strip():
        raise ConceptfixError("prompt is empty", field="PROMPT")
    if ablation not in ("zero", "mean", "counterfactual"):
        raise ConceptfixError(f"unknown ablation {ablation!r}", field="--ablation", hint="zero, mean or counterfactual")
    if ablation == "counterfactual" and not counterfactual_prompt:
        raise ConceptfixError("counterfactual ablation needs a counterfactual prompt", field="--counterfactual")
    # Clear, CLI-worded errors before any model work (multi-token strings suggest their first piece).
    resolve_contrastive_token(loaded.tokenizer, correct, field="--contrastive CORRECT")
    resolve_contrastive_token(loaded.tokenizer, wrong, field="--contrastive WRONG")
    if labels_file is not None and not Path(labels_file).is_file():
        raise ConceptfixError(f"labels file not found: {labels_file}", field="--labels-file")
    if corpus is not None and not Path(corpus).is_file():
        raise ConceptfixError(f"corpus file not found: {corpus}", field="--corpus")

    output_dir = Path(output_dir)
    config = analysis_config(loaded, prompt, correct=correct, wrong=wrong, tau=tau, top_k=top_k, max_nodes=max_nodes,
                             edges=edges, labels_file=labels_file, corpus=corpus, ablation=ablation,
                             counterfactual_prompt=counterfactual_prompt, no_llm=no_llm, llm_model=llm_model,
                             base_url=base_url, random_draws=random_draws, seed=seed)
    key = content_hash(config)
    cached = _load_cached(output_dir, key, overwrite)
    if cached is not None:
        return cached

    metric = make_metric(loaded.tokenizer, correct, wrong)
    scores = attribute_neurons(loaded, prompt, metric)
    graph = prune(scores, tau=tau if top_k is None else None, top_k=top_k, max_nodes=max_nodes)
    if not graph.kept:
        raise ConceptfixError("no neuron passed the pruning threshold", field="--tau", hint="lower --tau or use --top-k")
    if edges:
        compute_edges(loaded, graph, batch_size=batch_size, progress=progress)

    # Labels: one corpus pass gives top contexts (for the kept neurons) and means (for mean ablation).
    keys = sorted({(k.layer, k.neuron) for k in graph.kept})
    prompt_act = {}
    for k in sorted(graph.kept, key=lambda k: abs(k.score)):
        prompt_act[(k.layer, k.neuron)] = k.activation   # the strongest occurrence wins
    sentences, corpus_name = L.load_corpus(corpus)
    stats = L.corpus_statistics(loaded, sentences, keys, corpus_name=corpus_name, batch_size=batch_size,
                                progress=progress)
    lens = L.logit_lens_labels(loaded, keys, prompt_activation=prompt_act)
    contexts = L.top_context_labels(stats, prompt_act)
    imported = {}
    if labels_file is not None:
        imported = {k: v for k, v in L.load_imported_labels(labels_file).items() if k in set(keys)}
    llm = {}
    llm_info = None
    if not no_llm:
        if llm_client is None:
            from conceptfix.llm import LLMClient

            llm_client = LLMClient(model=llm_model, base_url=base_url, temperature=0.0)
        evidence = {k: {"logit_lens": lens.get(k), "top_contexts": contexts.get(k)} for k in keys}
        llm = L.llm_labels(llm_client, evidence, model_name=llm_model, progress=progress)
        llm_info = llm_client.describe() if hasattr(llm_client, "describe") else {"model": llm_model}
    labels = L.combine_labels(imported, llm, contexts, lens)

    report = evaluate_faithfulness(loaded, graph, ablation=ablation, mean_activations=stats.mean_activations,
                                   counterfactual_prompt=counterfactual_prompt, random_draws=random_draws, seed=seed,
                                   batch_size=batch_size)

    prov = provenance("analyze", {**config, "config_sha256": key, "llm_client": llm_info})
    attribution = attribution_json(graph, labels, model=loaded.spec, provenance=prov)
    graph_data = graph_json(graph, labels, scan=loaded.spec, slug=f"{loaded.spec}-{prompt}"[:50] + f"-{key[:8]}",
                            num_layers=loaded.num_layers, correct_prob=report.unablated.correct_prob,
                            extra_metadata={"config_sha256": key, "wrong_prob": report.unablated.wrong_prob})
    check_graph_json(graph_data)
    faithfulness = {**report.to_dict(), "provenance": prov}
    title = f"{prompt} — {metric.describe()}"

    output_dir.mkdir(parents=True, exist_ok=True)
    files = {name: output_dir / name for name in OUTPUT_FILES}
    write_json(files["graph.json"], graph_data)
    write_json(files["attribution.json"], attribution)
    write_json(files["faithfulness.json"], faithfulness)
    atomic_write_bytes(files["faithfulness.png"], faithfulness_png(report, title))
    atomic_write_text(files["graph.html"], graph_html(graph_data, attribution, faithfulness, title=title))
    # The manifest goes last: its presence says the directory holds a complete analysis.
    write_json(output_dir / MANIFEST, {"config_sha256": key, "config": config, "files": list(OUTPUT_FILES)})
    return AnalysisResult(output_dir=output_dir, attribution=attribution, faithfulness=faithfulness, graph=graph_data,
                          cached=False, files=files)


def _load_cached(output_dir: Path, key: str, overwrite: bool) -> AnalysisResult | None:
    manifest_path = output_dir / MANIFEST
    existing = [name for name in (*OUTPUT_FILES, MANIFEST) if (output_dir / name).exists()]
    if not existing:
        return None
    manifest = None
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None
    complete = all((output_dir / name).exists() for name in OUTPUT_FILES)
    if manifest and manifest.get("config_sha256") == key and complete:
        files = {name: output_dir / name for name in OUTPUT_FILES}
        try:
            return AnalysisResult(
                output_dir=output_dir, cached=True, files=files,
                attribution=json.loads(files["attribution.json"].read_text(encoding="utf-8")),
                faithfulness=json.loads(files["faithfulness.json"].read_text(encoding="utf-8")),
                graph=json.loads(files["graph.json"].read_text(encoding="utf-8")),
            )
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a damaged cache is recomputed
        return None
    if overwrite:
        return None
    raise ConceptfixError(f"{output_dir} already holds a different analysis ({', '.join(existing)})",
                          field="--output", hint="choose another directory or pass --overwrite")


def summary_lines(attribution: dict, faithfulness: dict, *, top: int = 10) -> list[str]:
    """The seed-style terminal summary: metric, conservation, explained fraction, top neurons, faithfulness, flip."""
    metric = attribution["metric"]
    lines = [
        f"metric {metric['description']} = {metric['value']:.4f}",
        f"conservation residual {attribution['conservation_residual']:.2e}   "
        f"explained fraction (kept) {attribution['explained_fraction']:.3f}   "
        f"kept {len(attribution['neurons'])} neurons ({_rule_text(attribution['pruning'])})",
        "top neurons:",
    ]
    for n in attribution["neurons"][:top]:
        label = n["label"] or "-"
        lines.append(f"  L{n['layer']}/N{n['neuron']} score={n['score']:+.2f} pos={n['position']} {n['token']!r} "
                     f"→ {n['pushes_toward_token']!r} label={label}")
    curve = faithfulness.get("curve", [])
    if curve:
        lines.append(f"faithfulness ({faithfulness['ablation']} ablation; change of the metric, real / predicted / "
                     f"uniform random / matched random):")
        for p in curve:
            lines.append(f"  N={p['n']:<4} {p['change']:+8.3f} / {p['predicted_change']:+8.3f} / "
                         f"{p['uniform_random_change_mean']:+.3f}±{p['uniform_random_change_std']:.3f} / "
                         f"{p['matched_random_change_mean']:+.3f}±{p['matched_random_change_std']:.3f}")
    completeness = faithfulness.get("completeness", [])
    if completeness:
        lines.append("completeness (keep top-N, ablate all other neurons; 1 = full metric): "
                     + ", ".join(f"N={p['n']}: {p['normalized']:.2f}" for p in completeness))
    flip = faithfulness.get("flip_test")
    base = faithfulness.get("unablated") or {}
    if flip:
        verdict = "FLIPPED: correct token is top-1" if flip["flipped"] else "not flipped"
        lines.append(f"flip test: ablating the {flip['n']} kept neurons that push toward {metric['wrong_token']!r}: "
                     f"top-1 {base.get('top1_token', '?')!r} → {flip['top1_token']!r}, "
                     f"p({metric['correct_token']!r}) {base.get('correct_prob', float('nan')):.3f} → "
                     f"{flip['correct_prob']:.3f} (rank {flip['correct_rank']}) — {verdict}")
    else:
        lines.append("flip test: no kept neuron pushes toward the wrong answer")
    return lines


def _rule_text(rule: dict) -> str:
    method = rule.get("method", "?")
    if method == "tau":
        return f"tau={rule.get('tau')}"
    if method == "top_k":
        return f"top_k={rule.get('top_k')}"
    return f"{method}={rule.get(method)}"
