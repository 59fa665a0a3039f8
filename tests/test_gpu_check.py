"""`scripts/gpu_check.sh --cpu`: the GPU check's smoke run, so the script cannot rot while no GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae.saes import SAE_CLASSES

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["model", "tests", "bench_train", "bench_harvest", "cache", "on_the_fly", "ddp"]
MUST_PASS = STEPS


@pytest.mark.slow  # about 1.5 min on an idle 2-core machine: ten Python processes, each importing torch
def test_cpu_mode_reports_every_step(tmp_path: Path) -> None:
    summary = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "ignored")}  # --out wins over $OUT
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(summary)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    lines = [json.loads(line) for line in summary.read_text().splitlines()]
    steps = {r["step"]: r for r in lines if "step" in r}
    assert list(steps) == STEPS, proc.stderr[-2000:]
    failed = {name: steps[name]["why"] for name in MUST_PASS if not steps[name]["ok"]}
    assert not failed, failed
    assert steps["tests"]["detail"]["skipped"] == steps["tests"]["detail"]["tests"] > 0  # no CUDA here: all skip
    assert set(steps["bench_train"]["detail"]["ours"]) == set(SAE_CLASSES)
    assert steps["bench_train"]["detail"]["config"]["dtype"].startswith("bfloat16")
    assert steps["bench_harvest"]["detail"]["model_dtype"] == "float32"  # bf16 is for the GPU run
    end = lines[-1]
    assert end["summary"] and end["mode"] == "cpu" and end["goals_missed"] == []  # goals are judged on GPUs only
    assert sorted(end["passed"] + end["failed"]) == sorted(STEPS) and end["not_exercised"] == []
    assert proc.returncode == (0 if end["ok"] else 1)
    assert (tmp_path / "gpu_check_logs" / "bench_train.json").is_file()
    assert stdout_lines(proc.stdout) == lines  # the same lines on stdout


def stdout_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _judge(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_step.py"), *args],
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(proc.stdout)


def test_ddp_below_two_gpus_is_not_exercised(tmp_path: Path) -> None:
    """torchrun with one process creates no process group, yet its run wrote SAE folders and a checkpoint of world
    size 1 = the GPUs counted, so the DDP step passed on a one-GPU machine. Below 2 GPUs it is neither passed nor
    failed, and the summary says so."""
    ddp = _judge("step", "ddp", "--mode", "gpu", "--rc", "0", "--started", "0", "--world", "1")
    assert ddp["ok"] is None and ddp["exercised"] is False
    assert ddp["why"] == "not exercised: 1 GPU(s) visible to torch: DDP needs 2 or more"
    summary = tmp_path / "gpu_check.json"
    model = {"step": "model", "ok": True, "rc": 0, "why": None, "detail": {}}
    summary.write_text(json.dumps(model) + "\n" + json.dumps(ddp) + "\n")
    end = _judge("summary", str(summary), "--mode", "gpu", "--seconds", "1")
    assert end["ok"] is True and end["passed"] == ["model"] and end["failed"] == []
    assert end["not_exercised"] == ["ddp"]
    summary.write_text(json.dumps(ddp) + "\n")  # nothing that ran is nothing that passed
    assert _judge("summary", str(summary), "--mode", "gpu", "--seconds", "1")["ok"] is False

