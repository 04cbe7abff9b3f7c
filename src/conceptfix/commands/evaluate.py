"""`conceptfix evaluate`: stage 7, base vs fine-tuned on the target, its paraphrases and held-out facts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from conceptfix.cli_app import (AnswerPrefixOpt, ChatTemplateOpt, ProfileFileOpt, SystemPromptOpt, TrustRemoteCodeOpt,
                                command, err, out)


@command("evaluate")
def evaluate_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for evaluation.json/.md and probability_shift.png.")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="The SFT config: base = model_name, tuned = output_dir, target = its target block.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (alias, .gguf, checkpoint dir or hub id).")] = None,
    tuned: Annotated[Optional[str], typer.Option("--tuned", help="Fine-tuned checkpoint directory.")] = None,
    case: Annotated[Optional[str], typer.Option("--case", help="One target case: filtered_prompts.json#N.")] = None,
    cases: Annotated[Optional[Path], typer.Option("--cases", help="Every target case of a filtered_prompts.json.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Ad-hoc target prompt.")] = None,
    correct: Annotated[Optional[str], typer.Option("--correct", help="Correct answer: a word ('aldosterone') or a token text with a leading space (' Ald').")] = None,
    wrong: Annotated[Optional[str], typer.Option("--wrong", help="Wrong answer the model gives: a word or a token text.")] = None,
    paraphrase: Annotated[Optional[list[str]], typer.Option("--paraphrase", help="A rewording of the target prompt (repeatable).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="'Experiment' column of the results table.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="'Method' column, e.g. 'Train on aldosterone as hormone'.")] = None,
    locality_file: Annotated[Optional[Path], typer.Option("--locality-file", help="Prompt records for locality (default: the built-in prompt bank).")] = None,
    locality_max: Annotated[int, typer.Option("--locality-max", min=0, help="At most this many held-out facts.")] = 100,
    locality_seed: Annotated[int, typer.Option("--locality-seed", help="Seed of the deterministic sample of facts.")] = 0,
    neutral: Annotated[bool, typer.Option("--neutral/--no-neutral", help="Also measure KL on built-in neutral prompts.")] = True,
    paraphrases_llm: Annotated[bool, typer.Option("--paraphrases-llm", help="Generate paraphrases with the LLM when none are given (network).")] = False,
    llm_model: Annotated[str, typer.Option("--llm-model", help="LLM for paraphrases (OpenAI-compatible).")] = "gpt-4o",
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible server URL (vLLM, Ollama …).")] = None,
    n_paraphrases: Annotated[int, typer.Option("--n-paraphrases", min=1, help="How many LLM paraphrases to ask for.")] = 5,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Rows of the before/after tables.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass.")] = 16,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different result in --output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print evaluation.json instead of the summary.")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda (default: the config's, else auto).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16 (default: the config's, else auto).")] = None,
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemPromptOpt = None,
    answer_prefix: AnswerPrefixOpt = None,
    profile: ProfileFileOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Before/after next-token probabilities on the target, its paraphrases and held-out facts (KL, accuracy)."""
    import json

    from conceptfix.evaluate.run import EvaluationRequest, run_evaluation
    from conceptfix.evaluate.types import EvaluationSettings
    from conceptfix.evaluate.report import print_summary

    request = EvaluationRequest(
        config=str(config) if config else None, base=base, tuned=tuned, case_ref=case,
        cases_file=str(cases) if cases else None, prompt=prompt, correct=correct, wrong=wrong,
        paraphrases=list(paraphrase or []), name=name, method=method, device=device, dtype=dtype,
        chat_template=chat_template, system_prompt=system_prompt, answer_prefix=answer_prefix,
        profile_file=str(profile) if profile else None, trust_remote_code=trust_remote_code,
        locality_file=str(locality_file) if locality_file else None,
        settings=EvaluationSettings(top_k=top_k, batch_size=batch_size, locality_max=locality_max,
                                    locality_seed=locality_seed, neutral=neutral),
        paraphrases_llm=paraphrases_llm, llm_model=llm_model, base_url=base_url, n_llm_paraphrases=n_paraphrases,
    )
    run = run_evaluation(request, output, overwrite=overwrite, status=err.status)
    if as_json:
        typer.echo(json.dumps(run.result.model_dump(mode="json"), indent=2, ensure_ascii=False))
        return
    if run.cached:
        out.print(f"same inputs as the stored result in {output} (pass --overwrite to recompute)", highlight=False)
    print_summary(run.result, out)
    out.print(f"evaluation.json, evaluation.md, {Path(run.paths['plot']).name} → {output}", highlight=False)
