"""The offline provider: a curated bank of short completion prompts shipped as package data.

`conceptfix/data/prompt_bank.json` holds a few hundred hand-written medical/biology/general-science
facts, each with its answer, spelling aliases and paraphrases (for testing whether a fix
generalises). Sampling is seeded and never repeats a prompt.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from importlib import resources
from typing import Iterator, Sequence

from conceptfix.errors import ConceptfixError
from conceptfix.schemas import PromptRecord

BANK_RESOURCE = "prompt_bank.json"


@lru_cache(maxsize=1)
def _bank_records() -> tuple[PromptRecord, ...]:
    from conceptfix.artifacts import parse_model

    text = resources.files("conceptfix").joinpath("data").joinpath(BANK_RESOURCE).read_text(encoding="utf-8")
    data = json.loads(text)
    return tuple(parse_model(PromptRecord, item, prefix=f"prompt_bank[{i}].") for i, item in enumerate(data))


def load_bank() -> list[PromptRecord]:
    """Every bank record (fresh copies: callers may edit them)."""
    return [r.model_copy(deep=True) for r in _bank_records()]


def bank_categories() -> list[str]:
    return sorted({r.category for r in _bank_records()})


def filter_categories(records: Sequence[PromptRecord], categories: Sequence[str] | None) -> list[PromptRecord]:
    if not categories:
        return list(records)
    wanted = {c.strip().lower() for c in categories}
    known = {r.category.lower() for r in records}
    unknown = sorted(wanted - known)
    if unknown:
        raise ConceptfixError(f"unknown category {', '.join(map(repr, unknown))}", field="--category",
                              hint=f"choose from {', '.join(sorted(known))}")
    return [r for r in records if r.category.lower() in wanted]


def sample_bank(n: int | None, seed: int = 0, categories: Sequence[str] | None = None) -> list[PromptRecord]:
    """`n` distinct bank records in a seeded random order (`n=None`: all of them, shuffled)."""
    pool = filter_categories(load_bank(), categories)
    if n is None:
        n = len(pool)
    if n < 1:
        raise ConceptfixError("must be at least 1", field="--n")
    if n > len(pool):
        scope = f"in categories {', '.join(categories)}" if categories else "in total"
        raise ConceptfixError(f"asked for {n} prompts but the bank has {len(pool)} {scope}", field="--n",
                              hint="lower --n/--batches or pass --all")
    return random.Random(seed).sample(pool, n)


class BankProvider:
    """Serves bank records in batches; the whole draw is made up front, so batches never overlap."""

    name = "bank"

    def __init__(self, categories: Sequence[str] | None = None):
        self.categories = list(categories) if categories else None
        self.model = None

    def describe(self) -> dict:
        return {"provider": self.name, "categories": self.categories, "bank_size": len(_bank_records())}

    def batches(self, n: int | None, batches: int, seed: int, topic: str | None = None) -> Iterator[list[dict]]:
        total = None if n is None else n * batches
        records = sample_bank(total, seed, self.categories)
        size = n if n is not None else max(1, -(-len(records) // batches))
        for start in range(0, len(records), size):
            yield [r.model_dump() for r in records[start:start + size]]
