import json
import os
import stat
import time

import pytest
import torch

import conceptfix.models as models
from conceptfix.artifacts import current_umask
from conceptfix.errors import ConceptfixError
from conceptfix.models import (ModelProfile, convert_gguf, default_profile, format_prompt, is_gguf_marker, load_model,
                               locate_alias_gguf, resolve_checkpoint)
from conceptfix.predict import complete_word, top_k_predictions
from tests.helpers import save_tiny_model


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


# --- GGUF conversion leaves plain fp32 checkpoints (no stale quantization_config) --------------------------

def _is_plain(loaded) -> bool:
    return (getattr(loaded.model.config, "quantization_config", None) is None
            and getattr(loaded.model, "hf_quantizer", None) is None
            and not getattr(loaded.model, "is_quantized", False))


def _gguf_marked_model(tokenizer):
    """A tiny model whose config carries the marker transformers attaches when it loads a GGUF file."""
    from transformers.utils.quantization_config import GgufConfig

    from tests.helpers import tiny_model

    model = tiny_model(vocab_size=len(tokenizer))
    model.config.quantization_config = GgufConfig(gguf_file="tiny.gguf")
    return model


def test_embedded_cache_config_has_no_gguf_marker(embedded):
    cache_dir = convert_gguf(locate_alias_gguf("smollm2-135m"))
    config = json.loads((cache_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert _is_plain(embedded)


def test_convert_gguf_saves_plain_config_with_normal_permissions(tmp_path, monkeypatch, embedded_tokenizer):
    monkeypatch.setenv("CONCEPTFIX_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in: _load_gguf is replaced below")
    monkeypatch.setattr(models, "_load_gguf", lambda path: (_gguf_marked_model(embedded_tokenizer), embedded_tokenizer))
    target = convert_gguf(gguf)
    assert target.parent == tmp_path / "cache" / "models"
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    umask = current_umask()
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    loaded = load_model(str(gguf), device="cpu", reuse=False)
    assert _is_plain(loaded) and loaded.checkpoint == str(target)


def test_stale_cache_with_gguf_marker_is_repaired_and_loads(tmp_path, monkeypatch, embedded_tokenizer):
    """A cache entry written before the fix (marker in config.json, 0700 directory) is fixed on first use."""
    monkeypatch.setenv("CONCEPTFIX_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    target = models._gguf_cache_dir(gguf)
    save_tiny_model(target, embedded_tokenizer)
    config_path = target / "config.json"
    stale = json.loads(config_path.read_text())
    stale["quantization_config"] = {"dequantize": False, "gguf_file": "tiny.gguf", "quant_method": "gguf"}
    config_path.write_text(json.dumps(stale))
    os.chmod(target, 0o700)

    def no_reconversion(path):
        raise AssertionError("a cached entry must not be converted again")

    monkeypatch.setattr(models, "_load_gguf", no_reconversion)
    loaded = load_model(str(gguf), device="cpu", reuse=False)
    assert _is_plain(loaded)
    repaired = json.loads(config_path.read_text())
    assert "quantization_config" not in repaired
    assert repaired == {k: v for k, v in stale.items() if k != "quantization_config"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~current_umask()


def _gguf_marked_checkpoint(directory, tokenizer):
    """A checkpoint directory de-quantised elsewhere with the GGUF marker left in its config.json."""
    directory = save_tiny_model(directory, tokenizer)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    config_path.write_text(json.dumps(config))
    return directory, config_path, config


def test_checkpoint_directory_with_gguf_marker_loads_unquantised(tmp_path, embedded_tokenizer):
    """A directory de-quantised elsewhere with the marker left in: loaded as plain weights, the user's
    files untouched."""
    directory, config_path, config = _gguf_marked_checkpoint(tmp_path / "ckpt", embedded_tokenizer)
    before = config_path.read_bytes()
    loaded = load_model(str(directory), device="cpu", reuse=False)
    assert _is_plain(loaded)
    assert config_path.read_bytes() == before
    assert is_gguf_marker(config["quantization_config"]) and not is_gguf_marker({"quant_method": "bitsandbytes"})


# --- hub ids: the local Hugging Face cache first, a clear error at once when the hub cannot be had ----------

def test_uncached_hub_id_offline_is_an_immediate_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConceptfixError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE") as info:
        load_model("nobody/no-such-model-xyz", device="cpu", reuse=False)
    assert info.value.field == "model" and "hf download nobody/no-such-model-xyz" in info.value.one_line()
    assert time.perf_counter() - start < 5


def test_uncached_hub_id_with_unreachable_hub_fails_at_once(monkeypatch):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ConceptfixError, match="cannot be reached") as info:
        load_model("nobody/no-such-model-xyz", device="cpu", reuse=False)
    assert info.value.field == "model"


def test_cached_hub_id_loads_without_network(tmp_path, tiny_llama_dir):
    """A hub id laid out in a Hugging Face cache (as `hf download` leaves it) loads from there, online or not,
    without one request: the hub endpoint points at a closed local port, so any request would fail."""
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--someorg--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_llama_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--someorg--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny-llama" / "refs" / "main").write_text("0" * 40)
    code = ("from conceptfix.models import load_model; m = load_model('someorg/tiny-llama', device='cpu'); "
            "print(m.num_layers, m.checkpoint)")
    for offline in ("0", "1"):
        env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": offline,
               "HF_ENDPOINT": "http://127.0.0.1:9"}
        # Asking the closed port retries for minutes before falling back to the cache: the timeout catches that.
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Retrying" not in out.stderr and "127.0.0.1:9" not in out.stderr, out.stderr[-2000:]
        assert out.stdout.split() == ["2", "someorg/tiny-llama"], out.stdout


def test_training_loader_strips_the_gguf_marker_too(tmp_path, embedded_tokenizer):
    """`train` loads through its own loader (no device map under accelerate): the marker is dropped there too."""
    from conceptfix.train.config import SFTConfig
    from conceptfix.train.sft import load_trainable_model

    directory, _, _ = _gguf_marked_checkpoint(tmp_path / "ckpt", embedded_tokenizer)
    cfg = SFTConfig(model_name=str(directory), device="cpu", dtype="float32", output_dir=str(tmp_path / "o"),
                    texts=["Aldosterone is a hormone."])
    model, *_ = load_trainable_model(cfg, "cpu")
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
