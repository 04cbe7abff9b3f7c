"""Stage 3 end to end: attribution → pruning → edges → labels → faithfulness → files in the output directory.

``analyze(loaded, prompt, correct=" al", wrong=" ren", output_dir=...)`` writes graph.json, attribution.json,
faithfulness.json, faithfulness.png, graph.html and manifest.json (each atomically). The manifest holds a hash
of everything that determines the result (model, profile, prompt, pair, options); re-running the same analysis
into the same directory reuses the files, a different analysis there needs ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conceptfix.artifacts import atomic_write_bytes, atomic_write_text, content_hash, provenance, write_json
from conceptfix.errors import ConceptfixError
from conceptfix.generate.validator import prompt_form_violations

OUTPUT_FILES = ("graph.json", "attribution.json", "faithfulness.json", "faithfulness.png", "graph.html")
MANIFEST = "manifest.json"
# Bump when the analysis changes meaning, so cached results from older versions are recomputed.
PIPELINE_VERSION = 2


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
                    base_url: str | None, random_draws: int, seed: int, include_first_position: bool = False,
                    llm_max_neurons: int = 40) -> dict:
    """Everything that determines the result (hashed for caching)."""
    from conceptfix.filter import model_fingerprint

    labels_hash = content_hash(Path(labels_file).read_text(encoding="utf-8", errors="replace")) if labels_file else None
    corpus_hash = content_hash(Path(corpus).read_text(encoding="utf-8", errors="replace")) if corpus else None
    return {
        "version": PIPELINE_VERSION,
        "model": loaded.spec, "checkpoint": str(loaded.checkpoint), "dtype": str(loaded.dtype).replace("torch.", ""),
        # Size and mtime of local weight files: a model retrained into the same directory is a different model.
        "model_fingerprint": model_fingerprint(loaded.spec, loaded.checkpoint, loaded.device, loaded.dtype),
        "profile": loaded.profile.model_dump(), "prompt": prompt, "correct": correct, "wrong": wrong,
        "tau": tau, "top_k": top_k, "max_nodes": max_nodes, "edges": edges,
        "include_first_position": include_first_position,
        "labels_file": str(labels_file) if labels_file else None, "labels_file_sha256": labels_hash,
        "corpus": str(corpus) if corpus else "builtin", "corpus_sha256": corpus_hash,
        "ablation": ablation, "counterfactual_prompt": counterfactual_prompt,
        "llm": None if no_llm else {"model": llm_model, "base_url": base_url, "max_neurons": llm_max_neurons},
        "random_draws": random_draws, "seed": seed,
    }


def analyze(loaded, prompt: str, *, correct: str, wrong: str, output_dir: str | Path, tau: float | None = 0.05,
            top_k: int | None = None, max_nodes: int | None = 200, edges: bool = True, no_llm: bool = True,
            labels_file: str | Path | None = None, corpus: str | Path | None = None,
            ablation: Literal["zero", "mean", "counterfactual"] = "zero", counterfactual_prompt: str | None = None,
            llm_model: str = "gpt-4o", base_url: str | None = None, llm_client=None, llm_max_neurons: int = 40,
            random_draws: int = 8, seed: int = 0, include_first_position: bool = False, overwrite: bool = False,
            batch_size: int = 32, edge_batch_size: int | None = None,
            progress: bool | None = None) -> AnalysisResult:
    """Run stage 3 on one prompt and contrastive pair; see the module docstring for the files written.

    ``include_first_position=False`` (the default) leaves the neurons at position 0 out of the circuit and out of
    the random controls and complement ablations. Position 0 sees only the first token and is the model's
    attention sink (activations in the thousands, e.g. L11/N1229 = 2824 on SmolLM2); RelP freezes attention
    patterns, so its linear scores there do not predict ablations: on "The capital of Australia is" the top
    position-0 neuron's predicted change is +1.83 and its real one −1.07, while with position 0 left out the
    top-10 predicted and real changes agree within 5%. What was left out is recorded in attribution.json
    (``first_position``).
    """
    from conceptfix.analyze import labels as L
    from conceptfix.analyze.edges import compute_edges
    from conceptfix.analyze.export import (attribution_json, check_graph_json, faithfulness_png, graph_html,
                                           graph_json)
    from conceptfix.analyze.faithfulness import evaluate_faithfulness
    from conceptfix.analyze.prune import prune
    from conceptfix.analyze.relp import attribute_neurons, make_metric
    from conceptfix.tokens import resolve_contrastive_token

    form = prompt_form_violations(prompt or "", field="PROMPT")
    if form:  # the metric reads the next token: after a question that is not the answer
        raise ConceptfixError(form[0].message, field="PROMPT",
                              hint="a completion prompt stops where the answer begins ('The capital of Australia is')")
    if ablation not in ("zero", "mean", "counterfactual"):
        raise ConceptfixError(f"unknown ablation {ablation!r}", field="--ablation", hint="zero, mean or counterfactual")
    if ablation == "counterfactual" and not counterfactual_prompt:
        raise ConceptfixError("counterfactual ablation needs a counterfactual prompt", field="--counterfactual",
                              hint="a prompt of the same token length, e.g. with another subject")
    if random_draws < 1:
        raise ConceptfixError(f"random draws must be at least 1, got {random_draws}", field="--random-draws")
    # Clear, CLI-worded errors before any model work (multi-token strings suggest their first piece).
    cid = resolve_contrastive_token(loaded.tokenizer, correct, field="--contrastive CORRECT")
    wid = resolve_contrastive_token(loaded.tokenizer, wrong, field="--contrastive WRONG")
    if cid == wid:
        raise ConceptfixError(f"correct and wrong are the same token {correct!r}", field="--contrastive")
    if labels_file is not None and not Path(labels_file).is_file():
        raise ConceptfixError(f"labels file not found: {labels_file}", field="--labels-file")
    if corpus is not None and not Path(corpus).is_file():
        raise ConceptfixError(f"corpus file not found: {corpus}", field="--corpus")

    output_dir = Path(output_dir)
    config = analysis_config(loaded, prompt, correct=correct, wrong=wrong, tau=tau, top_k=top_k, max_nodes=max_nodes,
                             edges=edges, labels_file=labels_file, corpus=corpus, ablation=ablation,
                             counterfactual_prompt=counterfactual_prompt, no_llm=no_llm, llm_model=llm_model,
                             base_url=base_url, random_draws=random_draws, seed=seed,
                             include_first_position=include_first_position, llm_max_neurons=llm_max_neurons)
    key = content_hash(config)
    cached = _load_cached(output_dir, key, overwrite)
    if cached is not None:
        return cached
    # Parse the inputs and set up the LLM client before the model work: a malformed file or a missing API key
    # fails in a second, not after a minute of attribution.
    imported_all = L.load_imported_labels(labels_file) if labels_file is not None else {}
    sentences, corpus_name = L.load_corpus(corpus)
    if not no_llm and llm_client is None:
        from conceptfix.llm import LLMClient

        llm_client = LLMClient(model=llm_model, base_url=base_url, temperature=0.0)

    metric = make_metric(loaded.tokenizer, correct, wrong)
    scores = attribute_neurons(loaded, prompt, metric)
    num_positions = len(scores.input_ids)
    positions = list(range(num_positions))
    first_position: dict = {"excluded": False}
    if not include_first_position and num_positions > 1:
        positions = positions[1:]
        first_position = _first_position_report(scores)
        masked = scores.scores.clone()
        masked[:, 0, :] = 0.0
        scores = dataclasses.replace(scores, scores=masked)   # prune never keeps exact zeros
    graph = prune(scores, tau=tau if top_k is None else None, top_k=top_k, max_nodes=max_nodes)
    if not graph.kept:
        raise ConceptfixError("no neuron passed the pruning threshold", field="--tau", hint="lower --tau or use --top-k")
    if edges:
        # Edge targets per backward: None = per-device default (CPU pays a full forward per copy, GPU does not).
        compute_edges(loaded, graph, batch_size=edge_batch_size, progress=progress)

    # Labels: one (cached) corpus pass gives top contexts (for the kept neurons) and means (for mean ablation).
    by_strength = sorted(graph.kept, key=lambda k: abs(k.score), reverse=True)
    keys = sorted({(k.layer, k.neuron) for k in graph.kept})
    prompt_act = {}
    for k in reversed(by_strength):
        prompt_act[(k.layer, k.neuron)] = k.activation   # the strongest occurrence wins
    stats = L.corpus_statistics(loaded, sentences, keys, corpus_name=corpus_name, batch_size=batch_size,
                                progress=progress)
    lens = L.logit_lens_labels(loaded, keys, prompt_activation=prompt_act)
    contexts = L.top_context_labels(stats, prompt_act)
    imported = {k: v for k, v in imported_all.items() if k in set(keys)}
    llm = {}
    llm_info = None
    if not no_llm:
        # One request per neuron: only the strongest distinct neurons, so cost and time stay bounded.
        llm_keys = list(dict.fromkeys((k.layer, k.neuron) for k in by_strength))[:llm_max_neurons]
        evidence = {k: {"logit_lens": lens.get(k), "top_contexts": contexts.get(k)} for k in llm_keys}
        llm = L.llm_labels(llm_client, evidence, model_name=llm_model, progress=progress)
        llm_info = llm_client.describe() if hasattr(llm_client, "describe") else {"model": llm_model}
    labels = L.combine_labels(imported, llm, contexts, lens)

    report = evaluate_faithfulness(loaded, graph, ablation=ablation, mean_activations=stats.mean_activations,
                                   counterfactual_prompt=counterfactual_prompt, random_draws=random_draws, seed=seed,
                                   batch_size=batch_size, positions=positions)

    prov = provenance("analyze", {**config, "config_sha256": key, "llm_client": llm_info})
    attribution = attribution_json(graph, labels, model=loaded.spec, provenance=prov)
    attribution["first_position"] = first_position
    attribution["label_sources"] = {source: sum(1 for labs in labels.values() for lab in labs if lab.source == source)
                                    for source in L.SOURCES}
    attribution["corpus"] = {"name": corpus_name, "passages": len(sentences), "tokens": stats.num_tokens,
                             "statistics_cached": stats.cached}
    graph_data = graph_json(graph, labels, scan=loaded.spec, slug=f"{loaded.spec}-{prompt}"[:50] + f"-{key[:8]}",
                            num_layers=loaded.num_layers, correct_prob=report.unablated.correct_prob,
                            extra_metadata={"config_sha256": key, "wrong_prob": report.unablated.wrong_prob,
                                            "first_position_excluded": first_position["excluded"]})
    check_graph_json(graph_data)
    faithfulness = {**report.to_dict(), "provenance": prov}
    title = f"{prompt} — {metric.describe()}"

    output_dir.mkdir(parents=True, exist_ok=True)
    files = {name: output_dir / name for name in OUTPUT_FILES}
    # A stale manifest must not vouch for a half-rewritten directory if this run is interrupted.
    (output_dir / MANIFEST).unlink(missing_ok=True)
    write_json(files["graph.json"], graph_data)
    write_json(files["attribution.json"], attribution)
    write_json(files["faithfulness.json"], faithfulness)
    png = faithfulness_png(report, title, correct=correct, wrong=wrong)
    atomic_write_bytes(files["faithfulness.png"], png)
    atomic_write_text(files["graph.html"], graph_html(graph_data, attribution, faithfulness, title=title,
                                                      faithfulness_png=png))
    # The manifest goes last: its presence says the directory holds a complete analysis.
    write_json(output_dir / MANIFEST, {"config_sha256": key, "config": config, "files": list(OUTPUT_FILES)})
    return AnalysisResult(output_dir=output_dir, attribution=attribution, faithfulness=faithfulness, graph=graph_data,
                          cached=False, files=files)


def _first_position_report(scores, top: int = 5) -> dict:
    """What leaving position 0 out removes: its score mass and its strongest neurons (for the record)."""
    first = scores.scores[:, 0, :]
    total = float(scores.scores.abs().sum())
    flat = first.reshape(-1)
    width = first.shape[1]
    order = [int(i) for i in flat.abs().argsort(descending=True)[:top]]
    return {
        "excluded": True,
        "reason": "position 0 is the attention sink; its linear scores do not predict ablations",
        "token": scores.tokens[0] if scores.tokens else "",
        "score_sum": float(first.sum()),
        "abs_mass_fraction": float(first.abs().sum()) / total if total else 0.0,
        "top_neurons": [{"layer": i // width, "neuron": i % width, "score": float(flat[i]),
                         "activation": float(scores.activations[i // width, 0, i % width])} for i in order],
    }


def _load_cached(output_dir: Path, key: str, overwrite: bool) -> AnalysisResult | None:
    """The stored result when ``output_dir`` holds this exact analysis; None to compute; error for another one."""
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
    same = isinstance(manifest, dict) and manifest.get("config_sha256") == key
    if same and all((output_dir / name).exists() for name in OUTPUT_FILES):
        files = {name: output_dir / name for name in OUTPUT_FILES}
        try:
            return AnalysisResult(
                output_dir=output_dir, cached=True, files=files,
                attribution=json.loads(files["attribution.json"].read_text(encoding="utf-8")),
                faithfulness=json.loads(files["faithfulness.json"].read_text(encoding="utf-8")),
                graph=json.loads(files["graph.json"].read_text(encoding="utf-8")),
            )
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged copy of this same analysis is recomputed
    if same or overwrite:
        return None
    raise ConceptfixError(f"{output_dir} already holds a different analysis ({', '.join(existing)})",
                          field="--output", hint="choose another directory or pass --overwrite")


def summary_lines(attribution: dict, faithfulness: dict, *, top: int = 10) -> list[str]:
    """The seed-style terminal summary: metric, conservation, explained fraction, top neurons, faithfulness, flip."""
    metric = attribution["metric"]
    correct, wrong = metric["correct_token"], metric["wrong_token"]
    base = faithfulness.get("unablated") or {}
    rule = attribution["pruning"]
    where = ""
    if "kept_at_last_position" in rule:
        where = f"; {rule['kept_at_last_position']} at the last position, {rule['kept_at_earlier_positions']} earlier"
    first = attribution.get("first_position") or {}
    if first.get("excluded"):
        where += f"; position 0 {first.get('token', '')!r} left out ({first.get('abs_mass_fraction', 0):.1%} of |score|)"
    lines = [
        f"metric {metric['description']} = {metric['value']:.4f}   "
        f"(top-1 {base.get('top1_token', '?')!r}; p({correct!r}) = {base.get('correct_prob', float('nan')):.3f}, "
        f"p({wrong!r}) = {base.get('wrong_prob', float('nan')):.3f})",
        f"conservation residual {attribution['conservation_residual']:.2e}   "
        f"kept |score| mass {rule.get('kept_abs_mass_fraction', float('nan')):.1%}   "
        f"Σ kept scores / metric {attribution['explained_fraction']:.3f}   "
        f"kept {len(attribution['neurons'])} neurons ({_rule_text(rule)}{where})",
        "top neurons:",
    ]
    for n in attribution["neurons"][:top]:
        label = n["label"] or "-"
        lines.append(f"  L{n['layer']}/N{n['neuron']} score={n['score']:+.2f} pos={n['position']} {n['token']!r} "
                     f"→ {n['pushes_toward_token']!r} label={label}")
    curves = [("curve_wrong", f"the top-N pushing toward {wrong!r} (ablating them should raise the metric)"),
              ("curve_correct", f"the top-N pushing toward {correct!r} (should lower it)"),
              ("curve", "the top-N by |score|, both signs (their effects partly cancel)")]
    if any(faithfulness.get(name) for name, _ in curves):
        lines.append(f"faithfulness ({faithfulness['ablation']} ablation), metric change real / predicted / "
                     f"{faithfulness.get('random_draws', '?')} × N uniform random neurons (mean ± std):")
    for name, text in curves:
        points = faithfulness.get(name) or []
        if not points:
            continue
        lines.append(f"  ablating {text}:")
        for p in points:
            rnd = p.get("uniform_random_change_mean")
            rnd_text = f"{rnd:+.3f} ± {p['uniform_random_change_std']:.3f}" if rnd is not None else "-"
            lines.append(f"    N={p['n']:<4} {p['change']:+8.3f} / {p['predicted_change']:+8.3f} / {rnd_text}")
    singles = faithfulness.get("singles") or []
    if singles:
        agree = sum(1 for p in singles if p["change"] * p["predicted_change"] > 0)
        ratios = sorted(p["change"] / p["predicted_change"] for p in singles if p["predicted_change"])
        median = ratios[len(ratios) // 2] if ratios else float("nan")
        lines.append(f"single neurons (top {len(singles)}): real change has the predicted sign for {agree}/"
                     f"{len(singles)}, median real/predicted {median:.2f}")
    completeness = faithfulness.get("completeness", [])
    if completeness:
        lines.append("completeness (keep top-N, ablate all other neurons; 1 = full metric): "
                     + ", ".join(f"N={p['n']}: {p['normalized']:.2f}" for p in completeness))
    flip = faithfulness.get("flip_test")
    if flip:
        verdict = "FLIPPED: correct token is top-1" if flip["flipped"] else "not flipped"
        lines.append(f"flip test: ablating the {flip['n']} kept neurons that push toward {wrong!r}: "
                     f"top-1 {base.get('top1_token', '?')!r} → {flip['top1_token']!r}, "
                     f"p({correct!r}) {base.get('correct_prob', float('nan')):.3f} → "
                     f"{flip['correct_prob']:.3f} (rank {flip['correct_rank']}) — {verdict}")
        sweep = faithfulness.get("flip_sweep") or [flip]
        flipped = [p["n"] for p in sweep if p["flipped"]]
        if flipped:
            lines.append(f"  {correct!r} is top-1 after ablating the top N of them for N = "
                         f"{', '.join(map(str, flipped))} (of {', '.join(str(p['n']) for p in sweep)})")
        else:
            best = max(sweep, key=lambda p: p["correct_prob"])
            lines.append(f"  best over the sweep: N={best['n']} p({correct!r}) = {best['correct_prob']:.3f} "
                         f"(rank {best['correct_rank']}, top-1 {best['top1_token']!r})")
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
