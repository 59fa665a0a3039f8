"""torchrun: data-parallel training and distributed sweeps, run as users run them — 2 CPU processes (gloo)
started from pytest with `python -m torch.distributed.run --standalone --nproc_per_node 2 -m sae train`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sae.saes import SAE
from sae.data.store import CacheWriter
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
         {"architecture": "jumprelu", "hook": "h0", "d_sae": 64, "target_l0": 4.0},
         {"architecture": "batchtopk", "hook": "h1", "d_sae": 64, "k": 4}]


def test_data_parallel_matches_one_process_with_the_whole_batch(tmp_path, cache):
    """World 2 with 64 rows per rank takes the same steps as 1 process with 128: gradients averaged over ranks
    equal the gradient of the mean over the global batch (no latent dies in 20 steps, so AuxK is off), and
    JumpReLU's warm-up cut (where its thresholds start) and its L0 controller (10 steps after a warm-up of 10) are
    the global batch's: with the ranks' cuts averaged, W_enc ended 0.003–0.005 (max abs) from 1 process. So is
    BatchTopK's top k·B and its threshold (10 steps after its warm-up); per-rank top k·b left W_enc 0.004 apart."""
    common = dict(saes=SWEEP, batch_size=128, total_tokens=128 * 20, dead_window_tokens=10**9, topk_warmup_frac=0.5)
    one = _sae_train(_config(tmp_path, cache, "one", **common))
    two = _sae_train(_config(tmp_path, cache, "two", **common), nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "on 2 processes (64 rows each)" in two.stdout
    for name in ("relu_l1_l1c3_d64_h0", "topk_k4_d64_h1", "jumprelu_target4_d64_h0", "batchtopk_k4_d64_h1"):
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
    assert len(names) == len(SWEEP)
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir() if (p / "cfg.json").is_file())
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


# ----- a rank that fails alone stops the job, every rank saying why -------------------------------------------------
# Under nccl a rank that raised alone left the others blocked in their next collective until the timeout, and
# torchrun's SIGTERM cannot interrupt a thread blocked on the GPU (issue 19). Under gloo the others failed at once but
# said only "lost another process". Each failure below happens on one rank only; every rank must exit promptly,
# the failed one with its own one-line error and the others with "rank N failed: " and the same message.


def _failed_alone(run: subprocess.CompletedProcess, rank: int, message: str) -> None:
    errors = re.findall(r"sae train: error: (.*)", run.stderr)  # rank 0's progress bar may precede one on its line
    assert run.returncode != 0 and len(errors) == 2, run.stderr[-3000:]
    own = next(line for line in errors if f"rank {rank} failed: " not in line)
    told = next(line for line in errors if f"rank {rank} failed: " in line)
    assert message in own and message in told, errors
    # torchrun prints its own traceback (ChildFailedError); no worker prints one, nor loses its peer.
    assert "lost another process" not in run.stderr and "sae/training" not in run.stderr, run.stderr[-3000:]


def test_plan_that_fails_on_one_rank_stops_every_rank(tmp_path, cache):
    """distribute_saes: rank 1 trains the SAE too wide for its device; rank 0's SAE fits (PlanError on one GPU)."""
    saes = [SWEEP[1], {**SWEEP[1], "d_sae": 2**32, "name": "too_wide"}]
    t0 = time.monotonic()
    run = _sae_train(_config(tmp_path, cache, "run", saes=saes, distribute_saes=True, batch_size=64,
                             total_tokens=64 * 20), nproc=2, timeout=120)
    _failed_alone(run, 1, "on cpu but")
    assert time.monotonic() - t0 < 60
    assert "would fit with d_sae ≤" in run.stderr


def test_nan_rows_in_the_sample_rank_0_reads_alone_stop_every_rank(tmp_path):
    """Data parallel: rank 0 alone reads the initial fit's sample while rank 1 waits for its broadcast."""
    data, _ = planted(1024, d=16, n_true=64)
    data[::7] = float("nan")
    cache = make_cache(tmp_path / "nan_cache", {"h0": data})
    t0 = time.monotonic()
    run = _sae_train(_config(tmp_path, cache, "run", saes=SWEEP[:1], batch_size=64, total_tokens=64 * 20),
                     nproc=2, timeout=120)
    _failed_alone(run, 0, "hold NaN/inf values")
    assert time.monotonic() - t0 < 60


ON_TMPFS = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            'mount -t tmpfs -o size=16k tmpfs "$1" && shift && exec "$@"', "sh"]
"""`[*ON_TMPFS, folder, *command]` runs command with a 16 KiB tmpfs on folder, in a mount namespace of its own (gone
with it; no privileges needed where unprivileged user namespaces are allowed)."""


def test_disk_full_under_rank_0s_checkpoint_stops_every_rank(tmp_path, cache):
    """A real ENOSPC: the checkpoints folder is a 16 KiB tmpfs (in a private mount namespace), too small for the
    first checkpoint, which rank 0 alone writes while rank 1 waits for it."""
    if subprocess.run([*ON_TMPFS, str(tmp_path), "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here (unshare --user --mount)")
    config = _config(tmp_path, cache, "run", saes=SWEEP[:1], batch_size=64, total_tokens=64 * 20, checkpoint_every=5)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sae",
                "train", "--config", str(config)]
    t0 = time.monotonic()
    run = subprocess.run([*ON_TMPFS, str(checkpoints), *launcher], env=_env(), text=True, capture_output=True,
                         timeout=120)
    _failed_alone(run, 0, f"no space left on device while writing in {checkpoints}")
    assert time.monotonic() - t0 < 60
    assert "no checkpoint was written yet" in run.stderr
    assert not any(checkpoints.iterdir())  # the namespace's tmpfs is gone; nothing was written under it either


def test_nan_row_in_one_ranks_share_of_a_batch_stops_every_rank(tmp_path):
    """A NaN row the initial fit's sample does not read (its shard is not among those sampled) lands in one rank's
    share of a batch mid-run: that rank's batch check fails alone while the other steps on."""
    from sae.data.store import ActivationStore, is_holdout

    seed, context_size, contexts_per_shard, n_shards = 3, 16, 512, 12
    rows_per_shard = contexts_per_shard * context_size  # the sample takes 65,536 rows from at most 9 such shards
    data, _ = planted(n_shards * rows_per_shard, d=16, n_true=64)
    unsampled = torch.randperm(n_shards, generator=torch.Generator().manual_seed(seed + 1))[-1].item()
    seqs = torch.arange(unsampled * contexts_per_shard, (unsampled + 1) * contexts_per_shard)
    context = seqs[~is_holdout(seqs, 0.1)][0].item()  # a training context
    data[context * context_size + 5] = float("nan")
    cache = tmp_path / "cache"
    writer = CacheWriter(cache, {"model": "planted", "hooks": {"h0": 16}, "dtype": "float32",
                                 "context_size": context_size, "exclude_first": False, "eval_fraction": 0.1},
                         contexts_per_shard=contexts_per_shard)
    writer.add({"h0": data.reshape(-1, context_size, 16)}, torch.zeros(len(data) // context_size, context_size,
                                                                        dtype=torch.long), first_pos=0)
    writer.finish(first_pos=0)
    writer.close()
    store = ActivationStore(cache)
    assert torch.isfinite(store.sample(["h0"], 65536, seed=seed + 1)["h0"]).all()  # the test's premise
    t0 = time.monotonic()
    run = _sae_train(_config(tmp_path, cache, "run", saes=SWEEP[:1], batch_size=1024, shuffle_rows=rows_per_shard,
                             total_tokens=store.n_train_rows, log_every=50), nproc=2, timeout=120)
    rank = int(re.search(r"rank (\d) failed: ", run.stderr).group(1)) if "failed: " in run.stderr else -1
    _failed_alone(run, rank, "non-finite values (NaN/inf) in the cache for hook 'h0'")
    assert time.monotonic() - t0 < 60


def test_init_makes_the_picked_gpu_current_and_gives_the_group_its_timeout(monkeypatch):
    """device=cuda:1 in one process: CUDA events and synchronize() act on the current device, so it must be the
    picked one. Under torchrun the process group gets the run's timeout rather than nccl's 10 minutes."""
    from datetime import timedelta

    import torch.distributed as dist

    from sae.training import distributed

    current, group = [], {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    world, device = distributed.init("cuda:1")
    assert not world.distributed and device == torch.device("cuda", 1) and current == [device]

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: group.update(backend=backend, **kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    world, device = distributed.init("cpu", timedelta(minutes=3))
    assert world.rank == 1 and device.type == "cpu"
    assert group == {"backend": "gloo", "device_id": None, "timeout": timedelta(minutes=3)}
