"""The seed's prompt rules, as code: every generated or curated prompt must pass them.

Rules (seed, stage 1): a short completion, not a question; no yes/no; a single correct answer of
1-2 words; the first word of the completion IS the answer (no leading "The ..."/"A ..."). A few more
catch what makes a prompt useless for the filter: a prompt that already contains the answer, an
open-ended ending ("... includes"), a finished sentence, stray whitespace that changes tokenization.
Paraphrases are held to the same prompt rules.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from pydantic import BaseModel

# Name → one-line description, for summaries and docs.
RULES: dict[str, str] = {
    "empty": "prompt and answer must be non-empty text",
    "missing_field": "a record needs a string `prompt` and a string `answer`",
    "question_format": "must be a completion ('The capital of France is'), not a question",
    "yes_no": "must not be answerable with yes/no or true/false",
    "answer_too_long": "the answer must be 1-2 words",
    "leading_article": "the answer must start with the answer word, not 'the'/'a'/'an'",
    "multiple_answers": "the answer must be a single answer, not a list or alternatives",
    "answer_format": "the answer must be a word (letters or digits), without trailing punctuation",
    "answer_in_prompt": "the prompt must not already contain the answer",
    "open_ended": "the prompt must not invite a list or an example ('includes', 'such as')",
    "not_completion": "the prompt must stop where the answer begins (no final '.', '!' or ':')",
    "whitespace": "the prompt must not start or end with whitespace (it changes the next token)",
    "prompt_too_long": "the prompt must be short (at most 30 words)",
    "duplicate": "the prompt repeats an earlier one",
}

MAX_PROMPT_WORDS = 30
MAX_ANSWER_WORDS = 2

ARTICLES = frozenset({"the", "a", "an"})
YES_NO_ANSWERS = frozenset({"yes", "no", "true", "false", "correct", "incorrect", "right", "wrong"})
# A sentence opening with one of these (or an auxiliary) asks something instead of leaving a blank.
QUESTION_WORDS = frozenset({"what", "which", "who", "whom", "whose", "why", "how", "when", "where"})
AUXILIARIES = frozenset({"is", "are", "was", "were", "do", "does", "did", "can", "could", "will", "would",
                         "should", "shall", "has", "have", "had", "may", "might", "must", "am"})
IMPERATIVES = frozenset({"name", "list", "identify", "explain", "describe", "state", "give", "define", "tell"})
# Endings that invite one of many correct answers (the seed's "The treatment for X includes").
OPEN_ENDINGS = ("includes", "include", "including", "such as", "for example", "for instance", "e.g.", "like",
                "examples of", "one of", "one example of", "an example of", "is one")
ALTERNATIVE_SEPARATORS = re.compile(r"\s(?:or|and|and/or)\s|[,;/|]|\s&\s")


class RuleViolation(BaseModel):
    """One broken rule: which rule, which field, and what exactly is wrong."""

    rule: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule} ({self.field}): {self.message}"


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, unified apostrophes, collapsed whitespace, no trailing punctuation: the dedup key."""
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'").lower()
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(" .:;!?")


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^\w'-]+", normalize_text(text)) if w]


def _check_prompt_text(prompt: str, field: str) -> list[RuleViolation]:
    """Rules that apply to any prompt text (the main prompt and each paraphrase)."""
    found: list[RuleViolation] = []
    if not prompt.strip():
        return [RuleViolation(rule="empty", field=field, message="prompt is empty")]
    if prompt != prompt.strip():
        found.append(RuleViolation(rule="whitespace", field=field,
                                   message="remove leading/trailing whitespace (the answer token carries the space)"))
    text = prompt.strip()
    words = _words(text)
    first = words[0] if words else ""
    if text.endswith("?"):
        found.append(RuleViolation(rule="question_format", field=field,
                                   message=f"ends with '?': rewrite {text!r} as a sentence the answer completes"))
    elif first in QUESTION_WORDS or first in IMPERATIVES:
        found.append(RuleViolation(rule="question_format", field=field,
                                   message=f"starts with {first!r}: rewrite as a sentence the answer completes"))
    if first in AUXILIARIES and not text.endswith("?"):
        found.append(RuleViolation(rule="yes_no", field=field,
                                   message=f"starts with {first!r}, which asks a yes/no question"))
    elif first in AUXILIARIES:
        found.append(RuleViolation(rule="yes_no", field=field, message=f"{text!r} is a yes/no question"))
    if text.endswith((".", "!", ":", ";")) and not text.endswith("..."):
        found.append(RuleViolation(rule="not_completion", field=field,
                                   message=f"ends with {text[-1]!r}: stop right before the answer"))
    lowered = normalize_text(text)
    for ending in OPEN_ENDINGS:
        if lowered == ending or lowered.endswith(" " + ending):
            found.append(RuleViolation(rule="open_ended", field=field,
                                       message=f"ends with {ending!r}, which has many valid answers"))
            break
    if len(words) > MAX_PROMPT_WORDS:
        found.append(RuleViolation(rule="prompt_too_long", field=field,
                                   message=f"{len(words)} words (at most {MAX_PROMPT_WORDS})"))
    return found


# The rules without which the next token after a prompt says nothing about its answer: the filter and every
# later stage refuse such prompts, whatever their source (a question's next token is not its answer).
FORM_RULES = ("empty", "question_format", "yes_no", "not_completion", "whitespace")


def prompt_form_violations(prompt: str, field: str = "prompt") -> list[RuleViolation]:
    """The :data:`FORM_RULES` that ``prompt`` breaks (the other rules are for curating new prompts)."""
    return [v for v in _check_prompt_text(prompt, field) if v.rule in FORM_RULES]


def _check_answer(answer: str, aliases: list[str]) -> list[RuleViolation]:
    found: list[RuleViolation] = []
    if not answer.strip():
        return [RuleViolation(rule="empty", field="answer", message="answer is empty")]
    text = answer.strip()
    words = text.split()
    # A lone "A" is a letter answer (vitamin A, hepatitis A); an article only opens a longer answer.
    if words[0].lower() in ARTICLES and (len(words) > 1 or words[0].lower() in ("the", "an")):
        found.append(RuleViolation(rule="leading_article", field="answer",
                                   message=f"{text!r} starts with {words[0]!r}; the answer word must come first"))
    if normalize_text(text) in YES_NO_ANSWERS:
        found.append(RuleViolation(rule="yes_no", field="answer", message=f"answer {text!r} is a yes/no answer"))
    if ALTERNATIVE_SEPARATORS.search(f" {text} "):
        found.append(RuleViolation(rule="multiple_answers", field="answer",
                                   message=f"{text!r} lists alternatives; keep one answer, put spellings in aliases"))
    elif len(words) > MAX_ANSWER_WORDS:
        found.append(RuleViolation(rule="answer_too_long", field="answer",
                                   message=f"{text!r} has {len(words)} words (at most {MAX_ANSWER_WORDS})"))
    if not any(ch.isalnum() for ch in text) or not (text[0].isalnum()) or text[-1] in ".,;:!?":
        found.append(RuleViolation(rule="answer_format", field="answer",
                                   message=f"{text!r} must start with a letter or digit and not end in punctuation"))
    for i, alias in enumerate(aliases):
        if not isinstance(alias, str) or not alias.strip():
            found.append(RuleViolation(rule="empty", field=f"aliases[{i}]", message="alias is empty"))
    return found


def _answer_in(prompt: str, answer: str) -> bool:
    """Does the prompt already contain the whole answer as words ("... of Paris is" → Paris)?"""
    needle = normalize_text(answer)
    if not needle:
        return False
    haystack = normalize_text(prompt)
    if len(needle) <= 2:
        # Short answers ("A", "K", "21") are compared case-sensitively: "a lack of" does not give away vitamin "A".
        needle, haystack = " ".join(answer.split()), " ".join(prompt.split())
    return re.search(rf"(?<![\w'-]){re.escape(needle)}(?![\w'-])", haystack) is not None


def validate_prompt(record: Any) -> list[RuleViolation]:
    """All rules `record` (a PromptRecord or a dict) breaks; an empty list means it is a good prompt."""
    data = record.model_dump() if isinstance(record, BaseModel) else record
    if not isinstance(data, dict):
        return [RuleViolation(rule="missing_field", field="record",
                              message=f"expected an object with prompt and answer, got {type(data).__name__}")]
    found: list[RuleViolation] = []
    for key in ("prompt", "answer"):
        if key not in data or data[key] is None:
            found.append(RuleViolation(rule="missing_field", field=key, message=f"`{key}` is missing"))
        elif not isinstance(data[key], str):
            found.append(RuleViolation(rule="missing_field", field=key,
                                       message=f"`{key}` must be a string, got {type(data[key]).__name__}"))
    if found:
        return found
    prompt, answer = data["prompt"], data["answer"]
    aliases = data.get("aliases") or []
    paraphrases = data.get("paraphrases") or []
    if not isinstance(aliases, list):
        found.append(RuleViolation(rule="missing_field", field="aliases", message="`aliases` must be a list"))
        aliases = []
    if not isinstance(paraphrases, list):
        found.append(RuleViolation(rule="missing_field", field="paraphrases", message="`paraphrases` must be a list"))
        paraphrases = []

    found += _check_prompt_text(prompt, "prompt")
    found += _check_answer(answer, aliases)
    if prompt.strip() and answer.strip() and _answer_in(prompt, answer):
        found.append(RuleViolation(rule="answer_in_prompt", field="prompt",
                                   message=f"the prompt already says {answer.strip()!r}"))
    seen = {normalize_text(prompt)}
    for i, para in enumerate(paraphrases):
        field = f"paraphrases[{i}]"
        if not isinstance(para, str):
            found.append(RuleViolation(rule="missing_field", field=field, message="paraphrase must be a string"))
            continue
        found += _check_prompt_text(para, field)
        if para.strip() and answer.strip() and _answer_in(para, answer):
            found.append(RuleViolation(rule="answer_in_prompt", field=field,
                                       message=f"the paraphrase already says {answer.strip()!r}"))
        key = normalize_text(para)
        if key in seen:
            found.append(RuleViolation(rule="duplicate", field=field,
                                       message="paraphrase repeats the prompt or another paraphrase"))
        seen.add(key)
    return found
