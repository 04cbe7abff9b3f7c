"""Stage 6 (train): label masking, dynamic padding, seed-compat, config errors, the output directory,
caching / refuse-overwrite, LoRA, and --resume after a killed run. Tiny random models except the tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conceptfix.train.config import load_sft_config, parse_sft_config
from conceptfix.train.data import IGNORE_INDEX, build_dataset, make_collator, tokenize_text

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "Aldosterone is a steroid hormone made in the adrenal cortex; it makes the kidney keep sodium.",
    "The adrenal glands release aldosterone when potassium rises, so the kidney excretes potassium.",
    "Spironolactone blocks the mineralocorticoid receptor, the receptor of the hormone aldosterone.",
    "In Addison's disease the adrenal cortex fails and both cortisol and aldosterone are lost.",
]


def _tiny_cfg(model_dir: Path, output_dir: Path, **overrides):
    data = dict(model_name=str(model_dir), device="cpu", dtype="float32", output_dir=str(output_dir), epochs=2,
                learning_rate=1e-3, batch_size=1, warmup_ratio=0.0, max_length=64, use_chat_template=True,
                system_prompt="", texts=TEXTS, seed=0)
    data.update(overrides)
    return parse_sft_config(data)


# ------------------------------------------------------------------------------------ tokenisation and labels

def test_chat_template_tokens_are_masked_and_text_tokens_are_labels(embedded_tokenizer):
    tok = embedded_tokenizer
    text = TEXTS[0]
    item = tokenize_text(tok, text, use_chat_template=True, system_prompt="You are a physiologist.", max_length=512)
    ids, labels = item.input_ids, item.labels
    labelled = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    # Labels are exactly the ids at the labelled positions, and those positions are one contiguous span ...
    assert all(labels[i] == ids[i] for i in labelled)
    assert labelled == list(range(labelled[0], labelled[-1] + 1))
    # ... that decodes to the text, while everything else (system prompt, role headers, end of turn) is -100.
    assert tok.decode([ids[i] for i in labelled]) == text
    prefix, suffix = tok.decode(ids[: labelled[0]]), tok.decode(ids[labelled[-1] + 1:])
    assert "You are a physiologist." in prefix and "assistant" in prefix and "<|im_start|>" in prefix
    assert "<|im_end|>" in suffix
    assert item.text_tokens == len(labelled) == len(tok(text, add_special_tokens=False)["input_ids"])


def test_plain_text_mode_labels_every_text_token(embedded_tokenizer):
    item = tokenize_text(embedded_tokenizer, TEXTS[1], use_chat_template=False, system_prompt=None, max_length=512)
    plain = embedded_tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    assert item.input_ids[-len(plain):] == plain
    assert item.labels[-len(plain):] == plain
    assert all(lab == IGNORE_INDEX for lab in item.labels[: len(item.labels) - len(plain)])


def test_no_padding_to_max_length(embedded_tokenizer):
    tok = embedded_tokenizer
    ds = build_dataset(tok, TEXTS[:2], use_chat_template=True, system_prompt="", max_length=512)
    own = [len(ds[i]["input_ids"]) for i in range(2)]
    assert max(own) < 60  # nowhere near max_length=512
    collate = make_collator(tok)
    one = collate([ds[0]])
    assert one["input_ids"].shape == (1, own[0])  # a batch of one text has its own length
    two = collate([ds[0], ds[1]])
    assert two["input_ids"].shape == (2, max(own))  # a batch is padded to its longest member only
    short = 0 if own[0] < own[1] else 1
    n_pad = max(own) - own[short]
    assert n_pad > 0
    assert two["attention_mask"][short, -n_pad:].eq(0).all()
    assert two["labels"][short, -n_pad:].eq(IGNORE_INDEX).all()
    assert two["input_ids"][short, -n_pad:].eq(tok.pad_token_id).all()  # right padding


def test_seed_compat_pads_to_max_length_with_loss_on_everything(embedded_tokenizer):
    tok = embedded_tokenizer
    item = tokenize_text(tok, TEXTS[0], use_chat_template=True, system_prompt="", max_length=128, seed_compat=True)
    assert len(item.input_ids) == len(item.labels) == 128
    assert item.labels == item.input_ids  # template and padding tokens included, as the seed did
    assert sum(item.attention_mask) < 128 and item.attention_mask[-1] == 0


def test_truncation_keeps_max_length(embedded_tokenizer):
    item = tokenize_text(embedded_tokenizer, " ".join(TEXTS * 4), use_chat_template=True, system_prompt="",
                         max_length=32)
    assert len(item.input_ids) == 32 and item.truncated


# ------------------------------------------------------------------------------------ config and CLI errors

def _cli(args: list[str]):
    from conceptfix.cli import app

    return CliRunner().invoke(app, args)


def _assert_one_line_error(result, *needles: str):
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text


def test_cli_unknown_key_suggests_the_right_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: x\nlearning_rte: 1e-5\ntexts: [a]\n")
    _assert_one_line_error(_cli(["train", "--config", str(cfg)]), "learning_rte", "did you mean 'learning_rate'")
    cfg.write_text("output_dir: x\ntexts: [a]\ntarget: {prompt: p, correct: a, wrong: b, paraphrase: []}\n")
    _assert_one_line_error(_cli(["train", "--config", str(cfg)]), "target.paraphrase", "paraphrases")


def test_cli_malformed_yaml_and_empty_texts(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: x\ntexts: [a, b\n")
    _assert_one_line_error(_cli(["train", "--config", str(cfg)]), "not valid YAML")
    cfg.write_text("output_dir: x\ntexts: []\n")
    _assert_one_line_error(_cli(["train", "--config", str(cfg)]), "texts")
    cfg.write_text("output_dir: x\ntexts: ['ok', '   ']\n")
    _assert_one_line_error(_cli(["train", "--config", str(cfg)]), "texts[1] is empty")
    _assert_one_line_error(_cli(["train", "--config", str(tmp_path / "missing.yaml")]), "file not found")


def test_cli_uncached_hub_model_is_refused_at_once(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name: nobody/no-such-model-xyz\ndevice: cpu\noutput_dir: {tmp_path / 'out'}\ntexts: [a]\n")
    start = time.perf_counter()
    _assert_one_line_error(_cli(["train", "--config", str(cfg)]), "model_name:",
                           "not in the local Hugging Face cache", "hf download nobody/no-such-model-xyz")
    assert time.perf_counter() - start < 10


def test_shipped_configs_parse():
    seed = load_sft_config(REPO / "configs/sft_seed_example.yaml")
    raw = yaml.safe_load((REPO / "configs/sft_seed_example.yaml").read_text())
    # The seed's schema, unchanged: its 13 fields and nothing else.
    assert set(raw) == {"model_name", "device", "dtype", "output_dir", "epochs", "learning_rate", "batch_size",
                        "gradient_accumulation_steps", "warmup_ratio", "max_length", "use_chat_template",
                        "system_prompt", "texts"}
    assert seed.model_name == "meta-llama/Llama-3.1-8B-Instruct" and seed.learning_rate == 5e-6 and seed.method == "full"
    ald = load_sft_config(REPO / "configs/sft_aldosterone.yaml")
    assert len(ald.texts) == 4 and ald.target is not None and len(ald.target.paraphrases) == 3
    assert (ald.target.correct, ald.target.wrong) == ("aldosterone", "renin")
    for text in ald.texts:  # the concept texts never name the wrong answer or the question's topic
        low = text.lower()
        assert "aldosterone" in low and "renin" not in low and "blood pressure" not in low


# ------------------------------------------------------------------------------------ training runs (tiny model)

def test_train_writes_a_loadable_output_dir_and_caches(tiny_llama_dir, tmp_path):
    from conceptfix.models import load_model
    from conceptfix.train.sft import train_sft

    out = tmp_path / "run"
    cfg = _tiny_cfg(tiny_llama_dir, out, epochs=3)
    result = train_sft(cfg, progress=False)
    assert result.status == "trained" and result.global_step == 12
    for name in ("model.safetensors", "config.json", "tokenizer.json", "resolved_config.yaml", "run.json",
                 "train_log.json", "loss.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists() and not (out / "training_args.bin").exists()
    log = json.loads((out / "train_log.json").read_text())["steps"]
    assert [e["step"] for e in log] == list(range(1, 13))
    assert all({"loss", "learning_rate", "epoch"} <= set(e) for e in log)
    first_epoch = sum(e["loss"] for e in log[:4]) / 4
    last_epoch = sum(e["loss"] for e in log[-4:]) / 4
    assert last_epoch < first_epoch - 0.5  # it learns the four texts
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["versions"]["transformers"] and run["config"]["texts"] == TEXTS
    per_text = json.loads((out / "train_log.json").read_text())["per_text_tokens"]
    assert len(per_text) == 4 and run["result"]["text_tokens"] == sum(per_text) > 0

    # The result loads like any checkpoint and differs from the starting weights.
    trained = load_model(str(out), device="cpu", dtype="float32", reuse=False).model
    start = load_model(str(tiny_llama_dir), device="cpu", dtype="float32", reuse=False).model
    diff = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), start.parameters()))
    assert diff > 1e-3

    again = train_sft(cfg, progress=False)  # identical config: done, nothing retrained
    assert again.status == "cached" and again.global_step == 12
    other = _tiny_cfg(tiny_llama_dir, out, epochs=1)
    with pytest.raises(Exception, match="different training run"):
        train_sft(other, progress=False)
    assert train_sft(other, overwrite=True, progress=False).global_step == 4


def test_cli_refuses_foreign_output_dir(tiny_llama_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tiny_cfg(tiny_llama_dir, out).model_dump(mode="json")))
    _assert_one_line_error(_cli(["train", "--config", str(cfg)]), "no conceptfix training run", "--overwrite")
    _assert_one_line_error(_cli(["train", "--config", str(cfg), "-o", str(tmp_path / "none"), "--resume"]),
                           "nothing to resume")


def test_seed_compat_and_default_differ_only_in_what_they_train_on(tiny_llama_dir, tmp_path):
    from conceptfix.train.sft import train_sft

    default = train_sft(_tiny_cfg(tiny_llama_dir, tmp_path / "a", epochs=1), progress=False)
    compat = train_sft(_tiny_cfg(tiny_llama_dir, tmp_path / "b", epochs=1, seed_compat=True), progress=False)
    assert compat.processed_tokens == 4 * 64 and default.processed_tokens < compat.processed_tokens
    assert default.text_tokens == compat.text_tokens


def test_lora_saves_adapter_and_merged_weights(tiny_llama_dir, tmp_path):
    from conceptfix.models import load_model
    from conceptfix.train.sft import train_sft

    out = tmp_path / "lora"
    cfg = _tiny_cfg(tiny_llama_dir, out, method="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                    gradient_checkpointing=True, learning_rate=5e-3)
    result = train_sft(cfg, progress=False)
    assert result.global_step == 8
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_model(str(out), device="cpu", dtype="float32", reuse=False).model
    start = load_model(str(tiny_llama_dir), device="cpu", dtype="float32", reuse=False).model
    names = dict(start.named_parameters())
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, names[n])}
    assert changed and all("proj" in n for n in changed)  # only LoRA-targeted projections moved
    assert not any("lora_" in k for k in merged.state_dict())


_KILLED_RUN = textwrap.dedent("""
    import os, sys
    from transformers import TrainerCallback
    from conceptfix.train.config import load_sft_config
    from conceptfix.train.sft import train_sft

    class DieAfterCheckpoint(TrainerCallback):
        # Simulates a crash (OOM kill, pre-emption): no cleanup, no exception handling.
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= int(sys.argv[2]):
                os._exit(17)

    train_sft(load_sft_config(sys.argv[1]), callbacks=[DieAfterCheckpoint()], progress=False)
""")


def test_resume_after_killed_run_matches_uninterrupted_run(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from conceptfix.train.sft import train_sft

    killed = tmp_path / "killed"
    cfg = _tiny_cfg(tiny_llama_dir, killed, epochs=2, checkpoint_steps=1, warmup_ratio=0.2)
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(cfg_file), "3"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    assert (killed / "checkpoints" / "checkpoint-3").is_dir()

    # Without --resume the interrupted run is not silently restarted.
    with pytest.raises(Exception, match="interrupted run"):
        train_sft(cfg, progress=False)
    resumed = train_sft(cfg, resume=True, progress=False)
    assert resumed.status == "resumed" and resumed.global_step == 8
    log = json.loads((killed / "train_log.json").read_text())["steps"]
    assert [e["step"] for e in log] == list(range(1, 9))  # steps 1-3 from the checkpoint, 4-8 after resuming

    straight = train_sft(cfg.model_copy(update={"output_dir": str(tmp_path / "straight")}), progress=False)
    assert straight.global_step == 8
    a, b = load_file(killed / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    straight_log = json.loads((tmp_path / "straight" / "train_log.json").read_text())["steps"]
    assert [round(e["loss"], 4) for e in log] == [round(e["loss"], 4) for e in straight_log]


def test_embedded_model_takes_one_real_training_step(embedded, tmp_path):
    """The alias path (GGUF de-quantised into the cache) loads as a trainable, non-quantised model."""
    from conceptfix.train.sft import build_trainer, load_trainable_model

    cfg = parse_sft_config(dict(model_name="smollm2-135m", device="cpu", dtype="float32", output_dir=str(tmp_path / "out"),
                                learning_rate=1e-4, warmup_ratio=0.0, use_chat_template=False, texts=TEXTS[:1]))
    model, tok, dtype, checkpoint = load_trainable_model(cfg, "cpu")
    assert dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    assert all(p.requires_grad for p in model.parameters())
    ds = build_dataset(tok, cfg.texts, use_chat_template=False, system_prompt=None, max_length=cfg.max_length)
    probe = model.model.layers[10].mlp.down_proj.weight
    before = probe.detach().clone()
    trainer = build_trainer(cfg, model, tok, ds, checkpoint_dir=tmp_path / "ckpt", device="cpu", save_checkpoints=False,
                            progress=False, args_overrides={"max_steps": 2})
    out = trainer.train()
    assert trainer.state.global_step == 2 and 0.5 < out.training_loss < 6  # a real LM on English text
    assert not torch.equal(before, probe.detach())
