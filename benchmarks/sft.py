"""SFT throughput and memory: the seed's loop (every text padded to 512 tokens, loss on all tokens) vs
conceptfix (dynamic padding, loss on the text only), same config, same Trainer, in one run; and on a GPU,
which options let full fine-tuning of a Llama-3.1-8B-shaped model fit in one GPU's memory.

    python benchmarks/sft.py --small                  # CPU smoke: embedded model, configs/sft_aldosterone.yaml
    python benchmarks/sft.py --config CFG.yaml        # the seed-vs-conceptfix comparison for any config
    python benchmarks/sft.py --llama8b --tokenizer DIR   # GPU: random Llama-3.1-8B-shaped model, option matrix

The seed's loop is reproduced by conceptfix's ``seed_compat: true`` (pad to max_length, labels = input_ids),
so both variants share model, optimizer and Trainer: the difference measured is the padding and the labels.
Each variant runs in a fresh subprocess so peak memory is its own (GPU: torch.cuda.max_memory_allocated;
CPU: peak RSS of the process, model loading included). Throughput is timed over the second epoch only
(one pass over every text, after warm-up: CUDA init, optimizer-state allocation).
Tokens/s is reported twice: the texts' own tokens per second (useful work) and tokens the model processed
per second (template and padding included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# Llama-3.1-8B (meta-llama/Llama-3.1-8B-Instruct config.json), weights random: memory and speed depend
# on shapes only.
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152)

SEED = {"seed_compat": True}
COMPARISON = [
    ("seed loop: pad to 512, loss on all tokens", SEED, {}),
    ("conceptfix: dynamic padding, text-only loss", {}, {}),
]
# Options for full fine-tuning of the 8B shape on one GPU (all with the seed's padding: the worst case).
LLAMA8B_MATRIX = [
    ("seed: bf16 weights, AdamW (torch)", SEED, {}),
    ("conceptfix default: bf16, AdamW, dynamic pad", {}, {}),
    ("seed + fused AdamW", {**SEED, "optimizer": "adamw_torch_fused"}, {}),
    ("seed + gradient checkpointing", {**SEED, "gradient_checkpointing": True}, {}),
    ("seed + 8-bit AdamW (torchao)", {**SEED, "optimizer": "adamw_torch_8bit"}, {}),
    ("fp32 master weights + bf16 autocast, AdamW", {**SEED, "dtype": "float32"}, {"bf16": True}),
    ("fp32 master + autocast + 8-bit AdamW + grad ckpt",
     {**SEED, "dtype": "float32", "optimizer": "adamw_torch_8bit", "gradient_checkpointing": True}, {"bf16": True}),
]
# Do the updates survive bf16 rounding at the seed's learning rate? (run with --lr 5e-6)
LLAMA8B_PRECISION = [
    ("seed: bf16 weights, AdamW (torch)", SEED, {}),
    ("seed + 8-bit AdamW, bf16 stochastic rounding",
     {**SEED, "optimizer": "adamw_torch_8bit", "optim_args": "bf16_stochastic_round=True"}, {}),
]
# Sharded over the processes of `accelerate launch --use_fsdp` (see --fsdp).
LLAMA8B_FSDP = [
    ("FSDP: fp32 master weights + bf16 mixed precision, AdamW", {**SEED, "dtype": "float32"}, {"bf16": True}),
]


# --------------------------------------------------------------------------------------------- one variant

def run_variant(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from conceptfix.train.config import load_sft_config, parse_sft_config
    from conceptfix.train.data import build_dataset
    from conceptfix.train.sft import build_trainer, load_trainable_model, resolve_train_device

    base = load_sft_config(spec["config"]).model_dump(mode="json")
    cfg = parse_sft_config({**base, **spec["overrides"], "epochs": 2, "batch_size": 1,
                            "gradient_accumulation_steps": 1})
    device = resolve_train_device(cfg)
    cuda = device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cuda and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if cuda and spec.get("memory_cap_gib"):
        # Emulate a smaller GPU (e.g. an 80 GB H100 on an H200): the allocator refuses beyond the cap.
        total = torch.cuda.mem_get_info()[1] / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap_gib"] / total))
    if spec.get("llama8b"):
        from transformers import AutoModelForCausalLM, LlamaConfig

        from conceptfix.models import load_tokenizer, resolve_dtype

        tokenizer = load_tokenizer(spec["tokenizer"])
        dtype = resolve_dtype(cfg.dtype, device)
        torch.manual_seed(0)
        with torch.device(device):
            shape = {**LLAMA_31_8B, **spec.get("shape_overrides", {})}
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    else:
        model, tokenizer, dtype, _ = load_trainable_model(cfg, device)
    dataset = build_dataset(tokenizer, cfg.texts, use_chat_template=cfg.use_chat_template,
                            system_prompt=cfg.system_prompt, max_length=cfg.max_length, seed_compat=cfg.seed_compat)

    # One weight matrix, to count how many of its entries the optimizer actually changed (bf16 rounding).
    probe_name, probe = next((n, p) for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight"))
    probe_before = probe.detach().clone()

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.marks: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks[state.global_step] = time.perf_counter()

    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, model, tokenizer, dataset, checkpoint_dir=tmp, device=device, callbacks=[timer],
                                save_checkpoints=False, progress=False,
                                args_overrides={"logging_steps": 1, **spec["args"]})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row: dict = {"name": spec["name"], "device": torch.cuda.get_device_name() if cuda else "cpu",
                     "dtype": str(dtype).removeprefix("torch."), "optimizer": cfg.optimizer,
                     "gradient_checkpointing": cfg.gradient_checkpointing, "seed_compat": cfg.seed_compat,
                     "processed_tokens_per_epoch": dataset.processed_tokens,
                     "text_tokens_per_epoch": dataset.text_tokens, "params": sum(p.numel() for p in model.parameters())}
        try:
            trainer.train()
        except torch.OutOfMemoryError as exc:
            row.update(status="OOM", error=str(exc).splitlines()[0][:160])
        else:
            half = trainer.state.global_step // 2  # steps per epoch (fewer with several processes)
            epoch2 = timer.marks[trainer.state.global_step] - timer.marks[half]
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            after = probe.detach()
            # (Under FSDP the original parameter may now be a shard: then the probe is not comparable.)
            changed = (after != probe_before).float().mean().item() if after.shape == probe_before.shape else None
            row.update(status="ok", epoch2_s=round(epoch2, 4),
                       text_tok_per_s=round(dataset.text_tokens / epoch2, 1),
                       processed_tok_per_s=round(dataset.processed_tokens / epoch2, 1),
                       first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
                       probe=probe_name, probe_changed_frac=None if changed is None else round(changed, 4))
        if cuda:
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            row["gpu_total_gib"] = round(torch.cuda.mem_get_info()[1] / 2**30, 2)
            row["memory_cap_gib"] = spec.get("memory_cap_gib")
            row["world_size"] = world
        else:
            row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


# --------------------------------------------------------------------------------------------- the driver

def fsdp_launcher(n: int) -> list[str]:
    """`accelerate launch` with FSDP full sharding per decoder layer (fp32 shards, bf16 compute)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
            "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type",
            "SHARDED_STATE_DICT", "--fsdp_use_orig_params", "true", "--fsdp_offload_params", "false",
            "--fsdp_sync_module_states", "false", "--main_process_port", "29561"]


def run_in_subprocess(spec: dict, timeout: int, fsdp: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CONCEPTFIX_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    started = time.perf_counter()
    try:
        launcher = fsdp_launcher(fsdp) if fsdp else [sys.executable]
        proc = subprocess.run([*launcher, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": spec["name"], "status": f"timeout after {timeout}s"}
    if os.environ.get("BENCH_LOG_DIR"):
        log = Path(os.environ["BENCH_LOG_DIR"]) / f"variant_{abs(hash(spec['name'])) % 10**6}.log"
        log.write_text(f"{spec['name']}\n--- stdout\n{proc.stdout[-20000:]}\n--- stderr\n{proc.stderr[-20000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            row = json.loads(line[len("RESULT "):])
            row["wall_s"] = round(time.perf_counter() - started, 1)
            return row
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"name": spec["name"], "status": "failed", "error": " | ".join(tail)[:300]}


def print_table(rows: list[dict]) -> None:
    gpu = any("peak_allocated_gib" in r for r in rows)
    mem = "peak alloc GiB" if gpu else "peak RSS GiB"
    head = ["variant", "weights", "optimizer", "status", "text tok/s", "processed tok/s", mem, "tokens/epoch (text/processed)",
            "loss first→last", "probe changed"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        peak = r.get("peak_allocated_gib", r.get("peak_rss_gib", ""))
        ok = r.get("status") == "ok"
        cells = [r["name"], r.get("dtype", "?"), r.get("optimizer", "?"), r.get("status", "?"), r.get("text_tok_per_s", "–") if ok else "–",
                 r.get("processed_tok_per_s", "–") if ok else "–", peak,
                 f"{r.get('text_tokens_per_epoch', '')}/{r.get('processed_tokens_per_epoch', '')}",
                 f"{r['first_loss']}→{r['last_loss']}" if ok else "–",
                 f"{100 * r['probe_changed_frac']:.1f}%" if ok and r.get("probe_changed_frac") is not None else "–"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for r in rows:
        if r.get("status") not in ("ok",):
            print(f"  {r['name']}: {r.get('status')} {r.get('error', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help="CPU smoke run on the embedded model")
    parser.add_argument("--config", default=str(REPO / "configs/sft_aldosterone.yaml"))
    parser.add_argument("--llama8b", action="store_true", help="random Llama-3.1-8B-shaped model (GPU)")
    parser.add_argument("--tokenizer", help="tokenizer dir for --llama8b (any; ids must be < 128256)")
    parser.add_argument("--tiny-shape", action="store_true", help="shrink the --llama8b shape (CPU smoke test)")
    parser.add_argument("--precision", action="store_true", help="with --llama8b: the bf16-rounding variants")
    parser.add_argument("--fsdp", type=int, default=0, help="with --llama8b: FSDP over this many GPUs")
    parser.add_argument("--memory-cap-gib", type=float, help="cap each process's GPU memory (emulate a smaller GPU)")
    parser.add_argument("--lr", type=float, help="override the config's learning rate")
    parser.add_argument("--only", nargs="*", type=int, help="indices of the variants to run")
    parser.add_argument("--chat-template", action="store_true", help="use the chat template as the seed did")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--json-out", help="write all rows here")
    args = parser.parse_args()

    if args.child:
        row = run_variant(json.loads(args.child))
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(row), flush=True)
        return
    if args.fsdp:
        variants = LLAMA8B_FSDP
    elif args.llama8b:
        variants = LLAMA8B_PRECISION if args.precision else LLAMA8B_MATRIX
    else:
        variants = COMPARISON
    if args.only:
        variants = [variants[i] for i in args.only]
    common = {"use_chat_template": True, "system_prompt": ""} if args.chat_template else {}
    if args.small:
        common["device"] = "cpu"
    if args.lr:
        common["learning_rate"] = args.lr
    rows = []
    for name, overrides, train_args in variants:
        spec = {"name": name, "config": args.config, "overrides": {**common, **overrides}, "args": train_args,
                "llama8b": args.llama8b, "tokenizer": args.tokenizer,
                "shape_overrides": TINY_SHAPE if args.tiny_shape else {}, "memory_cap_gib": args.memory_cap_gib}
        row = run_in_subprocess(spec, args.timeout, fsdp=args.fsdp)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    print(f"\nconfig: {args.config}  model: {'random Llama-3.1-8B shape' if args.llama8b else 'config model_name'}  "
          f"chat template: {bool(args.chat_template)}\n")
    print_table(rows)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
