"""Stage 6: supervised fine-tuning on the concept texts, with transformers' Trainer.

Trainer (not TRL's SFTTrainer, not a hand-written loop) because it already gives everything this stage
needs -- AdamW variants by name, warmup + schedule, gradient accumulation with correct token-weighted loss,
gradient checkpointing, resumable checkpoints (model, optimizer, scheduler, RNG, data order), DDP/FSDP under
``accelerate launch`` -- while the one SFT-specific part, label masking of the chat template, is ten lines in
``conceptfix.train.data`` that we can test token by token. SFTTrainer would add a dependency whose
``assistant_only_loss`` needs generation markers in the chat template (Llama-3.1's has none).

Output directory layout::

    output_dir/
      model.safetensors, config.json, tokenizer*  -> loadable by conceptfix.models.load_model(output_dir)
      adapter/                                     -> LoRA only: the adapter alone
      resolved_config.yaml                         -> the config as run, with resolved device/dtype/steps
      run.json                                     -> status, config hash, provenance (versions), metrics
      train_log.json, loss.png                     -> per-step loss / lr / grad norm and its plot
      checkpoints/checkpoint-N/                    -> for --resume (deleted after success unless kept)
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from conceptfix.artifacts import content_hash, provenance, read_json, write_json, write_yaml
from conceptfix.errors import ConceptfixError
from conceptfix.train.config import SFTConfig
from conceptfix.train.data import TextDataset, build_dataset, make_collator

RUN_FILE = "run.json"
CHECKPOINT_SUBDIR = "checkpoints"
# Files this stage writes into output_dir; --overwrite removes only these (never a user's other files).
_OWN_FILES = ("run.json", "resolved_config.yaml", "train_log.json", "loss.png", "model.safetensors",
              "model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "training_args.bin")
_OWN_DIRS = (CHECKPOINT_SUBDIR, "adapter")


@dataclass
class TrainResult:
    output_dir: str
    status: Literal["trained", "resumed", "cached"]
    global_step: int
    final_loss: float | None
    mean_loss: float | None
    train_runtime_s: float
    text_tokens: int           # the texts' own tokens per epoch (what the loss is on, by default)
    processed_tokens: int      # tokens through the model per epoch (template and padding included)
    text_tokens_per_s: float
    processed_tokens_per_s: float
    world_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_hash(cfg: SFTConfig) -> str:
    return content_hash(cfg.model_dump(mode="json"))


# ----------------------------------------------------------------------------------------------- environment

def distributed_world_size() -> int:
    """Processes launched together (accelerate launch / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _process_state(device: str):
    """accelerate's process state: initialises the process group under `accelerate launch` (gloo on CPU).

    On a machine without a GPU, ``PartialState()`` under ``accelerate launch --multi_gpu`` reports ONE
    non-distributed process: every rank is then "main" and every barrier a no-op, so all ranks cleared and wrote
    output_dir at once (a rank that looked while another wrote refused the half-written directory). ``cpu=True``
    makes it a MULTI_CPU group over gloo, the one Trainer uses too.
    """
    from accelerate import PartialState

    return PartialState(cpu=not device.startswith("cuda"))


def resolve_train_device(cfg: SFTConfig) -> str:
    from conceptfix.models import resolve_device

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        return "cpu"  # `accelerate launch --cpu`
    return resolve_device(cfg.device)


def load_trainable_model(cfg: SFTConfig, device: str):
    """Model + tokenizer through conceptfix.models (aliases, .gguf, dirs and hub ids all work), trainable.

    One process on GPU: ``device_map="auto"`` (several GPUs -> layers spread over them, as the seed did).
    Under ``accelerate launch`` every process loads the whole model on CPU and Trainer/accelerate places its
    replica (DDP) or shards (FSDP): a device map would fight with that.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from conceptfix.models import (LOAD_FAILURE_HINT, _quiet_transformers, load_tokenizer, offline_load_kwargs,
                                   resolve_checkpoint, resolve_dtype, strip_gguf_marker)

    dtype = resolve_dtype(cfg.dtype, device)
    checkpoint = resolve_checkpoint(cfg.model_name)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code,
                              **offline_load_kwargs(cfg.model_name, checkpoint, field="model_name")}
    local_only = kwargs["local_files_only"]
    if device.startswith("cuda") and distributed_world_size() == 1:
        kwargs["device_map"] = "auto" if device == "cuda" else {"": device}
    _quiet_transformers()
    try:
        tokenizer = load_tokenizer(checkpoint, trust_remote_code=cfg.trust_remote_code, local_files_only=local_only)
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=cfg.trust_remote_code,
                                            local_files_only=local_only)
        # A GGUF de-quantised into conceptfix's cache holds plain float weights; the stale marker would make
        # Trainer refuse full fine-tuning and would be copied into the trained checkpoint.
        strip_gguf_marker(config)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, config=config, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConceptfixError(f"cannot load model {cfg.model_name!r}: {first}", field="model_name",
                              hint=LOAD_FAILURE_HINT) from None
    if cfg.method == "lora":
        model = _wrap_lora(model, cfg)
    return model, tokenizer, dtype, checkpoint


def _wrap_lora(model, cfg: SFTConfig):
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ConceptfixError(f"LoRA: {str(exc).splitlines()[0]}", field="lora.target_modules") from None


# ----------------------------------------------------------------------------------------------- the trainer

def update_steps(cfg: SFTConfig, n_examples: int, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) the way Trainer counts them."""
    batches = math.ceil(n_examples / (cfg.batch_size * world_size))
    per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
    return per_epoch, per_epoch * cfg.epochs


def build_trainer(cfg: SFTConfig, model, tokenizer, dataset: TextDataset, *, checkpoint_dir: str | Path,
                  device: str, callbacks: Sequence = (), save_checkpoints: bool = True, progress: bool | None = None,
                  args_overrides: dict[str, Any] | None = None):
    """A configured transformers Trainer (also used by benchmarks/sft.py, which passes ``args_overrides``
    such as ``max_steps`` or ``bf16=True`` for fp32 master weights under bf16 autocast)."""
    from transformers import Trainer, TrainingArguments

    from conceptfix.progress import progress_enabled

    world_size = distributed_world_size()
    _, total_steps = update_steps(cfg, len(dataset), world_size)
    # An integer warmup (same rounding everywhere) instead of warmup_ratio, which transformers 5 dropped.
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    if not save_checkpoints:
        save = {"save_strategy": "no"}
    elif cfg.checkpoint_steps:
        save = {"save_strategy": "steps", "save_steps": cfg.checkpoint_steps}
    else:
        save = {"save_strategy": "epoch"}
    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoint_dir),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        optim_args=cfg.optim_args,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "cpu" and world_size > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable parameter is used in each step
        report_to="none",
        disable_tqdm=not progress_enabled(progress),
        remove_unused_columns=False,
        dataloader_pin_memory=device != "cpu",
        **save,
        **_checkpointing_args(TrainingArguments, cfg.gradient_checkpointing),
    )
    kwargs.update(args_overrides or {})
    args = TrainingArguments(**kwargs)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=make_collator(tokenizer),
                   processing_class=tokenizer, callbacks=list(callbacks))


def _checkpointing_args(args_cls, enabled: bool) -> dict[str, Any]:
    """Gradient (activation) checkpointing under the name this transformers version uses (renamed in 5.2x)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    if not enabled:
        return {}
    # Non-reentrant checkpointing also works when the inputs need no grad (frozen embeddings under LoRA).
    return {prefix: True, f"{prefix}_kwargs": {"use_reentrant": False}}


# ----------------------------------------------------------------------------------------------- output dir

def _read_run(output_dir: Path) -> dict | None:
    path = output_dir / RUN_FILE
    if not path.exists():
        return None
    data = read_json(path, field="output_dir")
    return data if isinstance(data, dict) else None


def last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = output_dir / CHECKPOINT_SUBDIR
    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def plan_run(output_dir: Path, chash: str, *, overwrite: bool, resume: bool) -> tuple[str, str | None]:
    """Decide what to do with output_dir: ("fresh"|"resume"|"done", checkpoint to resume from)."""
    if not output_dir.exists() or not any(output_dir.iterdir()):
        if resume:
            raise ConceptfixError(f"nothing to resume in {output_dir}", field="--resume", hint="run without --resume")
        return "fresh", None
    run = _read_run(output_dir)
    if run is None:
        if overwrite:
            return "fresh", None
        raise ConceptfixError(f"{output_dir} is not empty and holds no conceptfix training run", field="output_dir",
                              hint="choose another output_dir or pass --overwrite")
    if run.get("config_hash") != chash:
        if overwrite:
            return "fresh", None
        raise ConceptfixError(f"{output_dir} holds a different training run (config hash "
                              f"{str(run.get('config_hash'))[:12]}…)", field="output_dir",
                              hint="choose another output_dir or pass --overwrite")
    if overwrite:
        return "fresh", None
    if run.get("status") == "complete":
        return "done", None
    checkpoint = last_checkpoint(output_dir)
    if not resume:
        where = f"from {Path(checkpoint).name}" if checkpoint else "(no checkpoint was written yet)"
        raise ConceptfixError(f"{output_dir} holds an interrupted run of this config", field="output_dir",
                              hint=f"pass --resume to continue {where}, or --overwrite to start over")
    if checkpoint is None:
        return "fresh", None  # interrupted before the first checkpoint: starting over is resuming
    return "resume", checkpoint


def _clear_output(output_dir: Path) -> None:
    for name in _OWN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    for name in _OWN_DIRS:
        shutil.rmtree(output_dir / name, ignore_errors=True)


def _cached_result(output_dir: Path, run: dict) -> TrainResult:
    data = dict(run.get("result") or {})
    data.update(output_dir=str(output_dir), status="cached")
    return TrainResult(**{k: data.get(k) for k in TrainResult.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------- logs and plot

def training_log(log_history: list[dict]) -> list[dict]:
    """Per-step entries (step, epoch, loss, learning_rate, grad_norm) from Trainer's log history."""
    keep = ("step", "epoch", "loss", "learning_rate", "grad_norm")
    return [{k: entry[k] for k in keep if k in entry} for entry in log_history if "loss" in entry]


def plot_loss(entries: list[dict], path: Path, title: str, ylabel: str = "training loss (text tokens)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conceptfix.artifacts import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [e["step"] for e in entries]
    ax.plot(steps, [e["loss"] for e in entries], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if any("learning_rate" in e for e in entries):
        ax2 = ax.twinx()
        ax2.plot(steps, [e.get("learning_rate", float("nan")) for e in entries], color="tab:gray", alpha=0.5,
                 linestyle="--")
        ax2.set_ylabel("learning rate", color="tab:gray")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- the stage

def train_sft(cfg: SFTConfig, *, overwrite: bool = False, resume: bool = False, callbacks: Sequence = (),
              progress: bool | None = None) -> TrainResult:
    """Fine-tune ``cfg.model_name`` on ``cfg.texts`` and write the output directory (see module docstring).

    Re-running a finished identical config returns the cached result; a different config in the same
    output_dir is refused unless ``overwrite``; ``resume`` continues an interrupted run from its last checkpoint.
    Works unchanged in one process (CPU or GPU) and under ``accelerate launch`` (DDP or FSDP).
    """
    from transformers import set_seed

    output_dir = Path(cfg.output_dir)
    chash = config_hash(cfg)
    device = resolve_train_device(cfg)
    state = _process_state(device)
    # Every process reads the directory before the main process changes it, so all decide alike.
    action, checkpoint = plan_run(output_dir, chash, overwrite=overwrite, resume=resume)
    state.wait_for_everyone()
    if action == "done":
        return _cached_result(output_dir, _read_run(output_dir) or {})
    if state.is_main_process:
        if action == "fresh":
            _clear_output(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / RUN_FILE, {"status": "running", "config_hash": chash,
                                           **provenance("train", cfg), "world_size": state.num_processes})
    state.wait_for_everyone()

    set_seed(cfg.seed)  # before model creation: LoRA's initial weights depend on it
    model, tokenizer, dtype, resolved = load_trainable_model(cfg, device)
    dataset = build_dataset(tokenizer, cfg.texts, use_chat_template=cfg.use_chat_template,
                            system_prompt=cfg.system_prompt, max_length=cfg.max_length, seed_compat=cfg.seed_compat)
    truncated = [i for i, item in enumerate(dataset.items) if item.truncated]
    if truncated and state.is_main_process:
        print(f"warning: texts {truncated} are longer than max_length={cfg.max_length} tokens and were truncated",
              file=sys.stderr)
    trainer = build_trainer(cfg, model, tokenizer, dataset, checkpoint_dir=output_dir / CHECKPOINT_SUBDIR,
                            device=device, callbacks=callbacks, progress=progress)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    runtime = time.perf_counter() - started

    _save_model(cfg, trainer, tokenizer, output_dir)
    if state.is_main_process:
        # Trainer pickles its arguments next to the weights; resolved_config.yaml holds the same, readable.
        (output_dir / "training_args.bin").unlink(missing_ok=True)
    log = training_log(trainer.state.log_history)
    steps_run = trainer.state.global_step - (_checkpoint_step(checkpoint) if checkpoint else 0)
    _, total_steps = update_steps(cfg, len(dataset), state.num_processes)
    # Tokens counted over the steps this process actually ran (a resumed run skips the finished ones).
    fraction = steps_run / max(1, total_steps)
    # (Every process holds the whole dataset; the distributed sampler gives each its share of an epoch.)
    text_tok = dataset.text_tokens * cfg.epochs * fraction
    proc_tok = dataset.processed_tokens * cfg.epochs * fraction
    result = TrainResult(
        output_dir=str(output_dir), status="resumed" if checkpoint else "trained",
        global_step=trainer.state.global_step, final_loss=log[-1]["loss"] if log else None,
        mean_loss=float(output.training_loss) if output.training_loss is not None else None,
        train_runtime_s=round(runtime, 3), text_tokens=dataset.text_tokens, processed_tokens=dataset.processed_tokens,
        text_tokens_per_s=round(text_tok / runtime, 2) if runtime > 0 else 0.0,
        processed_tokens_per_s=round(proc_tok / runtime, 2) if runtime > 0 else 0.0,
        world_size=state.num_processes,
    )
    if state.is_main_process:
        resolved_cfg = {**cfg.model_dump(mode="json"), "resolved": {
            "checkpoint": resolved, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "world_size": state.num_processes, "optimizer_steps": total_steps,
            "warmup_steps": trainer.args.warmup_steps, "text_tokens_per_epoch": dataset.text_tokens,
            "processed_tokens_per_epoch": dataset.processed_tokens, "truncated_texts": truncated}}
        write_yaml(output_dir / "resolved_config.yaml", resolved_cfg)
        write_json(output_dir / "train_log.json", {"config_hash": chash, "steps": log,
                                                   "per_text_tokens": [it.text_tokens for it in dataset.items]})
        if log:
            plot_loss(log, output_dir / "loss.png", f"{cfg.model_name} · {cfg.method} · lr {cfg.learning_rate:g}",
                      ylabel="loss (all tokens, seed_compat)" if cfg.seed_compat else "training loss (text tokens)")
        if not cfg.keep_checkpoints:
            shutil.rmtree(output_dir / CHECKPOINT_SUBDIR, ignore_errors=True)
        write_json(output_dir / RUN_FILE, {"status": "complete", "config_hash": chash,
                                           **provenance("train", cfg), "resolved": resolved_cfg["resolved"],
                                           "result": result.to_dict()})
    state.wait_for_everyone()
    return result


def _checkpoint_step(checkpoint: str) -> int:
    try:
        return int(Path(checkpoint).name.rsplit("-", 1)[-1])
    except ValueError:
        return 0


def _save_model(cfg: SFTConfig, trainer, tokenizer, output_dir: Path) -> None:
    """Full weights + tokenizer into output_dir; LoRA: the adapter under adapter/ and (by default) merged weights."""
    if cfg.method != "lora":
        trainer.save_model(str(output_dir))  # gathers FSDP shards; writes on the main process only
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(output_dir)
        return
    trainer.save_model(str(output_dir / "adapter"))
    if cfg.merge_lora and getattr(trainer, "is_fsdp_enabled", False):
        # Merging needs the full LoRA weights in one process; under FSDP they are sharded.
        if trainer.is_world_process_zero():
            print("LoRA under FSDP: saved the adapter only (merge it after training with peft)", file=sys.stderr)
        return
    if cfg.merge_lora and trainer.is_world_process_zero():
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
