"""Builders for tiny random models used in edge-case tests (fast, deterministic)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_config(arch: str = "llama", vocab_size: int = 49152, **overrides):
    from transformers import AutoConfig

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, vocab_size=vocab_size,
                tie_word_embeddings=True)
    if arch == "gemma":
        base.update(head_dim=16)
    base.update(overrides)
    return AutoConfig.for_model(arch, **base)


def tiny_model(arch: str = "llama", vocab_size: int = 49152, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **overrides), dtype=torch.float32)
    return model.eval()


def save_tiny_model(directory: Path, tokenizer, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    model = tiny_model(arch, vocab_size=len(tokenizer), seed=seed, **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def run_cli(args: list[str]):
    """Invoke the `conceptfix` CLI in-process (all commands registered)."""
    from typer.testing import CliRunner

    from conceptfix.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    """A user mistake: exit code 2, one line, no traceback, naming every needle (the field, the fix)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
