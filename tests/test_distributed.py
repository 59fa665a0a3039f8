"""torchrun: data-parallel training and distributed sweeps, run as users run them — 2 CPU processes (gloo)
started from pytest with `python -m torch.distributed.run --standalone --nproc_per_node 2 -m sae train`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sae.saes import SAE
from test_train import make_cache, planted

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def _config(tmp_path: Path, cache: Path, out: str, **train) -> Path:
    cfg = {"train": {"cache": str(cache), "out": str(tmp_path / out), "wandb_mode": "disabled", "seed": 3,
                     "lr": 3e-3, "log_every": 5, **train}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sae_train(config: Path, *overrides: str, nproc: int = 1, timeout: int = 240,
               **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "sae", "train", "--config", str(config), *overrides]
    if popen:
        return subprocess.Popen(cmd, env=_env(), text=True, **popen)
    return subprocess.run(cmd, env=_env(), text=True, capture_output=True, timeout=timeout)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return SAE.load(folder).state_dict()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    data, _ = planted(4096, d=16, n_true=64)
    return make_cache(tmp_path_factory.mktemp("dist") / "cache", {"h0": data, "h1": data.flip(1) * 2})


SWEEP = [{"architecture": "relu_l1", "hook": "h0", "d_sae": 64},
         {"architecture": "topk", "hook": "h1", "d_sae": 64, "k": 4},
         {"architecture": "jumprelu", "hook": "h0", "d_sae": 64, "target_l0": 4.0}]


def test_data_parallel_matches_one_process_with_the_whole_batch(tmp_path, cache):
    """World 2 with 64 rows per rank takes the same steps as 1 process with 128: gradients averaged over ranks
    equal the gradient of the mean over the global batch (no latent dies in 20 steps, so AuxK is off)."""
    common = dict(saes=SWEEP[:2], batch_size=128, total_tokens=128 * 20, dead_window_tokens=10**9)
    one = _sae_train(_config(tmp_path, cache, "one", **common))
    two = _sae_train(_config(tmp_path, cache, "two", **common), nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "on 2 processes (64 rows each)" in two.stdout
    for name in ("relu_l1_l1c3_d64_h0", "topk_k4_d64_h1"):
        a, b = _weights(tmp_path / "one" / name), _weights(tmp_path / "two" / name)
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (name, key, (a[key] - b[key]).abs().max())


def test_data_parallel_matches_one_process_while_auxk_fires(tmp_path, cache):
    """With latents dying after 2 steps, AuxK fires at most steps; its loss is normalised by the residual's energy,
    a batch statistic, which every rank must take over the global batch for 2 ranks to equal 1 process (per-rank
    energies left the weights 0.41 apart on SmolLM2, issue 19). AuxK must matter here: off, the weights differ."""
    common = dict(saes=[{**SWEEP[1], "d_sae": 512}], batch_size=128, total_tokens=128 * 20, dead_window_tokens=256)
    one = _sae_train(_config(tmp_path, cache, "one", **common))
    two = _sae_train(_config(tmp_path, cache, "two", **common), nproc=2)
    off = _sae_train(_config(tmp_path, cache, "off", **common), "dead_window_tokens=1000000000")
    for run in (one, two, off):
        assert run.returncode == 0, run.stderr
    a, b, c = (_weights(tmp_path / run / "topk_k4_d512_h1") for run in ("one", "two", "off"))
    assert max((a[key] - c[key]).abs().max() for key in a) > 1e-2  # AuxK changed the SAE
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (key, (a[key] - b[key]).abs().max())


def test_distributed_sweep_writes_the_same_saes_as_one_process(tmp_path, cache):
    common = dict(saes=SWEEP, batch_size=64, total_tokens=64 * 15)
    one = _sae_train(_config(tmp_path, cache, "one", **common))
    two = _sae_train(_config(tmp_path, cache, "two", distribute_saes=True, **common), nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    names = sorted(p.name for p in (tmp_path / "one").iterdir() if (p / "cfg.json").is_file())
    assert len(names) == 3 and names == sorted(p.name for p in (tmp_path / "two").iterdir() if (p / "cfg.json").is_file())
    for name in names:
        a, b = _weights(tmp_path / "one" / name), _weights(tmp_path / "two" / name)
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (name, key)
    # Resuming with another number of processes is refused, naming the one to use.
    other = _sae_train(_config(tmp_path, cache, "two", distribute_saes=True, resume=True, **common))
    assert other.returncode == 2 and "resume with torchrun --nproc_per_node 2" in other.stderr


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a child of the launcher)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_killed_rank_fails_the_job_clearly_and_resume_continues(tmp_path, cache):
    common = dict(saes=SWEEP[:1], batch_size=32, total_tokens=32 * 1500, checkpoint_every=50)
    config = _config(tmp_path, cache, "run", **common)
    job = _sae_train(config, nproc=2, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    latest = tmp_path / "run" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not latest.is_file() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(job.pid, 1)
    assert victim is not None and job.poll() is None, "the job ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "resume=true" in err and ("lost another process" in err or "another process of the job failed" in err), err
    resumed = _sae_train(config, "resume=true", nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout and "resuming from step 0 " not in resumed.stdout
    assert (tmp_path / "run" / "relu_l1_l1c3_d64_h0" / "cfg.json").is_file()
