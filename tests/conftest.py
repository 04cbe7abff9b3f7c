"""Shared fixtures: the embedded model (loaded once per session) and tiny random models for edge cases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network, and never draw progress bars into the log.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CONCEPTFIX_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded():
    """SmolLM2-135M-Instruct (GGUF → cached safetensors), fp32 on CPU, raw-completion profile."""
    from conceptfix.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded):
    return embedded.tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    """A 2-layer random Llama with the embedded tokenizer, saved as a checkpoint directory."""
    from tests.helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), embedded_tokenizer, arch="llama")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules of many small tensor ops: on two shared cores two threads stalled at
    barriers (a 64k-element op went from 25 us to 8 ms; 64 ablation rows from 2.4 s to 9.8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
