"""Stage 7: did the fine-tune fix the error, does the fix generalise, and what else did it change?

For each target case the base and the tuned model are read out on the same formatted prompts (same
profile): the top-k next tokens, p(wrong) and p(correct) with their ranks, and KL(base‖tuned) of the
full next-token distributions. The case's paraphrases say whether the fix survives a rewording;
the locality set (stage ``locality``) says whether unrelated knowledge survived.

An answer's probability is the probability of its FIRST token after the prompt (the seed's p(Ald)).
A word such as "aldosterone" can start with several tokens (`` al`` / `` Ald``); the one scored on a
prompt is the case variant the BASE model prefers there, so base and tuned are compared on the same
token. A token text with a leading space (``" Ald"``) is taken literally and must be one token.
Success means the top-1 token after training starts the correct answer (`token_matches_answer`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from conceptfix.errors import ConceptfixError
from conceptfix.evaluate.types import (CaseEvaluation, EvalCase, EvaluationResult, EvaluationSettings,
                                       GeneralisationSummary, PromptComparison, Readout, SeedRow, TokenRow, TokenShift)
from conceptfix.models import LoadedModel
from conceptfix.predict import next_token_logits
from conceptfix.schemas import PromptRecord
from conceptfix.tokens import answer_token_ids, resolve_contrastive_token, token_matches_answer


# ------------------------------------------------------------------------------------ answer tokens

def _case_variants(word: str) -> list[str]:
    word = word.strip()
    return list(dict.fromkeys([word, word[:1].upper() + word[1:], word[:1].lower() + word[1:]]))


def answer_candidates(tokenizer, text: str, *, field: str, extra_ids: Sequence[int | None] = ()) -> list[int]:
    """Token ids that may start the answer after a prompt.

    A leading space marks a literal token text (``" Ald"``): exactly that one token. Otherwise the first
    token of each case variant of the word (``aldosterone`` → `` al``, `` Ald``).
    """
    if not text.strip():
        raise ConceptfixError("answer is empty", field=field)
    if text[0].isspace():
        return [resolve_contrastive_token(tokenizer, text, field=field)]
    ids = [int(i) for i in extra_ids if i is not None]
    for variant in _case_variants(text):
        try:
            ids.append(answer_token_ids(tokenizer, variant)[0])
        except ConceptfixError as exc:
            raise ConceptfixError(str(exc), field=field) from None
    return list(dict.fromkeys(ids))


def _match_word(text: str) -> str:
    """The text token_matches_answer compares against (a literal token text is its own answer)."""
    return text.strip()


def pct(p: float) -> str:
    """Seed-style percentage: whole percent, one decimal below 10% (so 5.1% is not rounded to 5%)."""
    if p >= 0.995:
        return "100%"
    if p >= 0.1:
        return f"{p * 100:.0f}%"
    if p >= 0.001:
        return f"{p * 100:.1f}%"
    return "<0.1%"


# ------------------------------------------------------------------------------------------- readout

@torch.no_grad()
def log_probs(loaded: LoadedModel, prompts: list[str], *, batch_size: int, progress: bool | None = None,
              description: str = "forward") -> torch.Tensor:
    """[N, vocab] float32 log-probabilities of the next token, in prompt order."""
    if not prompts:
        return torch.empty(0, 0)
    rows = [torch.log_softmax(batch, dim=-1) for batch in
            next_token_logits(loaded, prompts, batch_size=batch_size, progress=progress, description=description)]
    return torch.cat(rows, dim=0)


def kl_divergence(base_logp: torch.Tensor, tuned_logp: torch.Tensor) -> torch.Tensor:
    """KL(base‖tuned) per row in nats, computed in float64 (small values stay accurate)."""
    if base_logp.shape != tuned_logp.shape:
        raise ConceptfixError(f"base and tuned vocabularies differ ({base_logp.shape[-1]} vs {tuned_logp.shape[-1]})",
                              field="tuned", hint="the tuned checkpoint must come from the base model")
    p = base_logp.double()
    q = tuned_logp.double()
    return (p.exp() * (p - q)).sum(dim=-1).clamp_min(0.0)


def _rank(logp: torch.Tensor, token_id: int) -> int:
    return int((logp > logp[token_id]).sum()) + 1


def readout(loaded: LoadedModel, logp: torch.Tensor, *, correct_id: int, wrong_id: int, correct_word: str,
            aliases: Sequence[str], wrong_word: str, top_k: int) -> Readout:
    values, indices = torch.topk(logp, top_k)
    rows = []
    for rank, (v, i) in enumerate(zip(values.tolist(), indices.tolist()), 1):
        rows.append(TokenRow(rank=rank, token_id=i, token=loaded.token_str(i), prob=math.exp(v),
                             is_correct=i == correct_id, is_wrong=i == wrong_id))
    top1_id, top1 = rows[0].token_id, rows[0].token
    success = top1_id == correct_id or token_matches_answer(top1, correct_word, list(aliases))
    top1_is_wrong = top1_id == wrong_id or token_matches_answer(top1, wrong_word)
    if success and top1_is_wrong:  # a prefix shared by both answers (" re" for renin/retinol) decides nothing
        success = top1_id == correct_id
        top1_is_wrong = top1_id == wrong_id
    return Readout(top_k=rows, top1=top1, correct_prob=math.exp(float(logp[correct_id])),
                   correct_rank=_rank(logp, correct_id), wrong_prob=math.exp(float(logp[wrong_id])),
                   wrong_rank=_rank(logp, wrong_id), success=success, top1_is_wrong=top1_is_wrong)


def token_shift(loaded: LoadedModel, base_logp: torch.Tensor, tuned_logp: torch.Tensor, k: int,
                extra_ids: Sequence[int]) -> list[TokenShift]:
    ids = dict.fromkeys([*torch.topk(base_logp, k).indices.tolist(), *torch.topk(tuned_logp, k).indices.tolist(),
                         *extra_ids])
    rows = [TokenShift(token_id=i, token=loaded.token_str(i), base_prob=math.exp(float(base_logp[i])),
                       tuned_prob=math.exp(float(tuned_logp[i]))) for i in ids]
    return sorted(rows, key=lambda r: -max(r.base_prob, r.tuned_prob))


def check_compatible(base: LoadedModel, tuned: LoadedModel) -> None:
    """Base and tuned must share the tokenizer and the prompt profile, or the numbers mean nothing."""
    if base.profile != tuned.profile:
        raise ConceptfixError("base and tuned models have different prompt profiles", field="profile",
                              hint="evaluate both with the same profile")
    if len(base.tokenizer) != len(tuned.tokenizer) or base.tokenizer.get_vocab() != tuned.tokenizer.get_vocab():
        raise ConceptfixError("the tuned checkpoint's tokenizer differs from the base model's", field="tuned",
                              hint="pass the base model the checkpoint was trained from")


def compare_prompts(base: LoadedModel, tuned: LoadedModel, case: EvalCase, prompts: list[str], kinds: list[str],
                    settings: EvaluationSettings) -> list[PromptComparison]:
    """Read out both models on the prompts; the answer tokens are chosen per prompt on the base model."""
    tok = base.tokenizer
    correct_ids = answer_candidates(tok, case.correct, field="correct", extra_ids=[case.correct_token_id])
    wrong_ids = answer_candidates(tok, case.wrong, field="wrong", extra_ids=[case.wrong_token_id])
    base_logp = log_probs(base, prompts, batch_size=settings.batch_size, progress=False)
    tuned_logp = log_probs(tuned, prompts, batch_size=settings.batch_size, progress=False)
    kls = kl_divergence(base_logp, tuned_logp)
    results = []
    for i, (prompt, kind) in enumerate(zip(prompts, kinds)):
        # The filter's token is authoritative on its own prompt; elsewhere the base model's favourite variant.
        if kind == "target" and case.correct_token_id is not None:
            correct_id = case.correct_token_id
        else:
            correct_id = max(correct_ids, key=lambda t: float(base_logp[i, t]))
        if kind == "target" and case.wrong_token_id is not None:
            wrong_id = case.wrong_token_id
        else:
            wrong_id = max(wrong_ids, key=lambda t: float(base_logp[i, t]))
        if correct_id == wrong_id:
            raise ConceptfixError(f"correct {case.correct!r} and wrong {case.wrong!r} start with the same token "
                                  f"{base.token_str(correct_id)!r}", field="wrong",
                                  hint="give token texts with a leading space that differ, e.g. ' Ald' and ' Ren'")
        kw = dict(correct_id=correct_id, wrong_id=wrong_id, correct_word=_match_word(case.correct),
                  aliases=case.aliases, wrong_word=_match_word(case.wrong), top_k=settings.top_k)
        results.append(PromptComparison(
            prompt=prompt, formatted_prompt=base.format_prompt(prompt), kind=kind,
            correct_token=base.token_str(correct_id), correct_token_id=correct_id,
            wrong_token=base.token_str(wrong_id), wrong_token_id=wrong_id,
            base=readout(base, base_logp[i], **kw), tuned=readout(tuned, tuned_logp[i], **kw), kl=float(kls[i]),
            shift=token_shift(base, base_logp[i], tuned_logp[i], settings.top_k, [correct_id, wrong_id]),
        ))
    return results


def summarise_paraphrases(comparisons: list[PromptComparison], source: str) -> GeneralisationSummary | None:
    if not comparisons:
        return None
    n = len(comparisons)
    return GeneralisationSummary(
        source=source, n=n,
        success_before=sum(c.base.success for c in comparisons) / n,
        success_after=sum(c.tuned.success for c in comparisons) / n,
        mean_delta_correct=sum(c.delta_correct for c in comparisons) / n,
        mean_delta_wrong=sum(c.delta_wrong for c in comparisons) / n,
        n_correct_up=sum(c.delta_correct > 0 for c in comparisons),
        n_wrong_down=sum(c.delta_wrong < 0 for c in comparisons),
        mean_kl=sum(c.kl for c in comparisons) / n,
    )


def verdict(target: PromptComparison) -> str:
    """A plain sentence about the target prompt; no claim beyond the numbers."""
    b, t = target.base, target.tuned
    shift = (f"p(wrong {target.wrong_token!r}) {pct(b.wrong_prob)}→{pct(t.wrong_prob)}, "
             f"p(correct {target.correct_token!r}) {pct(b.correct_prob)}→{pct(t.correct_prob)}")
    if t.success and not b.success:
        return f"fixed: top-1 is now {t.top1!r} (was {b.top1!r}); {shift}"
    if t.success:
        return f"already correct before training; still top-1 {t.top1!r}; {shift}"
    if b.success:
        return f"broken: top-1 was correct ({b.top1!r}) and is now {t.top1!r}; {shift}"
    moved = "closer" if t.correct_rank < b.correct_rank or (t.correct_prob - t.wrong_prob) > (b.correct_prob - b.wrong_prob) else "not closer"
    return (f"not fixed: top-1 is {t.top1!r} (was {b.top1!r}); correct rank {b.correct_rank}→{t.correct_rank} "
            f"({moved}); {shift}")


def evaluate_case(base: LoadedModel, tuned: LoadedModel, case: EvalCase, *,
                  settings: EvaluationSettings | None = None, method: str = "SFT") -> CaseEvaluation:
    """Target prompt and its paraphrases, base vs tuned."""
    settings = settings or EvaluationSettings()
    check_compatible(base, tuned)
    paraphrases = [p for p in dict.fromkeys(p.strip() for p in case.paraphrases) if p and p != case.prompt.strip()]
    prompts = [case.prompt, *paraphrases]
    comps = compare_prompts(base, tuned, case, prompts, ["target"] + ["paraphrase"] * len(paraphrases), settings)
    target, para = comps[0], comps[1:]
    row = SeedRow(experiment=case.label, base=f"{pct(target.base.wrong_prob)}→{pct(target.base.correct_prob)}",
                  sft=f"{pct(target.tuned.wrong_prob)}→{pct(target.tuned.correct_prob)}", method=method)
    return CaseEvaluation(case=case, target=target, paraphrases=para,
                          generalisation=summarise_paraphrases(para, case.paraphrase_source), seed_row=row,
                          success_before=target.base.success, success_after=target.tuned.success,
                          verdict=verdict(target))


# ------------------------------------------------------------------------------------------ the stage

def evaluate(base: LoadedModel, tuned: LoadedModel, cases: list[EvalCase], *,
             locality_records: list[PromptRecord] | None = None, locality_source: str = "none",
             training_texts: Sequence[str] | None = None, settings: EvaluationSettings | None = None,
             method: str = "SFT", profile_source: str = "model default",
             neutral_prompts: Sequence[str] | None = None) -> EvaluationResult:
    """Evaluate every case, then locality once (it does not depend on the case, only on what to exclude)."""
    from conceptfix.evaluate.locality import NEUTRAL_PROMPTS, evaluate_locality

    settings = settings or EvaluationSettings()
    if not cases:
        raise ConceptfixError("no target case to evaluate", field="case",
                              hint="give --config with a target block, --case FILE#N, --cases FILE or --prompt")
    check_compatible(base, tuned)
    results = [evaluate_case(base, tuned, case, settings=settings, method=method) for case in cases]
    locality = evaluate_locality(
        base, tuned, locality_records or [], source=locality_source, training_texts=training_texts,
        exclude_cases=cases, settings=settings,
        neutral_prompts=(NEUTRAL_PROMPTS if neutral_prompts is None else list(neutral_prompts)) if settings.neutral else [],
    )
    n = len(results)
    summary = {
        "n_cases": n,
        "fixed": sum(r.success_after and not r.success_before for r in results),
        "success_before": sum(r.success_before for r in results),
        "success_after": sum(r.success_after for r in results),
        "broken": sum(r.success_before and not r.success_after for r in results),
        "mean_delta_correct": sum(r.target.delta_correct for r in results) / n,
        "mean_delta_wrong": sum(r.target.delta_wrong for r in results) / n,
    }
    return EvaluationResult(base_model=base.spec, base_checkpoint=base.checkpoint, tuned_model=tuned.spec,
                            profile=base.profile.model_dump(), profile_source=profile_source, settings=settings,
                            cases=results, locality=locality, summary=summary)
