"""Answer matching on sub-word tokens.

A next-token candidate matches an answer when its stripped, lower-cased text is a prefix of the
answer (`` ren`` → renin, `` al`` → aldosterone, `` Opt`` → optic). Single letters, articles,
punctuation and other function words never match, unless the answer itself *is* that token
(vitamin `` K``). A top-1 token that is a function word, punctuation or chat marker is "ambiguous":
the model has not committed to an answer yet, so it cannot be *clearly* wrong.
"""

from __future__ import annotations

import re
import string
import unicodedata

from conceptfix.errors import ConceptfixError

# Closed-class English words a completion may start with before the real answer.
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every no not all both either neither
    and or but nor so yet if then than as because while whereas although though
    of in on at to from by for with without within into onto upon over under about above below
    between among through during before after against around across along via per
    is are was were be been being am do does did has have had having can could may might must
    shall should will would
    it its it's he she they them their his her we our you your i me my one ones
    which who whom whose what where when why how there here
    also often usually typically generally commonly mainly mostly primarily largely especially
    called known termed named referred considered defined described
    very more most less least much many few several such same other another
    just only even still too quite rather
    """.split()
)

_CHAT_MARKER = re.compile(r"^<\|?[^<>]*\|?>$|^<[/]?s>$|^\[/?INST\]$")


def normalize(text: str) -> str:
    """Strip whitespace and SentencePiece/BPE space markers, lower-case, NFKC."""
    text = unicodedata.normalize("NFKC", text).replace("▁", " ").replace("Ġ", " ")
    return text.strip().lower()


def is_punctuation(text: str) -> bool:
    t = normalize(text)
    return bool(t) and all(ch in string.punctuation or unicodedata.category(ch).startswith(("P", "S")) for ch in t)


def is_chat_marker(text: str, special_tokens: frozenset[str] = frozenset()) -> bool:
    stripped = text.strip()
    return stripped in special_tokens or bool(_CHAT_MARKER.match(stripped))


def token_kind(text: str, special_tokens: frozenset[str] = frozenset()) -> str:
    """One of: 'special', 'empty', 'punctuation', 'function', 'letter', 'content'."""
    if is_chat_marker(text, special_tokens):
        return "special"
    t = normalize(text)
    if not t:
        return "empty"
    if is_punctuation(t):
        return "punctuation"
    if t in FUNCTION_WORDS:
        return "function"
    if len(t) == 1 and t.isalpha():
        return "letter"
    return "content"


def token_matches_answer(token_text: str, answer: str, aliases: list[str] | tuple[str, ...] = ()) -> bool:
    """True when the token could be the start of the answer (or one of its aliases)."""
    t = normalize(token_text)
    if not t:
        return False
    for candidate in (answer, *aliases):
        a = normalize(candidate)
        if not a:
            continue
        if token_kind(t) != "content":
            # Function words, single letters and punctuation only match an answer that is exactly them.
            if t == a:
                return True
            continue
        if a.startswith(t):
            return True
    return False


def is_content_token(token_text: str, special_tokens: frozenset[str] = frozenset()) -> bool:
    return token_kind(token_text, special_tokens) == "content"


def special_token_set(tokenizer) -> frozenset[str]:
    return frozenset(getattr(tokenizer, "all_special_tokens", []) or [])


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of the answer as it would follow a prompt (with a leading space)."""
    answer = answer.strip()
    if not answer:
        raise ConceptfixError("answer is empty", field="answer")
    ids = tokenizer.encode(" " + answer, add_special_tokens=False)
    # Some tokenizers emit a bare-space token first; the answer starts at the first non-space token.
    while ids and not tokenizer.decode([ids[0]]).strip():
        ids = ids[1:]
    if not ids:
        raise ConceptfixError(f"answer {answer!r} does not tokenize to any token", field="answer")
    return ids


def first_answer_token(tokenizer, answer: str) -> int:
    return answer_token_ids(tokenizer, answer)[0]


def resolve_contrastive_token(tokenizer, text: str, *, field: str) -> int:
    """A contrastive pair member (`" Ald"`) must be exactly one token; say so clearly when it is not."""
    if not text or not text.strip():
        raise ConceptfixError("empty token text", field=field)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ConceptfixError(
            f"{text!r} is {len(ids)} tokens {pieces}, not one", field=field,
            hint=f"use the first piece {pieces[0]!r} if that is the answer's first token" if pieces else None,
        )
    return ids[0]
