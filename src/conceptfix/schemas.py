"""Artifact schemas shared between stages (pydantic). Files on disk are these models as JSON.

Stage 1 writes a list of PromptRecord (the seed's data/medical_prompts.json).
Stage 2 writes a FilterResult (the seed's data/filtered_prompts.json, with `target_cases`).
Later stages read a TargetCase by reference: ``data/filtered_prompts.json#N`` (N = index in target_cases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from conceptfix.errors import ConceptfixError


class PromptRecord(BaseModel):
    """One completion prompt whose next word is the answer."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    category: str = "general"
    source: str = "unknown"
    # Other spellings that also count as correct (e.g. "epinephrine" for "adrenaline").
    aliases: list[str] = Field(default_factory=list)
    # Rewordings of the same question with the same answer (used by evaluate for generalisation).
    paraphrases: list[str] = Field(default_factory=list)

    @field_validator("prompt", "answer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class TokenCandidate(BaseModel):
    rank: int
    token_id: int
    token: str
    prob: float
    logit: float
    matches_answer: bool = False
    kind: str = "content"  # content | function | letter | punctuation | special | empty


class TargetCase(BaseModel):
    """A prompt where the model's top-1 is clearly wrong and the answer sits at rank 2-5."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    answer: str
    category: str = "general"
    source: str = "unknown"
    aliases: list[str] = Field(default_factory=list)
    paraphrases: list[str] = Field(default_factory=list)
    formatted_prompt: str
    top_k: list[TokenCandidate]
    wrong_token: str
    wrong_token_id: int
    wrong_prob: float
    wrong_word: str
    # What the model greedily writes from its top-1 on (a few tokens): the wrong answer in context.
    wrong_continuation: str = ""
    correct_token: str
    correct_token_id: int
    correct_rank: int
    correct_prob: float
    # The pair stage 3 contrasts, in the seed's order: (correct, wrong), e.g. (" Ald", " Ren").
    contrastive: tuple[str, str]


class DroppedPrompt(BaseModel):
    prompt: str
    answer: str
    reason: str  # top1_correct | top1_ambiguous | correct_rank_too_low | correct_not_in_top_k | invalid
    detail: str = ""
    top1: str | None = None
    top1_prob: float | None = None
    # Rank of the answer's first token over the whole vocabulary (1 = top-1); None when not computed.
    correct_rank: int | None = None


class FilterResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    profile: dict[str, Any]
    top_k: int
    max_rank: int = 5
    target_cases: list[TargetCase]
    dropped: list[DroppedPrompt] = Field(default_factory=list)
    summary: dict[str, int] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)


def load_prompt_records(path: str | Path) -> list[PromptRecord]:
    """Read a prompt file: a JSON list of records, or an object with a `prompts` list."""
    from conceptfix.artifacts import parse_model, read_json

    data = read_json(path, field="--input")
    if isinstance(data, dict) and "prompts" in data:
        data = data["prompts"]
    if not isinstance(data, list):
        raise ConceptfixError("expected a JSON list of {prompt, answer, ...} records", field="--input")
    return [parse_model(PromptRecord, item, prefix=f"[{i}].") for i, item in enumerate(data)]


def load_target_case(reference: str) -> TargetCase:
    """Resolve ``path/to/filtered_prompts.json#N`` (N defaults to 0) to a TargetCase."""
    from conceptfix.artifacts import parse_model, read_json

    path, _, index_text = reference.partition("#")
    try:
        index = int(index_text) if index_text else 0
    except ValueError:
        raise ConceptfixError(f"case index {index_text!r} is not an integer", field="--case",
                              hint="use FILE.json#N") from None
    data = read_json(path, field="--case")
    cases = data.get("target_cases") if isinstance(data, dict) else None
    if not isinstance(cases, list):
        raise ConceptfixError(f"{path} has no target_cases list", field="--case", hint="pass a filter output")
    if not 0 <= index < len(cases):
        raise ConceptfixError(f"{path} has {len(cases)} target cases; #{index} is out of range", field="--case")
    return parse_model(TargetCase, cases[index], prefix=f"target_cases[{index}].")
