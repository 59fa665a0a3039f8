"""GPU-shaped behaviour checked on the CPU: selections that stay exact without ever sorting the whole batch, no topk
over more than 2³¹ − 1 elements at a million latents (shapes under the meta device, nothing allocated), JumpReLU's
initialisation in bounded chunks, and a backward that keeps the parameters' dtype under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sae.saes import SAEConfig, create_sae
from sae.saes import jumprelu as jumprelu_module
from sae.saes import kernels
from sae.training.trainer import SAETrainer

aten = torch.ops.aten


def batch_topk_brute(pre: torch.Tensor, k_total: int) -> set[tuple[int, int]]:
    flat = pre.flatten().topk(k_total).indices
    return {(int(i) // pre.shape[1], int(i) % pre.shape[1]) for i in flat}


def test_flat_topk_in_chunks_equals_one_topk(monkeypatch):
    torch.manual_seed(0)
    values = torch.randn(37, 50)
    expected = set(values.flatten().topk(100).indices.tolist())
    monkeypatch.setattr(kernels, "TOPK_MAX_ELEMENTS", 120)  # chunks of 2 rows
    assert set(kernels.flat_topk(values, 100).tolist()) == expected


def test_batchtopk_selection_is_exact_when_one_row_needs_every_candidate():
    """A row that holds far more than its 4k candidates of the batch's top k·B is widened, not cut short."""
    torch.manual_seed(0)
    sae = create_sae(SAEConfig("batchtopk", d_in=8, d_sae=256, k=2))
    pre = torch.randn(16, 256)
    pre[3] += 10  # row 3 holds the batch's top 32 = k·B entries alone, 4× its 4k = 8 candidates
    rows, feats, inexact = sae._select(pre)
    assert bool(inexact)  # flagged, so the step redoes it
    rows, feats = sae._select_wider(pre)
    assert set(zip(rows.tolist(), feats.tolist())) == batch_topk_brute(pre, 32)
    assert rows.tolist() == sorted(rows.tolist())
    pre = torch.randn(16, 256)  # an ordinary batch: exact at once
    rows, feats, inexact = sae._select(pre)
    assert not bool(inexact) and set(zip(rows.tolist(), feats.tolist())) == batch_topk_brute(pre, 32)


@pytest.mark.parametrize("dominant", [None, 3, 12])
def test_batchtopk_data_parallel_ranks_select_the_whole_batchs_top_between_them(dominant):
    """Two data-parallel ranks of 8 rows each keep between them exactly the top k·16 of the 16 rows, as one process
    does (each rank sees every rank's candidates through ``gather_over_ranks``), rows ascending on each; a row that
    needs more than its candidates, on either rank, flags both ranks, so they widen together."""
    torch.manual_seed(0)
    sae = create_sae(SAEConfig("batchtopk", d_in=8, d_sae=256, k=2))
    pre = torch.randn(16, 256)
    if dominant is not None:
        pre[dominant] += 10
    halves = pre.split(8)
    kept, flags = set(), []
    for rank, own in enumerate(halves):
        sae.rank_of_process = rank
        sae.gather_over_ranks = lambda t: torch.stack([h.topk(t.shape[1], dim=-1, sorted=False).values for h in halves])
        rows, feats, inexact = sae._select(pre=own)
        flags.append(bool(inexact))
        if inexact:
            rows, feats = sae._select_wider(own)
        assert rows.tolist() == sorted(rows.tolist())
        kept |= {(r + 8 * rank, f) for r, f in zip(rows.tolist(), feats.tolist())}
    assert kept == batch_topk_brute(pre, 32)
    assert flags == [dominant is not None] * 2


class TopkSizes(TorchDispatchMode):
    """The number of elements each topk/sort is asked to search."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.topk.default, aten.sort.default, aten.sort.stable, aten.kthvalue.default):
            x, dim = args[0], (args[2] if func is aten.topk.default and len(args) > 2 else -1)
            self.sizes.append(x.numel() if x.dim() <= 1 else x.shape[dim])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_no_selection_searches_past_2_31_at_a_million_latents(architecture):
    """Each topk of a training step's selections (the main one, the widest retry of BatchTopK's, AuxK's, JumpReLU's
    warm-up) searches one row or a bounded set of candidates, never the flat 4096 × 2²⁰ matrix (2³² entries): shapes
    on the meta device, nothing allocated."""
    extra = {"target_l0": 32} if architecture == "jumprelu" else {}
    sae = create_sae(SAEConfig(architecture, d_in=8, d_sae=64, k=32, aux_k=32, **extra)).to("meta")
    pre = torch.empty(4096, 2**20, device="meta")
    dead = torch.empty(2**20, dtype=torch.bool, device="meta")
    sizes = TopkSizes()
    with sizes:
        sae._select_aux(pre, dead, sae.aux_k)
        if architecture == "jumprelu":
            sae._warmup_mask(pre)
        else:
            sae._select(pre)
        if architecture == "batchtopk":
            sae._top_of_candidates(pre, 2**20)  # the widest retry: every latent a candidate
    assert len(sizes.sizes) >= 2 and max(sizes.sizes) < 2**31 - 1, sizes.sizes


def test_jumprelu_initialisation_works_in_bounded_chunks(monkeypatch):
    """The same b_enc as one quantile over the whole [rows, d_sae] matrix, never more than the chunk at once."""
    torch.manual_seed(0)
    sample = torch.randn(2000, 16) * 3 + 1
    whole = create_sae(SAEConfig("jumprelu", d_in=16, d_sae=300))
    chunked = create_sae(SAEConfig("jumprelu", d_in=16, d_sae=300))
    chunked.load_state_dict(whole.state_dict())
    whole.initialise_from_data(sample)
    seen = []
    real = torch.quantile
    monkeypatch.setattr(jumprelu_module, "INIT_CHUNK_ELEMENTS", 2000 * 64)
    monkeypatch.setattr(torch, "quantile", lambda t, *a, **k: seen.append(t.numel()) or real(t, *a, **k))
    chunked.initialise_from_data(sample)
    assert max(seen) <= 2000 * 64 and len(seen) == 5  # 300 latents in chunks of 64
    torch.testing.assert_close(chunked.b_enc, whole.b_enc)


CUDA_AUTOCAST_TO_BF16 = {aten.mm.default, aten.mv.default, aten.addmm.default, aten.addmv.default, aten.bmm.default,
                         aten.baddbmm.default, aten.addbmm.default}
"""Matrix products CUDA's autocast runs in bf16. CPU autocast's list is shorter (it leaves `mv` in fp32), so it alone
would not show a backward that re-entered autocast on CUDA."""


class CudaAutocastInBackward(TorchDispatchMode):
    """CUDA's autocast policy for those products while autocast is enabled, counting casts of tensors as large as
    `numel` (a parameter cast to bf16)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.casts = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CUDA_AUTOCAST_TO_BF16 and torch.is_autocast_enabled("cpu"):
            def cast(a):
                if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
                    self.casts += a.numel() >= self.numel
                    return a.to(torch.bfloat16)
                return a

            args = tuple(cast(a) for a in args)
        return func(*args, **(kwargs or {}))


def test_sparse_encoder_backward_casts_no_parameter_under_autocast():
    """On CUDA a backward that re-entered the forward's autocast (custom_bwd) cast W_enc to bf16 every step and
    rounded b_dec's gradient: called here with autocast on and CUDA's policy for matrix products, the kernel's
    backward runs its products in fp32 and returns fp32 gradients."""
    torch.manual_seed(0)
    W_enc = torch.randn(32, 256, requires_grad=True)
    b_enc, b_dec = torch.zeros(256, requires_grad=True), torch.zeros(32, requires_grad=True)
    x = torch.randn(64, 32)
    # with the dense pre-activations out too (AuxK's dense path), so both halves of the backward run
    select = lambda pre: (torch.arange(64).repeat_interleave(4), pre.topk(4, dim=-1).indices.flatten(), True)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vals, _, _, pre = kernels.SparseEncode.apply(x, b_dec, W_enc, b_enc, True, select)
        assert vals.dtype == pre.dtype == torch.bfloat16  # the forward's matmul did run under autocast
        casts = CudaAutocastInBackward(W_enc.numel())
        with casts:  # the backward called in the autocast context, as custom_bwd would run it
            grads = vals.grad_fn.apply(torch.ones_like(vals), None, None, torch.ones_like(pre))
    assert casts.casts == 0
    assert [g.dtype for g in grads if g is not None] == [torch.float32] * 3  # b_dec, W_enc, b_enc


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "relu_l1"])
def test_training_step_under_bf16_autocast_keeps_fp32_state(architecture):
    """The trainer's autocast step (the CUDA path, on the CPU here) with AuxK firing, in and after the TopK warm-up:
    no crash, every gradient in its parameter's dtype, Adam's moments fp32."""
    torch.manual_seed(0)
    extra = {"target_l0": 4} if architecture == "jumprelu" else {}
    sae = create_sae(SAEConfig(architecture, d_in=32, d_sae=256, k=4, aux_k=8, **extra))
    sae.initialise_from_data(torch.randn(256, 32))
    trainer = SAETrainer(sae, lr=1e-3, total_steps=4, topk_warmup_frac=0.5, dead_window_tokens=1)
    x = torch.randn(64, 32)
    for _ in range(4):  # steps 0-1 in the warm-up, 2-3 after it; AuxK from step 1 on
        metrics = trainer.step(x, autocast=True)
        grads = {n: p.grad.dtype for n, p in sae.named_parameters() if p.grad is not None}
        assert grads and set(grads.values()) == {torch.float32}, grads
    assert "auxk" in metrics or architecture == "relu_l1"
    moments = [v.dtype for st in trainer.optimizer.state.values() for k, v in st.items() if k.startswith("exp_avg")]
    assert moments and set(moments) == {torch.float32}


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_steps_autocast_to_bf16_only_where_the_gpu_has_it(monkeypatch, native_bf16, expected):
    """bf16 autocast on a GPU with native bf16; fp32 on older GPUs (emulated bf16 is slower than fp32) and the CPU.
    The query must ask for native support: with emulation counted every CUDA GPU says yes."""
    from sae.training.plan import step_precision

    asked: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native_bf16)
    assert step_precision(torch.device("cuda", 0)) == expected and asked == [False]
    assert step_precision(torch.device("cpu")) == "fp32"


def test_adam_keeps_the_foreach_implementation_on_the_cpu():
    """The fused Adam kernel is asked for on CUDA only (``SAETrainer``); on the CPU, where it would change the
    update's rounding against every checkpoint written so far, the default (foreach) implementation stays."""
    cfg = SAEConfig(architecture="topk", d_in=8, d_sae=32, k=2, hook_name="h")
    assert not SAETrainer(create_sae(cfg), lr=1e-3, total_steps=2).optimizer.defaults["fused"]


@pytest.mark.slow
def test_the_memory_plan_holds_what_a_step_really_takes():
    """Issue 19 §2 at a small scale: ``scripts/bench_memory.py`` measures peak RSS of each variant's initial fit and
    training steps (fp32 and bf16 autocast, AuxK firing) against the plan's figure: never above it, at most 1.3× below.
    (The plan counting 4 parameter copies and 2 activations left TopK's peak 35–80% above it.)"""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_memory.py"
    done = subprocess.run([sys.executable, str(script), "--d-in", "256", "--d-sae", "8192", "--batch", "512",
                           "--steps", "2", "--sample-rows", "4096", "--variants", "topk", "relu_l1", "jumprelu"],
                          capture_output=True, text=True, timeout=900, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    ratios = {name: r["plan_over_peak"] for name, r in report["results"].items()}
    assert report["ok"], ratios
