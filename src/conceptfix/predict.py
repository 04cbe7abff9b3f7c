"""Next-token predictions, batched: the core read-out shared by predict, filter and evaluate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from conceptfix.models import LoadedModel
from conceptfix.progress import track


@dataclass
class TokenProb:
    token_id: int
    token: str
    prob: float
    logit: float

    def to_dict(self) -> dict:
        return asdict(self)


def batched(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise ValueError("batch size must be >= 1")
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def next_token_logits(
    loaded: LoadedModel, prompts: list[str], *, batch_size: int = 16, progress: bool | None = None,
    description: str = "forward",
) -> Iterator[torch.Tensor]:
    """Yield float32 CPU logits [B, vocab] at the last prompt position, one tensor per batch.

    Left padding keeps the last real token at position -1 for every row of a batch.
    """
    batches = list(batched(prompts, batch_size))
    for batch in track(batches, total=len(batches), description=description, enabled=progress):
        enc = loaded.encode(batch)
        out = loaded.model(**enc, use_cache=False, logits_to_keep=1)
        yield out.logits[:, -1, :].float().cpu()


def length_sorted_order(loaded: LoadedModel, prompts: list[str]) -> list[int]:
    """Indices of `prompts` ordered by token length (stable), so a batch holds prompts of similar length
    and left padding stays small (bank prompts are 4-20 tokens: unsorted batches of 32 are ~40% padding)."""
    texts = [loaded.format_prompt(p) for p in prompts]
    ids = loaded.tokenizer(texts, add_special_tokens=not loaded.profile.use_chat_template)["input_ids"]
    return sorted(range(len(prompts)), key=lambda j: len(ids[j]))


def top_k_from_logits(loaded: LoadedModel, logits: torch.Tensor, k: int) -> list[TokenProb]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = torch.topk(logprobs, k)
    return [
        TokenProb(token_id=int(i), token=loaded.token_str(int(i)), prob=math.exp(float(v)), logit=float(logits[i]))
        for v, i in zip(values, indices)
    ]


def top_k_predictions(
    loaded: LoadedModel, prompts: list[str], *, k: int = 10, batch_size: int = 16, progress: bool | None = None,
) -> list[list[TokenProb]]:
    results: list[list[TokenProb]] = []
    for logits in next_token_logits(loaded, prompts, batch_size=batch_size, progress=progress):
        results.extend(top_k_from_logits(loaded, row, k) for row in logits)
    return results


def end_token_ids(loaded: LoadedModel) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS and the model's generation EOS ids (Llama-3.1-Instruct ends
    turns with <|eot_id|>, which is not its tokenizer's only end token)."""
    ids = [loaded.tokenizer.eos_token_id]
    generation = getattr(loaded.model, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@torch.no_grad()
def greedy_continuations(loaded: LoadedModel, prompts: list[str], first_token_ids: list[int], *,
                         max_new_tokens: int = 8, batch_size: int = 16) -> list[list[int]]:
    """Token ids the model greedily writes after each prompt + its first token, up to EOS.

    Batched through transformers' ``generate`` (left padding, KV cache): one call per batch instead of one
    forward pass per token per prompt.
    """
    from transformers import GenerationConfig

    if len(prompts) != len(first_token_ids):
        raise ValueError("one first token per prompt")
    tokenizer = loaded.tokenizer
    eos = end_token_ids(loaded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=eos or None)
    continuations: list[list[int]] = []
    for batch in batched(list(zip(prompts, first_token_ids)), batch_size):
        enc = loaded.encode([prompt for prompt, _ in batch])
        first = torch.tensor([[int(t)] for _, t in batch], device=enc["input_ids"].device)
        ids = torch.cat([enc["input_ids"], first], dim=1)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(first)], dim=1)
        generated = loaded.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in generated[:, ids.shape[1]:].tolist():
            continuation = []
            for token_id in row:
                if token_id in eos:
                    break
                continuation.append(token_id)
            continuations.append(continuation)
    return continuations


def greedy_continuation(loaded: LoadedModel, prompt: str, first_token_id: int, *, max_new_tokens: int = 8) -> list[int]:
    """:func:`greedy_continuations` for one prompt."""
    return greedy_continuations(loaded, [prompt], [first_token_id], max_new_tokens=max_new_tokens)[0]


def word_from_pieces(loaded: LoadedModel, first_token_id: int, continuation: list[int]) -> str:
    """The whole word starting with ``first_token_id``: following pieces up to the first that starts a new word."""
    word = loaded.token_str(first_token_id)
    for next_id in continuation:
        piece = loaded.token_str(next_id)
        if not piece or piece[0].isspace() or not (piece[0].isalnum() or piece[0] in "-'"):
            break
        word += piece
    return word.strip()


def complete_word(loaded: LoadedModel, prompt: str, first_token_id: int, *, max_new_tokens: int = 8) -> str:
    """The whole word that starts with `first_token_id`, by greedy continuation (`` ren`` → "renin")."""
    return word_from_pieces(loaded, first_token_id,
                            greedy_continuation(loaded, prompt, first_token_id, max_new_tokens=max_new_tokens))
