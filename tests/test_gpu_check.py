"""`scripts/gpu_check.sh --cpu`: the GPU check's smoke run, so the script cannot rot while no GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae.saes import SAE_CLASSES
from test_syncs import BUDGET as SYNC_BUDGET

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["model", "tests", "bench_train", "bench_syncs", "bench_memory", "bench_harvest", "cache", "on_the_fly", "ddp"]
MUST_PASS = STEPS


@pytest.mark.slow  # about 2 min on an idle 2-core machine: twenty Python processes, each importing torch
def test_cpu_mode_reports_every_step(tmp_path: Path) -> None:
    summary = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "ignored")}  # --out wins over $OUT
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(summary)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    lines = [json.loads(line) for line in summary.read_text().splitlines()]
    steps = {r["step"]: r for r in lines if "step" in r}
    assert list(steps) == STEPS, proc.stderr[-2000:]
    failed = {name: steps[name]["why"] for name in MUST_PASS if not steps[name]["ok"]}
    assert not failed, failed
    assert steps["tests"]["detail"]["skipped"] == steps["tests"]["detail"]["tests"] > 0  # no CUDA here: all skip
    assert set(steps["bench_train"]["detail"]["ours"]) == set(SAE_CLASSES)
    assert steps["bench_train"]["detail"]["config"]["dtype"].startswith("bfloat16")
    assert isinstance(steps["bench_train"]["detail"]["topk_auxk"]["auxk_share_of_step"], float)  # issue 19 §3
    assert steps["bench_train"]["detail"]["topk_auxk"]["k_aux"] == 32  # d_in / 2
    syncs = steps["bench_syncs"]["detail"]
    assert len(syncs["max_syncs_per_step"]) == len(SAE_CLASSES) * 4  # AuxK on/off × in/after the TopK warm-up
    assert syncs["budget"] == SYNC_BUDGET and syncs["syncs"].startswith("not measurable on CPU")  # the test's own
    assert all(v is None for v in syncs["max_syncs_per_step"].values())  # measured under CUDA's sync debug mode only
    memory = steps["bench_memory"]["detail"]
    assert memory["shape"]["d_sae"] == 1024 and memory["meter"] == "peak RSS (VmHWM)"
    assert set(memory["peaks"]) == {f"{a}/{m}" for a in SAE_CLASSES for m in ("fp32", "bf16")}
    assert all(p["peak_mib"] > 0 and p["plan_mib"] > 0 for p in memory["peaks"].values())
    assert set(memory["jumprelu_init"]) == {"fp32", "bf16"}  # its initial fit, reported on its own (issue 19 §2)
    assert all(e["init_peak_mib"] > 0 and e["init_plan_mib"] > 0 for e in memory["jumprelu_init"].values())
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


def test_step_limits_fit_one_device_call() -> None:
    """A device call runs at most 600 s and the machine's start and the copies back come out of it: the steps'
    shares must add up to at most 580 s, and every step the script runs must have one (bash reads a missing
    array entry as 0 s, which would report the step as timed out without running it)."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    block = script[script.index("declare -A LIMIT=(") + len("declare -A LIMIT=("):]
    block = block[:block.index(")\n")]
    limits = {k: int(v) for k, v in (e.strip("[").split("]=") for e in block.split())}
    assert set(limits) == set(STEPS)
    assert sum(limits.values()) <= 580


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


def _bench_step(tmp_path: Path, name: str, doc: dict) -> dict:
    """The GPU-mode judgement of a bench step whose JSON document is `doc`."""
    (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    return _judge("step", name, "--mode", "gpu", "--rc", "0", "--started", "0", "--stdout",
                  str(tmp_path / f"{name}.json"))


def _syncs_case(arch: str, syncs: int, set_up: bool = True) -> dict:
    budget = 0 if arch == "relu_l1" else 1
    return {"arch": arch, "auxk": True, "topk_warmup": False, "budget": budget, "set_up": set_up,
            "max_syncs": syncs, "where": {"base.py:1": syncs}, "ok": set_up and syncs <= budget}


def test_gpu_mode_judges_syncs_against_the_budget(tmp_path: Path) -> None:
    """The branches only a GPU run takes: a case over its budget, or not on the AuxK path it meant, fails the step;
    a document without measurements (run on the CPU by mistake) fails it too."""
    doc = {"shape": {}, "device": "cuda", "gpu": "H100", "budget": {"relu_l1": 0, "topk": 1}, "measurable": True,
           "note": None, "cases": [_syncs_case("relu_l1", 0), _syncs_case("topk", 1)]}
    passed = _bench_step(tmp_path, "bench_syncs", doc)
    assert passed["ok"] is True and passed["detail"]["max_syncs_per_step"] == {"relu_l1/auxk/after-warmup": 0,
                                                                               "topk/auxk/after-warmup": 1}
    over = _bench_step(tmp_path, "bench_syncs", {**doc, "cases": [_syncs_case("relu_l1", 2), _syncs_case("topk", 1)]})
    assert over["ok"] is False and over["why"] == "syncs per step over budget: relu_l1/auxk/after-warmup 2 > 0"
    assert over["detail"]["over_budget"]["relu_l1/auxk/after-warmup"]["where"] == {"base.py:1": 2}
    unset = _bench_step(tmp_path, "bench_syncs", {**doc, "cases": [_syncs_case("topk", 0, set_up=False)]})
    assert unset["ok"] is False and unset["why"] == "AuxK did not run as meant in topk/auxk/after-warmup"
    cpu = {**doc, "measurable": False, "device": "cpu", "note": "not measurable on CPU",
           "cases": [{**_syncs_case("topk", 0), "max_syncs": None, "ok": None}]}
    assert _bench_step(tmp_path, "bench_syncs", cpu)["ok"] is False


def _memory_case(peak: int, plan: int, init_peak: int = 1, init_plan: int = 1) -> dict:
    return {"peak_bytes": peak, "plan_bytes": plan, "plan_over_peak": round(plan / peak, 3),
            "init_peak_bytes": init_peak, "init_plan_bytes": init_plan, "ok": peak <= plan <= 1.3 * peak}


def test_gpu_mode_judges_memory_against_the_plan(tmp_path: Path) -> None:
    """Under-counting fails the step (JumpReLU's initial fit against its own plan figure too); over-counting by more
    than 1.3× is a goal missed, not a failure."""
    doc = {"shape": {"d_sae": 65536}, "device": "cuda", "meter": "cuda max_memory_allocated", "goal_max_ratio": 1.3,
           "results": {"topk/bf16": _memory_case(100, 120), "jumprelu/bf16": _memory_case(100, 110, 90, 95)}}
    passed = _bench_step(tmp_path, "bench_memory", doc)
    assert passed["ok"] is True and passed["goals_met"] is True
    assert passed["detail"]["jumprelu_init"]["bf16"]["within_plan"] is True

    def judged(case: str, result: dict) -> dict:
        return _bench_step(tmp_path, "bench_memory", {**doc, "results": {**doc["results"], case: result}})

    loose = judged("topk/bf16", _memory_case(100, 200))
    assert loose["ok"] is True and loose["goals_met"] is False
    under = judged("topk/bf16", _memory_case(100, 99))
    assert under["ok"] is False and under["why"] == "the plan under-counts: topk/bf16"
    init = judged("jumprelu/bf16", _memory_case(100, 110, 96, 95))
    assert init["ok"] is False and init["why"] == "the plan under-counts: jumprelu/bf16 initial fit"
