"""The file provider: your own prompt list (JSON), checked against the same rules as generated prompts.

Useful to bring a hand-written or previously generated list into the seed's format: every record is
validated and deduplicated, broken ones are reported with the rule they broke.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator, Sequence

from conceptfix.errors import ConceptfixError


def read_prompt_list(path: str | Path) -> list[Any]:
    """A JSON list of records, or an object with a `prompts` list; one-line errors otherwise."""
    from conceptfix.artifacts import read_json

    data = read_json(path, field="--input")
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise ConceptfixError(f"{path} must hold a JSON list of {{prompt, answer, ...}} records", field="--input")
    if not data:
        raise ConceptfixError(f"{path} holds no prompts", field="--input")
    return data


class FileProvider:
    name = "file"

    def __init__(self, path: str | Path, categories: Sequence[str] | None = None):
        self.path = Path(path)
        self.records = read_prompt_list(self.path)
        self.model = None
        if categories:
            wanted = {c.strip().lower() for c in categories}
            self.records = [r for r in self.records
                            if isinstance(r, dict) and str(r.get("category", "general")).lower() in wanted]
            if not self.records:
                raise ConceptfixError(f"{self.path} has no prompts in categories {', '.join(categories)}",
                                      field="--category")

    def describe(self) -> dict:
        return {"provider": self.name, "input": str(self.path), "records": len(self.records)}

    def batches(self, n: int | None, batches: int, seed: int, topic: str | None = None) -> Iterator[list[Any]]:
        records = list(self.records)
        if n is not None:
            total = n * batches
            if total > len(records):
                raise ConceptfixError(f"asked for {total} prompts but {self.path} has {len(records)}", field="--n",
                                      hint="lower --n/--batches or pass --all")
            records = random.Random(seed).sample(records, total)
        size = n if n is not None else max(1, -(-len(records) // batches))
        for start in range(0, len(records), size):
            yield records[start:start + size]
