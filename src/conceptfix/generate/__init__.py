"""Stage 1: prompt generation (the seed's `generate_medical_prompts.py --n 25 --batches 4`).

`generate_prompts(provider, n, batches, seed)` pulls batches from a provider (the offline curated
bank, or an OpenAI-compatible LLM), validates every record against the seed's rules, drops repeats
of earlier batches by normalised prompt text, and returns the accepted records together with the
rejected ones and the rules they broke.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Protocol, Sequence

from pydantic import BaseModel, Field

from conceptfix.errors import ConceptfixError
from conceptfix.generate.bank import BankProvider, load_bank, sample_bank
from conceptfix.generate.validator import RULES, RuleViolation, normalize_text, validate_prompt
from conceptfix.progress import track
from conceptfix.schemas import PromptRecord

__all__ = [
    "BankProvider", "GenerationResult", "OpenAIProvider", "PromptProvider", "RULES", "RejectedPrompt",
    "RuleViolation", "clean_record", "generate_prompts", "load_bank", "make_provider", "sample_bank",
    "validate_prompt",
]


class PromptProvider(Protocol):
    name: str
    model: str | None

    def describe(self) -> dict: ...

    def batches(self, n: int | None, batches: int, seed: int, topic: str | None = None) -> Iterable[list[Any]]: ...


class RejectedPrompt(BaseModel):
    """A record that did not make it, with every rule it broke."""

    record: Any
    batch: int
    rules: list[str]
    violations: list[RuleViolation]


class GenerationResult(BaseModel):
    provider: str
    model: str | None = None
    requested: int | None = None
    batches: int = 0
    accepted: list[PromptRecord] = Field(default_factory=list)
    rejected: list[RejectedPrompt] = Field(default_factory=list)

    def rejected_by_rule(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for item in self.rejected:
            counts.update(set(item.rules))
        return dict(counts.most_common())

    def summary(self) -> dict[str, Any]:
        return {"accepted": len(self.accepted), "rejected": len(self.rejected),
                "rejected_by_rule": self.rejected_by_rule(), "batches": self.batches,
                "categories": dict(Counter(r.category for r in self.accepted).most_common())}


def clean_record(item: Any, default_source: str) -> Any:
    """Harmless tidying of an LLM record before validation: strip whitespace, default fields."""
    if not isinstance(item, dict):
        return item
    item = dict(item)
    for key in ("prompt", "answer", "category"):
        if isinstance(item.get(key), str):
            item[key] = " ".join(item[key].split())
    for key in ("aliases", "paraphrases"):
        if isinstance(item.get(key), list):
            item[key] = [" ".join(v.split()) if isinstance(v, str) else v for v in item[key]]
    if not item.get("category"):
        item["category"] = "general"
    else:
        item["category"] = str(item["category"]).lower()
    item.setdefault("source", default_source)
    return item


def generate_prompts(
    provider: PromptProvider,
    n: int | None = 25,
    batches: int = 4,
    seed: int = 0,
    *,
    topic: str = "medical",
    progress: bool | None = None,
) -> GenerationResult:
    """Collect `n` prompts per batch over `batches` batches (`n=None`: the provider's whole supply).

    Every record is validated; a record whose normalised prompt already appeared (in this or an
    earlier batch) is rejected as `duplicate`.
    """
    if n is not None and n < 1:
        raise ConceptfixError("must be at least 1", field="--n")
    if batches < 1:
        raise ConceptfixError("must be at least 1", field="--batches")
    result = GenerationResult(provider=provider.name, model=provider.model, requested=None if n is None else n * batches)
    seen: dict[str, int] = {}

    def known_prompts() -> list[str]:
        return [r.prompt for r in result.accepted]

    kwargs: dict[str, Any] = {"topic": topic}
    if provider.name == "openai":  # the LLM is told what exists so that later batches bring new prompts
        kwargs["known_prompts"] = known_prompts
    stream = provider.batches(n, batches, seed, **kwargs)
    if provider.name == "openai":  # one request per batch: worth a progress bar
        stream = track(stream, total=batches, description="LLM batches", enabled=progress)
    for batch_index, batch in enumerate(stream):
        result.batches += 1
        for item in batch:
            item = clean_record(item, default_source=provider.name)
            violations = validate_prompt(item)
            if not violations:
                key = normalize_text(item["prompt"])
                if key in seen:
                    violations = [RuleViolation(rule="duplicate", field="prompt",
                                                message=f"repeats a prompt from batch {seen[key] + 1}")]
                else:
                    seen[key] = batch_index
            if not violations:
                try:
                    result.accepted.append(PromptRecord.model_validate(item))
                    continue
                except Exception as exc:  # pydantic: a field with the wrong type that the rules do not cover
                    violations = [RuleViolation(rule="missing_field", field="record", message=str(exc).splitlines()[0])]
            result.rejected.append(RejectedPrompt(record=item, batch=batch_index,
                                                  rules=list(dict.fromkeys(v.rule for v in violations)),
                                                  violations=violations))
    return result


def make_provider(name: str, *, categories: Sequence[str] | None = None, llm_model: str = "gpt-4o",
                  base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.7,
                  max_retries: int = 4, timeout: float = 60.0, input_path: str | None = None) -> PromptProvider:
    """A provider by name: 'bank' (offline), 'openai' (any OpenAI-compatible server) or 'file' (your JSON list)."""
    if name == "bank":
        return BankProvider(categories)
    if name == "file":
        from conceptfix.generate.file_provider import FileProvider

        if input_path is None:
            raise ConceptfixError("the file provider needs a prompt list", field="--input", hint="pass --input FILE.json")
        return FileProvider(input_path, categories)
    if name == "openai":
        from conceptfix.generate.openai_provider import OpenAIProvider
        from conceptfix.llm import LLMClient

        client = LLMClient(model=llm_model, base_url=base_url, api_key_env=api_key_env, max_retries=max_retries,
                           timeout=timeout, temperature=temperature)
        return OpenAIProvider(client, categories)
    raise ConceptfixError(f"unknown provider {name!r}", field="--provider", hint="use bank, openai or file")


def __getattr__(name: str):
    # The openai SDK is imported only when the LLM provider is actually used.
    if name == "OpenAIProvider":
        from conceptfix.generate.openai_provider import OpenAIProvider

        return OpenAIProvider
    raise AttributeError(name)
