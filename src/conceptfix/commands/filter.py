"""`conceptfix filter`: stage 2, prompts where the model is clearly wrong but the answer is in its top-5."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from conceptfix.cli_app import (AnswerPrefixOpt, ChatTemplateOpt, DeviceOpt, DtypeOpt, ModelOpt, ProfileFileOpt,
                                SystemPromptOpt, TrustRemoteCodeOpt, build_profile, command, err, load_from_options,
                                out)
from conceptfix.errors import ConceptfixError
from conceptfix.models import DEFAULT_MODEL


@command("filter")
def filter_command(
    input: Annotated[Path, typer.Option("--input", "-i", help="Prompt file from stage 1: a JSON list of "
                                        "{prompt, answer, aliases?, ...}.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the filter result (JSON).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="How many next tokens to inspect (>= 5).")] = 10,
    max_rank: Annotated[int, typer.Option("--max-rank", help="Worst rank the correct answer may have.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per forward pass.")] = 16,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Drop records that are not completion "
                                               "prompts or whose answer cannot be matched (reason 'invalid') "
                                               "instead of stopping.")] = False,
    use_cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse a cached result for identical "
                                            "inputs.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different existing output.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemPromptOpt = None,
    answer_prefix: AnswerPrefixOpt = None,
    profile: ProfileFileOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Find target cases: a content-word top-1 that is wrong, with the correct answer at rank 2..max-rank."""
    from conceptfix.artifacts import write_artifact
    from conceptfix.filter import filter_cache_key, filter_prompts, load_cached, model_fingerprint, validate_options
    from conceptfix.models import resolve_checkpoint, resolve_device, resolve_dtype
    from conceptfix.schemas import load_prompt_records

    if top_k < 5:
        raise ConceptfixError(f"top-k {top_k} is too small; the answer must be looked for in at least the top 5",
                              field="--top-k", hint="use --top-k 5 or more (default 10)")
    _cli_fields(validate_options, top_k, max_rank, batch_size)
    records = load_prompt_records(input)
    if not records:
        raise ConceptfixError(f"{input} holds no prompts", field="--input")

    # Identical inputs: answer from the cache without loading the model (minutes for an 8B model).
    result = None
    if use_cache:
        prof = build_profile(model, chat_template, system_prompt, answer_prefix, profile)
        resolved_device = resolve_device(device)
        fingerprint = model_fingerprint(model, resolve_checkpoint(model), resolved_device,
                                        resolve_dtype(dtype, resolved_device))
        key = filter_cache_key(fingerprint, prof, records, top_k=top_k, max_rank=max_rank, skip_invalid=skip_invalid)
        result = load_cached(key)
        if result is not None:
            err.print(f"[dim]identical inputs: reusing cached result {key[:12]}[/]")
    if result is None:
        loaded = load_from_options(model, device, dtype, chat_template, system_prompt, answer_prefix, profile,
                                   trust_remote_code)
        result = filter_prompts(loaded, records, top_k=top_k, max_rank=max_rank, batch_size=batch_size,
                                skip_invalid=skip_invalid, cache=use_cache)
    write_artifact(output, result, overwrite=overwrite)
    _print_result(result, output)


def _cli_fields(check, top_k: int, max_rank: int, batch_size: int) -> None:
    """Library errors name parameters (top_k); on the command line name the flags (--top-k)."""
    try:
        check(top_k, max_rank, batch_size)
    except ConceptfixError as exc:
        flags = {"top_k": "--top-k", "max_rank": "--max-rank", "batch_size": "--batch-size"}
        raise ConceptfixError(str(exc), field=flags.get(exc.field, exc.field), hint=exc.hint) from None


def _print_result(result, output: Path) -> None:
    table = Table(title=f"target cases ({len(result.target_cases)} of {result.summary.get('prompts', '?')} prompts)")
    table.add_column("#", justify="right")
    table.add_column("prompt")
    table.add_column("wrong top-1 (word)")
    table.add_column("p", justify="right")
    table.add_column("correct token")
    table.add_column("rank", justify="right")
    table.add_column("p", justify="right")
    for n, case in enumerate(result.target_cases):
        # Prompts are user text: escape rich markup ("[INST]" must print as itself).
        table.add_row(str(n), escape(case.prompt), escape(f"{case.wrong_token!r} ({case.wrong_word})"),
                      f"{case.wrong_prob:.3f}", escape(f"{case.correct_token!r} → {case.answer}"),
                      str(case.correct_rank), f"{case.correct_prob:.3f}")
    out.print(table)
    reasons = Table(title="dropped", show_header=True)
    reasons.add_column("reason")
    reasons.add_column("prompts", justify="right")
    for reason, count in result.summary.items():
        if reason not in ("prompts", "target_cases"):
            reasons.add_row(reason, str(count))
    out.print(reasons)
    out.print(escape(f"wrote {output}  (use it in stage 3 as {output}#N)"))
