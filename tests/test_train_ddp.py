"""`conceptfix train` under `accelerate launch` with 2 processes on CPU (DDP over gloo), no code change."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_on_cpu(tiny_llama_dir, tmp_path):
    from conceptfix.models import load_model

    out = tmp_path / "ddp_out"
    cfg = dict(model_name=str(tiny_llama_dir), device="cpu", dtype="float32", output_dir=str(out), epochs=2,
               learning_rate=1e-3, batch_size=1, warmup_ratio=0.0, max_length=64, use_chat_template=True,
               system_prompt="", seed=0,
               texts=["Aldosterone is an adrenal hormone.", "The kidney keeps sodium under aldosterone.",
                      "Potassium rises, aldosterone is released.", "Spironolactone blocks aldosterone."])
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    bindir = Path(sys.executable).parent
    # --multi_gpu selects accelerate's torchrun launcher; with no GPU visible each process trains on CPU
    # and the process group uses gloo. (`--cpu` alone would need mpirun for more than one process.)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "CONCEPTFIX_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        # Once more, with another port, when the processes could not talk to each other: the port is free when
        # chosen but may be taken before torchrun binds it, and gloo's loopback connection failed once in ~10
        # full runs on a loaded 2-core machine. Any other failure fails at once.
        cmd = [str(bindir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               str(bindir / "conceptfix"), "train", "--config", str(cfg_file), "--json"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        transport = [line for line in proc.stderr.splitlines()
                     if any(s in line.lower() for s in ("address already in use", "gloo", "connection", "timed out"))]
        if proc.returncode == 0 or not transport:
            break
        print(f"DDP attempt {attempt + 1} failed in the transport, retrying:", *transport[-5:], sep="\n  ")
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
    assert proc.returncode == 0, (f"exit {proc.returncode}\n{proc.stdout[-2000:]}\nerror lines:\n"
                                  + "\n".join(errors[-20:]) + f"\n{proc.stderr[-3000:]}")

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["result"]["world_size"] == 2
    # 4 texts, batch 1 per process, 2 processes: 2 optimizer steps per epoch instead of 4.
    assert run["result"]["global_step"] == 4
    steps = json.loads((out / "train_log.json").read_text())["steps"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert load_model(str(out), device="cpu", dtype="float32", reuse=False).num_layers == 2
    # Only the main process printed the result.
    assert proc.stdout.count('"global_step"') == 1
