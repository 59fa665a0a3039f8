"""Sparse autoencoder models: the shared config, the base class every variant extends, and the variant registry.

Every variant stores ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]`` and
``b_dec [d_in]`` and works on *normalised* activations ``(x − mean) · scale`` internally, where the
trainer fits ``mean`` and ``scale`` so that the normalised data is centred with E‖x_n‖² = d_in (see
``SAE.initialise_from_data`` for why centred, where Anthropic's April 2024 update normalises E‖x‖²).
That makes the sparsity coefficients and learning rates transfer across models and layers.
``encode``/``decode``/``forward`` all take and return *raw* activations; ``save`` folds the mean
and the scale into the weights so that the files on disk need no normalisation at all.

Each variant lives in its own module (``relu_l1``, ``topk``, ``batchtopk`` with Matryoshka, ``jumprelu``) and is one
line of ``SAE_CLASSES``, filled in ``sae/saes/__init__.py``. On-disk layout is SAELens 6's (``sae.saes.formats``), so
a saved folder loads with ``sae_lens.SAE.load_from_disk``; ``SAE.load`` reads SAELens and sparsify folders too, and
``SAE.from_pretrained`` also takes hub ids and SAELens release/sae_id names (``sae.saes.pretrained``).

Transcoders are the same classes with ``cfg.hook_name_out`` set (Dunefsky et al. 2024, "Transcoders find
interpretable LLM feature circuits"): the encoder reads x at ``hook_name``, the decoder writes ŷ for the activation
y at ``hook_name_out`` (typically an MLP's input and output), and the loss is ‖y − ŷ‖². The output has its own scale
(E‖y·scale_out‖² = d_out) and, with ``cfg.skip``, a learned linear path x·W_skipᵀ (Paulo et al. 2025, "Transcoders
beat sparse autoencoders for interpretability"). They save in SAELens's transcoder layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.saes.formats import per_head_hook, read_saelens_config, read_saelens_tensors, saelens_architecture, saelens_cfg_json, write_saelens
from sae.saes.kernels import SparseActs, sparse_decode
from sae.saes.pretrained import (CFG_FILENAME, SPARSIFY_WEIGHTS_FILENAME, WEIGHTS_FILENAME, SAEFormatError, check_layout,
                                 find_sae, read_sparsify)

INIT_BLOCK = 4096
"""Latents per independently seeded block of the random initialisation (see ``SAE._init_tied``)."""


@dataclass
class SAEConfig:
    """Shape, provenance and loss hyper-parameters of one SAE.

    Fields a variant does not use are ignored by it (e.g. ``k`` for relu_l1), so one flat,
    JSON-serialisable dataclass describes every architecture.
    """

    architecture: str
    """The recipe: relu_l1, topk, batchtopk, matryoshka_batchtopk or jumprelu (see the class of each)."""
    d_in: int
    d_sae: int
    hook_name: str = ""
    model_name: str = ""
    dtype: str = "float32"
    scale: float = 1.0
    """Input normalisation: the model sees ``(x − mean) · scale`` (the mean is a buffer). 1.0 after ``save``
    folds both."""
    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec before encoding; None → the variant's paper default."""
    centre_input: bool | None = None
    """Subtract the data mean from the input (True), or leave it in with b_dec starting at it (False, Anthropic's April
    2024 recipe); either way an SAE's scale makes the centred energy d_in (see ``SAE.initialise_from_data``). None →
    True for an SAE, False for a transcoder (whose b_enc starts centring its input, and whose scale is uncentred)."""
    k: int = 32
    """topk: active latents per token; batchtopk, matryoshka_batchtopk: mean active latents per token."""
    l1_coefficient: float = 3.0
    """relu_l1: λ of the April-2024 penalty λ Σ fᵢ‖W_dec,ᵢ‖. Anthropic's λ = 5 is for uncentred inputs with
    E‖x‖² = d_in; ours are centred (see ``ReLUL1SAE`` for how 3 was chosen)."""
    l0_coefficient: float = 2.0
    """jumprelu without target_l0: weight λ of the paper's L0 penalty λ·L0 (with target_l0 the L0 controller sets
    λ)."""
    target_l0: float | None = None
    """jumprelu: None → the paper's λ·L0 penalty at λ = l0_coefficient; a number → a TopK warm-up at
    k = round(target_l0), then an L0 controller on θ and λ that holds the training L0 at the target (see
    JumpReLUSAE)."""
    bandwidth: float | None = None
    """jumprelu: STE kernel width ε; None → 1.0, the spread of a unit encoder direction's pre-activation
    (see JumpReLUSAE)."""
    init_threshold: float | None = None
    """jumprelu: initial θ; None → 1.0, as ε (see JumpReLUSAE). With target_l0 and a TopK warm-up, θ is reset to the
    warm-up's batch-wide threshold when it ends, and θ₀ only sets where b_enc starts."""
    aux_k: int | None = None
    """topk/batchtopk/jumprelu: latents in the AuxK reconstruction; None → d_in // 2 (Gao et al.)."""
    aux_coefficient: float = 1 / 32
    """topk/batchtopk/jumprelu: weight α of the AuxK loss (Gao et al. §A.2)."""
    threshold_momentum: float = 0.2
    """batchtopk: EMA rate of the inference threshold θ (the smallest activation each batch keeps); jumprelu: of the
    TopK warm-up's batch-wide threshold. 0.2 averages ~5 batches, a lag of ~4 steps behind a cut that still falls in the
    steps after the warm-up (the last tenth: 50 of a 500-step run, 400 of today's shortest default run), while the noise
    it lets through is small (per-batch cuts vary by ~1.5% at k 32, batch 512 on SmolLM2). Recorded per batch after the
    warm-up (`sae planted` d_in 32, 512 features, k 3, 500 steps of 2048): the cut fell 2.02 → 1.10, and fresh rows need
    1.109; 0.05 ended at 1.271 (+15%: saved L0 2.44, FVU 0.300), 0.1 at 1.143, 0.2 at 1.114 (L0 2.92, FVU 0.286). At
    d_in 64, 1024 features, k 8: L0 7.32 → 8.08; at the CI point 2.96 → 2.98. SmolLM2 layer 15 (k 32, 556 steps of 512):
    the cut fell 1.15 → 1.00 and 0.2 ended at 1.003 (the last 20 batches' mean 1.004), 0.05 at 1.023 — which fresh rows
    happened to need (held-out L0 32.3; 33.8 at 0.2): that run's last batches cut 2% below other rows. JumpReLU's mean
    max cosine and FVU moved by ≤ 0.001 and ≤ 0.002 at the 7 planted points measured (docs/planted.md), its SmolLM2 FVU
    0.157 → 0.156."""
    matryoshka_widths: list[int] | None = None
    """matryoshka_batchtopk: sizes of the nested dictionaries (prefixes of the latents) whose reconstruction errors
    the loss sums, strictly increasing and ending at d_sae; None → [d_sae/16, d_sae/4, d_sae]."""
    hook_name_out: str | None = None
    """Transcoder: the hook whose activations it predicts from those at ``hook_name`` (e.g. an MLP's output from its
    input); None → an SAE, which reconstructs its input."""
    d_out: int | None = None
    """Transcoder: width of ``hook_name_out``; None → d_in."""
    skip: bool = False
    """Transcoder: add a learned linear skip x·W_skipᵀ to the output (Paulo et al. 2025)."""
    scale_out: float = 1.0
    """Transcoder: output normalisation, the model predicts ``y · scale_out``. 1.0 after ``save`` folds it."""

    def __post_init__(self) -> None:
        if self.architecture not in SAE_CLASSES:
            raise SAEFormatError(
                f"unknown SAE architecture {self.architecture!r}; valid: {sorted(SAE_CLASSES)}"
            )
        if self.apply_b_dec_to_input is None:  # a transcoder's b_dec is the output's bias: nothing to subtract
            self.apply_b_dec_to_input = SAE_CLASSES[self.architecture].apply_b_dec_default and not self.is_transcoder
        if self.d_out is None:
            self.d_out = self.d_in
        if self.centre_input is None:  # a transcoder's input is left uncentred (its b_enc starts centring it)
            self.centre_input = not self.is_transcoder
        if self.architecture == "matryoshka_batchtopk" and self.matryoshka_widths is None:
            self.matryoshka_widths = sorted({w for w in (self.d_sae // 16, self.d_sae // 4, self.d_sae) if w > 0})
        problems = self.problems()
        if problems:
            raise SAEFormatError(f"invalid {self.architecture} SAE settings: {'; '.join(problems)}")

    def problems(self) -> list[str]:
        """Settings that would crash deep inside training (k > d_sae, a width of 0) or train silently to nothing
        (k = 0 ends at FVU 1.0), each with the range it must lie in."""
        found = [f"{name}={getattr(self, name)} must be > 0" for name in ("d_in", "d_sae") if getattr(self, name) <= 0]
        if SAE_CLASSES[self.architecture].uses_k and self.d_sae > 0 and not 1 <= self.k <= self.d_sae:
            found.append(f"k={self.k} must be between 1 and d_sae={self.d_sae}")
        found += [f"{name}={getattr(self, name)} must be ≥ 0" for name in ("l1_coefficient", "l0_coefficient", "aux_coefficient")
                  if not getattr(self, name) >= 0]  # `not >=` also catches NaN
        found += [f"{name}={getattr(self, name)} must be > 0 (or unset)" for name in ("target_l0", "bandwidth", "aux_k")
                  if getattr(self, name) is not None and not getattr(self, name) > 0]
        if self.target_l0 is not None and self.d_sae > 0 and self.target_l0 > self.d_sae:
            found.append(f"target_l0={self.target_l0} must be at most d_sae={self.d_sae}")
        widths = self.matryoshka_widths
        if widths is not None and (not widths or widths[-1] != self.d_sae or widths[0] < 1
                                   or any(a >= b for a, b in zip(widths, widths[1:]))):
            found.append(f"matryoshka_widths={widths} must be strictly increasing, ≥ 1 and end at d_sae={self.d_sae}")
        if self.is_transcoder:
            if self.apply_b_dec_to_input:
                found.append("apply_b_dec_to_input must be false for a transcoder (b_dec is the output's bias)")
            if self.d_out is not None and self.d_out <= 0:
                found.append(f"d_out={self.d_out} must be > 0")
        elif self.skip or self.d_out not in (None, self.d_in):
            found.append("skip and d_out are transcoder settings: also name the hook to predict (hook_out in a train "
                         "spec, hook_name_out in SAEConfig)")
        return found

    @property
    def is_transcoder(self) -> bool:
        return self.hook_name_out is not None

    @property
    def warms_up(self) -> bool:
        """Whether this SAE trains with the per-token TopK warm-up (``sae.training.train.TrainConfig.topk_warmup_frac``)."""
        return SAE_CLASSES[self.architecture].warms_up(self.target_l0)

    @property
    def auxk_latents(self) -> int:
        """k_aux: dead latents per token in the AuxK reconstruction (``aux_k``, or Gao et al.'s d_in / 2); 0 where
        the SAE has no AuxK pass (ReLU+L1, or aux_coefficient 0)."""
        if not (SAE_CLASSES[self.architecture].has_auxk and self.aux_coefficient):
            return 0
        return self.aux_k or self.d_in // 2

    @property
    def fast_biases(self) -> tuple[str, ...]:
        """Parameters whose Adam lr the trainer multiplies by √d_in: the variant's ``fast_params`` in an SAE, none in a
        transcoder (whose input keeps its mean; see ``ReLUL1SAE``)."""
        return () if self.is_transcoder else SAE_CLASSES[self.architecture].fast_params

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build from a dict, ignoring unknown keys (forward compatibility of cfg.json)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def auxk_loss(aux_hat: Tensor, residual: Tensor, d: int, energy: Tensor) -> Tensor:
    """AuxK (Gao et al. §A.2): how well the dead latents' reconstruction models the residual. Gao et al. normalise
    it by the residual's energy (NMSE), here ``energy`` (Σ residual² over the batch, see ``SAE.mean_over_ranks``); our
    mse is in units where E‖x‖² = d_in, so AuxK is expressed in the same units to keep their α = 1/32."""
    return (aux_hat - residual).pow(2).sum() / energy.clamp_min(1e-8) * d


def auxk_weight(n_dead: Tensor, aux_k: int) -> Tensor:
    """AuxK's weight relative to α: min(n_dead / k_aux, 1), as Gao et al.'s reference code, SAELens and sparsify
    (``scale = min(num_dead / k_aux, 1.0)``) scale it: with fewer dead latents than k_aux the loss still asks a full
    reconstruction of the residual from the few there are, so its pull is cut in proportion."""
    return (n_dead / aux_k).clamp(max=1.0)  # a tensor: reading n_dead on the host would stall a GPU


AUXK_DENSE_FROM: dict[str, float] = {"cpu": 1 / 8, "cuda": 1 / 256}
"""k_aux / d_sae from which AuxK decodes its activations as a dense [batch, d_sae] matrix (a masked ReLU of the
pre-activations, then matmuls) rather than as batch·k_aux (row, latent) pairs through ``embedding_bag`` (issue 19).
Both cost about five passes, over batch·d_sae·d_in multiply-adds for the dense path and batch·k_aux·d_in scattered
reads for the sparse one. The CPU's is measured (``scripts/bench_train.py``'s ``topk_auxk``, TopK with every latent
dead, dense ÷ sparse AuxK time, load 1–1.5): at k_aux / d_sae = 1/4 dense was 1.50× faster at d_in 576 and 1.91× at
2048; at 1/8 0.86× (576), 0.98× (256) and 1.33× (2048); at 1/32 0.51× (576). CUDA's is a roofline estimate until a
GPU measures it (the same script, run by ``scripts/gpu_check.sh``, reports ``dense_speedup``): a pair's d_in reads
from HBM cost ~200 bf16 (~50 TF32: the encoder's backward runs outside autocast) multiply-adds' time per element, so
at d_in 2048 × 65,536 latents (k_aux 1,024 = d_sae / 64) the dense decode should win by ~1.5–5×."""


def dense_auxk(aux_k: int, d_sae: int, device_type: str) -> bool:
    """Whether AuxK takes the dense path (``AUXK_DENSE_FROM``) for `aux_k` (at most all) of `d_sae` latents on this
    device type."""
    return min(aux_k, d_sae) >= AUXK_DENSE_FROM.get(device_type, AUXK_DENSE_FROM["cpu"]) * d_sae


class ForwardOutput(NamedTuple):
    """Everything one training step needs from a forward pass."""

    x_hat: Tensor
    """Reconstruction of the raw input, [batch, d_in]."""
    acts: Tensor | SparseActs
    """Latent activations: dense [batch, d_sae] (relu_l1, jumprelu) or ``SparseActs``
    (topk, batchtopk, which never materialise the dense matrix)."""
    loss: Tensor
    """Scalar to call ``backward`` on, in normalised units (E‖x‖² = d_in)."""
    losses: dict[str, Tensor]
    """Named, detached loss terms before weighting (mse, l1, l0, auxk)."""
    l0: Tensor
    """Mean number of active latents per token (detached scalar)."""
    fire_counts: Tensor
    """Tokens in this batch on which each latent fired, [d_sae] (int64, or float32 where summed from 0/1 floats: exact
    below 2²⁴ rows); feeds the trainer's dead-latent tracker."""


class SAE(nn.Module):
    """Shared parameters, normalisation, dense decode, save/load.

    Subclasses implement ``encode_normalised`` (inference activations) and ``_train_forward``
    (activations + loss terms in normalised units).
    """

    sae_lens_architecture: ClassVar[str]
    apply_b_dec_default: ClassVar[bool]
    uses_k: ClassVar[bool] = False
    """Whether ``cfg.k`` (active latents per token) shapes this variant's activations."""
    unit_norm_decoder: ClassVar[bool]
    """Keep decoder rows unit-norm: the trainer calls ``remove_parallel_grads`` before and
    ``project_parameters`` after each optimiser step."""
    sparse_step: ClassVar[bool] = False
    """The training step never builds the dense [batch, d_sae] activations (sparse decode and encoder backward)."""
    dense_act_copies: ClassVar[float]
    """fp32 [batch, d_sae] tensors alive at a training step's peak, for the memory plan (``sae.training.plan``):
    measured by ``scripts/bench_memory.py`` as the batch-dependent part of the peak (batches of 512 and 2,048 rows
    at d_in 256, d_sae 8,192, fp32, AuxK firing), rounded up."""
    dense_act_copies_bf16: ClassVar[float]
    """The same under bf16 autocast, in fp32-sized copies (some of the step's [batch, d_sae] tensors are bf16)."""
    has_auxk: ClassVar[bool] = False
    """Dead latents learn through the AuxK loss (Gao et al. §A.2; ``SAEConfig.auxk_latents``)."""
    dense_auxk_copies: ClassVar[float] = 0.0
    """fp32 [batch, d_sae] tensors AuxK's dense decode (``dense_auxk``) adds to a step's peak, for the memory plan:
    measured by ``scripts/bench_memory.py --auxk-path dense`` against ``--auxk-path sparse`` (d_in 256, d_sae 8,192,
    batch 2,048), rounded up."""
    dense_auxk_copies_bf16: ClassVar[float] = 0.0
    """The same under bf16 autocast."""
    init_workspace_bytes: ClassVar[int] = 0
    """Memory the variant's own initial fit needs beyond the sample's copies (``sae.training.plan``)."""
    reference_steps: ClassVar[int]
    """Run length (steps) at which ``sae.training.train.default_lr`` hands over to ``paper_lr`` (see there)."""
    paper_d_in: ClassVar[int | None] = None
    """Width of the activations ``paper_lr`` was set on, when ``default_lr`` rescales it to other widths; None:
    used at every width as it is (see there)."""
    fast_params: ClassVar[tuple[str, ...]] = ()
    """Per-latent scalars that learn √d_in times faster (see ``SAEConfig.fast_biases``)."""

    @staticmethod
    def paper_lr(d_sae: int) -> float:
        """The recipe's Adam learning rate for inputs with E‖x‖² = d_in, before ``default_lr``'s short-run boost."""
        raise NotImplementedError

    @staticmethod
    def warms_up(target_l0: float | None) -> bool:
        """Whether the variant trains with the per-token TopK warm-up (``sae.training.train.TrainConfig.topk_warmup_frac``);
        none by default."""
        return False

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dtype))
        self.register_buffer("scale", torch.tensor(float(cfg.scale), dtype=dtype))
        self.register_buffer("mean", torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.is_transcoder:
            self.register_buffer("scale_out", torch.tensor(float(cfg.scale_out), dtype=dtype))
        if cfg.skip:  # zero at init (as SAELens's SkipTranscoder): the sparse path starts alone
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=dtype))
        self._init_tied(decoder_norm=1.0)

    first_latent: int = 0
    """Index of this module's first latent in the whole SAE (a latent shard, ``sae.training.sharded``, holds a slice)."""

    @property
    def total_latents(self) -> int:
        """Latents of the whole SAE, of which this module holds ``cfg.d_sae`` (all of them unless a shard)."""
        return self.cfg.d_sae

    @torch.no_grad()
    def _init_tied(self, decoder_norm: float) -> None:
        """Random decoder directions of a fixed norm and W_enc = W_decᵀ — the initialisation
        shared by all four recipes (Gao et al. §2.2; Anthropic April 2024; Rajamanoharan et al.).

        The directions come in blocks of ``INIT_BLOCK`` latents, each from its own generator seeded by one draw
        from the global RNG, so latents [a, b) get the same values whether the SAE is built whole or as a shard
        holding only them: a shard of an SAE too wide for one device never builds the whole SAE. A transcoder's
        encoder and decoder live in different spaces, so its encoder gets directions of its own (a second draw)."""
        self.W_dec.copy_(self._random_directions(self.cfg.d_out, decoder_norm))
        if self.cfg.is_transcoder:
            self.W_enc.copy_(self._random_directions(self.cfg.d_in, decoder_norm).T)
        else:
            self.W_enc.copy_(self.W_dec.T)

    def _random_directions(self, width: int, norm: float) -> Tensor:
        """[d_sae, width] random rows of the given norm for this module's latents (see ``_init_tied``)."""
        seed = int(torch.randint(2**62, (), device="cpu"))
        first, device = self.first_latent, self.W_dec.device
        out = torch.empty(self.cfg.d_sae, width, device=device, dtype=self.W_dec.dtype)
        for start in range(first - first % INIT_BLOCK, first + self.cfg.d_sae, INIT_BLOCK):
            gen = torch.Generator(device).manual_seed(seed + start // INIT_BLOCK)
            block = torch.randn(INIT_BLOCK, width, generator=gen, device=device, dtype=self.W_dec.dtype)
            lo, hi = max(start, first), min(start + INIT_BLOCK, first + self.cfg.d_sae)
            out[lo - first:hi - first] = block[lo - start:hi - start]
        return out * (norm / out.norm(dim=1, keepdim=True))

    def sync_cfg_scales(self) -> None:
        """Copy the scale buffers (loaded from a checkpoint, or broadcast from rank 0) into the config."""
        self.cfg.scale = float(self.scale)
        if self.cfg.is_transcoder:
            self.cfg.scale_out = float(self.scale_out)

    @property
    def out_scale(self) -> Tensor:
        """Scale of the output space: the input's for an SAE, its own for a transcoder."""
        return self.scale_out if self.cfg.is_transcoder else self.scale

    # ----- normalisation -------------------------------------------------------------------

    FITTED_BUFFERS: ClassVar[tuple[str, ...]] = ("scale", "mean", "scale_out")
    """Buffers fitted once from data (``initialise_from_data``), never changed by training."""

    @torch.no_grad()
    def initialise_from_data(self, sample: Tensor, target: Tensor | None = None, *, topk_warmup: bool = False) -> None:
        """Fit ``scale`` so the centred data has E‖(x − mean)·scale‖² = d_in, and either subtract the mean
        (``cfg.centre_input``: x_n = (x − mean)·scale, b_dec starting at 0) or leave it in the input with b_dec
        starting at it (x_n = x·scale, Anthropic's April 2024 recipe).

        The scale comes from the *centred* energy in both cases. Anthropic's update normalises E‖x‖², which lets a
        constant offset eat the budget: a residual stream's mean is as large as its spread or larger (SmolLM2-135M
        layer 15: ‖mean‖ = 1.09·√E‖x − mean‖², so E‖x‖² = 2.2× the centred energy), and the signal is then weaker
        than the coefficients were tuned for. On the hard data of `sae planted` (‖offset‖ = 4× the spread) ReLU+L1 at
        λ = 5 scaled by E‖x‖² collapsed to L0 0.02 (FVU 1.0); scaled by the centred energy it keeps L0 ≈ 10.

        Centring (the default for every SAE) costs one subtraction per batch; b_dec then starts at 0, the
        normalised data's mean, standing in for Gao et al.'s geometric median (nearly as good, and one pass).
        Uncentred TopK k = 4 on that data reached mean max cosine 0.84 with 40% of its latents dead (d_in 64, 512
        features); centred, 0.95–0.99. (Left in the input, the mean was what let ReLU+L1 sparsify quickly on the
        real model: see ``ReLUL1SAE`` for what replaces it.)

        A transcoder (never centred) also fits ``scale_out`` on its `target` rows (E‖y·scale_out‖² = d_out), starts
        b_dec at their mean, and starts b_enc at −mean(x)·W_enc, so its encoder sees centred inputs at first as an
        SAE's does through b_dec.

        ``topk_warmup``: training will start with the per-token TopK warm-up (as ``train_forward``'s); JumpReLU then
        leaves b_enc where this fit leaves it.
        """
        sample = sample.to(self.W_dec.device, torch.float32)
        mean = sample.mean(0, dtype=torch.float64).float()
        energy = (sample if self.cfg.is_transcoder else sample - mean).pow(2).sum(-1).mean()
        scale = math.sqrt(self.cfg.d_in / energy.clamp_min(1e-30).item())
        self.scale.fill_(scale)
        self.cfg.scale = scale
        if not self.cfg.is_transcoder:
            if self.cfg.centre_input:
                self.mean.copy_(mean)
                self.b_dec.zero_()
            else:
                self.mean.zero_()
                self.b_dec.copy_(mean * scale)
            return
        if target is None:
            raise SAEFormatError(f"a transcoder to {self.cfg.hook_name_out} needs its target rows to initialise from")
        target = target.to(self.W_dec.device, torch.float32)
        scale_out = math.sqrt(self.cfg.d_out / target.pow(2).sum(-1).mean().item())
        self.scale_out.fill_(scale_out)
        self.cfg.scale_out = scale_out
        self.b_dec.copy_(target.mean(0) * scale_out)
        self.b_enc.copy_(-(mean * scale) @ self.W_enc.float())

    def normalise(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] in the SAE's working units: (x − mean)·scale, in the SAE's dtype."""
        return (x.to(self.W_enc.dtype) - self.mean) * self.scale

    def denormalise(self, out_n: Tensor) -> Tensor:
        """Normalised output in raw units: out_n/scale + mean for an SAE (the inverse of ``normalise``), out_n/scale_out
        for a transcoder (whose input is never centred)."""
        return out_n / self.out_scale if self.cfg.is_transcoder else out_n / self.scale + self.mean

    # ----- inference -----------------------------------------------------------------------

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """Encoder pre-activations of normalised input."""
        if self.cfg.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        return torch.addmm(self.b_enc, x_n, self.W_enc)

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        raise NotImplementedError

    def encode_sparse_normalised(self, x_n: Tensor) -> SparseActs:
        """Active latents of normalised input; variants that select latents directly override it."""
        f = self.encode_normalised(x_n)
        rows, feats = f.nonzero(as_tuple=True)
        return SparseActs(rows, feats, f[rows, feats])

    def _normalised_rows(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] as normalised rows [n, d_in] in the SAE's dtype."""
        return self.normalise(x.reshape(-1, self.cfg.d_in))

    def _flat(self, x: Tensor) -> Tensor:
        """x as [..., d_in]: an SAE of TransformerLens's attention ``hook_z`` gets its activations per head,
        [..., n_heads, d_head], which are flattened as SAELens's ``reshape_activations: hook_z`` does (input already
        flat is taken as it is)."""
        return x.flatten(-2) if per_head_hook(self.cfg.hook_name) and x.shape[-1] != self.cfg.d_in else x

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [..., d_sae] of raw activations x [..., d_in] (a hook_z SAE's also as
        [..., n_heads, d_head])."""
        x = self._flat(x)
        return self.encode_normalised(self._normalised_rows(x)).reshape(*x.shape[:-1], self.cfg.d_sae)

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """The nonzero latent activations of raw activations x [..., d_in] as (rows, features, values), rows
        ascending and indexing ``x.reshape(-1, d_in)``: ``encode_sparse(x).to_dense(n, d_sae)`` is ``encode(x)``.

        At L0 in the tens out of thousands of latents this is what analysis code wants to iterate over; the TopK
        variant never builds the dense [n, d_sae] activation matrix (only its pre-activations).
        """
        return self.encode_sparse_normalised(self._normalised_rows(self._flat(x)))

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Raw-space output [..., d_out] of dense latents f [..., d_sae]: the reconstruction of the input for an SAE,
        the prediction of the output hook for a transcoder, whose skip path also needs the raw input x [..., d_in]."""
        if self.cfg.skip and x is None:
            raise ValueError("a skip transcoder's output depends on its input: call decode(f, x)")
        out = (f @ self.W_dec + self.b_dec) if x is None else self._output_offset(f @ self.W_dec, self.normalise(self._flat(x)))
        return self.denormalise(out)

    def _output_offset(self, decoded: Tensor | float, x_n: Tensor) -> Tensor:
        """The latents' decoded sum plus b_dec and, for a skip transcoder, the linear path x_n·W_skipᵀ (normalised units)."""
        out = decoded + self.b_dec
        return out + x_n @ self.W_skip.T if self.cfg.skip else out

    # ----- training ------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Output [..., d_out] for raw activations x [..., d_in] (inference, as in SAELens and sparsify): the
        reconstruction of x for an SAE, the prediction of the output hook for a transcoder. A hook_z SAE given
        [..., n_heads, d_head] returns that shape, as SAELens's does."""
        flat = self._flat(x)
        out = self.decode(self.encode(flat), flat)
        return out.unflatten(-1, x.shape[-2:]) if flat is not x and not self.cfg.is_transcoder else out

    row_weight: float = 0.0
    """The warm-up's weight (set by ``train_forward``): 1 while each row keeps its top k, between 0 and 1 in
    BatchTopK's hand-over to its batch-wide selection, 0 after (and for a variant without the warm-up)."""

    @property
    def warming_up(self) -> bool:
        """In the per-token TopK warm-up of a batch-budget variant, its hand-over included."""
        return self.row_weight > 0

    def train_forward(
        self, x: Tensor, target: Tensor | None = None, *, dead_mask: Tensor | None = None, penalty_scale: float = 1.0,
        topk_warmup: float = 0.0,
    ) -> ForwardOutput:
        """Training forward pass on raw activations x [batch, d_in]: output, activations and loss terms.

        ``target`` [batch, d_out] is what a transcoder predicts (the activations at ``hook_name_out`` of the same
        tokens); an SAE's target is x itself. ``dead_mask`` [d_sae] marks latents the trainer considers dead (AuxK
        uses it); ``penalty_scale`` multiplies the sparsity coefficient (the trainer warms it up); ``topk_warmup``
        (1 or True) asks BatchTopK and JumpReLU with a target L0 to select each row's top k instead (the trainer's
        ``sae.training.train.TrainConfig.topk_warmup_frac``, which says why); BatchTopK reads a weight between 0 and 1
        as its hand-over (``sae.training.trainer.topk_row_weight``), JumpReLU as the warm-up.
        """
        if self.cfg.is_transcoder != (target is not None):
            raise ValueError("a transcoder trains on (x, target) pairs and an SAE on x alone")
        self.row_weight = float(topk_warmup) if self.cfg.warms_up else 0.0
        x_n = self.normalise(x)
        y_n = x_n if target is None else target.to(self.W_enc.dtype) * self.scale_out
        x_hat_n, acts, loss, losses, l0, fire_counts = self._train_forward(
            x_n, y_n, dead_mask, penalty_scale
        )
        return ForwardOutput(self.denormalise(x_hat_n), acts, loss, losses, l0, fire_counts)

    def _train_forward(
        self, x_n: Tensor, y_n: Tensor, dead_mask: Tensor | None, penalty_scale: float
    ) -> tuple[Tensor, Tensor | SparseActs, Tensor, dict[str, Tensor], Tensor, Tensor]:
        """Output, activations and losses for normalised input x_n and target y_n (x_n itself for an SAE)."""
        raise NotImplementedError

    # ----- AuxK (Gao et al. §A.2): dead latents model the residual ---------------------------------------------

    @property
    def aux_k(self) -> int:
        """k_aux: dead latents per token in the AuxK reconstruction (``SAEConfig.auxk_latents``)."""
        return self.cfg.auxk_latents

    def _dead_total(self, dead_mask: Tensor | None) -> Tensor | None:
        """Dead latents (of all shards) as a device tensor, or None when AuxK is off (no coefficient, or no tracker)."""
        if dead_mask is None or not self.cfg.aux_coefficient:
            return None
        return self._sum_over_shards(dead_mask.sum())

    def _select_aux(self, pre: Tensor, dead_mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(rows, latents) of each row's top-k latents by pre-activation among the dead ones, rows ascending. k is
        fixed (``aux_k``, not the number of dead latents, which only the device knows): where fewer are dead, the
        rest are live latents, which ``_aux_acts`` switches off."""
        feats = pre.masked_fill(~dead_mask, -torch.inf).topk(k, dim=-1).indices
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return rows, feats.flatten()

    @staticmethod
    def _aux_acts(rows: Tensor, feats: Tensor, pre_values: Tensor, dead_mask: Tensor) -> SparseActs:
        """AuxK's activations: ReLU of the selected pre-activations, zero (and so without gradient) on live latents."""
        return SparseActs(rows, feats, F.relu(pre_values) * dead_mask[feats])

    def _dense_auxk(self, pre: Tensor) -> bool:
        """Whether AuxK over these pre-activations takes the dense path: by k_aux over all latents, also where this
        process holds a shard of them (each shard then decodes its share, ~k_aux / shards pairs per row)."""
        return dense_auxk(self.aux_k, self.total_latents, pre.device.type)

    def _aux_from(self, pre: Tensor, dead_mask: Tensor) -> Tensor | SparseActs:
        """AuxK's activations from the whole pre-activations: dense (``_dense_auxk``; ReLU at the selected dead
        pairs, zero elsewhere) or as pairs."""
        rows, feats = self._select_aux(pre.detach(), dead_mask, min(self.aux_k, pre.shape[1]))
        if not self._dense_auxk(pre):
            return self._aux_acts(rows, feats, pre[rows, feats], dead_mask)
        keep = torch.zeros(pre.shape, dtype=torch.bool, device=pre.device).index_put_((rows, feats), dead_mask[feats])
        return pre * (keep & (pre > 0))  # ReLU by the mask: autograd keeps one bool matrix, not ReLU's output too

    def _auxk(self, aux: Tensor | SparseActs, y_n: Tensor, x_hat: Tensor, n_dead: Tensor) -> tuple[Tensor, Tensor]:
        """(the weighted AuxK term to add to the loss, the unweighted loss to log) for the dead latents' activations
        ``aux`` (dense, or as pairs) against the residual of the normalised target y_n: α·min(n_dead/k_aux, 1)·AuxK
        (``auxk_weight``)."""
        decoded = aux @ self.W_dec if isinstance(aux, Tensor) else sparse_decode(aux, self.W_dec, len(y_n))
        aux_hat = self._sum_over_shards(decoded)
        residual = (y_n - x_hat).detach()
        auxk = auxk_loss(aux_hat, residual, self.cfg.d_out, self.mean_over_ranks(residual.pow(2).sum()))
        return self.cfg.aux_coefficient * auxk_weight(n_dead, self.aux_k) * auxk, auxk.detach()

    mean_over_ranks: Callable[[Tensor], Tensor] = staticmethod(lambda t: t)
    """A batch statistic a loss divides by (AuxK's residual energy), averaged over data-parallel ranks: the identity in
    one process; ``sae.training.trainer.SAETrainer`` sets an all-reduce for a data-parallel job. Each rank's loss is
    then its share of the one-process loss on the global batch, so the ranks' mean gradient is that loss's gradient
    (with per-rank energies, 2 gloo ranks ended 0.41 (max abs) from 1 process on SmolLM2, issue 19)."""

    gather_over_ranks: Callable[[Tensor], Tensor] = staticmethod(lambda t: t.unsqueeze(0))
    """Every data-parallel rank's copy of a per-rank tensor, stacked [ranks, *shape]: one in one process;
    ``sae.training.trainer.SAETrainer`` sets an all-gather for a data-parallel job. For a batch statistic no mean
    of per-rank values gives (JumpReLU's warm-up cut, a quantile of the global batch; BatchTopK's selection)."""

    rank_of_process: int = 0
    """This process's index in ``gather_over_ranks``'s stack (its data-parallel rank)."""

    def _sum_over_shards(self, t: Tensor) -> Tensor:
        """A sum over latents completed across latent shards: the identity here, where this process holds every
        latent (``sae.training.sharded`` overrides it, and ``_encoder_b_dec``, to shard the latents across processes)."""
        return t

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out the gradient component along each decoder row, so the optimiser step
        moves rows (to first order) along the unit sphere (Gao et al. §A.2)."""
        if self.W_dec.grad is None:
            return
        W, g = self.W_dec, self.W_dec.grad
        g.sub_((g * W).sum(1, keepdim=True) * W)

    @torch.no_grad()
    def project_parameters(self) -> None:
        """Restore the variant's constraints after an optimiser step (unit-norm decoder rows
        where ``unit_norm_decoder``; subclasses add their own)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    # ----- persistence ---------------------------------------------------------------------

    def _extra_inference_tensors(self) -> dict[str, Tensor]:
        """Tensors besides the four weights that SAELens's inference class expects."""
        return {}

    def _load_extra_inference_tensors(self, tensors: dict[str, Tensor]) -> None:
        pass

    @torch.no_grad()
    def folded_state(self) -> dict[str, Tensor]:
        """Weights with the input mean μ and scale s folded in, for raw activations with no normalisation.

        With x_n = s·(x − μ) and a = apply_b_dec_to_input (W' = s·W_enc, b_dec' = b_dec/s + μ):
        x̂ = x̂_n/s + μ = f (W_dec/s) + b_dec', and pre = (s·(x − μ) − a·b_dec) W_enc + b_enc
        = (x − μ − a·b_dec/s) W' + b_enc, which is (x − b_dec') W' + b_enc when a = 1, and
        x W' + (b_enc − μ W') when a = 0. Thresholds act on the (unchanged) pre-activations.
        A transcoder (μ = 0, a = 0) folds its output scale t likewise: W_dec/t, b_dec/t, and W_skip·s/t.
        """
        s, t = self.scale, self.out_scale
        dtype = getattr(torch, self.cfg.dtype)
        W_enc = self.W_enc * s
        state = {
            "W_enc": W_enc,
            "b_enc": self.b_enc if self.cfg.apply_b_dec_to_input else self.b_enc - self.mean @ W_enc,
            "W_dec": self.W_dec / t,
            "b_dec": self.denormalise(self.b_dec),
            **({"W_skip": self.W_skip * s / t} if self.cfg.skip else {}),
            **self._extra_inference_tensors(),
        }
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}

    def save(self, path: str | Path) -> Path:
        """Write a SAELens-6 folder: ``cfg.json`` + ``sae_weights.safetensors``, mean and scale folded.

        The folder appears whole or not at all (a crash never pairs new weights with an old cfg); an SAE folder
        already there is replaced. The model itself is left untouched (training may continue after a save).
        """
        cfg = self.cfg
        cfg_json = saelens_cfg_json(
            asdict(replace(cfg, scale=1.0, scale_out=1.0)),
            saelens_architecture(self.sae_lens_architecture, cfg.is_transcoder, cfg.skip, cfg.d_out == cfg.d_in),
            fitted_scale=float(self.scale),
            fitted_scale_out=float(self.scale_out) if cfg.is_transcoder else None,
        )
        return write_saelens(Path(path), cfg_json, self.folded_state())

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Load a local SAE folder, ours, SAELens's (standard/topk/jumprelu and its transcoders) or sparsify's (topk), in eval
        mode. A folder SAELens re-saved computes as SAELens reads it: our copy of the settings (metadata.sae_config)
        is used only where SAELens's own keys and weights agree with it (see ``read_saelens_config``)."""
        path = Path(path)
        if check_layout(path) == "sparsify":
            fields_, tensors = read_sparsify(path)
            return SAE._from_tensors(fields_, tensors, path / SPARSIFY_WEIGHTS_FILENAME).to(device).eval()
        fields_, theirs = read_saelens_config(path, {name: c.sae_lens_architecture for name, c in SAE_CLASSES.items()})
        tensors = read_saelens_tensors(path)
        sae = SAE._from_tensors(fields_, tensors, path / WEIGHTS_FILENAME)
        held = all(torch.equal(t, tensors[name].to(t.dtype)) for name, t in sae._extra_inference_tensors().items())
        if not held:  # e.g. per-latent thresholds SAELens wrote over a BatchTopK's one: read as SAELens's own class
            sae = SAE._from_tensors(theirs, tensors, path / WEIGHTS_FILENAME)
        return sae.to(device).eval()

    @staticmethod
    def _from_tensors(fields_: dict[str, Any], tensors: dict[str, Tensor], file: Path) -> SAE:
        """The SAE `fields_` describe with the weights `tensors` read from `file`; settings that cannot build one, and
        weights missing or of another shape than the settings need, are named with the file (``copy_`` would
        broadcast some of them silently, or fail deep inside a later command)."""
        try:
            cfg = SAEConfig.from_dict(fields_)
        except (SAEFormatError, TypeError) as err:
            raise SAEFormatError(f"{file.parent / CFG_FILENAME}: {err}") from None
        sae = create_sae(cfg)
        names = ("W_enc", "b_enc", "W_dec", "b_dec", *(("W_skip",) if cfg.skip else ()))
        need = {name: getattr(sae, name).shape for name in names} | {
            name: t.shape for name, t in sae._extra_inference_tensors().items()}
        missing = [name for name in need if name not in tensors]
        if missing:
            raise SAEFormatError(f"{file} lacks {', '.join(missing)}, which its {CFG_FILENAME}'s {cfg.architecture} "
                                 "SAE needs")
        wrong = [f"{name} is {list(tensors[name].shape)}, not {list(shape)}" for name, shape in need.items()
                 if tensors[name].shape != shape]
        if wrong:
            widths = f"d_in={cfg.d_in}, d_sae={cfg.d_sae}" + (f", d_out={cfg.d_out}" if cfg.is_transcoder else "")
            raise SAEFormatError(f"{file}: {'; '.join(wrong)}, the shape{'s' if len(wrong) > 1 else ''} its "
                                 f"{CFG_FILENAME} ({widths}) needs")
        with torch.no_grad():
            for name in names:
                getattr(sae, name).copy_(tensors[name])
            sae._load_extra_inference_tensors(tensors)
        return sae

    @staticmethod
    def from_pretrained(name_or_path: str | Path, sae_id: str | None = None, device: str | torch.device = "cpu") -> SAE:
        """Load one SAE by any name ``sae.saes.pretrained`` resolves, in eval mode: a local folder (ours, SAELens's or
        sparsify's layout), a hub repo ``owner/name`` or a folder in one ``owner/name/layers.10``, or a SAELens
        ``release/sae_id`` (also as ``from_pretrained(release, sae_id)``)."""
        return SAE.load(find_sae(name_or_path, sae_id)[1], device)


SAE_CLASSES: dict[str, type[SAE]] = {}
"""Architecture name → class, one line per variant in ``sae/saes/__init__.py`` (which every import of this package
runs first, so the table is full before any config is built)."""


def create_sae(cfg: SAEConfig) -> SAE:
    """Instantiate the variant named by ``cfg.architecture``."""
    if cfg.architecture not in SAE_CLASSES:
        raise SAEFormatError(
            f"unknown SAE architecture {cfg.architecture!r}; valid: {sorted(SAE_CLASSES)}"
        )
    return SAE_CLASSES[cfg.architecture](cfg)


DEAD_FRACTION_LIMIT = 0.5
"""More dead latents than this and most of the width is wasted: Gao et al. (2024, §A.2) name dead latents the main
failure of large SAEs; the demo's TopK and ReLU SAEs end with 3% (docs/benchmarks.md)."""
MIN_FIRES_TO_JUDGE_DEAD = 50
"""Firings per latent on average (tokens·L0/d_sae) below which no latent is called dead (see ``failure_signs``)."""


def failure_signs(l0: float, dead_fraction: float, fires_per_latent: float = math.inf) -> list[str]:
    """What says an SAE failed to learn whatever its loss says, each with what to change; empty for a healthy one.

    L0 = 0 means no latent ever fires, so every input is reconstructed as b_dec alone (e.g. a sparsity penalty so
    strong it switched everything off); more than half the latents dead means most of the dictionary is unused.
    `fires_per_latent` (tokens·L0/d_sae, the firings an average latent had over the tokens measured): below
    ``MIN_FIRES_TO_JUDGE_DEAD`` a latent that never fired may just be rare — a wide SAE's features fire on as few as
    1 in 10⁶ tokens (Templeton et al. 2024) — so the dead fraction is not judged on so few tokens."""
    if l0 == 0:
        return ["L0 = 0 (no latent fires: it outputs b_dec alone); lower its sparsity penalty or learning rate"]
    if dead_fraction > DEAD_FRACTION_LIMIT and fires_per_latent >= MIN_FIRES_TO_JUDGE_DEAD:
        return [f"{dead_fraction:.0%} of its latents dead (more than {DEAD_FRACTION_LIMIT:.0%}); lower its learning "
                "rate, raise aux_coefficient (topk family) or train on more tokens"]
    return []

