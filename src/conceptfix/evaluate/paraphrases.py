"""Where a case's paraphrases come from, in priority order: the case/config itself, the prompt bank record
with the same prompt, or (only when asked: it needs the network) an LLM.

A paraphrase must keep the answer as the very next word and must not contain either answer: a rewording
that names "aldosterone" tests reading, not knowledge.
"""

from __future__ import annotations

import re
from typing import Sequence

from conceptfix.evaluate.types import EvalCase
from conceptfix.schemas import PromptRecord
from conceptfix.tokens import normalize

PARAPHRASE_SYSTEM = (
    "You rewrite sentence-completion prompts for evaluating a language model. Each rewrite must ask for the "
    "same fact, end exactly where the answer word would follow (no question mark, no trailing punctuation), "
    "and must not contain the answer or any other candidate answer. Vary wording and sentence structure."
)

PARAPHRASE_SCHEMA = {
    "type": "object",
    "properties": {"paraphrases": {"type": "array", "items": {"type": "string"}}},
    "required": ["paraphrases"],
    "additionalProperties": False,
}


def _mentions(text: str, word: str) -> bool:
    word = normalize(word)
    return bool(word) and re.search(rf"\b{re.escape(word)}", normalize(text)) is not None


def clean_paraphrases(case: EvalCase, candidates: Sequence[str]) -> list[str]:
    """Drop blanks, duplicates, the prompt itself, questions, and rewordings that name an answer."""
    kept: list[str] = []
    seen = {normalize(case.prompt)}
    for text in candidates:
        if not isinstance(text, str):
            continue
        text = " ".join(text.split())
        key = normalize(text)
        if not text or key in seen or text.endswith(("?", ".", "!", ":")):
            continue
        if any(_mentions(text, w) for w in (case.correct, case.wrong, *case.aliases)):
            continue
        seen.add(key)
        kept.append(text)
    return kept


def bank_paraphrases(case: EvalCase, records: Sequence[PromptRecord]) -> list[str]:
    """Paraphrases curated in the bank for a record with the same prompt."""
    key = normalize(case.prompt)
    for record in records:
        if normalize(record.prompt) == key and record.paraphrases:
            return clean_paraphrases(case, record.paraphrases)
    return []


def llm_paraphrases(client, case: EvalCase, n: int) -> list[str]:
    """Ask the LLM client for `n` rewordings; keep the valid ones."""
    user = (f"Prompt: {case.prompt!r}\nCorrect next word: {case.correct!r}\nOther candidate answers to avoid: "
            f"{case.wrong!r}\nWrite {n} paraphrases as JSON: {{\"paraphrases\": [...]}}.")
    data = client.complete_json(PARAPHRASE_SYSTEM, user, schema=PARAPHRASE_SCHEMA, schema_name="paraphrases")
    items = data.get("paraphrases", []) if isinstance(data, dict) else []
    return clean_paraphrases(case, items)[:n]


def with_paraphrases(case: EvalCase, *, bank: Sequence[PromptRecord] = (), client=None, n_llm: int = 5) -> EvalCase:
    """The case with paraphrases from the first source that has some (case → bank → LLM)."""
    if case.paraphrases:  # given explicitly: used as written (evaluate_case drops blanks and duplicates)
        return case
    found = bank_paraphrases(case, bank)
    if found:
        return case.model_copy(update={"paraphrases": found, "paraphrase_source": "bank"})
    if client is not None and n_llm > 0:
        found = llm_paraphrases(client, case, n_llm)
        if found:
            return case.model_copy(update={"paraphrases": found, "paraphrase_source": "llm"})
    return case
