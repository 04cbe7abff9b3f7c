"""The LLM provider: asks GPT-4o (or any OpenAI-compatible server) for prompts in the seed's format.

Each batch is one structured-output request. Later batches are told which prompts already exist, so
the model writes new ones; whatever still repeats is dropped by `generate_prompts` (normalised text).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from conceptfix.errors import ConceptfixError
from conceptfix.llm import LLMClient

# How many earlier prompts to quote back to the model (keeps the request small on long runs).
MAX_AVOID_LIST = 150

SYSTEM_PROMPT = """You write short factual completion prompts for testing language models.
Rules for every prompt:
- A sentence fragment that the answer completes, NOT a question (no '?', no 'What/Which/Is ...').
- Exactly one correct, unambiguous answer of 1-2 words; never yes/no.
- The very first word after the prompt IS the answer: the prompt ends right before it, so the answer
  never starts with 'the', 'a' or 'an' (put the article at the end of the prompt instead).
- The prompt must not contain the answer, and must not end with 'includes', 'such as' or similar
  open-ended phrases that allow many answers.
- No final punctuation after the prompt.
Good: {"prompt": "The neurotransmitter associated with reward is", "answer": "dopamine"}
Good: {"prompt": "Parkinson's disease involves degeneration of neurons in the", "answer": "substantia nigra"}
Bad: "What causes diabetes?" (question). Bad: "The treatment for X includes" (many answers).
Bad: "Is dopamine involved in reward?" (yes/no).
Reply with JSON: {"prompts": [{"prompt": ..., "answer": ..., "category": ..., "aliases": [...], "paraphrases": [...]}]}.
`aliases` are other correct spellings of the answer; `paraphrases` are 2 rewordings of the prompt that
follow the same rules and have the same answer."""

RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "prompt": {"type": "string"},
                    "answer": {"type": "string"},
                    "category": {"type": "string"},
                    "aliases": {"type": "array", "items": {"type": "string"}},
                    "paraphrases": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["prompt", "answer", "category", "aliases", "paraphrases"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["prompts"],
    "additionalProperties": False,
}


def user_message(n: int, topic: str, categories: Sequence[str] | None, avoid: Sequence[str]) -> str:
    lines = [f"Write {n} new {topic} completion prompts."]
    if categories:
        lines.append(f"Use only these categories (the `category` field): {', '.join(categories)}.")
    else:
        lines.append("Use a short lower-case `category` per prompt (e.g. pharmacology, physiology, anatomy).")
    lines.append("Mix well-known facts with harder ones a small model might get wrong.")
    if avoid:
        shown = list(avoid)[-MAX_AVOID_LIST:]
        lines.append("Do not repeat or reword any of these existing prompts:")
        lines.extend(f"- {p}" for p in shown)
    return "\n".join(lines)


def extract_records(payload: Any) -> list[Any]:
    """The list of records inside an answer: `{"prompts": [...]}`, or a bare list."""
    if isinstance(payload, dict):
        for key in ("prompts", "items", "data"):
            if isinstance(payload.get(key), list):
                return payload[key]
        raise ConceptfixError("the LLM answer has no `prompts` list", field="prompts",
                              hint="the model ignored the JSON format; try another model")
    if isinstance(payload, list):
        return payload
    raise ConceptfixError(f"the LLM answer is a {type(payload).__name__}, not a prompt list", field="prompts")


class OpenAIProvider:
    """Generates prompts with an LLMClient, one request per batch."""

    name = "openai"

    def __init__(self, client: LLMClient, categories: Sequence[str] | None = None):
        self.client = client
        self.categories = list(categories) if categories else None
        self.model = client.model

    def describe(self) -> dict:
        return {"provider": self.name, "categories": self.categories, **self.client.describe(),
                "usage": self.client.usage.to_dict()}

    def batches(self, n: int | None, batches: int, seed: int, topic: str | None = None,
                known_prompts: Callable[[], Sequence[str]] | None = None) -> Iterator[list[Any]]:
        if n is None:
            raise ConceptfixError("--all only applies to the bank provider", field="--all", hint="pass --n instead")
        if self.client.seed is None:
            self.client.seed = seed
        for _ in range(batches):
            avoid = known_prompts() if known_prompts else []
            payload = self.client.complete_json(SYSTEM_PROMPT, user_message(n, topic or "medical", self.categories,
                                                                            avoid),
                                                schema=RESPONSE_SCHEMA, schema_name="prompt_batch", strict=True)
            # A model that writes more than asked for does not get to decide the batch size.
            records = extract_records(payload)[:n]
            for item in records:
                if isinstance(item, dict):
                    item["source"] = f"openai:{self.client.model}"
            yield records
