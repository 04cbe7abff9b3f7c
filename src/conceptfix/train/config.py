"""The SFT config: the seed's YAML schema unchanged, plus optional fields. Unknown keys are errors with
a "did you mean" suggestion, so a typo never silently falls back to a default.

Seed fields: model_name, device, dtype, output_dir, epochs, learning_rate, batch_size,
gradient_accumulation_steps, warmup_ratio, max_length, use_chat_template, system_prompt, texts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conceptfix.errors import ConceptfixError


class TargetSpec(BaseModel):
    """The error the training is meant to fix (used by `conceptfix evaluate`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    correct: str = Field(min_length=1)  # the correct answer word, e.g. "aldosterone" (or its first token " al")
    wrong: str = Field(min_length=1)    # the wrong answer word, e.g. "renin" (or " ren")
    paraphrases: list[str] = Field(default_factory=list)


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"])


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- the seed's schema ---
    model_name: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    output_dir: str
    epochs: int = Field(5, ge=1)
    learning_rate: float = Field(5e-6, gt=0)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    max_length: int = Field(512, ge=8)
    use_chat_template: bool = True
    system_prompt: str | None = ""
    texts: list[str] = Field(min_length=1)

    # --- conceptfix extras (all optional) ---
    seed: int = 0
    method: Literal["full", "lora"] = "full"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    gradient_checkpointing: bool = False
    optimizer: str = "adamw_torch"         # any transformers `optim` name, e.g. adamw_torch_fused, adamw_bnb_8bit
    # transformers `optim_args`, e.g. "bf16_stochastic_round=True" for adamw_torch_8bit (torchao)
    optim_args: str | None = None
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    logging_steps: int = Field(1, ge=1)
    # Reproduce the seed's loop for comparison: pad every text to max_length and compute loss on all tokens
    # (template tokens included). Off by default: loss only on the text, no padding to max_length.
    seed_compat: bool = False
    trust_remote_code: bool = False
    target: TargetSpec | None = None
    max_grad_norm: float = Field(1.0, ge=0.0)  # gradient clipping (0 = off)
    # 0: a resumable checkpoint at the end of every epoch; N: every N optimizer steps.
    checkpoint_steps: int = Field(0, ge=0)
    keep_checkpoints: bool = False  # checkpoints only serve --resume; deleted after a finished run unless kept
    merge_lora: bool = True         # LoRA: save merged full weights (loadable like any checkpoint) + the adapter

    @field_validator("texts")
    @classmethod
    def _texts_not_blank(cls, texts: list[str]) -> list[str]:
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"texts[{i}] is empty")
        return texts


def _suggest(key: str, allowed: list[str]) -> str:
    match = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}?" if match else f"allowed keys: {', '.join(allowed)}"


def parse_sft_config(data: Any, *, source: str = "config") -> SFTConfig:
    if not isinstance(data, dict):
        raise ConceptfixError(f"{source} must be a YAML mapping of fields", field="config")
    for section, model_cls in ((None, SFTConfig), ("target", TargetSpec), ("lora", LoraSpec)):
        block = data if section is None else data.get(section)
        if not isinstance(block, dict):
            continue
        allowed = list(model_cls.model_fields)
        for key in block:
            if key not in allowed:
                name = key if section is None else f"{section}.{key}"
                raise ConceptfixError(f"unknown key in {source}", field=name, hint=_suggest(str(key), allowed))
    try:
        return SFTConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise ConceptfixError(f"{err.get('msg', 'invalid value')} in {source}", field=loc or "config") from None


def load_sft_config(path: str | Path) -> SFTConfig:
    from conceptfix.artifacts import read_yaml

    return parse_sft_config(read_yaml(path, field="--config"), source=str(path))
