"""Data types of the evaluate stage: what goes in (cases, settings) and what comes out (evaluation.json)."""

from __future__ import annotations

from pydantic import BaseModel, Field, computed_field

from conceptfix.schemas import TargetCase

# --------------------------------------------------------------------------------------------- inputs

class EvalCase(BaseModel):
    """One error to check: the prompt, the correct and the wrong answer (a word, or a token text)."""

    prompt: str = Field(min_length=1)
    correct: str = Field(min_length=1)
    wrong: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)   # other spellings of the correct answer
    paraphrases: list[str] = Field(default_factory=list)
    paraphrase_source: str = "none"   # config | case | bank | llm | none
    name: str | None = None           # the "Experiment" column; defaults to the correct answer
    category: str = "general"
    source: str = "unknown"
    # When the case comes from the filter, the tokens it chose on the base model (scored on the target prompt).
    correct_token_id: int | None = None
    wrong_token_id: int | None = None

    @property
    def label(self) -> str:
        return self.name or self.correct.strip().capitalize()

    @classmethod
    def from_target_case(cls, case: TargetCase) -> "EvalCase":
        return cls(prompt=case.prompt, correct=case.answer, wrong=case.wrong_word or case.wrong_token,
                   aliases=list(case.aliases), paraphrases=list(case.paraphrases),
                   paraphrase_source="case" if case.paraphrases else "none", category=case.category,
                   source=case.source, correct_token_id=case.correct_token_id, wrong_token_id=case.wrong_token_id)


class EvaluationSettings(BaseModel):
    top_k: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    locality_max: int = Field(100, ge=0)
    locality_seed: int = 0
    neutral: bool = True
    progress: bool | None = None


# -------------------------------------------------------------------------------------------- outputs

class TokenRow(BaseModel):
    rank: int
    token_id: int
    token: str
    prob: float
    is_correct: bool = False
    is_wrong: bool = False


class Readout(BaseModel):
    """One model on one prompt."""

    top_k: list[TokenRow]
    top1: str
    correct_prob: float
    correct_rank: int
    wrong_prob: float
    wrong_rank: int
    success: bool        # top-1 starts the correct answer
    top1_is_wrong: bool  # top-1 starts the wrong answer


class TokenShift(BaseModel):
    """One token's probability under both models (exact, also when outside one model's top-k)."""

    token_id: int
    token: str
    base_prob: float
    tuned_prob: float


class PromptComparison(BaseModel):
    prompt: str
    formatted_prompt: str
    kind: str  # target | paraphrase
    correct_token: str
    correct_token_id: int
    wrong_token: str
    wrong_token_id: int
    base: Readout
    tuned: Readout
    kl: float  # KL(base‖tuned) of the next-token distribution, nats
    # The union of both top-k lists plus the correct and wrong tokens, ordered by max probability.
    shift: list[TokenShift] = Field(default_factory=list)

    @computed_field
    @property
    def delta_correct(self) -> float:
        return self.tuned.correct_prob - self.base.correct_prob

    @computed_field
    @property
    def delta_wrong(self) -> float:
        return self.tuned.wrong_prob - self.base.wrong_prob


class GeneralisationSummary(BaseModel):
    source: str
    n: int
    success_before: float  # fraction of paraphrases where the correct answer is top-1
    success_after: float
    mean_delta_correct: float
    mean_delta_wrong: float
    n_correct_up: int
    n_wrong_down: int
    mean_kl: float


class SeedRow(BaseModel):
    """The seed's results-table row: p(wrong)→p(correct) on the base model and on the tuned model."""

    experiment: str
    base: str  # e.g. "35%→11%"
    sft: str
    method: str


class CaseEvaluation(BaseModel):
    case: EvalCase
    target: PromptComparison
    paraphrases: list[PromptComparison] = Field(default_factory=list)
    generalisation: GeneralisationSummary | None = None
    seed_row: SeedRow
    success_before: bool
    success_after: bool
    verdict: str



# ------------------------------------------------------------------------------------------- locality

class OverlapExclusion(BaseModel):
    prompt: str
    answer: str
    terms: list[str]  # the words it shares with the training texts (or "target" for the evaluated case)


class LocalityFact(BaseModel):
    """A held-out fact the base model gets right (its top-1 starts the answer)."""

    prompt: str
    answer: str
    category: str = "general"
    answer_token: str        # the base model's top-1, the answer token scored before and after
    answer_token_id: int
    base_prob: float
    tuned_prob: float
    tuned_rank: int
    tuned_top1: str
    tuned_correct: bool
    kl: float


class NeutralPrompt(BaseModel):
    prompt: str
    base_top1: str
    tuned_top1: str
    kl: float


class LocalityResult(BaseModel):
    source: str                      # where the facts came from
    n_records: int                   # records offered
    n_excluded_target: int           # the evaluated case itself, its paraphrases, or the same answers
    n_excluded_overlap: int          # share a word with the training texts
    overlap_examples: list[OverlapExclusion] = Field(default_factory=list)
    n_scanned: int                   # candidates read out on the base model
    n_base_correct: int              # of those, how many the base model gets right
    cap: int
    seed: int
    training_texts_known: bool
    facts: list[LocalityFact] = Field(default_factory=list)
    accuracy_before: float | None = None   # 1.0 by construction: only facts the base model gets right
    accuracy_after: float | None = None
    n_flipped: int = 0                     # right → wrong
    mean_answer_prob_before: float | None = None
    mean_answer_prob_after: float | None = None
    mean_kl_facts: float | None = None
    neutral: list[NeutralPrompt] = Field(default_factory=list)
    mean_kl_neutral: float | None = None
    n_neutral_top1_changed: int = 0
    max_kl: float | None = None



class EvaluationResult(BaseModel):
    base_model: str
    base_checkpoint: str
    tuned_model: str
    profile: dict
    profile_source: str
    settings: EvaluationSettings
    cases: list[CaseEvaluation]
    locality: LocalityResult | None = None
    summary: dict = Field(default_factory=dict)
    inputs_hash: str = ""
    provenance: dict = Field(default_factory=dict)
