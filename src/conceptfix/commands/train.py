"""`conceptfix train --config sft.yaml`: stage 6, SFT on the concept texts (the seed's YAML schema).

Multi-GPU without code change: ``accelerate launch -m conceptfix.cli train --config sft.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from conceptfix.cli_app import command, out


@command("train")
def train_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="SFT YAML (the seed's schema; see docs/training.md).")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different run in output_dir.")] = False,
    output_dir: Annotated[str | None, typer.Option("--output-dir", "-o", help="Override the config's output_dir.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Fine-tune the config's model on its texts (full or LoRA); writes model, logs, loss plot, run.json."""
    from conceptfix.train.config import load_sft_config
    from conceptfix.train.sft import train_sft

    cfg = load_sft_config(config)
    if output_dir is not None:
        cfg = cfg.model_copy(update={"output_dir": output_dir})
    result = train_sft(cfg, overwrite=overwrite, resume=resume)
    if result.world_size > 1:
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    if result.status == "cached":
        out.print(f"already trained with this config: {result.output_dir} (pass --overwrite to train again)")
        return
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    out.print(f"{result.status}: {result.global_step} steps, final loss {loss}, {result.train_runtime_s:.1f} s, "
              f"{result.text_tokens_per_s:.0f} text tok/s ({result.processed_tokens_per_s:.0f} processed tok/s)")
    out.print(f"model, train_log.json, loss.png, run.json → {result.output_dir}")
