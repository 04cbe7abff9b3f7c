"""Stage 2 filter on the embedded model: target cases, drop reasons, caching, CLI and bad input."""

import json

import pytest
from typer.testing import CliRunner

import conceptfix.filter as filter_module
from conceptfix.cli import app
from conceptfix.errors import ConceptfixError
from conceptfix.filter import DROP_REASONS, filter_prompts
from conceptfix.schemas import FilterResult, PromptRecord, load_target_case
from conceptfix.tokens import is_comparable_top1

AUSTRALIA = "The capital of Australia is"
HORMONE = "The primary hormone regulating blood pressure is"
FRANCE = "The capital of France is"
APPENDIX = "Inflammation of the appendix is called"

RECORDS = [
    PromptRecord(prompt=AUSTRALIA, answer="Canberra", category="geography"),
    PromptRecord(prompt=HORMONE, answer="aldosterone", category="physiology", source="seed"),
    PromptRecord(prompt=FRANCE, answer="Paris"),
    PromptRecord(prompt=APPENDIX, answer="appendicitis"),
    # Same prompt, other answers: one just below the cut (' Adelaide' #6), one outside the top 10.
    PromptRecord(prompt=AUSTRALIA, answer="Adelaide"),
    PromptRecord(prompt=AUSTRALIA, answer="Brisbane"),
    # Aliases count as correct: Sydney as an alias turns the wrong top-1 into a correct one ...
    PromptRecord(prompt=AUSTRALIA, answer="Canberra", aliases=["Sydney"]),
    # ... and Perth (#4) as an alias of Adelaide (#6) puts the answer inside the top 5.
    PromptRecord(prompt=AUSTRALIA, answer="Adelaide", aliases=["Perth"]),
    # A letter answer: ' B' is a clearly wrong vitamin, and its whole word is "B12".
    PromptRecord(prompt="Vitamin deficiency causing scurvy is vitamin", answer="C"),
    # Top-1 ' blood' repeats the prompt ("the red blood cell"): not a committed answer.
    PromptRecord(prompt="The cell that carries oxygen in the blood is the red", answer="erythrocyte"),
    # Top-1 ' composed' only leads into the answer ("composed of DNA"): not a wrong answer.
    PromptRecord(prompt="The genetic material of most organisms is", answer="DNA"),
    # Top-1 'ache' (no leading space) glues onto "tooth" ("toothache"): not a new answer word.
    PromptRecord(prompt="The hardest substance in the human body is tooth", answer="enamel"),
]


@pytest.fixture(scope="module")
def result(embedded, tmp_path_factory):
    # Filter results go to a private cache dir; the model cache ($CONCEPTFIX_CACHE/models) stays shared.
    with pytest.MonkeyPatch.context() as mp:
        private = tmp_path_factory.mktemp("filter_cache")
        mp.setattr(filter_module, "cache_dir", lambda: private)
        yield filter_prompts(embedded, RECORDS, top_k=10, max_rank=5, batch_size=16, progress=False)


@pytest.fixture
def filter_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(filter_module, "cache_dir", lambda: tmp_path / "filter_cache")
    return tmp_path / "filter_cache"


def _case(result: FilterResult, prompt: str, answer: str):
    matches = [c for c in result.target_cases if c.prompt == prompt and c.answer == answer]
    return matches[0] if matches else None


def _drop(result: FilterResult, prompt: str, answer: str, aliases=()):
    matches = [d for d in result.dropped if d.prompt == prompt and d.answer == answer]
    return matches[0] if matches else None


def test_australia_is_a_target(result):
    case = _case(result, AUSTRALIA, "Canberra")
    assert case is not None
    assert case.wrong_token == " Sydney" and case.wrong_word == "Sydney"
    assert case.correct_token == " Canberra" and case.correct_rank == 2
    assert case.contrastive == (" Canberra", " Sydney")
    assert case.wrong_prob > case.correct_prob > 0.2
    assert case.top_k[0].kind == "content" and not case.top_k[0].matches_answer
    assert case.top_k[1].matches_answer
    assert case.category == "geography"


def test_hormone_is_a_target_with_the_whole_wrong_word(result):
    case = _case(result, HORMONE, "aldosterone")
    assert case is not None
    assert case.wrong_token == " ren" and case.wrong_word == "renin"
    assert case.correct_token == " al" and case.correct_rank == 5
    assert case.contrastive == (" al", " ren")
    assert [c.rank for c in case.top_k] == list(range(1, 11))
    # ' the' and ' a' sit above ' al' and must not count as the answer.
    assert [c.token for c in case.top_k if c.matches_answer][0] == " al"
    assert case.formatted_prompt == HORMONE  # raw-completion profile
    assert case.source == "seed"
    # The wrong answer in context, as the model goes on to write it.
    assert case.wrong_continuation.startswith(" renin") and "aldosterone" not in case.wrong_continuation.lower()


def test_france_is_not_a_target(result):
    assert _case(result, FRANCE, "Paris") is None
    drop = _drop(result, FRANCE, "Paris")
    assert drop.reason == "top1_correct" and drop.top1 == " Paris" and drop.correct_rank == 1


def test_appendix_top1_article_is_ambiguous(result):
    assert _case(result, APPENDIX, "appendicitis") is None
    drop = _drop(result, APPENDIX, "appendicitis")
    assert drop.reason == "top1_ambiguous" and drop.top1 == " a"


def test_rank_too_low_and_not_in_top_k(result):
    adelaide = [d for d in result.dropped if d.answer == "Adelaide"]
    assert len(adelaide) == 1 and adelaide[0].reason == "correct_rank_too_low" and adelaide[0].correct_rank == 6
    brisbane = _drop(result, AUSTRALIA, "Brisbane")
    assert brisbane.reason == "correct_not_in_top_k" and brisbane.correct_rank > 10


def test_aliases(result):
    sydney_alias = [d for d in result.dropped if d.prompt == AUSTRALIA and d.reason == "top1_correct"]
    assert len(sydney_alias) == 1  # Canberra with alias Sydney
    perth = [c for c in result.target_cases if c.answer == "Adelaide"]
    assert len(perth) == 1 and perth[0].correct_token == " Perth" and perth[0].correct_rank == 4
    assert perth[0].aliases == ["Perth"]


def test_letter_answer_and_prompt_echo(result):
    vitamin = _case(result, "Vitamin deficiency causing scurvy is vitamin", "C")
    assert vitamin is not None and vitamin.wrong_token == " B" and vitamin.correct_token == " C"
    assert vitamin.wrong_word == "B12"
    red = _drop(result, "The cell that carries oxygen in the blood is the red", "erythrocyte")
    assert red.reason == "top1_ambiguous" and red.top1 == " blood" and "repeats" in red.detail


def test_lead_in_to_the_answer_is_not_a_wrong_answer(result):
    drop = _drop(result, "The genetic material of most organisms is", "DNA")
    assert drop.reason == "top1_ambiguous" and drop.top1 == " composed"
    assert "leads into the answer" in drop.detail and "DNA" in drop.detail


def test_word_continuation_is_not_a_new_answer(result):
    drop = _drop(result, "The hardest substance in the human body is tooth", "enamel")
    assert drop.reason == "top1_ambiguous" and drop.top1 == "ache"
    assert "continues the prompt's last word" in drop.detail


def test_answer_in_text_and_continues_last_word():
    from conceptfix.tokens import answer_in_text, continues_last_word

    assert answer_in_text(" female Anopheles mosquito", "mosquito") == "mosquito"
    assert answer_in_text(" female Anopheles", "mosquito", aliases=["Anopheles"]) == "anopheles"
    assert answer_in_text(" renin, which is produced by the kidneys", "aldosterone") is None
    assert answer_in_text(" the mitochondrial matrix", "mitochondria") == "mitochondrial"
    assert answer_in_text(" a cell", "C") is None  # one-letter answers match whole words only
    assert continues_last_word("ache", "The hardest substance is tooth")
    assert not continues_last_word(" ache", "The hardest substance is tooth")
    assert not continues_last_word("Ald", "<|assistant|>\n")  # a reply may start without a space
    assert not continues_last_word(",", "The capital of France is")


def test_every_prompt_is_accounted_for(result):
    s = result.summary
    assert s["prompts"] == len(RECORDS)
    assert s["target_cases"] == len(result.target_cases) == 4
    assert s["target_cases"] + sum(s[r] for r in DROP_REASONS) == len(RECORDS)
    assert set(DROP_REASONS) <= set(s)
    for case in result.target_cases:
        assert is_comparable_top1(case.wrong_token, case.answer)
        assert 2 <= case.correct_rank <= 5 and case.wrong_word
    assert result.provenance["stage"] == "filter"
    assert result.provenance["config"]["model"]["dtype"] == "float32"


def test_batched_and_one_at_a_time_agree(embedded, result):
    single = [filter_prompts(embedded, [r], batch_size=1, cache=False) for r in RECORDS[:4]]
    for record, one in zip(RECORDS[:4], single):
        batched_case = _case(result, record.prompt, record.answer)
        if batched_case is None:
            assert one.target_cases == [] and one.dropped[0].reason == _drop(result, record.prompt, record.answer).reason
        else:
            assert [c.token_id for c in one.target_cases[0].top_k] == [c.token_id for c in batched_case.top_k]
            assert one.target_cases[0].correct_prob == pytest.approx(batched_case.correct_prob, abs=1e-4)


def test_length_sorted_batches_change_nothing_but_speed(embedded, result):
    """The default groups prompts by token length for the forward pass; results keep the input order and the
    decisions of unsorted batching."""
    from conceptfix.predict import length_sorted_order

    order = length_sorted_order(embedded, [r.prompt for r in RECORDS])
    lengths = [len(embedded.encode([RECORDS[j].prompt])["input_ids"][0]) for j in order]
    assert lengths == sorted(lengths) and order != list(range(len(RECORDS)))  # the sort does reorder these
    unsorted = filter_prompts(embedded, RECORDS, batch_size=3, cache=False, sort_by_length=False, progress=False)

    def decisions(res):
        return ([(c.prompt, c.answer, c.wrong_token_id, c.correct_token_id, c.correct_rank) for c in res.target_cases],
                [(d.prompt, d.answer, d.reason) for d in res.dropped])

    # Same lists in the same order: unsorted batching walks the records in input order.
    assert decisions(unsorted) == decisions(result)


def test_rerun_reads_the_cache(embedded, filter_cache, monkeypatch):
    records = RECORDS[:2]
    first = filter_prompts(embedded, records, progress=False)
    assert len(list(filter_cache.glob("*.json"))) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("a cached re-run must not run the model")

    monkeypatch.setattr(filter_module, "next_token_logits", no_forward)
    again = filter_prompts(embedded, records, batch_size=1, progress=False)  # batch size is not part of the key
    assert again.model_dump() == first.model_dump()
    with pytest.raises(AssertionError, match="must not run"):  # different options: a different key
        filter_prompts(embedded, records, max_rank=4, progress=False)
    with pytest.raises(AssertionError, match="must not run"):  # different records: a different key
        filter_prompts(embedded, [records[0].model_copy(update={"answer": "Perth"})], progress=False)


def test_invalid_answer_raises_or_is_dropped(embedded):
    records = [RECORDS[2], PromptRecord(prompt=FRANCE, answer="\u200bParis")]
    with pytest.raises(ConceptfixError) as info:
        filter_prompts(embedded, records, cache=False)
    assert info.value.field == "[1].answer"
    kept = filter_prompts(embedded, records, cache=False, skip_invalid=True)
    assert [d.reason for d in kept.dropped] == ["top1_correct", "invalid"]
    assert kept.summary["invalid"] == 1


def test_option_errors(embedded):
    with pytest.raises(ConceptfixError) as info:
        filter_prompts(embedded, RECORDS[:1], top_k=4, max_rank=5)
    assert info.value.field == "top_k"
    with pytest.raises(ConceptfixError) as info:
        filter_prompts(embedded, RECORDS[:1], max_rank=1)
    assert info.value.field == "max_rank"
    with pytest.raises(ConceptfixError):
        filter_prompts(embedded, [])


# --- CLI ------------------------------------------------------------------------------------------

runner = CliRunner()


def _write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def test_cli_writes_target_cases_and_refuses_a_different_result(embedded, tmp_path, filter_cache):
    src = _write(tmp_path / "prompts.json", [r.model_dump() for r in RECORDS[:4]])
    out = tmp_path / "data" / "filtered_prompts.json"
    res = runner.invoke(app, ["filter", "--input", src, "--output", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "renin" in res.stdout and "Canberra" in res.stdout and "top1_ambiguous" in res.stdout
    saved = json.loads(out.read_text())
    assert saved["summary"]["target_cases"] == 2 and saved["top_k"] == 10
    assert load_target_case(f"{out}#1").wrong_word == "renin"
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temp file

    again = runner.invoke(app, ["filter", "--input", src, "--output", str(out), "--device", "cpu"])
    assert again.exit_code == 0 and "cached" in again.stderr
    changed = runner.invoke(app, ["filter", "-i", src, "-o", str(out), "--device", "cpu", "--max-rank", "4"])
    assert changed.exit_code == 2 and "--overwrite" in changed.stderr
    assert json.loads(out.read_text())["max_rank"] == 5  # untouched
    forced = runner.invoke(app, ["filter", "-i", src, "-o", str(out), "--device", "cpu", "--max-rank", "4",
                                 "--overwrite"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(out.read_text())["summary"]["target_cases"] == 1  # ' al' at #5 no longer counts


@pytest.mark.parametrize("content, extra, field", [
    ("[{\"prompt\": \"x\",", [], "--input"),  # malformed JSON
    ([{"prompt": "The capital of France is"}], [], "[0].answer"),  # missing field
    ([{"prompt": FRANCE, "answer": "Paris"}, {"prompt": "   ", "answer": "Paris"}], [], "[1].prompt"),
    ([{"prompt": "", "answer": "Paris"}], [], "[0].prompt"),
    ([{"prompt": FRANCE, "answer": "\u200bParis"}], [], "[0].answer"),  # does not tokenize
    ([{"prompt": FRANCE, "answer": "Paris"}], ["--model", "no such model"], "model"),
    ([{"prompt": FRANCE, "answer": "Paris"}], ["--top-k", "3"], "--top-k"),
    ([{"prompt": FRANCE, "answer": "Paris"}], ["--batch-size", "0"], "--batch-size"),
    ({"records": []}, [], "--input"),
    ([], [], "--input"),
    # not completion prompts: the next token of a question or a finished sentence is not its answer
    ([{"prompt": FRANCE, "answer": "Paris"}, {"prompt": "What is the capital of France?", "answer": "Paris"}],
     [], "[1].prompt"),
    ([{"prompt": "Is Paris the capital of France", "answer": "yes"}], [], "[0].prompt"),
    ([{"prompt": "The capital of France is Paris.", "answer": "Paris"}], [], "[0].prompt"),
    ([{"prompt": FRANCE + " ", "answer": "Paris"}], [], "[0].prompt"),
])
def test_cli_bad_input_is_one_line(embedded, tmp_path, filter_cache, content, extra, field):
    src = _write(tmp_path / "prompts.json", content)
    out = tmp_path / "out.json"
    res = runner.invoke(app, ["filter", "-i", src, "-o", str(out), "--device", "cpu", *extra])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), res.stderr
    assert "Traceback" not in res.output
    assert not out.exists()


def test_cli_missing_input_file(tmp_path):
    res = runner.invoke(app, ["filter", "-i", str(tmp_path / "nope.json"), "-o", str(tmp_path / "o.json")])
    assert res.exit_code == 2 and "--input: file not found" in res.stderr


def test_batched_greedy_continuations_match_one_prompt_at_a_time(embedded):
    """Left-padded batched generation gives the same tokens as an unpadded argmax loop per prompt."""
    import torch

    from conceptfix.predict import greedy_continuations

    prompts = [HORMONE, AUSTRALIA, "Vitamin deficiency causing scurvy is vitamin", "The genetic material of most organisms is"]
    firsts = [embedded.tokenizer.encode(t, add_special_tokens=False)[0] for t in (" ren", " Sydney", " B", " composed")]
    batched = greedy_continuations(embedded, prompts, firsts, max_new_tokens=5, batch_size=4)
    for prompt, first, got in zip(prompts, firsts, batched):
        ids = torch.cat([embedded.encode([prompt])["input_ids"], torch.tensor([[first]])], dim=1)
        expected = []
        with torch.no_grad():
            for _ in range(5):
                next_id = int(embedded.model(input_ids=ids).logits[0, -1].argmax())
                if next_id == embedded.tokenizer.eos_token_id:
                    break
                expected.append(next_id)
                ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
        assert got == expected, (prompt, embedded.tokenizer.decode(got), embedded.tokenizer.decode(expected))
    with pytest.raises(ValueError):
        greedy_continuations(embedded, prompts, firsts[:2])


@pytest.mark.parametrize("prompt, answer, top1", [
    ("The test that records the electrical activity of the brain is an", "electroencephalogram", " example"),
    ("The hormone that stimulates milk production is", "prolactin", " human"),
    ("Malaria is transmitted by the", "mosquito", " female"),
    ("Metformin reduces glucose production in the", "liver", " body"),
])
def test_frame_words_and_qualifiers_are_not_wrong_answers(embedded, filter_cache, prompt, answer, top1):
    """A top-1 that frames ("an example of") or qualifies ("female Anopheles") has not committed to an answer."""
    result = filter_prompts(embedded, [PromptRecord(prompt=prompt, answer=answer)], top_k=10, cache=False)
    assert not result.target_cases
    drop = result.dropped[0]
    assert drop.top1 == top1 and drop.reason == "top1_ambiguous" and "modifier" in drop.detail


def test_skip_invalid_drops_a_question_and_keeps_the_rest(embedded, filter_cache):
    records = [PromptRecord(prompt="What is the capital of Australia?", answer="Canberra"),
               PromptRecord(prompt=AUSTRALIA, answer="Canberra")]
    result = filter_prompts(embedded, records, skip_invalid=True, cache=False)
    assert [c.prompt for c in result.target_cases] == [AUSTRALIA]
    (drop,) = result.dropped
    assert drop.reason == "invalid" and drop.detail.startswith("[0].prompt: ends with '?'")


def test_end_token_ids_include_the_models_generation_eos(embedded):
    """A chat model that ends turns with another token than its tokenizer's EOS stops there too."""
    import copy

    from conceptfix.predict import end_token_ids

    assert end_token_ids(embedded) == [embedded.tokenizer.eos_token_id]
    other = copy.copy(embedded)
    other.model = copy.copy(embedded.model)
    other.model.generation_config = copy.deepcopy(embedded.model.generation_config)
    other.model.generation_config.eos_token_id = [embedded.tokenizer.eos_token_id, 1]
    assert end_token_ids(other) == [embedded.tokenizer.eos_token_id, 1]
