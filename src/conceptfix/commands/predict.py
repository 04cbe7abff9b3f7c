"""`conceptfix predict PROMPT`: the seed's stage-7 snippet as a command."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from conceptfix.cli_app import (AnswerPrefixOpt, ChatTemplateOpt, DeviceOpt, DtypeOpt, ModelOpt, ProfileFileOpt,
                                SystemPromptOpt, TrustRemoteCodeOpt, command, load_from_options, out)
from conceptfix.errors import ConceptfixError
from conceptfix.models import DEFAULT_MODEL


@command("predict")
def predict_command(
    prompt: Annotated[str, typer.Argument(help="Completion prompt, e.g. 'The capital of Australia is'.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many next tokens to show.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemPromptOpt = None,
    answer_prefix: AnswerPrefixOpt = None,
    profile: ProfileFileOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Top-k next tokens and their probabilities for one prompt."""
    from conceptfix.predict import top_k_predictions

    if not prompt.strip():
        raise ConceptfixError("prompt is empty", field="PROMPT")
    loaded = load_from_options(model, device, dtype, chat_template, system_prompt, answer_prefix, profile,
                               trust_remote_code)
    top = top_k_predictions(loaded, [prompt], k=top_k, progress=False)[0]
    if as_json:
        payload = {"prompt": prompt, "model": model, "profile": loaded.profile.model_dump(),
                   "formatted_prompt": loaded.format_prompt(prompt), "top_k": [t.to_dict() for t in top]}
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    table = Table(title=prompt, show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("p", justify="right")
    table.add_column("logit", justify="right")
    for rank, t in enumerate(top, 1):
        table.add_row(str(rank), repr(t.token), f"{t.prob:.4f}", f"{t.logit:.2f}")
    out.print(table)
