"""Answer matching on sub-word tokens.

A next-token candidate matches an answer when its stripped, lower-cased text is a prefix of the
answer (`` ren`` → renin, `` al`` → aldosterone, `` Opt`` → optic). Single letters, articles,
punctuation and other function words never match as a sub-word, only when they are the answer's
whole first word (vitamin `` K``). A top-1 token that is a function word, modifier, punctuation or
chat marker is "ambiguous": the model has not committed to an answer yet, so it cannot be *clearly*
wrong.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
import unicodedata

from conceptfix.errors import ConceptfixError

# Closed-class English words a completion may start with before the real answer.
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every no not all both either neither
    and or but nor so yet if then than as because while whereas although though however therefore thus hence
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
    probably likely actually really always never sometimes now namely indeed essentially basically
    approximately nearly almost roughly
    yes
    """.split()
)

# Open-class words that open a phrase without naming the answer yet: degree/direction modifiers
# ("increased constipation"), participles that continue the sentence ("is produced by the ..."), who/what
# qualifiers ("female Anopheles", "human prolactin") and frame nouns ("an example of", "a type of", "the body").
# As a top-1 they mean the model has not committed to an answer, so they are not *clearly* wrong.
MODIFIER_WORDS = frozenset(
    """
    increased decreased reduced elevated raised lowered impaired altered abnormal excessive excess
    high higher low lower severe mild acute chronic significant important main major primary key
    common rare normal general specific particular certain various different new
    produced caused made found located released secreted regulated controlled mediated
    characterized associated involved responsible used given seen related linked affected
    because due
    human male female adult
    example type kind form part result process body
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
    """One of: 'special', 'empty', 'punctuation', 'function', 'modifier', 'letter', 'content'."""
    if is_chat_marker(text, special_tokens):
        return "special"
    t = normalize(text)
    if not t:
        return "empty"
    if is_punctuation(t):
        return "punctuation"
    if t in FUNCTION_WORDS:
        return "function"
    if t in MODIFIER_WORDS:
        return "modifier"
    if len(t) == 1 and t.isalpha():
        return "letter"
    return "content"


def token_matches_answer(token_text: str, answer: str, aliases: list[str] | tuple[str, ...] = ()) -> bool:
    """True when the token could be the start of the answer (or one of its aliases).

    Content tokens match when they are a prefix of the answer (`` ren`` → renin). Function words,
    modifiers and single letters match only as a whole word at the start of the answer (`` K`` →
    "K", `` B`` → "B12", `` high`` → "high blood pressure"), never as a sub-word (`` a`` ↛
    aldosterone). Punctuation only matches an answer that is exactly it; chat markers never match.
    """
    kind = token_kind(token_text)
    if kind in ("special", "empty"):
        return False
    t = normalize(token_text)
    for candidate in (answer, *aliases):
        a = normalize(candidate)
        if not a:
            continue
        if kind == "content":
            if a.startswith(t):
                return True
        elif kind == "punctuation":
            if a == t:
                return True
        elif a.startswith(t) and (len(a) == len(t) or not a[len(t)].isalpha()):
            return True
    return False


def answer_kind(answer: str) -> str:
    """The kind of the answer's first word: 'letter' for "K" or "B12", 'content' for "aldosterone"."""
    words = normalize(answer).split()
    if not words:
        return "empty"
    first = words[0]
    letters = re.match(r"[^\W\d_]+", first)
    if letters and len(letters.group()) == 1 and len(first) > 1 and not first[1].isalpha():
        return "letter"  # "b12", "c-reactive": the first token is a single letter
    return token_kind(first)


def is_comparable_top1(token_text: str, answer: str, special_tokens: frozenset[str] = frozenset()) -> bool:
    """Can this top-1 token be *clearly* wrong for this answer?

    A content token can. A function word, modifier, punctuation or chat marker cannot: the model has
    not named anything yet. A single letter can only when the answer is itself a letter (`` B`` for
    vitamin "C" is clearly wrong; `` a`` for "appendicitis" is not).
    """
    kind = token_kind(token_text, special_tokens)
    if kind == "content":
        return True
    return kind == "letter" and answer_kind(answer) == "letter"


def echoes_prompt(token_text: str, prompt: str) -> bool:
    """True when the token is a whole word already in the prompt ("...organ of the human body is the" →
    `` human``): a repetition that usually opens a longer phrase, not a committed answer."""
    t = normalize(token_text)
    if not t:
        return False
    words = {w for w in re.split(r"[^\w'-]+", normalize(prompt)) if w}
    return t in words


def continues_last_word(token_text: str, formatted_prompt: str) -> bool:
    """True when the token glues onto the prompt's last word ("... body is tooth" + ``ache`` → "toothache").

    Only for prompts that end inside a word: after a chat template or an answer prefix ending in ":" or a
    newline, a reply may legitimately start without a space.
    """
    return bool(token_text) and bool(formatted_prompt) and formatted_prompt[-1].isalnum() \
        and not token_text[0].isspace() and token_text[0].isalnum()


def answer_in_text(text: str, answer: str, aliases: Sequence[str] = ()) -> str | None:
    """The word of ``text`` that is the answer (or an alias), matched on the answer's first word; else None.

    A word matches when it equals the answer's first word, extends it ("mitochondria" / "mitochondrial" from
    "mitochondria"), or is a prefix of it of at least 4 letters ("ovar" for "ovaries").
    """
    words = [w for w in re.split(r"[^\w'-]+", normalize(text)) if w]
    for candidate in (answer, *aliases):
        first = next((w for w in re.split(r"[^\w'-]+", normalize(candidate)) if w), "")
        if not first:
            continue
        for w in words:
            if w == first or (len(first) >= 4 and w.startswith(first)) or (len(w) >= 4 and first.startswith(w)):
                return w
    return None


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


def check_answer(tokenizer, answer: str, *, field: str = "answer") -> list[int]:
    """The answer's token ids, or a ConceptfixError saying why the answer cannot be matched.

    Refuses answers without letters or digits, answers whose first token is the unknown token, and
    answers whose first token is a byte fragment (decodes to U+FFFD): no top-k text can match those.
    """
    if not any(ch.isalnum() for ch in normalize(answer)):
        raise ConceptfixError(f"answer {answer!r} has no letters or digits", field=field)
    try:
        ids = answer_token_ids(tokenizer, answer)
    except ConceptfixError as exc:
        raise ConceptfixError(str(exc), field=field) from None
    if ids[0] == getattr(tokenizer, "unk_token_id", None) and tokenizer.unk_token_id is not None:
        raise ConceptfixError(f"answer {answer!r} starts with the unknown token", field=field)
    first = tokenizer.decode([ids[0]])
    if "\ufffd" in first or not first.strip():
        raise ConceptfixError(
            f"answer {answer!r} does not tokenize into readable tokens (first token {first!r} is a byte fragment)",
            field=field, hint="remove invisible or control characters",
        )
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
