"""Stage 7, evaluate: before/after probabilities on the target prompt, generalisation to paraphrases,
locality on held-out facts and neutral prompts, and the seed's results table.

Library entry points: `evaluate_case` and `evaluate` (two loaded models), `evaluate_locality`,
`run_evaluation` (from a request: config / checkpoint / case file, writes the outputs).
"""

from conceptfix.evaluate.core import evaluate, evaluate_case, kl_divergence, pct
from conceptfix.evaluate.locality import NEUTRAL_PROMPTS, evaluate_locality
from conceptfix.evaluate.types import (CaseEvaluation, EvalCase, EvaluationResult, EvaluationSettings,
                                       LocalityResult, PromptComparison, SeedRow)

__all__ = ["evaluate", "evaluate_case", "evaluate_locality", "kl_divergence", "pct", "NEUTRAL_PROMPTS",
           "CaseEvaluation", "EvalCase", "EvaluationResult", "EvaluationSettings", "LocalityResult",
           "PromptComparison", "SeedRow"]
