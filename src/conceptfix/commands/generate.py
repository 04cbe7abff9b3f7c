"""`conceptfix generate`: stage 1, prompts in the seed's data/medical_prompts.json format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from conceptfix.cli_app import command, out
from conceptfix.errors import ConceptfixError


def sibling_paths(output: Path) -> tuple[Path, Path]:
    """(rejected, meta) next to the output: medical_prompts.json → medical_prompts.rejected.json, .meta.json."""
    stem = output.name[:-len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}.rejected.json"), output.with_name(f"{stem}.meta.json")


@command("generate")
def generate_command(
    provider: Annotated[str, typer.Option(help="bank (offline curated prompts), openai (any OpenAI-compatible server) or file (check your own --input list).")] = "bank",
    input_path: Annotated[Optional[Path], typer.Option("--input", "-i", help="Prompt list (JSON) for --provider file.")] = None,
    n: Annotated[int, typer.Option("--n", help="Prompts per batch.")] = 25,
    batches: Annotated[int, typer.Option(help="Number of batches (later batches are deduplicated against earlier ones).")] = 4,
    take_all: Annotated[bool, typer.Option("--all", help="Take every prompt of the bank (or of the --input file).")] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the prompt list (JSON).")] = Path("data/medical_prompts.json"),
    seed: Annotated[int, typer.Option(help="Sampling seed (bank order; passed to the LLM where supported).")] = 0,
    category: Annotated[Optional[list[str]], typer.Option("--category", help="Keep only this category (repeatable).")] = None,
    llm_model: Annotated[str, typer.Option(help="Model name for the openai provider.")] = "gpt-4o",
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (vLLM, Ollama, llama.cpp).")] = None,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key (never passed on the command line).")] = "OPENAI_API_KEY",
    temperature: Annotated[float, typer.Option(help="Sampling temperature for the openai provider.")] = 0.7,
    topic: Annotated[str, typer.Option(help="Topic the LLM writes about.")] = "medical",
    overwrite: Annotated[bool, typer.Option(help="Replace a different existing output.")] = False,
) -> None:
    """Write short completion prompts (the answer is the next word), validated against the seed's rules."""
    from conceptfix.artifacts import provenance, write_artifact, write_json
    from conceptfix.generate import generate_prompts, make_provider

    if take_all and provider == "openai":
        raise ConceptfixError("--all does not apply to the openai provider", field="--all", hint="pass --n instead")
    if input_path is not None and provider != "file":
        raise ConceptfixError("--input needs --provider file", field="--input")
    if not take_all and n < 1:
        raise ConceptfixError("must be at least 1", field="--n")
    if batches < 1:
        raise ConceptfixError("must be at least 1", field="--batches")
    if output.exists() and output.is_dir():
        raise ConceptfixError(f"{output} is a directory", field="--output", hint="pass a .json file path")
    if provider == "openai" and output.exists() and not overwrite:
        # An LLM never gives the same answer twice: refuse before spending tokens.
        raise ConceptfixError(f"{output} already exists", field="--output", hint="choose another path or pass --overwrite")

    source = make_provider(provider, categories=category, llm_model=llm_model, base_url=base_url,
                           api_key_env=api_key_env, temperature=temperature,
                           input_path=str(input_path) if input_path is not None else None)
    result = generate_prompts(source, None if take_all else n, batches, seed, topic=topic)

    rejected_path, meta_path = sibling_paths(output)
    if not result.accepted:
        write_json(rejected_path, [r.model_dump(mode="json") for r in result.rejected])
        raise ConceptfixError(f"no prompt passed validation ({len(result.rejected)} rejected, see {rejected_path})",
                              field="--provider")
    records = [r.model_dump(mode="json") for r in result.accepted]
    write_artifact(output, records, overwrite=overwrite)
    write_json(rejected_path, [r.model_dump(mode="json") for r in result.rejected])
    config = {"provider": provider, "n": None if take_all else n, "batches": batches, "all": take_all, "seed": seed,
              "categories": category, "topic": topic, "output": str(output),
              "input": str(input_path) if input_path is not None else None}
    meta = provenance("generate", config)
    meta["provider"] = source.describe()
    meta["summary"] = result.summary()
    write_json(meta_path, meta)
    _print_summary(result, output, rejected_path)


def _print_summary(result, output: Path, rejected_path: Path) -> None:
    table = Table(title=f"generate: {result.provider}" + (f" ({result.model})" if result.model else ""))
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("accepted", str(len(result.accepted)))
    table.add_row("rejected", str(len(result.rejected)))
    for rule, count in result.rejected_by_rule().items():
        table.add_row(f"  {rule}", str(count))
    out.print(table)
    out.print(f"wrote {len(result.accepted)} prompts to {output}"
              + (f"; rejected ones with their rules in {rejected_path}" if result.rejected else ""), highlight=False)
