"""Locality: did the fine-tune break what the base model already knew?

Two read-outs, both base vs tuned on identical batches:

- **held-out facts**: prompt records (the prompt bank, or a file) whose answer the BASE model already
  gets right, excluding the evaluated case and anything that shares a word with the training texts (a
  fact the texts mention is not a locality test, it is part of the intervention). Sampled in a fixed
  pseudo-random order (seeded hash of the prompt) and capped, so the set is the same on every run.
  Reported: accuracy after (before is 1.0 by construction), facts flipped right→wrong, the answer
  token's probability before/after and KL(base‖tuned).
- **neutral prompts**: everyday completions with no medical content; only KL and top-1 changes.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Iterable, Sequence

import torch

from conceptfix.evaluate.core import kl_divergence, log_probs
from conceptfix.evaluate.types import (EvalCase, EvaluationSettings, LocalityFact, LocalityResult, NeutralPrompt,
                                       OverlapExclusion)
from conceptfix.models import LoadedModel
from conceptfix.predict import next_token_logits
from conceptfix.schemas import PromptRecord
from conceptfix.tokens import FUNCTION_WORDS, normalize, token_matches_answer

# Unrelated everyday completions: a change here is collateral damage, whatever the target was.
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "Once upon a time, there was a",
    "The weather today is",
    "My favourite colour is",
    "The quick brown fox jumps over the",
    "She opened the door and saw",
    "To make a cup of tea, first",
    "The train to London leaves at",
    "In the morning I usually",
    "The best way to learn a new language is",
    "He put the book on the",
    "The children played in the",
    "Football is a sport played by two teams of",
    "The meeting has been moved to",
    "Please remember to bring your",
    "The recipe calls for two cups of",
    "After dinner we went for a walk in the",
    "The price of the new phone is",
    "Thank you very much for your",
    "The river flows into the",
    "The guitar has six",
    "On weekends, many people like to",
    "The museum is open from",
    "The cat jumped onto the",
    "The password must contain at least",
    "The first day of the week is",
    "Water freezes at a temperature of",
    "The largest planet in the solar system is",
    "The author of the novel was born in",
    "The painting was sold at auction for",
    "The bus stops in front of the",
    "I would like to order a",
    "The mountains were covered in",
)

# Words too general to count as overlap with the training texts ("common", "body" …).
GENERIC_WORDS = frozenset(
    """
    common primary main major important known called type types part parts human body people person first
    second largest smallest name word process cause causes caused result results found located example
    normal level levels form forms used uses using term condition effect effects function functions
    """.split()
)

_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")


def stem(word: str) -> str:
    """Crude plural/possessive folding: enough to match 'hormones' with 'hormone', 'kidney's' with 'kidney'."""
    word = word.lower().strip("'-")
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def text_vocabulary(texts: Iterable[str]) -> set[str]:
    return {stem(w) for text in texts for w in words(text)}


def record_terms(record: PromptRecord) -> list[str]:
    """The words that make a record *about* something: every answer/alias word, and the prompt's content words."""
    terms: list[str] = []
    for answer in (record.answer, *record.aliases):
        terms.extend(w for w in words(answer) if len(w) > 2)
    terms.extend(w for w in words(record.prompt)
                 if len(w) >= 4 and w not in FUNCTION_WORDS and w not in GENERIC_WORDS and not w.isdigit())
    return list(dict.fromkeys(terms))


def overlap_terms(record: PromptRecord, vocabulary: set[str]) -> list[str]:
    return [t for t in record_terms(record) if stem(t) in vocabulary]


def _same_answer(record: PromptRecord, case: EvalCase) -> bool:
    answers = {normalize(a) for a in (record.answer, *record.aliases)}
    case_words = {normalize(case.correct), normalize(case.wrong), *(normalize(a) for a in case.aliases)}
    return bool(answers & case_words)


def _case_prompts(cases: Sequence[EvalCase]) -> set[str]:
    return {normalize(p) for c in cases for p in (c.prompt, *c.paraphrases)}


def split_candidates(records: Sequence[PromptRecord], *, training_texts: Sequence[str] | None,
                     exclude_cases: Sequence[EvalCase]) -> tuple[list[PromptRecord], int, list[OverlapExclusion]]:
    """(candidates, number excluded as the target itself, exclusions for overlap with the training texts)."""
    vocabulary = text_vocabulary(training_texts or [])
    case_prompts = _case_prompts(exclude_cases)
    kept: list[PromptRecord] = []
    n_target = 0
    overlaps: list[OverlapExclusion] = []
    seen: set[str] = set()
    for record in records:
        key = normalize(record.prompt)
        if key in seen:
            continue
        seen.add(key)
        if key in case_prompts or any(_same_answer(record, c) for c in exclude_cases):
            n_target += 1
            continue
        shared = overlap_terms(record, vocabulary) if vocabulary else []
        if shared:
            overlaps.append(OverlapExclusion(prompt=record.prompt, answer=record.answer, terms=shared))
            continue
        kept.append(record)
    return kept, n_target, overlaps


def deterministic_order(records: Sequence[PromptRecord], seed: int) -> list[PromptRecord]:
    """A fixed shuffle: sort by a seeded hash of the prompt (independent of the file's order)."""
    return sorted(records, key=lambda r: hashlib.sha256(f"{seed}\0{r.prompt}".encode()).hexdigest())


def _top1_matches(loaded: LoadedModel, logits: torch.Tensor, record: PromptRecord) -> tuple[bool, int]:
    top_id = int(torch.argmax(logits))
    return token_matches_answer(loaded.token_str(top_id), record.answer, record.aliases), top_id


@torch.no_grad()
def find_known_facts(base: LoadedModel, candidates: list[PromptRecord], *, cap: int, batch_size: int,
                     progress: bool | None = None) -> tuple[list[tuple[PromptRecord, int]], int]:
    """Scan candidates in order until `cap` facts the base model gets right; returns ((record, top1 id)…, scanned)."""
    found: list[tuple[PromptRecord, int]] = []
    scanned = 0
    if cap <= 0 or not candidates:
        return found, 0
    prompts = [r.prompt for r in candidates]
    # The generator encodes batch by batch, so stopping early skips the rest of the forward passes.
    for logits in next_token_logits(base, prompts, batch_size=batch_size, progress=progress,
                                    description="locality: base scan"):
        for row in logits:
            record = candidates[scanned]
            scanned += 1
            ok, top_id = _top1_matches(base, row, record)
            if ok and len(found) < cap:
                found.append((record, top_id))
        if len(found) >= cap:
            break
    return found, scanned


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_locality(base: LoadedModel, tuned: LoadedModel, records: Sequence[PromptRecord], *, source: str,
                      training_texts: Sequence[str] | None, exclude_cases: Sequence[EvalCase],
                      settings: EvaluationSettings, neutral_prompts: Sequence[str] = NEUTRAL_PROMPTS) -> LocalityResult:
    candidates, n_target, overlaps = split_candidates(records, training_texts=training_texts,
                                                      exclude_cases=exclude_cases)
    ordered = deterministic_order(candidates, settings.locality_seed)
    known, scanned = find_known_facts(base, ordered, cap=settings.locality_max, batch_size=settings.batch_size,
                                      progress=settings.progress)
    n_base_correct = len(known)

    # Base and tuned are re-read on exactly the same batches: identical models give KL exactly 0.
    fact_prompts = [r.prompt for r, _ in known]
    all_prompts = fact_prompts + list(neutral_prompts)
    base_logp = log_probs(base, all_prompts, batch_size=settings.batch_size, progress=settings.progress,
                          description="locality: base")
    tuned_logp = log_probs(tuned, all_prompts, batch_size=settings.batch_size, progress=settings.progress,
                           description="locality: tuned")
    kls = kl_divergence(base_logp, tuned_logp).tolist() if all_prompts else []

    facts: list[LocalityFact] = []
    for i, (record, answer_id) in enumerate(known):
        tuned_row = tuned_logp[i]
        tuned_top = int(torch.argmax(tuned_row))
        tuned_top_text = tuned.token_str(tuned_top)
        facts.append(LocalityFact(
            prompt=record.prompt, answer=record.answer, category=record.category,
            answer_token=base.token_str(answer_id), answer_token_id=answer_id,
            base_prob=math.exp(float(base_logp[i, answer_id])), tuned_prob=math.exp(float(tuned_row[answer_id])),
            tuned_rank=int((tuned_row > tuned_row[answer_id]).sum()) + 1, tuned_top1=tuned_top_text,
            tuned_correct=token_matches_answer(tuned_top_text, record.answer, record.aliases), kl=kls[i],
        ))
    neutral: list[NeutralPrompt] = []
    for j, prompt in enumerate(neutral_prompts):
        i = len(known) + j
        neutral.append(NeutralPrompt(prompt=prompt, base_top1=base.token_str(int(torch.argmax(base_logp[i]))),
                                     tuned_top1=tuned.token_str(int(torch.argmax(tuned_logp[i]))), kl=kls[i]))

    return LocalityResult(
        source=source, n_records=len(records), n_excluded_target=n_target, n_excluded_overlap=len(overlaps),
        overlap_examples=overlaps[:20], n_scanned=scanned, n_base_correct=n_base_correct,
        cap=settings.locality_max, seed=settings.locality_seed, training_texts_known=training_texts is not None,
        facts=facts,
        accuracy_before=1.0 if facts else None,
        accuracy_after=_mean([float(f.tuned_correct) for f in facts]),
        n_flipped=sum(not f.tuned_correct for f in facts),
        mean_answer_prob_before=_mean([f.base_prob for f in facts]),
        mean_answer_prob_after=_mean([f.tuned_prob for f in facts]),
        mean_kl_facts=_mean([f.kl for f in facts]),
        neutral=neutral, mean_kl_neutral=_mean([n.kl for n in neutral]),
        n_neutral_top1_changed=sum(n.base_top1 != n.tuned_top1 for n in neutral),
        max_kl=max(kls) if kls else None,
    )
