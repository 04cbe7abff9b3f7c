import time

import pytest
import torch

from conceptfix.errors import ConceptfixError
from conceptfix.models import (ModelProfile, convert_gguf, default_profile, format_prompt, load_model,
                               locate_alias_gguf, resolve_checkpoint)
from conceptfix.predict import complete_word, top_k_predictions


def test_alias_converts_once_and_reloads_fast(embedded):
    cache_dir = convert_gguf(locate_alias_gguf("smollm2-135m"))
    assert (cache_dir / "model.safetensors").exists()
    assert (cache_dir / "config.json").exists()
    start = time.perf_counter()
    reloaded = load_model("smollm2-135m", device="cpu", reuse=False)
    assert time.perf_counter() - start < 5.0
    # Tied embeddings survive the round trip through safetensors.
    assert reloaded.model.lm_head.weight.data_ptr() == reloaded.model.model.embed_tokens.weight.data_ptr()
    assert reloaded.model.model.embed_tokens.weight.dtype == torch.float32


def test_seed_phenomenon_in_raw_completion_mode(embedded):
    top = top_k_predictions(embedded, ["The primary hormone regulating blood pressure is"], k=10)[0]
    tokens = [t.token for t in top]
    assert tokens[0] == " ren"
    assert " al" in tokens[1:5]


def test_batched_left_padding_matches_single(embedded):
    prompts = ["The capital of France is", "The primary hormone regulating blood pressure is", "Insulin is made in the"]
    batched = top_k_predictions(embedded, prompts, k=3, batch_size=3)
    single = [top_k_predictions(embedded, [p], k=3, batch_size=1)[0] for p in prompts]
    for b, s in zip(batched, single):
        assert [t.token_id for t in b] == [t.token_id for t in s]
        for tb, ts in zip(b, s):
            assert tb.prob == pytest.approx(ts.prob, abs=1e-4)


def test_complete_word(embedded):
    top = top_k_predictions(embedded, ["The primary hormone regulating blood pressure is"], k=1)[0][0]
    assert complete_word(embedded, "The primary hormone regulating blood pressure is", top.token_id) == "renin"


def test_profiles(embedded):
    assert default_profile("smollm2-135m").use_chat_template is False
    llama = default_profile("meta-llama/Llama-3.1-8B-Instruct")
    assert llama.use_chat_template and llama.answer_prefix == " Answer:" and llama.system_prompt == ""
    chat = ModelProfile(use_chat_template=True, system_prompt="", answer_prefix=" Answer:")
    text = format_prompt(embedded.tokenizer, chat, "The capital of France is")
    assert text.endswith("<|im_start|>assistant\n Answer:")
    assert "The capital of France is" in text
    assert default_profile("smollm2-135m").merged(answer_prefix=" A:").answer_prefix == " A:"


def test_local_directory_and_unknown_models(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), device="cpu", reuse=False)
    assert loaded.num_layers == 2
    with pytest.raises(ConceptfixError, match="unknown model"):
        resolve_checkpoint("definitely not a model")
    with pytest.raises(ConceptfixError, match="GGUF file not found"):
        resolve_checkpoint("/nonexistent/model.gguf")
    with pytest.raises(ConceptfixError) as info:
        load_model("nobody/no-such-model-xyz", device="cpu")
    assert info.value.field == "model"


def test_cli_predict_json_and_bad_model(embedded):
    import json

    from typer.testing import CliRunner

    from conceptfix.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["predict", "The capital of France is", "--top-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["top_k"][0]["token"] == " Paris"
    bad = runner.invoke(app, ["predict", "x", "--model", "no such model"])
    assert bad.exit_code == 2
    assert "model:" in bad.output and "Traceback" not in bad.output
