"""Stage 1 (generate): the validator, the curated bank, the LLM provider over a local server, the CLI. No model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conceptfix.cli_app import app
from conceptfix.errors import ConceptfixError
from conceptfix.generate import (BankProvider, generate_prompts, load_bank, sample_bank, validate_prompt)
from conceptfix.generate.bank import bank_categories
from conceptfix.generate.openai_provider import OpenAIProvider
from conceptfix.generate.validator import RULES, normalize_text
from conceptfix.llm import LLMClient
from conceptfix.schemas import load_prompt_records

ROUTE = "/v1/chat/completions"
KEY_ENV = "CONCEPTFIX_TEST_LLM_KEY"

REQUIRED = {
    "The primary hormone regulating blood pressure is": "aldosterone",
    "The capital of Australia is": "Canberra",
    "The capital of France is": "Paris",
    "Inflammation of the appendix is called": "appendicitis",
    "A common side effect of opioid analgesics is": "constipation",
    "The neurotransmitter associated with reward is": "dopamine",
    "Parkinson's disease involves degeneration of neurons in the": "substantia nigra",
    "The hormone that lowers blood sugar is": "insulin",
}


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


def rules_of(record) -> set[str]:
    return {v.rule for v in validate_prompt(record)}


# --- validator ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, answer", [
    ("The neurotransmitter associated with reward is", "dopamine"),
    ("Parkinson's disease involves degeneration of neurons in the", "substantia nigra"),
    ("Ground-glass hepatocytes are characteristic of", "hepatitis B"),
    ("Night blindness is an early sign of deficiency of vitamin", "A"),  # a letter, not an article
    ("Down syndrome is caused by an extra copy of chromosome", "21"),
])
def test_validator_accepts_the_seeds_good_prompts(prompt, answer):
    assert validate_prompt({"prompt": prompt, "answer": answer}) == []


@pytest.mark.parametrize("record, rule, field", [
    ({"prompt": "What causes diabetes?", "answer": "insulin resistance"}, "question_format", "prompt"),
    ({"prompt": "Which hormone lowers blood sugar", "answer": "insulin"}, "question_format", "prompt"),
    ({"prompt": "Name the hormone that lowers blood sugar", "answer": "insulin"}, "question_format", "prompt"),
    ({"prompt": "Is dopamine involved in reward?", "answer": "yes"}, "yes_no", "prompt"),
    ({"prompt": "Dopamine is involved in reward, which is", "answer": "true"}, "yes_no", "answer"),
    ({"prompt": "The treatment for hypertension includes", "answer": "diuretics"}, "open_ended", "prompt"),
    ({"prompt": "Antihypertensive drugs such as", "answer": "lisinopril"}, "open_ended", "prompt"),
    ({"prompt": "The primary hormone regulating blood pressure is", "answer": "the hormone aldosterone"},
     "leading_article", "answer"),
    ({"prompt": "The primary hormone regulating blood pressure is", "answer": "an aldosterone"},
     "leading_article", "answer"),
    ({"prompt": "Opioids commonly cause", "answer": "severe chronic constipation"}, "answer_too_long", "answer"),
    ({"prompt": "Opioids commonly cause", "answer": "nausea or constipation"}, "multiple_answers", "answer"),
    ({"prompt": "Opioids commonly cause", "answer": "constipation, nausea"}, "multiple_answers", "answer"),
    ({"prompt": "Paris, the capital of France, is called", "answer": "Paris"}, "answer_in_prompt", "prompt"),
    ({"prompt": "Vitamin C deficiency is also called vitamin", "answer": "C"}, "answer_in_prompt", "prompt"),
    ({"prompt": "The capital of France is Paris.", "answer": "Paris"}, "not_completion", "prompt"),
    ({"prompt": "The capital of France is ", "answer": "Paris"}, "whitespace", "prompt"),
    ({"prompt": "", "answer": "Paris"}, "empty", "prompt"),
    ({"prompt": "The capital of France is", "answer": "   "}, "empty", "answer"),
    ({"prompt": "The capital of France is", "answer": "Paris."}, "answer_format", "answer"),
    ({"answer": "Paris"}, "missing_field", "prompt"),
    ({"prompt": "The capital of France is", "answer": 7}, "missing_field", "answer"),
    ({"prompt": " ".join(["very"] * 31) + " long prompt is", "answer": "x"}, "prompt_too_long", "prompt"),
    ({"prompt": "The capital of France is", "answer": "Paris", "paraphrases": ["What is France's capital?"]},
     "question_format", "paraphrases[0]"),
    ({"prompt": "The capital of France is", "answer": "Paris", "paraphrases": ["The capital of France is"]},
     "duplicate", "paraphrases[0]"),
])
def test_validator_names_the_broken_rule_and_field(record, rule, field):
    violations = validate_prompt(record)
    assert any(v.rule == rule and v.field == field for v in violations), violations
    assert rule in RULES
    assert all(v.message for v in violations)


def test_validator_reports_every_broken_rule():
    violations = validate_prompt({"prompt": "Is the capital of France Paris?", "answer": "the Paris one yes"})
    assert {"question_format", "yes_no", "leading_article", "answer_too_long"} <= {
        v.rule for v in violations}


def test_normalize_text_is_the_dedup_key():
    assert normalize_text("The Capital  of France is.") == normalize_text("the capital of france is")
    assert normalize_text("Parkinson\u2019s disease") == normalize_text("Parkinson's disease")


# --- bank -----------------------------------------------------------------------------------------

def test_bank_is_large_valid_and_unique():
    bank = load_bank()
    assert len(bank) >= 300
    bad = {r.prompt: [str(v) for v in validate_prompt(r)] for r in bank if validate_prompt(r)}
    assert bad == {}
    assert all(r.source == "bank" for r in bank)
    keys = [normalize_text(p) for r in bank for p in (r.prompt, *r.paraphrases)]
    assert len(keys) == len(set(keys)), "a prompt or paraphrase appears twice in the bank"
    assert sum(len(r.paraphrases) >= 2 for r in bank) >= 60
    assert len(bank_categories()) >= 8


def test_bank_contains_the_seed_examples_with_paraphrases():
    by_prompt = {r.prompt: r for r in load_bank()}
    for prompt, answer in REQUIRED.items():
        assert by_prompt[prompt].answer == answer
        assert len(by_prompt[prompt].paraphrases) >= 2


def test_sample_bank_is_seeded_and_never_repeats():
    first = sample_bank(120, seed=3)
    assert [r.prompt for r in first] == [r.prompt for r in sample_bank(120, seed=3)]
    assert [r.prompt for r in first] != [r.prompt for r in sample_bank(120, seed=4)]
    assert len({r.prompt for r in first}) == 120
    everything = sample_bank(None, seed=0)
    assert sorted(r.prompt for r in everything) == sorted(r.prompt for r in load_bank())


def test_sample_bank_categories_and_limits():
    pharma = sample_bank(10, seed=0, categories=["pharmacology"])
    assert {r.category for r in pharma} == {"pharmacology"}
    size = len(load_bank())
    with pytest.raises(ConceptfixError) as info:
        sample_bank(size + 1)
    assert info.value.field == "--n" and str(size) in str(info.value)
    with pytest.raises(ConceptfixError) as info:
        sample_bank(5, categories=["astrology"])
    assert info.value.field == "--category" and "pharmacology" in info.value.hint


def test_generate_from_bank_batches_do_not_overlap():
    result = generate_prompts(BankProvider(), n=25, batches=4, seed=0)
    assert len(result.accepted) == 100 and result.rejected == [] and result.batches == 4
    assert len({r.prompt for r in result.accepted}) == 100
    again = generate_prompts(BankProvider(), n=25, batches=4, seed=0)
    assert [r.prompt for r in again.accepted] == [r.prompt for r in result.accepted]
    whole = generate_prompts(BankProvider(), n=None, batches=1, seed=0)
    assert len(whole.accepted) == len(load_bank())


# --- the LLM provider over a local OpenAI-compatible server ---------------------------------------

def llm_answer(records) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "local",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": json.dumps({"prompts": records})}}]}


BATCH_1 = [
    {"prompt": "The neurotransmitter associated with reward is", "answer": "dopamine", "category": "Neuroscience",
     "aliases": [], "paraphrases": ["The brain's main reward neurotransmitter is", "Reward signalling relies on"]},
    {"prompt": "What causes diabetes?", "answer": "insulin", "category": "endocrinology", "aliases": [],
     "paraphrases": []},
    {"prompt": "The hormone that lowers blood sugar is ", "answer": " insulin", "category": "endocrinology",
     "aliases": [], "paraphrases": []},  # stray whitespace is tidied, not rejected
]
BATCH_2 = [
    {"prompt": "the neurotransmitter associated with  reward is", "answer": "dopamine", "category": "neuroscience",
     "aliases": [], "paraphrases": []},  # a repeat of batch 1 after normalisation
    {"prompt": "A common side effect of opioid analgesics is", "answer": "the constipation", "category": "pharma",
     "aliases": [], "paraphrases": []},
    {"prompt": "The antidote for opioid overdose is", "answer": "naloxone", "category": "pharmacology",
     "aliases": ["Narcan"], "paraphrases": []},
    {"answer": "aldosterone", "category": "endocrinology"},  # no prompt at all
]


def test_openai_provider_validates_and_deduplicates_across_batches(httpserver):
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(llm_answer(BATCH_1))
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(
        {"error": {"message": "busy"}}, status=429)
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(llm_answer(BATCH_2))
    client = LLMClient(model="local", base_url=httpserver.url_for("/v1"), api_key_env=KEY_ENV, backoff_base=0.001)
    result = generate_prompts(OpenAIProvider(client), n=4, batches=2, seed=7)

    assert [r.prompt for r in result.accepted] == [
        "The neurotransmitter associated with reward is", "The hormone that lowers blood sugar is",
        "The antidote for opioid overdose is"]
    assert result.accepted[0].category == "neuroscience" and result.accepted[0].source == "openai:local"
    assert result.accepted[1].answer == "insulin"
    rejected = {(r.batch, r.rules[0]) for r in result.rejected}
    assert rejected == {(0, "question_format"), (1, "duplicate"), (1, "leading_article"), (1, "missing_field")}
    assert result.rejected_by_rule()["duplicate"] == 1

    first, second = (req.get_json() for req, _ in (httpserver.log[0], httpserver.log[2]))
    assert first["response_format"]["type"] == "json_schema" and first["seed"] == 7
    assert "Write 4 new medical completion prompts" in first["messages"][1]["content"]
    # The second batch is told what already exists, so the model writes new prompts.
    assert "- The neurotransmitter associated with reward is" in second["messages"][1]["content"]
    assert client.usage.retries == 1


def test_openai_provider_reports_an_answer_without_a_prompt_list(httpserver):
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(
        {"id": "x", "object": "chat.completion", "created": 0, "model": "local",
         "choices": [{"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": '{"answer": 3}'}}]})
    client = LLMClient(model="local", base_url=httpserver.url_for("/v1"), api_key_env=KEY_ENV, backoff_base=0.001)
    with pytest.raises(ConceptfixError) as info:
        generate_prompts(OpenAIProvider(client), n=2, batches=1)
    assert info.value.field == "prompts"


# --- CLI ------------------------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args):
    import conceptfix.commands  # noqa: F401  registers the stage commands

    return runner.invoke(app, ["generate", *args])


def one_line_error(res, field: str) -> str:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def test_cli_bank_writes_the_seed_format_and_siblings(tmp_path):
    out = tmp_path / "data" / "medical_prompts.json"
    res = invoke("--n", "10", "--batches", "3", "--seed", "1", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "accepted" in res.stdout and "30" in res.stdout
    records = json.loads(out.read_text())
    assert isinstance(records, list) and len(records) == 30
    assert {"prompt", "answer", "category", "source"} <= set(records[0])
    assert len(load_prompt_records(out)) == 30  # stage 2 reads it back
    meta = json.loads((tmp_path / "data" / "medical_prompts.meta.json").read_text())
    assert meta["stage"] == "generate" and meta["config"]["seed"] == 1 and meta["summary"]["accepted"] == 30
    assert json.loads((tmp_path / "data" / "medical_prompts.rejected.json").read_text()) == []
    assert not list(out.parent.glob(".*.tmp"))

    same = invoke("--n", "10", "--batches", "3", "--seed", "1", "-o", str(out))
    assert same.exit_code == 0, same.output
    different = invoke("--n", "10", "--batches", "3", "--seed", "2", "-o", str(out))
    one_line_error(different, "output")
    assert json.loads(out.read_text()) == records  # untouched
    forced = invoke("--n", "10", "--batches", "3", "--seed", "2", "-o", str(out), "--overwrite")
    assert forced.exit_code == 0 and json.loads(out.read_text()) != records


def test_cli_all_and_category(tmp_path):
    out = tmp_path / "all.json"
    assert invoke("--all", "-o", str(out)).exit_code == 0
    assert len(json.loads(out.read_text())) == len(load_bank())
    geo = tmp_path / "geo.json"
    assert invoke("--n", "5", "--batches", "1", "--category", "geography", "-o", str(geo)).exit_code == 0
    assert {r["category"] for r in json.loads(geo.read_text())} == {"geography"}


@pytest.mark.parametrize("args, field", [
    (["--n", "1000"], "--n"),
    (["--n", "0"], "--n"),
    (["--batches", "0"], "--batches"),
    (["--category", "astrology"], "--category"),
    (["--provider", "gpt"], "--provider"),
    (["--provider", "openai", "--all"], "--all"),
])
def test_cli_bad_options_are_one_line(tmp_path, args, field):
    out = tmp_path / "p.json"
    one_line_error(invoke(*args, "-o", str(out)), field)
    assert not out.exists()


def test_cli_openai_without_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    line = one_line_error(invoke("--provider", "openai", "--api-key-env", KEY_ENV, "-o", str(tmp_path / "p.json")),
                          KEY_ENV)
    assert f"export {KEY_ENV}" in line


def test_cli_openai_against_local_server(tmp_path, httpserver, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-must-not-leak")
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(llm_answer(BATCH_1))
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(llm_answer(BATCH_2))
    out = tmp_path / "llm.json"
    res = invoke("--provider", "openai", "--base-url", httpserver.url_for("/v1"), "--api-key-env", KEY_ENV,
                 "--llm-model", "local", "--n", "4", "--batches", "2", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "duplicate" in res.stdout and "question_format" in res.stdout
    assert len(json.loads(out.read_text())) == 3
    rejected = json.loads((tmp_path / "llm.rejected.json").read_text())
    assert {r["rules"][0] for r in rejected} == {"question_format", "duplicate", "leading_article", "missing_field"}
    assert all(r["violations"][0]["message"] for r in rejected)
    for path in tmp_path.iterdir():
        assert "sk-must-not-leak" not in path.read_text()
    meta = json.loads((tmp_path / "llm.meta.json").read_text())
    assert meta["provider"]["model"] == "local" and meta["provider"]["usage"]["requests"] == 2
    # A different LLM result is never written over an existing file without --overwrite.
    again = invoke("--provider", "openai", "--base-url", httpserver.url_for("/v1"), "--api-key-env", KEY_ENV,
                   "-o", str(out))
    one_line_error(again, "--output")
    assert len(httpserver.log) == 2  # refused before spending a request


def test_cli_openai_malformed_answers_are_one_line(tmp_path, httpserver):
    for _ in range(3):
        httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(
            {"id": "x", "object": "chat.completion", "created": 0, "model": "local",
             "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "{\"prompts\": [ oops"}}]})
    out = tmp_path / "p.json"
    line = one_line_error(invoke("--provider", "openai", "--base-url", httpserver.url_for("/v1"), "--api-key-env",
                                 KEY_ENV, "--llm-model", "local", "-o", str(out)), "--llm-model")
    assert "malformed JSON" in line
    assert not out.exists()


# --- file provider: a user's own list, same rules --------------------------------------------------

@pytest.mark.parametrize("content, field", [
    ('[{"prompt": "The capital of France is",', "--input"),  # malformed JSON
    ('{"records": []}', "--input"),
    ("[]", "--input"),
])
def test_cli_file_provider_bad_file_is_one_line(tmp_path, content, field):
    src = tmp_path / "mine.json"
    src.write_text(content)
    out = tmp_path / "p.json"
    one_line_error(invoke("--provider", "file", "--input", str(src), "--all", "-o", str(out)), field)
    assert not out.exists()


def test_cli_file_provider_reports_broken_records_with_field(tmp_path):
    src = tmp_path / "mine.json"
    src.write_text(json.dumps([
        {"prompt": "The capital of France is", "answer": "Paris", "category": "geography"},
        {"prompt": "The capital of Japan is"},
        {"prompt": "   ", "answer": "Tokyo"},
        {"prompt": "What is the capital of Italy?", "answer": "Rome"},
    ]))
    out = tmp_path / "p.json"
    res = invoke("--provider", "file", "--input", str(src), "--all", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert [r["prompt"] for r in json.loads(out.read_text())] == ["The capital of France is"]
    rejected = json.loads((tmp_path / "p.rejected.json").read_text())
    assert [(r["violations"][0]["rule"], r["violations"][0]["field"]) for r in rejected] == [
        ("missing_field", "answer"), ("empty", "prompt"), ("question_format", "prompt")]
    one_line_error(invoke("--provider", "file", "--input", str(src), "--n", "5", "--batches", "1",
                          "-o", str(tmp_path / "q.json")), "--n")
    one_line_error(invoke("--input", str(src), "-o", str(tmp_path / "r.json")), "--input")
    geo = tmp_path / "geo.json"
    assert invoke("--provider", "file", "-i", str(src), "--all", "--category", "geography", "-o", str(geo)).exit_code == 0
    assert len(json.loads(geo.read_text())) == 1
    one_line_error(invoke("--provider", "file", "-i", str(src), "--all", "--category", "pharmacology",
                          "-o", str(tmp_path / "s.json")), "--category")
