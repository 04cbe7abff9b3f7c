"""The typer app and the options every stage shares. Stage commands live in conceptfix.commands.*.

User mistakes (ConceptfixError) are printed as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from conceptfix.errors import ConceptfixError

app = typer.Typer(
    name="conceptfix",
    help="Find factual errors in a language model, trace them through MLP neurons, and repair them "
    "by fine-tuning on an intermediate concept.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Stages: generate, filter, analyze, train, evaluate (and predict for a quick look)."""
    if version:
        from conceptfix import __version__

        typer.echo(__version__)
        raise typer.Exit()


out = Console()
err = Console(stderr=True)


def command(name: str | None = None, **kwargs) -> Callable:
    """Register a stage command; ConceptfixError becomes `error: field: message` and exit 2."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except ConceptfixError as exc:
                err.print(f"[bold red]error:[/] {exc.one_line()}", markup=True, highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                err.print("interrupted; artifacts already written are complete (writes are atomic)")
                raise typer.Exit(130) from None

        app.command(name, **kwargs)(wrapper)
        return fn

    return decorate


# Options shared by every command that loads a model. `None` means "the profile's default".
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Alias (smollm2-135m), .gguf file, checkpoint dir or hub id.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda (bf16, device_map=auto across GPUs).")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")]
ChatTemplateOpt = Annotated[
    Optional[bool], typer.Option("--chat-template/--no-chat-template", help="Wrap the prompt in the chat template.")
]
SystemPromptOpt = Annotated[Optional[str], typer.Option(help="System prompt when the chat template is on.")]
AnswerPrefixOpt = Annotated[Optional[str], typer.Option(help="Text appended after the prompt, e.g. ' Answer:'.")]
ProfileFileOpt = Annotated[Optional[Path], typer.Option("--profile", help="YAML file with profile fields.")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(help="Allow custom model code from the checkpoint (off by default).")]


def build_profile(model: str, chat_template: bool | None, system_prompt: str | None, answer_prefix: str | None,
                  profile_file: Path | None = None):
    """Default profile for the model, then the profile file, then explicit flags."""
    from conceptfix.artifacts import parse_model, read_yaml
    from conceptfix.models import ModelProfile, default_profile

    profile = default_profile(model)
    if profile_file is not None:
        data = read_yaml(profile_file, field="--profile") or {}
        merged = {**profile.model_dump(), **(data if isinstance(data, dict) else {})}
        if not isinstance(data, dict):
            raise ConceptfixError("profile file must be a YAML mapping", field="--profile")
        profile = parse_model(ModelProfile, merged, prefix="profile.")
    return profile.merged(use_chat_template=chat_template, system_prompt=system_prompt, answer_prefix=answer_prefix)


def load_from_options(model: str, device: str, dtype: str, chat_template: bool | None, system_prompt: str | None,
                      answer_prefix: str | None, profile_file: Path | None = None, trust_remote_code: bool = False):
    from conceptfix.models import load_model

    profile = build_profile(model, chat_template, system_prompt, answer_prefix, profile_file)
    with err.status(f"loading {model} …"):
        return load_model(model, device=device, dtype=dtype, profile=profile, trust_remote_code=trust_remote_code)


def main() -> None:
    import conceptfix.commands  # noqa: F401  registers the stage commands

    app()


if __name__ == "__main__":
    sys.exit(main())
