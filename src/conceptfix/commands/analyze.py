"""`conceptfix analyze`: stage 3, contrastive RelP attribution over MLP neurons with graph, labels and
faithfulness checks.

    conceptfix analyze "The primary hormone regulating blood pressure is" --answer-prefix " Answer:" \\
        --contrastive " Ald" " Ren" --tau 0.05 --output outputs/my_analysis/ --no-llm
    conceptfix analyze --case data/filtered_prompts.json#0 --output outputs/case0/
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from conceptfix.cli_app import (AnswerPrefixOpt, ChatTemplateOpt, DeviceOpt, DtypeOpt, ProfileFileOpt,
                                SystemPromptOpt, TrustRemoteCodeOpt, build_profile, command, err, out)
from conceptfix.errors import ConceptfixError
from conceptfix.models import DEFAULT_MODEL


@command("analyze")
def analyze_command(
    prompt: Annotated[Optional[str], typer.Argument(help="Completion prompt, e.g. 'The primary hormone regulating "
                                                         "blood pressure is'. Or give --case.")] = None,
    case: Annotated[Optional[str], typer.Option("--case", help="A filter target: filtered_prompts.json#N (prompt, "
                                                "pair, and unless overridden the filter's model and profile).")] = None,
    contrastive: Annotated[Optional[tuple[str, str]], typer.Option(
        "--contrastive", metavar="CORRECT WRONG",
        help="The pair of single tokens, correct first: --contrastive ' Ald' ' Ren' (leading spaces matter).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory for graph.json, "
                                                   "attribution.json, faithfulness.json/.png, graph.html "
                                                   "(default outputs/analysis/<prompt>).")] = None,
    tau: Annotated[float, typer.Option("--tau", help="Keep neurons with |score| >= tau × |metric|.")] = 0.05,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", min=1, help="Keep the k neurons of largest |score| "
                                                 "instead of the tau rule.")] = None,
    max_nodes: Annotated[int, typer.Option("--max-nodes", min=1, help="At most this many neurons in the graph.")] = 200,
    edges: Annotated[bool, typer.Option("--edges/--no-edges", help="Compute neuron-to-neuron edges "
                                        "(--no-edges: every neuron links to the metric with its score).")] = True,
    no_llm: Annotated[bool, typer.Option("--no-llm", help="No LLM neuron descriptions (offline labels only).")] = False,
    llm_model: Annotated[str, typer.Option("--llm-model", help="LLM for neuron descriptions (OpenAI-compatible).")] = "gpt-4o",
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible server URL (vLLM, Ollama …).")] = None,
    llm_max_neurons: Annotated[int, typer.Option("--llm-max-neurons", min=1, help="Describe at most this many of the "
                                                 "strongest neurons with the LLM (one request each).")] = 40,
    labels_file: Annotated[Optional[Path], typer.Option("--labels-file", help="Neuron descriptions to import: CSV or "
                                                        "JSONL with layer, neuron, description columns.")] = None,
    corpus: Annotated[Optional[Path], typer.Option("--corpus", help="Text file, one passage per line, for "
                                                   "top-activating contexts and mean ablation (default: built-in).")] = None,
    ablation: Annotated[str, typer.Option("--ablation", help="zero, mean (corpus mean) or counterfactual.")] = "zero",
    counterfactual: Annotated[Optional[str], typer.Option("--counterfactual", help="Prompt of the same token length "
                                                          "whose activations replace ablated ones (--ablation counterfactual).")] = None,
    include_first_position: Annotated[bool, typer.Option("--include-first-position", help="Keep position-0 neurons "
                                                         "(the attention sink; off by default, see docs/graph_schema.md).")] = False,
    random_draws: Annotated[int, typer.Option("--random-draws", min=1, help="Random-neuron control draws per N.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random controls.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Rows per forward/backward pass.")] = 32,
    edge_batch_size: Annotated[Optional[int], typer.Option("--edge-batch-size", min=1, help="Edge targets per "
                                                           "backward (default: 32 on GPU, 8 on CPU).")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Neurons listed in the summary.")] = 10,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different analysis in --output.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Alias (smollm2-135m), .gguf file, checkpoint "
                                                 "dir or hub id (default: the --case's model, else smollm2-135m).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemPromptOpt = None,
    answer_prefix: AnswerPrefixOpt = None,
    profile: ProfileFileOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Which MLP neurons push the model toward the wrong answer instead of the correct one (RelP), checked by ablation."""
    from conceptfix.analyze.export import slugify
    from conceptfix.analyze.pipeline import analyze
    from conceptfix.models import load_model

    if prompt is not None and case is not None:
        raise ConceptfixError("give a PROMPT or --case, not both", field="PROMPT",
                              hint="--case takes the prompt and the pair from a filter result")
    if prompt is None and case is None:
        raise ConceptfixError("no prompt", field="PROMPT",
                              hint="conceptfix analyze 'PROMPT' --contrastive ' Ald' ' Ren', or --case FILE.json#N")
    base_profile = None
    case_formatted = None
    if case is not None:
        target, filter_model, filter_profile = _load_case(case)
        prompt = target.prompt
        case_formatted = target.formatted_prompt
        if contrastive is None:
            contrastive = tuple(target.contrastive)
        if model is None and filter_model:
            model = filter_model
        base_profile = filter_profile
    if not prompt.strip():
        raise ConceptfixError("prompt is empty", field="PROMPT")
    if contrastive is None:
        raise ConceptfixError("no contrastive pair", field="--contrastive",
                              hint="--contrastive CORRECT WRONG, e.g. --contrastive ' Ald' ' Ren'")
    if ablation not in ("zero", "mean", "counterfactual"):
        raise ConceptfixError(f"unknown ablation {ablation!r}", field="--ablation", hint="zero, mean or counterfactual")
    if ablation == "counterfactual" and not counterfactual:
        raise ConceptfixError("counterfactual ablation needs --counterfactual PROMPT", field="--counterfactual")
    if counterfactual and ablation != "counterfactual":
        raise ConceptfixError("--counterfactual is only used with --ablation counterfactual", field="--counterfactual")
    for path, flag in ((labels_file, "--labels-file"), (corpus, "--corpus")):
        if path is not None and not path.is_file():
            raise ConceptfixError(f"file not found: {path}", field=flag)
    model = model or DEFAULT_MODEL
    correct, wrong = contrastive

    prof = build_profile(model, chat_template, system_prompt, answer_prefix, profile)
    if base_profile is not None and profile is None:
        # The case was found with the filter's profile: keep it, with this command's flags on top.
        from conceptfix.artifacts import parse_model
        from conceptfix.models import ModelProfile

        prof = parse_model(ModelProfile, base_profile, prefix="profile.").merged(
            use_chat_template=chat_template, system_prompt=system_prompt, answer_prefix=answer_prefix)
    with err.status(f"loading {model} …"):
        loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    # The profile goes on a copy: load_model hands out one shared object per process.
    loaded = dataclasses.replace(loaded, profile=prof)
    if case_formatted is not None and loaded.format_prompt(prompt) != case_formatted:
        err.print(escape(f"note: the filter saw this prompt as {case_formatted!r}; analysing "
                         f"{loaded.format_prompt(prompt)!r}"), highlight=False)

    output = output or Path("outputs") / "analysis" / slugify(prompt)
    result = analyze(
        loaded, prompt, correct=correct, wrong=wrong, output_dir=output, tau=tau, top_k=top_k, max_nodes=max_nodes,
        edges=edges, no_llm=no_llm, labels_file=labels_file, corpus=corpus, ablation=ablation,
        counterfactual_prompt=counterfactual, llm_model=llm_model, base_url=base_url, llm_max_neurons=llm_max_neurons,
        random_draws=random_draws, seed=seed, include_first_position=include_first_position, overwrite=overwrite,
        batch_size=batch_size, edge_batch_size=edge_batch_size,
    )
    if result.cached:
        out.print(escape(f"same inputs as the analysis stored in {output} (pass --overwrite to recompute)"),
                  highlight=False, soft_wrap=True)
    out.print(escape(f"prompt: {result.attribution['formatted_prompt']!r}  model: {loaded.spec}"), highlight=False,
              soft_wrap=True)
    for line in result.summary_lines(top=top):
        # Labels and tokens are model/corpus text: print them literally, never as rich markup.
        out.print(escape(line), highlight=False, soft_wrap=True)
    names = ", ".join(sorted(p.name for p in result.files.values()))
    out.print(escape(f"wrote {names} → {output}  (open {output / 'graph.html'} in a browser)"), highlight=False,
              soft_wrap=True)


def _load_case(reference: str):
    """The target case and the model/profile of the filter run that found it."""
    from conceptfix.artifacts import read_json
    from conceptfix.schemas import load_target_case

    path = reference.partition("#")[0]
    target = load_target_case(reference)   # FILE.json#N; N defaults to 0
    data = read_json(path, field="--case")
    model = data.get("model") if isinstance(data, dict) else None
    profile = data.get("profile") if isinstance(data, dict) else None
    return target, model if isinstance(model, str) else None, profile if isinstance(profile, dict) else None
