"""Stage 7 (evaluate) on the embedded model: base vs itself, base vs a copy whose lm_head row for ' al' is
boosted (a 'fix' with a known effect), locality exclusion, outputs and the CLI's bad-input paths."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conceptfix.errors import ConceptfixError
from conceptfix.evaluate import EvalCase, EvaluationSettings, evaluate, kl_divergence, pct
from conceptfix.evaluate.core import answer_candidates
from conceptfix.evaluate.locality import deterministic_order, split_candidates
from conceptfix.evaluate.paraphrases import bank_paraphrases, clean_paraphrases, with_paraphrases
from conceptfix.evaluate.report import render_markdown, write_outputs
from conceptfix.schemas import PromptRecord
from tests.helpers import assert_one_line_error, run_cli

TARGET = "The primary hormone regulating blood pressure is"
PARAPHRASES = ["The main hormone that controls blood pressure is",
               "Blood pressure is mainly regulated by the hormone"]
FACTS = [PromptRecord(prompt=p, answer=a) for p, a in [
    ("The capital of France is", "Paris"),
    ("The capital of Australia is", "Canberra"),       # base says Sydney: not a known fact
    ("The chemical symbol for gold is", "Au"),
    ("The planet closest to the Sun is", "Mercury"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The currency of Japan is the", "yen"),
    ("The author of Romeo and Juliet is William", "Shakespeare"),
    ("The adrenal hormone that makes the kidney keep sodium is", "aldosterone"),  # the target's answer
    ("The organ that excretes potassium into the urine is the", "kidney"),       # overlaps the texts below
]]
TEXTS = ["Aldosterone is a steroid hormone of the adrenal cortex. It acts on the kidney, where it keeps "
         "sodium and excretes potassium."]
SETTINGS = EvaluationSettings(locality_max=20, neutral=False, batch_size=8)


@pytest.fixture(scope="module")
def boosted_dir(tmp_path_factory) -> Path:
    """The embedded model with an untied lm_head whose ' al' row is scaled by 1.3: p(' al') must jump."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from conceptfix.models import resolve_checkpoint

    src = Path(resolve_checkpoint("smollm2-135m"))
    dst = tmp_path_factory.mktemp("boosted")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    state = load_file(str(src / "model.safetensors"))
    al = AutoTokenizer.from_pretrained(str(src)).encode(" al", add_special_tokens=False)[0]
    lm_head = state["model.embed_tokens.weight"].clone()
    lm_head[al] *= 1.3
    state["lm_head.weight"] = lm_head
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def boosted(boosted_dir):
    from conceptfix.models import load_model

    return load_model(str(boosted_dir), device="cpu", dtype="float32")


def aldosterone_case(**kw) -> EvalCase:
    return EvalCase(**{"prompt": TARGET, "correct": "aldosterone", "wrong": "renin", "paraphrases": PARAPHRASES,
                       "paraphrase_source": "test", **kw})


@pytest.fixture(scope="module")
def boosted_result(embedded, boosted):
    return evaluate(embedded, boosted, [aldosterone_case(name="Aldosterone")], locality_records=FACTS,
                    locality_source="test", training_texts=TEXTS, settings=SETTINGS, method="boost ' al'")


# ------------------------------------------------------------------------------------------- numbers

def test_identical_models_change_nothing(embedded):
    result = evaluate(embedded, embedded, [aldosterone_case()], locality_records=FACTS, locality_source="test",
                      training_texts=TEXTS, settings=SETTINGS)
    case = result.cases[0]
    t = case.target
    # The embedded model's known error: ' ren' 0.234 on top, ' al' 0.051 at rank 5.
    assert t.base.top1 == " ren" and t.wrong_token == " ren" and t.correct_token == " al"
    assert t.base.wrong_prob == pytest.approx(0.234, abs=0.01) and t.base.correct_rank == 5
    assert case.seed_row.base == f"{pct(t.base.wrong_prob)}→{pct(t.base.correct_prob)}" == "23%→5.1%"
    assert case.seed_row.sft == case.seed_row.base
    assert not case.success_before and not case.success_after and case.verdict.startswith("not fixed")
    assert all(c.kl < 1e-6 for c in [t, *case.paraphrases])
    loc = result.locality
    assert loc.facts and loc.accuracy_after == 1.0 and loc.n_flipped == 0
    assert loc.mean_kl_facts < 1e-6
    assert {f.prompt for f in loc.facts} >= {"The capital of France is", "The chemical symbol for gold is"}
    assert "The capital of Australia is" not in {f.prompt for f in loc.facts}  # base top-1 is ' Sydney'


def test_boosted_answer_row_fixes_the_target(boosted_result):
    case = boosted_result.cases[0]
    t = case.target
    assert t.tuned.correct_prob > t.base.correct_prob + 0.3
    assert t.tuned.wrong_prob < t.base.wrong_prob
    assert case.success_after and not case.success_before and case.verdict.startswith("fixed")
    assert t.tuned.top1 == " al" and t.tuned.correct_rank == 1 and t.kl > 0.1
    assert re.fullmatch(r"\d+(\.\d)?%→\d+(\.\d)?%", case.seed_row.sft)
    # The bar chart's data holds exact probabilities of both answers under both models.
    al = next(s for s in t.shift if s.token == " al")
    assert al.base_prob == pytest.approx(t.base.correct_prob) and al.tuned_prob == pytest.approx(t.tuned.correct_prob)
    loc = boosted_result.locality  # boosting one output row barely touches unrelated facts
    assert loc.accuracy_after == 1.0 and 0 < loc.mean_kl_facts < 0.1
    g = case.generalisation
    assert g.n == 2 and g.n_correct_up == 2 and g.mean_delta_correct > 0
    assert g.success_after >= g.success_before


def test_kl_divergence_is_zero_for_equal_and_positive_otherwise():
    logp = torch.log_softmax(torch.randn(3, 50), dim=-1)
    assert torch.all(kl_divergence(logp, logp) == 0)
    other = torch.log_softmax(torch.randn(3, 50), dim=-1)
    assert torch.all(kl_divergence(logp, other) > 0)
    with pytest.raises(ConceptfixError, match="vocabularies differ"):
        kl_divergence(logp, other[:, :40])


def test_answer_tokens(embedded_tokenizer):
    tok = embedded_tokenizer
    ids = answer_candidates(tok, "aldosterone", field="correct")
    assert {tok.decode([i]) for i in ids} == {" al", " Ald"}
    assert [tok.decode([i]) for i in answer_candidates(tok, " Ald", field="correct")] == [" Ald"]
    with pytest.raises(ConceptfixError) as exc:
        answer_candidates(tok, " aldosterone", field="correct")
    assert exc.value.field == "correct"


def test_pct_format():
    assert [pct(p) for p in (0.35, 0.11, 0.051, 0.004, 0.0004, 1.0)] == ["35%", "11%", "5.1%", "0.4%", "<0.1%", "100%"]


# ------------------------------------------------------------------------------------------ locality

def test_locality_excludes_target_and_training_overlap():
    case = aldosterone_case()
    kept, n_target, overlaps = split_candidates(FACTS, training_texts=TEXTS, exclude_cases=[case])
    prompts = {r.prompt for r in kept}
    assert n_target == 1  # the aldosterone fact: same answer as the target
    assert "The organ that excretes potassium into the urine is the" not in prompts
    assert {o.prompt for o in overlaps} == {"The organ that excretes potassium into the urine is the"}
    assert set(overlaps[0].terms) >= {"kidney", "potassium"}
    assert "The capital of France is" in prompts
    # Without training texts nothing is excluded for overlap; the order is a seeded shuffle, stable.
    kept_all, _, none = split_candidates(FACTS, training_texts=None, exclude_cases=[case])
    assert not none and len(kept_all) == len(FACTS) - 1
    assert deterministic_order(kept_all, 0) == deterministic_order(list(reversed(kept_all)), 0)
    assert deterministic_order(kept_all, 0) != deterministic_order(kept_all, 1)


def test_locality_cap_and_neutral(embedded, boosted):
    from conceptfix.evaluate.locality import evaluate_locality

    settings = EvaluationSettings(locality_max=2, batch_size=4)
    loc = evaluate_locality(embedded, boosted, FACTS, source="test", training_texts=TEXTS,
                            exclude_cases=[aldosterone_case()], settings=settings,
                            neutral_prompts=["Once upon a time, there was a", "The weather today is"])
    assert len(loc.facts) == 2 and loc.n_scanned <= len(FACTS)
    assert len(loc.neutral) == 2 and loc.mean_kl_neutral > 0 and loc.max_kl >= loc.mean_kl_facts
    assert loc.n_excluded_overlap == 1 and loc.training_texts_known


# --------------------------------------------------------------------------------------- paraphrases

def test_paraphrase_sources():
    case = EvalCase(prompt=TARGET, correct="aldosterone", wrong="renin")
    cleaned = clean_paraphrases(case, ["The main hormone for blood pressure is", "Is aldosterone the hormone?",
                                       "Renin is the hormone that", TARGET, "  ", "The main hormone for blood pressure is"])
    assert cleaned == ["The main hormone for blood pressure is"]
    bank = [PromptRecord(prompt=TARGET, answer="aldosterone", paraphrases=["Blood pressure is set by the hormone"])]
    assert bank_paraphrases(case, bank) == ["Blood pressure is set by the hormone"]
    assert with_paraphrases(case, bank=bank).paraphrase_source == "bank"

    class FakeClient:
        def complete_json(self, system, user, schema=None, **kw):
            assert "aldosterone" in user and schema["required"] == ["paraphrases"]
            return {"paraphrases": ["Blood pressure is chiefly controlled by the hormone", "Aldosterone is"]}

    from_llm = with_paraphrases(case, bank=[], client=FakeClient(), n_llm=3)
    assert from_llm.paraphrase_source == "llm"
    assert from_llm.paraphrases == ["Blood pressure is chiefly controlled by the hormone"]
    explicit = aldosterone_case()
    assert with_paraphrases(explicit, bank=bank, client=FakeClient()) is explicit


# ------------------------------------------------------------------------------------------- outputs

def test_outputs_markdown_plot_and_overwrite(boosted_result, tmp_path):
    result = boosted_result
    paths = write_outputs(result, tmp_path)
    md = (tmp_path / "evaluation.md").read_text()
    row = result.cases[0].seed_row
    assert "| Experiment | Base Wrong→Correct | SFT Wrong→Correct | Method |" in md
    assert f"| Aldosterone | 23%→5.1% | {row.sft} | boost ' al' |" in md
    assert "### Generalisation: 2 paraphrases" in md and "## Locality" in md
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert data["cases"][0]["success_after"] is True and data["locality"]["facts"]
    write_outputs(result, tmp_path)  # identical: fine
    changed = result.model_copy(update={"tuned_model": "other"})
    with pytest.raises(ConceptfixError, match="different result"):
        write_outputs(changed, tmp_path)
    write_outputs(changed, tmp_path, overwrite=True)
    assert "`other`" in render_markdown(changed)


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_bad_input(tmp_path, boosted_dir):
    assert_one_line_error(run_cli(["evaluate", "--base", "smollm2-135m", "--tuned", str(tmp_path / "missing"),
                          "--prompt", TARGET, "--correct", "aldosterone", "--wrong", "renin",
                          "--output", str(tmp_path / "o")]), "--tuned")
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name: smollm2-135m\noutput_dir: {boosted_dir}\ntexts: ['Aldosterone is a hormone.']\n")
    assert_one_line_error(run_cli(["evaluate", "--config", str(config), "--output", str(tmp_path / "o")]), "target")
    assert_one_line_error(run_cli(["evaluate", "--base", "smollm2-135m", "--tuned", str(boosted_dir), "--prompt", TARGET,
                          "--correct", "aldosterone", "--output", str(tmp_path / "o")]), "--wrong")
    assert_one_line_error(run_cli(["evaluate", "--base", "smollm2-135m", "--tuned", str(boosted_dir), "--prompt", TARGET,
                          "--correct", " aldosterone", "--wrong", "renin", "--device", "cpu", "--dtype", "float32",
                          "--output", str(tmp_path / "o")]), "correct")
    assert_one_line_error(run_cli(["evaluate", "--tuned", str(boosted_dir), "--case", str(tmp_path / "none.json#0"),
                          "--base", "smollm2-135m", "--output", str(tmp_path / "o")]), "--case")
    # questions are not completion prompts: from the command line or from the config's target block
    assert_one_line_error(run_cli(["evaluate", "--base", "smollm2-135m", "--tuned", str(boosted_dir), "--prompt",
                          "Which hormone regulates blood pressure?", "--correct", "aldosterone", "--wrong", "renin",
                          "--output", str(tmp_path / "o")]), "--prompt", "ends with '?'")
    config.write_text(f"model_name: smollm2-135m\noutput_dir: {boosted_dir}\ntexts: ['Aldosterone is a hormone.']\n"
                      f"target: {{prompt: '{TARGET}', correct: aldosterone, wrong: renin,\n"
                      f"  paraphrases: ['Is aldosterone the hormone that regulates blood pressure']}}\n")
    assert_one_line_error(run_cli(["evaluate", "--config", str(config), "--output", str(tmp_path / "o")]),
                          "target.paraphrases[0]", "yes/no")
    assert not (tmp_path / "o").exists()


def test_cli_config_run_then_cached(tmp_path, boosted_dir, embedded):
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model_name: smollm2-135m\ndevice: cpu\ndtype: float32\noutput_dir: {boosted_dir}\n"
        f"use_chat_template: false\ntexts: {json.dumps(TEXTS)}\n"
        f"target:\n  prompt: {TARGET}\n  correct: aldosterone\n  wrong: renin\n  paraphrases: {json.dumps(PARAPHRASES)}\n")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([r.model_dump() for r in FACTS]))
    out = tmp_path / "eval"
    args = ["evaluate", "--config", str(config), "--output", str(out), "--locality-file", str(facts), "--no-neutral"]
    first = run_cli(args)
    assert first.exit_code == 0, first.output
    assert "23%→5.1%" in first.output and "fixed" in first.output and "locality:" in first.output
    data = json.loads((out / "evaluation.json").read_text())
    assert data["profile"]["use_chat_template"] is False and "config" in data["profile_source"]
    assert data["locality"]["training_texts_known"] and data["locality"]["n_excluded_overlap"] == 1
    assert data["cases"][0]["case"]["paraphrase_source"] == "config"
    assert embedded.profile.system_prompt is None  # the shared session model's profile is left alone
    assert (out / "probability_shift.png").exists()
    second = run_cli(args)
    assert second.exit_code == 0 and "same inputs" in second.output
    third = run_cli([*args, "--top-k", "5"])  # different settings: refuse rather than overwrite
    assert_one_line_error(third, "--output")


def test_several_cases_summary_plot(embedded, boosted, tmp_path):
    cases = [aldosterone_case(paraphrases=[]),
             EvalCase(prompt="The capital of Australia is", correct="Canberra", wrong="Sydney")]
    result = evaluate(embedded, boosted, cases, settings=EvaluationSettings(locality_max=0, neutral=False))
    assert result.summary["n_cases"] == 2 and result.summary["fixed"] == 1  # only ' al' was boosted
    sydney = result.cases[1]
    assert sydney.target.base.top1 == " Sydney" and not sydney.success_after
    assert result.locality.facts == [] and result.locality.accuracy_after is None
    paths = write_outputs(result, tmp_path)
    assert {p.name for p in paths.values()} == {"evaluation.json", "evaluation.md", "probability_shift.png",
                                                "probability_shift_00.png", "probability_shift_01.png"}
    assert "No paraphrases were available" in (tmp_path / "evaluation.md").read_text()
