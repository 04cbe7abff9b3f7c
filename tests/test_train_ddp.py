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


def _launch_two(*program: str) -> list[str]:
    """`accelerate launch` of 2 processes on a free port. --multi_gpu selects accelerate's torchrun launcher; with
    no GPU visible each process runs on CPU and the process group uses gloo."""
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *program]


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
    # (`accelerate launch --cpu` alone would need mpirun for more than one process.)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "CONCEPTFIX_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = _launch_two(str(Path(sys.executable).parent / "conceptfix"), "train", "--config", str(cfg_file), "--json")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
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


PROBE = """
import json, time
from conceptfix.train.sft import _process_state
state = _process_state("cpu")
if state.process_index == 1:
    time.sleep(2)  # rank 0 must wait for it at the barrier
start = time.perf_counter()
state.wait_for_everyone()
record = {"rank": state.process_index, "main": state.is_main_process, "processes": state.num_processes,
          "type": str(state.distributed_type), "waited": time.perf_counter() - start}
with open(f"rank{state.process_index}.json", "w") as f:  # one file a rank: their stdout lines interleave
    json.dump(record, f)
"""


def test_process_state_is_one_group_with_a_real_barrier_before_training(tmp_path):
    """Before Trainer sets up DDP, train_sft's own process state must already see 2 processes, one main, and a
    barrier that waits: otherwise both ranks clear and write output_dir at once (a race that failed ~1 run in 6)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cmd = _launch_two(str(script))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {r["rank"]: r for r in (json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json")))}
    assert sorted(ranks) == [0, 1]
    assert [ranks[0]["main"], ranks[1]["main"]] == [True, False]
    assert all(r["processes"] == 2 and r["type"].endswith("MULTI_CPU") for r in ranks.values())
    assert ranks[0]["waited"] > 1.0
