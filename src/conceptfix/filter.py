"""Stage 2: keep the prompts where the model is clearly wrong and the answer is at rank 2..max_rank.

For each prompt one batched forward pass gives the next-token distribution; the top-k table is
matched against the answer with sub-word rules (`conceptfix.tokens`). A prompt becomes a *target
case* when

  1. the top-1 token does not match the answer (or an alias),
  2. the top-1 is *clearly* wrong: a content token (not a function word, modifier, punctuation, chat
     marker, a bare letter, or a word echoed from the prompt),
  3. a matching token sits at rank 2..max_rank.

Every other prompt is kept in `dropped` with its reason, and `summary` counts them. Results are
cached under ``$CONCEPTFIX_CACHE/filter/<key>.json``, keyed by a content hash of the model, dtype,
profile, records and options, so a re-run with identical inputs skips the forward passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from conceptfix.artifacts import content_hash, provenance, write_json
from conceptfix.errors import ConceptfixError
from conceptfix.generate.validator import prompt_form_violations
from conceptfix.models import LoadedModel, ModelProfile, cache_root
from conceptfix.predict import (greedy_continuations, length_sorted_order, next_token_logits, top_k_from_logits,
                                word_from_pieces)
from conceptfix.schemas import DroppedPrompt, FilterResult, PromptRecord, TargetCase, TokenCandidate
from conceptfix.tokens import (FUNCTION_WORDS, MODIFIER_WORDS, answer_in_text, check_answer, continues_last_word,
                               echoes_prompt, is_comparable_top1,
                               special_token_set, token_kind, token_matches_answer)

# Tokens of greedy continuation after the top-1: its whole word and whether it only leads into the answer.
CONTINUATION_TOKENS = 8
# Bump when the decision rules change, so cached results from older rules are not reused.
FILTER_RULES_VERSION = 3  # 2: word continuations and lead-ins to the answer are ambiguous; 3: prompt form checked

DROP_REASONS = ("top1_correct", "top1_ambiguous", "correct_rank_too_low", "correct_not_in_top_k", "invalid")


def validate_options(top_k: int, max_rank: int, batch_size: int) -> None:
    if max_rank < 2:
        raise ConceptfixError(f"max rank {max_rank} must be at least 2 (rank 1 is the wrong top-1)", field="max_rank")
    if top_k < max_rank:
        raise ConceptfixError(f"top-k {top_k} is smaller than the max rank {max_rank}", field="top_k",
                              hint=f"use top_k >= {max_rank}")
    if batch_size < 1:
        raise ConceptfixError(f"batch size {batch_size} must be at least 1", field="batch_size")


def model_fingerprint(spec: str, checkpoint: str, device: str, dtype: torch.dtype | str) -> dict[str, Any]:
    """What identifies the weights for caching: spec, checkpoint, device type, dtype, and for a local
    checkpoint directory the size and mtime of its weight and config files (a retrained model in the
    same directory is a different model)."""
    files: dict[str, list[int]] = {}
    path = Path(checkpoint)
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                st = f.stat()
                files[f.name] = [st.st_size, st.st_mtime_ns]
    return {"spec": spec, "checkpoint": str(checkpoint), "device": str(device).split(":")[0],
            "dtype": str(dtype).replace("torch.", ""), "files": files}


def filter_cache_key(fingerprint: dict[str, Any], profile: ModelProfile | dict, records: Sequence[PromptRecord], *,
                     top_k: int, max_rank: int, skip_invalid: bool) -> str:
    """Content hash of everything that determines a filter result (batch size does not)."""
    profile_dict = profile.model_dump() if isinstance(profile, ModelProfile) else dict(profile)
    return content_hash({
        "rules_version": FILTER_RULES_VERSION,
        "word_lists": content_hash(sorted(FUNCTION_WORDS | MODIFIER_WORDS)),
        "model": fingerprint,
        "profile": profile_dict,
        "records": [r.model_dump(mode="json") for r in records],
        "top_k": top_k,
        "max_rank": max_rank,
        "skip_invalid": skip_invalid,
    })


def cache_dir() -> Path:
    return cache_root() / "filter"


def cache_path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def load_cached(key: str) -> FilterResult | None:
    """The cached result for this key, or None (a missing or unreadable cache entry is a miss)."""
    path = cache_path(key)
    if not path.exists():
        return None
    try:
        return FilterResult.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed, never fatal
        return None


def filter_prompts(
    loaded: LoadedModel,
    records: Sequence[PromptRecord],
    *,
    top_k: int = 10,
    max_rank: int = 5,
    batch_size: int = 16,
    progress: bool | None = None,
    skip_invalid: bool = False,
    cache: bool = True,
    sort_by_length: bool = True,
) -> FilterResult:
    """Classify every record; return the target cases and why every other prompt was dropped.

    A prompt that is not a completion (a question, a yes/no question, a finished sentence, stray whitespace)
    or an answer that cannot be matched (no letters, byte-fragment tokens) raises ConceptfixError naming
    ``[i].prompt`` / ``[i].answer``; with ``skip_invalid`` it is dropped as ``invalid`` instead. ``sort_by_length`` batches
    prompts of similar token length together (less padding; only speed changes, results keep input order).
    """
    validate_options(top_k, max_rank, batch_size)
    records = list(records)
    if not records:
        raise ConceptfixError("no prompts to filter", field="records")
    fingerprint = model_fingerprint(loaded.spec, loaded.checkpoint, loaded.device, loaded.dtype)
    key = filter_cache_key(fingerprint, loaded.profile, records, top_k=top_k, max_rank=max_rank,
                           skip_invalid=skip_invalid)
    if cache:
        cached = load_cached(key)
        if cached is not None:
            return cached

    tokenizer = loaded.tokenizer
    special = special_token_set(tokenizer)
    dropped: dict[int, DroppedPrompt] = {}
    answer_ids: dict[int, set[int]] = {}
    for i, record in enumerate(records):
        try:
            form = prompt_form_violations(record.prompt, field=f"[{i}].prompt")
            if form:
                raise ConceptfixError(form[0].message, field=form[0].field,
                                      hint="a completion prompt stops where the answer begins; or --skip-invalid")
            ids = {check_answer(tokenizer, record.answer, field=f"[{i}].answer")[0]}
            for j, alias in enumerate(record.aliases):
                ids.add(check_answer(tokenizer, alias, field=f"[{i}].aliases[{j}]")[0])
        except ConceptfixError as exc:
            if not skip_invalid:
                raise
            dropped[i] = DroppedPrompt(prompt=record.prompt, answer=record.answer, reason="invalid",
                                       detail=exc.one_line())
            continue
        answer_ids[i] = ids

    valid = [i for i in range(len(records)) if i not in dropped]
    tables: dict[int, list[TokenCandidate]] = {}
    full_rank: dict[int, int] = {}
    prompts = [records[i].prompt for i in valid]
    order = (length_sorted_order(loaded, prompts) if sort_by_length and batch_size > 1 and prompts
             else list(range(len(prompts))))
    logits_iter = next_token_logits(loaded, [prompts[j] for j in order], batch_size=batch_size,
                                    progress=progress, description="filter")
    position = 0
    for batch_logits in logits_iter:
        for row in batch_logits:
            i = valid[order[position]]
            position += 1
            record = records[i]
            tables[i] = [
                TokenCandidate(
                    rank=rank, token_id=tp.token_id, token=tp.token, prob=tp.prob, logit=tp.logit,
                    matches_answer=tp.token_id in answer_ids[i]
                    or token_matches_answer(tp.token, record.answer, record.aliases),
                    kind=token_kind(tp.token, special),
                )
                for rank, tp in enumerate(top_k_from_logits(loaded, row, top_k), 1)
            ]
            # Where the answer's first token sits in the whole vocabulary: says how far off a drop was.
            best = max(float(row[t]) for t in answer_ids[i])
            full_rank[i] = int((row > best).sum()) + 1

    candidates: dict[int, tuple[TokenCandidate, TokenCandidate]] = {}
    for i in valid:
        checked = _precheck(loaded, records[i], tables[i], special, max_rank=max_rank, vocab_rank=full_rank[i])
        if isinstance(checked, DroppedPrompt):
            dropped[i] = checked
        else:
            candidates[i] = checked
    # What the model goes on to write after each candidate's top-1 (the whole wrong word, and whether it only
    # leads into the answer), for all candidates in batched generate calls.
    pending = sorted(candidates)
    continuations = dict(zip(pending, greedy_continuations(
        loaded, [records[i].prompt for i in pending], [candidates[i][0].token_id for i in pending],
        max_new_tokens=CONTINUATION_TOKENS, batch_size=batch_size)))
    targets: list[TargetCase] = []
    for i in pending:
        top1, correct = candidates[i]
        case_or_drop = _classify(loaded, records[i], tables[i], full_rank[i], top1, correct, continuations[i])
        if isinstance(case_or_drop, TargetCase):
            targets.append(case_or_drop)
        else:
            dropped[i] = case_or_drop

    ordered_drops = [dropped[i] for i in sorted(dropped)]
    summary = {"prompts": len(records), "target_cases": len(targets)}
    summary.update({reason: sum(d.reason == reason for d in ordered_drops) for reason in DROP_REASONS})
    config = {
        "model": fingerprint, "profile": loaded.profile.model_dump(), "top_k": top_k, "max_rank": max_rank,
        "skip_invalid": skip_invalid, "records_hash": content_hash([r.model_dump(mode="json") for r in records]),
        "rules_version": FILTER_RULES_VERSION, "cache_key": key,
    }
    result = FilterResult(model=loaded.spec, profile=loaded.profile.model_dump(), top_k=top_k, max_rank=max_rank,
                          target_cases=targets, dropped=ordered_drops, summary=summary,
                          provenance=provenance("filter", config))
    if cache:
        write_json(cache_path(key), result)
    return result


def _drop(record: PromptRecord, table: list[TokenCandidate], vocab_rank: int, reason: str, detail: str) -> DroppedPrompt:
    matched_rank = next((c.rank for c in table if c.matches_answer), None)
    return DroppedPrompt(prompt=record.prompt, answer=record.answer, reason=reason, detail=detail,
                         top1=table[0].token, top1_prob=table[0].prob, correct_rank=matched_rank or vocab_rank)


def _precheck(loaded: LoadedModel, record: PromptRecord, table: list[TokenCandidate], special: frozenset[str], *,
              max_rank: int, vocab_rank: int) -> DroppedPrompt | tuple[TokenCandidate, TokenCandidate]:
    """Every rule that needs only the top-k table: a drop, or the (wrong top-1, correct) pair of a candidate."""
    top1 = table[0]

    def drop(reason: str, detail: str) -> DroppedPrompt:
        return _drop(record, table, vocab_rank, reason, detail)

    if top1.matches_answer:
        return drop("top1_correct", f"top-1 {top1.token!r} ({top1.prob:.3f}) matches {record.answer!r}")
    if not is_comparable_top1(top1.token, record.answer, special):
        return drop("top1_ambiguous", f"top-1 {top1.token!r} is a {top1.kind} token, not a committed answer")
    if echoes_prompt(top1.token, record.prompt):
        return drop("top1_ambiguous", f"top-1 {top1.token!r} repeats a word of the prompt")
    if continues_last_word(top1.token, loaded.format_prompt(record.prompt)):
        return drop("top1_ambiguous", f"top-1 {top1.token!r} continues the prompt's last word, not a new answer word")
    correct = next((c for c in table[1:] if c.matches_answer), None)
    if correct is None:
        return drop("correct_not_in_top_k",
                    f"no top-{len(table)} token matches {record.answer!r}; its first token is at rank {vocab_rank}")
    if correct.rank > max_rank:
        return drop("correct_rank_too_low", f"{correct.token!r} matches {record.answer!r} at rank {correct.rank}")

    # Stage 3 takes the pair as text and re-encodes it; a token that does not round-trip cannot be used.
    for role, cand in (("correct", correct), ("wrong", top1)):
        if loaded.tokenizer.encode(cand.token, add_special_tokens=False) != [cand.token_id]:
            return drop("invalid", f"{role} token {cand.token!r} does not re-encode as one token")
    return top1, correct


def _classify(loaded: LoadedModel, record: PromptRecord, table: list[TokenCandidate], vocab_rank: int,
              top1: TokenCandidate, correct: TokenCandidate, continuation: list[int]) -> TargetCase | DroppedPrompt:
    """The rules that need what the model writes after its top-1 (``continuation``, greedy token ids)."""
    wrong_word = word_from_pieces(loaded, top1.token_id, continuation) or top1.token.strip()
    wrong_continuation = loaded.tokenizer.decode([top1.token_id, *continuation], skip_special_tokens=True)
    # A top-1 that only leads into the right answer ("is composed of DNA", "by the female Anopheles mosquito")
    # is not a wrong answer.
    if answer_in_text(wrong_continuation, record.answer, record.aliases) is not None:
        return _drop(record, table, vocab_rank, "top1_ambiguous",
                     f"top-1 {top1.token!r} leads into the answer: {wrong_continuation!r}")
    extras = {k: v for k, v in record.model_dump().items() if k not in PromptRecord.model_fields}
    return TargetCase(
        prompt=record.prompt, answer=record.answer, category=record.category, source=record.source,
        aliases=record.aliases, paraphrases=record.paraphrases, formatted_prompt=loaded.format_prompt(record.prompt),
        top_k=table, wrong_token=top1.token, wrong_token_id=top1.token_id, wrong_prob=top1.prob,
        wrong_word=wrong_word, wrong_continuation=wrong_continuation, correct_token=correct.token,
        correct_token_id=correct.token_id, correct_rank=correct.rank, correct_prob=correct.prob,
        contrastive=(correct.token, top1.token),
        **({"record_extra": extras} if extras else {}),
    )
