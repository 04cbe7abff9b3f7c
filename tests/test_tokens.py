"""Answer matching on sub-word tokens (pure text rules, plus answer checks on the embedded tokenizer)."""

import pytest

from conceptfix.errors import ConceptfixError
from conceptfix.tokens import (answer_kind, check_answer, echoes_prompt, is_comparable_top1, normalize,
                               resolve_contrastive_token, token_kind, token_matches_answer)


@pytest.mark.parametrize("token, answer", [
    (" ren", "renin"),
    (" al", "aldosterone"),
    (" Opt", "optic"),
    (" Canberra", "Canberra"),
    ("▁Ald", "Aldosterone"),  # SentencePiece space marker
    ("Ġsub", "substantia nigra"),  # byte-level BPE space marker
    (" K", "K"),  # vitamin K: a single letter matches an answer that is that letter
    (" B", "B12"),  # ... or whose first word starts with that letter followed by a non-letter
    (" high", "high blood pressure"),  # modifiers match as the answer's whole first word
    (" the", "the liver"),
])
def test_matches(token, answer):
    assert token_matches_answer(token, answer)


@pytest.mark.parametrize("token, answer", [
    (" a", "aldosterone"),  # a single letter is never a sub-word match
    (" the", "theophylline"),  # nor is an article
    (" an", "angiotensin"),
    (",", "aldosterone"),
    (" **", "aldosterone"),
    ("<|im_end|>", "aldosterone"),
    ("<|im_end|>", "<|im_end|>"),  # chat markers never match, whatever the answer
    (" ", "aldosterone"),
    ("", "aldosterone"),
    (" K", "potassium"),
    (" Sydney", "Canberra"),
    (" renin", "ren"),  # the token must be a prefix of the answer, not the other way round
    (" high", "highland"),
    (" increased", "increase"),
])
def test_does_not_match(token, answer):
    assert not token_matches_answer(token, answer)


def test_aliases_count_as_correct():
    assert not token_matches_answer(" ep", "adrenaline")
    assert token_matches_answer(" ep", "adrenaline", ["epinephrine"])
    assert token_matches_answer(" ep", "adrenaline", ("noradrenaline", "epinephrine"))
    assert not token_matches_answer(" a", "adrenaline", ["epinephrine"])
    assert not token_matches_answer(" ep", "adrenaline", ["", "  "])  # blank aliases are ignored


@pytest.mark.parametrize("text, kind", [
    (" ren", "content"), (" Sydney", "content"), (" the", "function"), (" called", "function"),
    (" increased", "modifier"), (" produced", "modifier"), (" a", "function"), (" K", "letter"),
    (",", "punctuation"), (" **", "punctuation"), (" $\\", "punctuation"), (" ", "empty"),
    ("<|im_end|>", "special"), ("<|eot_id|>", "special"), ("</s>", "special"), ("[INST]", "special"),
])
def test_token_kind(text, kind):
    assert token_kind(text) == kind


def test_special_tokens_from_tokenizer_are_special():
    assert token_kind("<pad>") == "special"  # looks like a marker
    assert token_kind("PAD", frozenset({"PAD"})) == "special"  # named special token of a tokenizer
    assert token_kind("PAD") == "content"


def test_clearly_wrong_top1_needs_a_comparable_token():
    assert is_comparable_top1(" ren", "aldosterone")
    assert not is_comparable_top1(" the", "aldosterone")
    assert not is_comparable_top1(" a", "appendicitis")
    assert not is_comparable_top1(" increased", "constipation")
    assert not is_comparable_top1(",", "aldosterone")
    assert not is_comparable_top1("<|im_end|>", "aldosterone")
    # A letter is a real (wrong) answer only when the answer itself is a letter: vitamin B vs C.
    assert is_comparable_top1(" B", "C")
    assert is_comparable_top1(" B", "K")
    assert is_comparable_top1(" D", "B12")
    assert not is_comparable_top1(" B", "cobalamin")
    assert answer_kind("B12") == "letter" and answer_kind("aldosterone") == "content"


def test_prompt_echo():
    assert echoes_prompt(" human", "The largest organ of the human body is the")
    assert not echoes_prompt(" hum", "The largest organ of the human body is the")  # sub-words are not echoes
    assert not echoes_prompt(" skin", "The largest organ of the human body is the")


def test_normalize():
    assert normalize("  ▁Ald ") == "ald"
    assert normalize("Ġren") == "ren"
    assert normalize("ﬁbrin") == "fibrin"  # NFKC folds the ligature


def test_check_answer(embedded_tokenizer):
    tok = embedded_tokenizer
    ids = check_answer(tok, "aldosterone")
    assert tok.decode([ids[0]]) == " al"
    assert tok.decode(check_answer(tok, "K")) == " K"
    with pytest.raises(ConceptfixError) as info:
        check_answer(tok, "\u200bParis", field="[3].answer")  # zero-width space: starts with byte fragments
    assert info.value.field == "[3].answer" and "byte fragment" in str(info.value)
    with pytest.raises(ConceptfixError, match="no letters or digits"):
        check_answer(tok, "--")
    with pytest.raises(ConceptfixError, match="no letters or digits"):
        check_answer(tok, "\u200b")


def test_contrastive_tokens_round_trip(embedded_tokenizer):
    tok = embedded_tokenizer
    assert tok.decode([resolve_contrastive_token(tok, " ren", field="wrong")]) == " ren"
    with pytest.raises(ConceptfixError) as info:
        resolve_contrastive_token(tok, " aldosterone", field="correct")
    assert info.value.field == "correct" and "' al'" in (info.value.hint or "")
