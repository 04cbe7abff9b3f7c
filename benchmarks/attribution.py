"""RelP attribution cost: nodes (one linearised forward + backward) against a plain forward + backward on the
same input, and edges between 200 kept neurons, batched (one forward of B copies, one backward per B targets)
against the naive way (one backward per target), in one run.

    python benchmarks/attribution.py                          # CPU: the embedded model (SmolLM2-135M, fp32)
    python benchmarks/attribution.py --llama8b [--tokenizer DIR]   # GPU: random Llama-3.1-8B-shaped model, bf16

Rows:
* plain forward (no grad), the reference for the cost of one pass;
* plain forward + backward to the input embeddings (parameters frozen; the same metric, read from the final
  hidden state): what any gradient-based attribution costs at least;
* the same with weight gradients too (a training step without the optimizer);
* RelP node attribution (``attribute_ids``): linearised forward + ONE backward, every neuron at every position,
  copies of activations and gradients to the CPU and the conservation check included;
* edges for N kept neurons (``compute_edges_for_model``), batched with batch size B;
* naive edges (``compute_edges_one_by_one``: one forward, then one backward per target): timed on a subset of
  targets spread over the layers, extrapolated to N as forward + N × (mean time per target) — the row says so.

Timings are the median of ``--repeats`` runs after one warm-up; on a GPU every timing is bracketed by
``torch.cuda.synchronize()`` and peak memory is ``torch.cuda.max_memory_allocated`` above the weights.
Importable without pydantic (only the embedded-model path loads ``conceptfix.models``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from conceptfix.analyze.edges import _forward_cut, compute_edges_for_model, compute_edges_one_by_one  # noqa: E402
from conceptfix.analyze.prune import prune  # noqa: E402
from conceptfix.analyze.relp import attribute_ids, linearized, metric_readout  # noqa: E402
from conceptfix.analyze.adapters import get_adapter  # noqa: E402
from conceptfix.analyze.types import MetricSpec  # noqa: E402

# Llama-3.1-8B-Instruct's config.json shape; the weights are random (cost depends on shapes only).
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                   tie_word_embeddings=False)
EMBEDDED_PROMPT = ("The primary hormone regulating blood pressure is", " al", " ren")
# ~40 tokens: a factual question in a chat template is about this long
LONG_PROMPT = ("You are a helpful assistant. Answer with one word.\nQuestion: Which hormone, made by the adrenal "
               "cortex, makes the kidney keep sodium and so raises blood pressure?\nAnswer: The hormone is")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1):
    """(median seconds, peak extra memory in bytes or None, last result)."""
    for _ in range(warmup):
        fn()
    times, peak, out = [], None, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            extra = torch.cuda.max_memory_allocated(device) - base
            peak = extra if peak is None else max(peak, extra)
    return statistics.median(times), peak, out


def build_model(args):
    """(model, input_ids [1, T], metric, description)."""
    if args.llama8b:
        from transformers import AutoConfig, AutoModelForCausalLM

        device = torch.device(args.device or "cuda")
        config = AutoConfig.for_model("llama", **LLAMA_31_8B)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype or "bfloat16"))
        model.eval().requires_grad_(False)
        if args.tokenizer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.tokenizer)
            ids = tok(LONG_PROMPT, return_tensors="pt")["input_ids"][:, : args.tokens]
            source = f"tokenizer {args.tokenizer}"
        else:
            ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
            source = "random ids"
        metric = MetricSpec(kind="contrastive", correct_token_id=1000, wrong_token_id=2000,
                            correct_token="#1000", wrong_token="#2000")
        desc = f"random Llama-3.1-8B shape, {args.dtype or 'bfloat16'}, {ids.shape[1]} tokens ({source})"
        return model, ids.to(device), metric, desc
    from conceptfix.analyze.relp import make_metric
    from conceptfix.models import load_model

    loaded = load_model(args.model, device=args.device or "cpu", dtype=args.dtype or "float32")
    prompt, correct, wrong = EMBEDDED_PROMPT if args.tokens <= 10 else (LONG_PROMPT, " al", " ren")
    ids = loaded.encode([loaded.format_prompt(prompt)], formatted=True)["input_ids"][:, : args.tokens]
    metric = make_metric(loaded.tokenizer, correct, wrong)
    desc = f"{args.model}, {args.dtype or 'float32'}, {ids.shape[1]} tokens"
    return loaded.model, ids.to(loaded.model.device), metric, desc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama8b", action="store_true", help="random Llama-3.1-8B-shaped model on the GPU")
    ap.add_argument("--model", default="smollm2-135m", help="model for the non-8B run (conceptfix.models name)")
    ap.add_argument("--tokenizer", help="tokenizer directory for --llama8b (default: random token ids)")
    ap.add_argument("--tokens", type=int, default=7, help="prompt length (7 = the hormone prompt)")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--nodes", type=int, default=200, help="kept neurons for the edge rows (top-k by |score|)")
    ap.add_argument("--batch-sizes", default="32", help="comma-separated edge batch sizes")
    ap.add_argument("--naive-targets", type=int, default=20,
                    help="targets timed for the naive edges (extrapolated to --nodes); 0 = all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one node attribution")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, ids, metric, desc = build_model(args)
    device = ids.device
    adapter = get_adapter(model)
    vec, const = metric_readout(adapter, metric)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"CPU ({platform.processor() or 'x86-64'}, {torch.get_num_threads()} threads)"
    print(f"# {desc}; {hw}; weights {weights_gib:.2f} GiB; torch {torch.__version__}", flush=True)

    rows: list[dict] = []

    def row(name, seconds, peak, note=""):
        rows.append({"what": name, "seconds": seconds, "peak_extra_gib": None if peak is None else peak / 2**30,
                     "note": note})
        mem = "" if peak is None else f", peak +{peak / 2**30:.2f} GiB"
        print(f"  {name}: {seconds * 1000:.1f} ms{mem} {note}", flush=True)

    def plain_forward():
        with torch.no_grad():
            return adapter.decoder(input_ids=ids, use_cache=False).last_hidden_state[0, -1]

    def plain_fwd_bwd(weights: bool = False):
        with torch.enable_grad():
            emb = adapter.embed_tokens(ids).detach().requires_grad_(True)
            hidden = adapter.decoder(inputs_embeds=emb, use_cache=False).last_hidden_state
            value = (hidden[0, -1].float() * vec.float()).sum() + const
            if weights:
                value.backward()
                return float(value.detach())
            torch.autograd.grad(value, emb)
            return float(value.detach())

    def with_weight_grads():
        model.requires_grad_(True)
        try:
            return plain_fwd_bwd(weights=True)
        finally:
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)

    # the linearised forward must compute exactly what the model computes (same grad mode, same kernels)
    with torch.enable_grad():
        emb = adapter.embed_tokens(ids).detach().requires_grad_(True)
        plain_h = adapter.decoder(inputs_embeds=emb, use_cache=False).last_hidden_state.detach()
        with linearized(model):
            lin_h = adapter.decoder(inputs_embeds=emb, use_cache=False).last_hidden_state.detach()
    exact = bool(torch.equal(plain_h, lin_h))
    print(f"  linearised forward bit-identical to the plain forward: {exact}", flush=True)
    del emb, plain_h, lin_h

    t, peak, _ = timed(plain_forward, device, args.repeats)
    row("plain forward (no grad)", t, peak)
    t, peak, plain_value = timed(plain_fwd_bwd, device, args.repeats)
    row("plain forward + backward (input grads)", t, peak)
    t_plain_fb = t
    t, peak, _ = timed(with_weight_grads, device, args.repeats)
    row("plain forward + backward (+ weight grads)", t, peak)
    t, peak, scores = timed(lambda: attribute_ids(model, ids, metric), device, args.repeats)
    row("RelP nodes: linearised fwd + 1 bwd, all neurons", t, peak,
        f"({t / t_plain_fb:.2f}x plain fwd+bwd; residual {scores.conservation_residual:.2e})")
    t_nodes = t
    layers, positions, width = scores.scores.shape
    print(f"  metric {scores.metric_value:.4f} (plain {plain_value:.4f}); {layers}x{positions}x{width} = "
          f"{scores.scores.numel():,} neuron scores", flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            attribute_ids(model, ids, metric)
            _sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)

    graph = prune(scores, top_k=args.nodes)
    nodes = len(graph.kept)
    layers_hit = len({k.layer for k in graph.kept})
    edge_results = {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        def batched(bs=bs):
            graph.edges, graph.edge_stats = [], {}
            return compute_edges_for_model(model, graph, batch_size=bs, progress=False)
        t, peak, _ = timed(batched, device, max(1, args.repeats - 1))
        stats = graph.edge_stats
        edge_results[bs] = {e[:2]: e[2] for e in graph.edges}
        row(f"edges, {nodes} nodes, batched B={bs}", t, peak,
            f"(1 forward of {stats['batch_size']} copies + {stats['backward_passes']} backward; "
            f"{len(graph.edges):,} edges; max conservation residual {stats['max_conservation_residual']:.1e})")

    # Naive: one forward, one backward per target, on a subset of targets spread over the (layer-sorted) nodes
    ordered = sorted(graph.kept, key=lambda k: (k.layer, k.position, k.neuron))
    n_sub = nodes if args.naive_targets <= 0 else min(args.naive_targets, nodes)
    subset = [ordered[round(i * (nodes - 1) / max(n_sub - 1, 1))] for i in range(n_sub)]
    max_layer = max(k.layer for k in ordered)

    def forward_only():
        with torch.inference_mode(False), torch.enable_grad():
            cap = _forward_cut(model, ids, max_layer)
        del cap

    t_fwd, _, _ = timed(forward_only, device, args.repeats)
    t_sub, peak, naive_edges = timed(lambda: compute_edges_one_by_one(model, graph, targets=subset), device,
                                     max(1, args.repeats - 1))
    per_target = max(t_sub - t_fwd, 0.0) / n_sub
    t_naive = t_fwd + per_target * nodes
    note = ("measured on all targets" if n_sub == nodes else
            f"(extrapolated: {n_sub} targets took {t_sub * 1000:.0f} ms incl. one forward of {t_fwd * 1000:.0f} ms; "
            f"{per_target * 1000:.1f} ms per target)")
    row(f"edges, {nodes} nodes, naive (1 backward per target)", t_naive, peak, note)
    # the batched edges agree with the naive ones on the subset
    ref = edge_results[next(iter(edge_results))]
    scale = max((abs(w) for *_, w in naive_edges), default=0.0)
    diff = max((abs(ref.get((s, t), 0.0) - w) for s, t, w in naive_edges), default=0.0)
    print(f"  batched vs naive edge weights on the subset: max |diff| {diff:.2e} (max |w| {scale:.2e}); "
          f"kept nodes span {layers_hit} layers", flush=True)

    print()
    print(f"| {desc} — {hw} | time | peak extra memory | note |")
    print("|---|---|---|---|")
    for r in rows:
        mem = "–" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f} GiB"
        print(f"| {r['what']} | {r['seconds'] * 1000:.1f} ms | {mem} | {r['note']} |")
    best = min(v["seconds"] for v in rows if v["what"].startswith("edges") and "batched" in v["what"])
    print(f"\nnodes / plain fwd+bwd: {t_nodes / t_plain_fb:.2f}x; naive / batched edges: {t_naive / best:.1f}x")
    result = {"description": desc, "hardware": hw, "weights_gib": weights_gib, "rows": rows,
              "conservation_residual": scores.conservation_residual, "linearised_forward_exact": exact,
              "metric": scores.metric_value,
              "edge_subset_max_abs_diff": diff, "edge_subset_max_abs_weight": scale, "nodes": nodes,
              "torch": torch.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
