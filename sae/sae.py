"""Sparse autoencoder models: one base class, one small class per architecture.

Every variant stores ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]`` and
``b_dec [d_in]`` and works on *normalised* activations ``(x − mean) · scale`` internally, where the
trainer fits ``mean`` and ``scale`` so that the normalised data is centred with E‖x_n‖² = d_in (see
``SAE.initialise_from_data`` for why centred, where Anthropic's April 2024 update normalises E‖x‖²).
That makes the sparsity coefficients and learning rates transfer across models and layers.
``encode``/``decode``/``forward`` all take and return *raw* activations; ``save`` folds the mean
and the scale into the weights so that the files on disk need no normalisation at all.

On-disk layout is SAELens 6's (``cfg.json`` + ``sae_weights.safetensors``), so a saved folder
loads with ``sae_lens.SAE.load_from_disk``; ``SAE.load`` reads SAELens and sparsify folders too, and
``SAE.from_pretrained`` also takes hub ids and SAELens release/sae_id names (``sae.pretrained``).

Transcoders are the same classes with ``cfg.hook_name_out`` set (Dunefsky et al. 2024, "Transcoders find
interpretable LLM feature circuits"): the encoder reads x at ``hook_name``, the decoder writes ŷ for the activation
y at ``hook_name_out`` (typically an MLP's input and output), and the loss is ‖y − ŷ‖². The output has its own scale
(E‖y·scale_out‖² = d_out) and, with ``cfg.skip``, a learned linear path x·W_skipᵀ (Paulo et al. 2025, "Transcoders
beat sparse autoencoders for interpretability"). They save in SAELens's transcoder layouts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from .pretrained import (
    CFG_FILENAME, WEIGHTS_FILENAME, SAEFormatError, check_layout, find_sae, read_sparsify,
)
from .store import atomic_folder

INIT_BLOCK = 4096
"""Latents per independently seeded block of the random initialisation (see ``SAE._init_tied``)."""
TRANSCODER_LAYOUTS = ["jumprelu_skip_transcoder", "jumprelu_transcoder", "skip_transcoder", "transcoder"]
"""SAELens's transcoder architectures, which load as our relu_l1 / jumprelu with ``hook_name_out`` set."""

# SAELens 6 decides how to parse cfg.json from metadata.sae_lens_version: anything older
# than 6.0 goes through its legacy-key conversion. We write the 6.x layout, so we say so.
SAELENS_FORMAT_VERSION = "6.0.0"


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
    """jumprelu: weight λ of the L0 penalty (λ·L0, or λ·(L0/target_l0 − 1)² with target_l0)."""
    target_l0: float | None = None
    """jumprelu: None → the paper's λ·L0 penalty; a number → dictionary_learning's
    λ·(L0/target_l0 − 1)², which steers L0 to target_l0, after a TopK warm-up at k = round(target_l0) (see
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
    threshold_momentum: float = 0.05
    """batchtopk: EMA rate of the inference threshold; jumprelu: of the TopK warm-up's batch-wide threshold. 0.05
    averages ~20 batches, so it settles within the ~80 steps after the warm-up of a 781-step run (0.01 left
    BatchTopK's inference L0 at 2.74 for k = 3 on the CI planted data, 0.05 at 2.95); runs of fewer than ~600 steps
    leave it less time."""
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
        """Whether this SAE trains with the per-token TopK warm-up (``sae.train.TrainConfig.topk_warmup_frac``)."""
        return SAE_CLASSES[self.architecture].warms_up(self.target_l0)

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


def auxk_loss(aux_hat: Tensor, residual: Tensor, d: int) -> Tensor:
    """AuxK (Gao et al. §A.2): how well the dead latents' reconstruction models the residual. Gao et al. normalise
    it by the residual's energy (NMSE); our mse is in units where E‖x‖² = d_in, so AuxK is expressed in the same
    units to keep their α = 1/32."""
    return (aux_hat - residual).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-8) * d


def auxk_weight(n_dead: int, aux_k: int) -> float:
    """AuxK's weight relative to α: min(n_dead / k_aux, 1), as Gao et al.'s reference code, SAELens and sparsify
    (``scale = min(num_dead / k_aux, 1.0)``) scale it: with fewer dead latents than k_aux the loss still asks a full
    reconstruction of the residual from the few there are, so its pull is cut in proportion."""
    return min(n_dead / aux_k, 1.0)


class SparseActs(NamedTuple):
    """Active latents in coordinate form, rows sorted ascending (one entry per active pair)."""

    rows: Tensor
    """Token index of each entry, int64 [nnz]."""
    features: Tensor
    """Latent index of each entry, int64 [nnz]."""
    values: Tensor
    """Activation of each entry, [nnz]."""

    def to_dense(self, n_rows: int, d_sae: int) -> Tensor:
        out = self.values.new_zeros(n_rows, d_sae)
        out[self.rows, self.features] = self.values
        return out


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
    """Tokens in this batch on which each latent fired, int64 [d_sae]; feeds the trainer's
    dead-latent tracker."""


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
    dense_act_copies: ClassVar[int]
    """fp32 [batch, d_sae] tensors alive at once in one training step, for the memory plan (``sae.plan``)."""
    reference_steps: ClassVar[int]
    """Run length (steps) at which ``sae.train.default_lr`` hands over to ``paper_lr`` (see there)."""
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
        """Whether the variant trains with the per-token TopK warm-up (``sae.train.TrainConfig.topk_warmup_frac``);
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
    """Index of this module's first latent in the whole SAE (a latent shard, ``sae.sharded``, holds a slice)."""

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
    def initialise_from_data(self, sample: Tensor, target: Tensor | None = None) -> None:
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

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [..., d_sae] of raw activations x [..., d_in]."""
        return self.encode_normalised(self._normalised_rows(x)).reshape(*x.shape[:-1], self.cfg.d_sae)

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """The nonzero latent activations of raw activations x [..., d_in] as (rows, features, values), rows
        ascending and indexing ``x.reshape(-1, d_in)``: ``encode_sparse(x).to_dense(n, d_sae)`` is ``encode(x)``.

        At L0 in the tens out of thousands of latents this is what analysis code wants to iterate over; the TopK
        variant never builds the dense [n, d_sae] activation matrix (only its pre-activations).
        """
        return self.encode_sparse_normalised(self._normalised_rows(x))

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Raw-space output [..., d_out] of dense latents f [..., d_sae]: the reconstruction of the input for an SAE,
        the prediction of the output hook for a transcoder, whose skip path also needs the raw input x [..., d_in]."""
        if self.cfg.skip and x is None:
            raise ValueError("a skip transcoder's output depends on its input: call decode(f, x)")
        out = (f @ self.W_dec + self.b_dec) if x is None else self._output_offset(f @ self.W_dec, self.normalise(x))
        return self.denormalise(out)

    def _output_offset(self, decoded: Tensor | float, x_n: Tensor) -> Tensor:
        """The latents' decoded sum plus b_dec and, for a skip transcoder, the linear path x_n·W_skipᵀ (normalised units)."""
        out = decoded + self.b_dec
        return out + x_n @ self.W_skip.T if self.cfg.skip else out

    # ----- training ------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Output [..., d_out] for raw activations x [..., d_in] (inference, as in SAELens and sparsify): the
        reconstruction of x for an SAE, the prediction of the output hook for a transcoder."""
        return self.decode(self.encode(x), x)

    warming_up: bool = False
    """In the per-token TopK warm-up of a batch-budget variant (set by ``train_forward``)."""

    def train_forward(
        self, x: Tensor, target: Tensor | None = None, *, dead_mask: Tensor | None = None, penalty_scale: float = 1.0,
        topk_warmup: bool = False,
    ) -> ForwardOutput:
        """Training forward pass on raw activations x [batch, d_in]: output, activations and loss terms.

        ``target`` [batch, d_out] is what a transcoder predicts (the activations at ``hook_name_out`` of the same
        tokens); an SAE's target is x itself. ``dead_mask`` [d_sae] marks latents the trainer considers dead (AuxK
        uses it); ``penalty_scale`` multiplies the sparsity coefficient (the trainer warms it up); ``topk_warmup``
        asks BatchTopK and JumpReLU with a target L0 to select each row's top k instead (the trainer's
        ``sae.train.TrainConfig.topk_warmup_frac``, which says why).
        """
        if self.cfg.is_transcoder != (target is not None):
            raise ValueError("a transcoder trains on (x, target) pairs and an SAE on x alone")
        self.warming_up = topk_warmup and self.cfg.warms_up
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
        """k_aux: dead latents per token in the AuxK reconstruction (Gao et al.: d_in / 2)."""
        return self.cfg.aux_k or self.cfg.d_in // 2

    def _select_aux(self, pre: Tensor, dead_mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(rows, latents) of each row's top-k *dead* latents by pre-activation, rows ascending."""
        feats = pre.masked_fill(~dead_mask, -torch.inf).topk(k, dim=-1).indices
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return rows, feats.flatten()

    def _auxk(self, aux: SparseActs, y_n: Tensor, x_hat: Tensor, n_dead: int) -> tuple[Tensor, Tensor]:
        """(the weighted AuxK term to add to the loss, the unweighted loss to log) for the dead latents' activations
        ``aux`` against the residual of the normalised target y_n: α·min(n_dead/k_aux, 1)·AuxK (``auxk_weight``)."""
        aux_hat = self._sum_over_shards(sparse_decode(aux, self.W_dec, len(y_n)))
        auxk = auxk_loss(aux_hat, (y_n - x_hat).detach(), self.cfg.d_out)
        return self.cfg.aux_coefficient * auxk_weight(n_dead, self.aux_k) * auxk, auxk.detach()

    def _sum_over_shards(self, t: Tensor) -> Tensor:
        """A sum over latents completed across latent shards: the identity here, where this process holds every
        latent (``sae.sharded`` overrides it, and ``_encoder_b_dec``, to shard the latents across processes)."""
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
        path = Path(path)
        ours = replace(self.cfg, scale=1.0, scale_out=1.0)
        cfg_json: dict[str, Any] = {
            "architecture": self._sae_lens_name(),
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            "dtype": self.cfg.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": SAELENS_FORMAT_VERSION,
                "hook_name": self.cfg.hook_name,
                "model_name": self.cfg.model_name,
                "fitted_scale": float(self.scale),
                "sae_config": asdict(ours),
            },
        }
        if self.cfg.is_transcoder:
            cfg_json["d_out"] = self.cfg.d_out
            cfg_json["metadata"].update(hook_name_out=self.cfg.hook_name_out, fitted_scale_out=float(self.scale_out))
        if self.sae_lens_architecture == "topk":
            cfg_json["k"] = self.cfg.k
        _check_replaceable(path)
        with atomic_folder(path) as tmp:
            (tmp / WEIGHTS_FILENAME).write_bytes(save_bytes(self.folded_state()))
            (tmp / CFG_FILENAME).write_text(json.dumps(cfg_json, indent=2))
        return path

    def _sae_lens_name(self) -> str:
        """SAELens's architecture name: its transcoder classes for ReLU and JumpReLU (BatchTopK saves as JumpReLU).
        SAELens has no TopK transcoder; its TopK SAE computes the same output when d_out = d_in and there is no skip
        (b_dec is not subtracted from a transcoder's input), so that is what a TopK transcoder is saved as."""
        name = self.sae_lens_architecture
        if not self.cfg.is_transcoder or name == "topk":
            return name
        return {"standard": "", "jumprelu": "jumprelu_"}[name] + ("skip_transcoder" if self.cfg.skip else "transcoder")

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Load a local SAE folder, ours, SAELens's (standard/topk/jumprelu and its transcoders) or sparsify's (topk), in eval
        mode."""
        path = Path(path)
        if check_layout(path) == "sparsify":
            fields_, tensors = read_sparsify(path)
            cfg = SAEConfig.from_dict(fields_)
        else:
            cfg = _saelens_config(path)
            tensors = _saelens_tensors(path)
        sae = create_sae(cfg)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", *(("W_skip",) if cfg.skip else ())):
                getattr(sae, name).copy_(tensors[name])
            sae._load_extra_inference_tensors(tensors)
        return sae.to(device).eval()

    @staticmethod
    def from_pretrained(name_or_path: str | Path, sae_id: str | None = None, device: str | torch.device = "cpu") -> SAE:
        """Load one SAE by any name ``sae.pretrained`` resolves, in eval mode: a local folder (ours, SAELens's or
        sparsify's layout), a hub repo ``owner/name`` or a folder in one ``owner/name/layers.10``, or a SAELens
        ``release/sae_id`` (also as ``from_pretrained(release, sae_id)``)."""
        return SAE.load(find_sae(name_or_path, sae_id)[1], device)


def _saelens_config(path: Path) -> SAEConfig:
    """Our config from a SAELens-layout cfg.json: ours verbatim from its metadata, else SAELens 6's keys (and the
    pre-6 names SAELens itself still reads: hook_point, activation_fn_str/activation_fn_kwargs for topk)."""
    raw = json.loads((path / CFG_FILENAME).read_text())
    meta = raw.get("metadata") or {}
    if raw.get("normalize_activations") not in (None, False, "none"):
        raise SAEFormatError(
            f"{path}: normalize_activations={raw['normalize_activations']!r} is not "
            "supported; fold the normalisation into the weights first"
        )
    if "sae_config" in meta:
        return SAEConfig.from_dict(meta["sae_config"])
    by_saelens = {c.sae_lens_architecture: name for name, c in SAE_CLASSES.items()}
    legacy_k = (raw.get("activation_fn_kwargs") or {}).get("k")
    legacy_topk = (raw.get("activation_fn_str") or raw.get("activation_fn")) == "topk" and legacy_k
    saved = "topk" if legacy_topk else raw.get("architecture", "standard")
    transcoder = saved.endswith("transcoder")  # SAELens's (jumprelu_)(skip_)transcoder
    arch = saved.removesuffix("transcoder").removesuffix("skip_").removesuffix("_") or "standard" if transcoder else saved
    if arch not in by_saelens:
        raise SAEFormatError(f"{path}: unsupported SAELens architecture {saved!r}; supported: "
                             f"{sorted(by_saelens) + TRANSCODER_LAYOUTS}")
    return SAEConfig(
        architecture=by_saelens[arch],
        hook_name_out=(meta.get("hook_name_out") or raw.get("hook_name_out") or "") if transcoder else None,
        d_out=raw.get("d_out"),
        skip=saved.endswith("skip_transcoder"),
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        hook_name=meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or "",
        model_name=meta.get("model_name") or raw.get("model_name") or "",
        dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),
        apply_b_dec_to_input=raw.get("apply_b_dec_to_input", not transcoder),
        k=raw.get("k") or legacy_k or 32,
    )


def _saelens_tensors(path: Path) -> dict[str, Tensor]:
    """The weights of a SAELens-layout folder with what SAELens applies at run time folded in, so our forward matches:
    older SAELens's finetuning ``scaling_factor`` s (latents times s before decoding: W_dec·diag(s)), and TopK's
    ``rescale_acts_by_decoder_norm`` (its training default: top k of pre·‖W_dec‖, decoded as acts/‖W_dec‖), which is
    SAELens's own ``fold_W_dec_norm``: W_enc and b_enc times n, W_dec over n, n the decoder row norms."""
    tensors = load_file(path / WEIGHTS_FILENAME)
    if "scaling_factor" in tensors:
        tensors["W_dec"] = tensors["W_dec"] * tensors["scaling_factor"][:, None]
    if json.loads((path / CFG_FILENAME).read_text()).get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].norm(dim=1)
        tensors["W_enc"], tensors["b_enc"] = tensors["W_enc"] * norms, tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    return tensors


def _check_replaceable(path: Path) -> None:
    """Saving replaces the whole folder, so refuse one that holds anything besides an SAE's own files."""
    if path.exists() and not path.is_dir():
        raise SAEFormatError(f"cannot save an SAE to {path}: it is a file; name a folder")
    others = sorted(p.name for p in path.iterdir() if p.name not in (CFG_FILENAME, WEIGHTS_FILENAME)) if path.is_dir() else []
    if others:
        raise SAEFormatError(f"cannot save an SAE to {path}: saving replaces the folder, and it holds other files "
                             f"({', '.join(others[:5])}); save to a new or empty folder")


# ----- sparse kernels ------------------------------------------------------------------------


def _csr_offsets(index: Tensor, n: int) -> Tensor:
    """Start offset of each of n bags for sorted ``index`` (empty bags allowed)."""
    counts = torch.bincount(index, minlength=n)
    return torch.cumsum(counts, 0) - counts


class _SparseEncode(torch.autograd.Function):
    """Pre-activations at selected (row, latent) pairs, with a *sparse* backward.

    Forward runs the dense encoder matmul once and lets ``select`` pick the pairs. Backward
    only touches the selected pairs: dW_enc, db_enc, db_dec and dx cost O(nnz·d_in) instead of
    the O(batch·d_sae·d_in) dense matmuls. dW_enc and dx are assembled with ``embedding_bag``
    (over pairs sorted by latent, and by row), which avoids materialising [nnz, d_in].
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(  # type: ignore[override]
        ctx: Any,
        x_n: Tensor,
        b_dec: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        apply_b_dec: bool,
        select: Callable[[Tensor], tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor, Tensor]:
        x_c = x_n - b_dec if apply_b_dec else x_n
        pre = torch.addmm(b_enc, x_c, W_enc)
        rows, feats = select(pre)
        ctx.save_for_backward(x_c, W_enc, rows, feats)
        ctx.apply_b_dec = apply_b_dec
        ctx.mark_non_differentiable(rows, feats)
        return pre[rows, feats], rows, feats

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_vals: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_c, W_enc, rows, feats = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_vals = grad_vals.to(x_c.dtype)
        order = torch.argsort(feats)
        # dW_encᵀ[j] = Σ_{(b, j) selected} grad · x_c[b]: one bag of token rows per latent.
        grad_W_enc_t = F.embedding_bag(
            rows[order],
            x_c,
            _csr_offsets(feats, d_sae),
            mode="sum",
            per_sample_weights=grad_vals[order],
        )
        grad_b_enc = torch.zeros(d_sae, dtype=x_c.dtype, device=x_c.device)
        grad_b_enc.index_add_(0, feats, grad_vals)
        # pre = (x − b_dec) W_enc + b_enc  ⇒  ∂/∂b_dec = −W_enc · (∂/∂b_enc).
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.apply_b_dec else None
        grad_x = None
        if ctx.needs_input_grad[0]:  # the input itself needs a gradient only when something upstream is trained
            # dx[b] = Σ_{(b, j) selected} grad · W_enc[:, j]: one bag of encoder columns per token row.
            by_row = torch.argsort(rows, stable=True)  # AuxK's pairs follow the main ones: rows are not sorted
            grad_x = F.embedding_bag(
                feats[by_row],
                W_enc.T.contiguous(),
                _csr_offsets(rows, x_c.shape[0]),
                mode="sum",
                per_sample_weights=grad_vals[by_row],
            )
        return grad_x, grad_b_dec, grad_W_enc_t.T, grad_b_enc, None, None


def sparse_decode(acts: SparseActs, W_dec: Tensor, n_rows: int) -> Tensor:
    """Σ_j values · W_dec[features] per row, without the dense [n_rows, d_sae] matrix.

    ``embedding_bag``'s backward is sparse as well: gradients reach only the used W_dec rows.
    """
    return F.embedding_bag(
        acts.features,
        W_dec,
        _csr_offsets(acts.rows, n_rows),
        mode="sum",
        per_sample_weights=acts.values.to(W_dec.dtype),
    )


# ----- variants ------------------------------------------------------------------------------


class ReLUL1SAE(SAE):
    """ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates –
    April 2024"): L = ‖x − x̂‖² + λ Σᵢ fᵢ‖W_dec,ᵢ‖, with no unit-norm constraint on the
    decoder — the norm inside the penalty stops the model from shrinking f and growing W_dec.

    Beyond the update's recipe, which leaves the data mean in the input and scales by E‖x‖²:

    * Inputs are centred like every SAE's (``SAE.initialise_from_data``): with the mean left in, an offset 4× the
      signal's spread (`sae planted`) collapsed λ = 5 to L0 0.02, and even scaled by the centred energy the
      encoder never recovered more than 0.73 of the planted dictionary (mean max cosine).
    * b_enc learns √d_in times faster than the weights (``fast_params``). Adam moves every coordinate by ~lr per
      step, so an encoder column of d_in coordinates shifts a pre-activation up to ~d_in times further per step than
      the bias does (√d_in for a step uncorrelated with the input), and L1 sparsity is set by the biases; √d_in is
      the factor measured (d_in was not tried). Left in the input, the mean did this job unnoticed: it is an
      input of norm ~√d_in on which W_enc acts as a second bias. Centred without it, L1 could not switch latents
      off in a short run (SmolLM2 layer 15, 8×, 234 steps, λ = 5: L0 294 against 58 with it).
    * The lr is Anthropic's rescaled by √(4096 / d_in) (``paper_d_in``; see ``sae.train.default_lr``), taking 4096
      as the width of the models the recipe was set on, and λ defaults to 3 in these units. Measured against PCA
      at the SAE's own L0 and, on planted data, the true dictionary:

      | | L0 | FVU | PCA FVU at L0 | mean max cos |
      |---|---:|---:|---:|---:|
      | SmolLM2, Anthropic's recipe (uncentred, E‖x‖², λ 5, lr 1.25e-3) | 31 | 0.346 | 0.48 | |
      | SmolLM2, these defaults | 29 | 0.260 | 0.492 | |
      | planted, Anthropic's recipe | 0.02 | 0.999 | 1.000 | 0.563 |
      | planted, these defaults | 5.2 | 0.310 | 0.539 | 0.963 |

      (SmolLM2: 60k tokens; planted: the CI configuration of `sae planted`, 781 steps.) At λ = 5 these defaults
      give L0 18 on SmolLM2 with 26% of the latents dead, and an L0 below the planted truth (1.7–3.8 of 3; mean
      max cosine 0.89).
"""

    sae_lens_architecture = "standard"
    apply_b_dec_default = False
    unit_norm_decoder = False
    dense_act_copies = 4  # pre-activations, the activations and their gradient, and the L1 term's workspace
    reference_steps = 200_000
    paper_d_in = 4096
    fast_params = ("b_enc",)

    @staticmethod
    def paper_lr(d_sae: int) -> float:
        return 5e-5  # Anthropic, Circuits Updates April 2024

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # April 2024: "W_dec columns initialised to random directions with norm 0.1"; W_enc = W_decᵀ.
        self._init_tied(decoder_norm=0.1)

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        return F.relu(self.pre_acts(x_n))

    def _train_forward(self, x_n, y_n, dead_mask, penalty_scale):  # type: ignore[no-untyped-def]
        f = self.encode_normalised(x_n)
        x_hat = self._output_offset(f @ self.W_dec, x_n)
        mse = (x_hat - y_n).pow(2).sum(-1).mean()
        l1 = (f @ self.W_dec.norm(dim=1)).mean()
        loss = mse + penalty_scale * self.cfg.l1_coefficient * l1
        # One pass over the dense [batch, d_sae] matrix gives both statistics (a bool mask and two
        # typed sums cost ~9% of the step at 16x width).
        fire_counts = torch.count_nonzero(f.detach(), dim=0)
        l0 = fire_counts.sum() / len(f)
        losses = {"mse": mse.detach(), "l1": l1.detach()}
        return x_hat, f, loss, losses, l0, fire_counts


class _TopKFamily(SAE):
    """Shared TopK/BatchTopK machinery (Gao et al. 2024, "Scaling and evaluating sparse
    autoencoders"): unit-norm decoder, tied init, b_dec subtracted from the input, sparse
    encoder backward and decoder, and the AuxK loss for dead latents."""

    apply_b_dec_default = True
    uses_k = True
    unit_norm_decoder = True
    sparse_step = True
    dense_act_copies = 2  # only the pre-activations and the selection's workspace (see _SparseEncode)
    reference_steps = 3_000

    @staticmethod
    def paper_lr(d_sae: int) -> float:
        return 2e-4 / math.sqrt(d_sae / 2**14)  # Gao et al. 2024, §2.2 (scaled with width)

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, latents) of the main activation, rows sorted ascending."""
        raise NotImplementedError

    def _row_topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, latents) of each row's k largest pre-activations, rows ascending."""
        feats = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.cfg.k)
        return rows, feats.flatten()

    def _encoder_b_dec(self) -> Tensor:
        """b_dec as the encoder subtracts it (its gradient there is a sum over latents; see ``_sum_over_shards``)."""
        return self.b_dec

    def _train_forward(self, x_n, y_n, dead_mask, penalty_scale):  # type: ignore[no-untyped-def]
        n = x_n.shape[0]
        n_dead = int(self._sum_over_shards(dead_mask.sum())) if dead_mask is not None else 0
        aux_k = min(self.aux_k, n_dead)
        n_main: list[int] = []

        def select(pre: Tensor) -> tuple[Tensor, Tensor]:
            rows, feats = self._select(pre)
            n_main.append(rows.numel())
            if n_dead == 0:
                return rows, feats
            aux_rows, aux_feats = self._select_aux(pre, dead_mask, aux_k)
            return torch.cat([rows, aux_rows]), torch.cat([feats, aux_feats])

        vals, rows, feats = _SparseEncode.apply(
            x_n, self._encoder_b_dec(), self.W_enc, self.b_enc, self.cfg.apply_b_dec_to_input, select
        )
        m = n_main[0]
        acts = SparseActs(rows[:m], feats[:m], F.relu(vals[:m]))
        self._observe(acts)
        x_hat = self._output_offset(self._sum_over_shards(sparse_decode(acts, self.W_dec, n)), x_n)
        mse = (x_hat - y_n).pow(2).sum(-1).mean()
        loss = mse
        losses = {"mse": mse.detach()}
        if n_dead:
            term, losses["auxk"] = self._auxk(SparseActs(rows[m:], feats[m:], F.relu(vals[m:])), y_n, x_hat, n_dead)
            loss = loss + term
        fired = acts.values.detach() > 0
        fire_counts = torch.bincount(acts.features[fired], minlength=self.cfg.d_sae)
        l0 = self._sum_over_shards(fired.sum(dtype=torch.float32)) / n
        return x_hat, acts, loss, losses, l0, fire_counts

    def _observe(self, acts: SparseActs) -> None:
        """Hook for statistics gathered from the training activations."""


class TopKSAE(_TopKFamily):
    """Exactly k latents per token: ReLU(TopK(W_enc(x − b_dec) + b_enc)) (Gao et al. eq. 3)."""

    sae_lens_architecture = "topk"

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return self._row_topk(pre)

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        pre = self.pre_acts(x_n)
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))

    def encode_sparse_normalised(self, x_n: Tensor) -> SparseActs:
        pre = self.pre_acts(x_n)
        rows, feats = self._select(pre)
        values = pre[rows, feats]
        active = values > 0  # ReLU(TopK): a selected latent with a negative pre-activation is off
        return SparseActs(rows[active], feats[active], values[active])


class BatchTopKSAE(_TopKFamily):
    """Top k·B activations over the whole batch (Bussmann et al. 2024, "BatchTopK Sparse
    Autoencoders"), so tokens get a variable number of latents. Inference replaces the
    batch-dependent selection by a global threshold θ — the running average of the smallest
    kept activation — i.e. a JumpReLU with one θ shared by all latents; SAELens saves it as
    ``jumprelu`` with that θ broadcast to every latent, and so do we.

    Training starts with a per-token TopK warm-up (``sae.train.TrainConfig.topk_warmup_frac``): the batch-wide
    selection gives no latent to a token whose features have no trained latent yet, so rare features are never
    learnt. Mean max cosine with the true dictionary on the CI-sized hard `sae planted` data (power-law frequencies,
    781 steps, k 3), seeds 0 / 1 / 2, by warm-up fraction:

    | warm-up | BatchTopK | JumpReLU (target_l0 3) |
    |---|---|---|
    | none | 0.82 | 0.77 (seed 0) |
    | 0.75 | 0.96 / 0.946 / 0.949 | 0.91 / 0.906 / 0.899 |
    | 0.9 | 0.97 / 0.960 / 0.962 | 0.956 / 0.954 / 0.953 |

    Recovery peaks at the end of the warm-up; JumpReLU's then drifts down while its thresholds settle (0.95 → 0.93 in
    200 steps, even with its L0 held at the target by λ = 100), BatchTopK's barely. The last tenth still gives the
    batch budget its variable per-token L0 and its thresholds time to settle (``SAEConfig.threshold_momentum``)."""

    sae_lens_architecture = "jumprelu"

    @staticmethod
    def warms_up(target_l0: float | None) -> bool:
        return True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=self.W_enc.dtype))
        # Smaller encoder at init, as in Bussmann et al.'s reference code (github.com/
        # bartbussmann/BatchTopK, sae.py): W_enc ~ kaiming_uniform_ on [d_in, d_sae] (column norm
        # √(2·d_in/d_sae)), W_dec = W_encᵀ row-normalised — i.e. our tied init with W_enc scaled.
        # With unit-norm encoder columns the batch-wide selection gives high-norm tokens many
        # overlapping latents, the first reconstructions overshoot (FVU ≈ 1.5 at step 1 on the
        # planted-dictionary test vs 0.7 for TopK), and the gradients shrink every encoder
        # column; most latents then never clear the global threshold again.
        with torch.no_grad():
            self.W_enc.mul_(min(1.0, math.sqrt(2 * cfg.d_in / self.total_latents)))

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        if self.warming_up:
            return self._row_topk(pre)
        n, d_sae = pre.shape
        k_total = self.cfg.k * n
        # A flat topk over n·d_sae entries is ~6× slower than a row-wise one on CPU, so first
        # keep each row's top-m candidates. This is exact unless some row needs all m of them
        # (it might need more): then fall back to the flat topk.
        m = min(d_sae, 4 * self.cfg.k)
        cand = pre.topk(m, dim=-1, sorted=False)
        flat = cand.values.flatten().topk(k_total, sorted=False).indices
        rows = flat // m
        if m < d_sae and bool((torch.bincount(rows, minlength=n) == m).any()):
            flat = pre.flatten().topk(k_total, sorted=False).indices
            rows, feats = flat // d_sae, flat % d_sae
        else:
            feats = cand.indices.flatten()[flat]
        order = torch.argsort(rows)
        return rows[order], feats[order]

    @torch.no_grad()
    def _observe(self, acts: SparseActs) -> None:
        positive = acts.values[acts.values > 0]
        if not self.training or self.warming_up or positive.numel() == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        if self.threshold == 0:  # first batch: start at the observed value, not at 0
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, self.cfg.threshold_momentum)

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        pre = self.pre_acts(x_n)
        return F.relu(pre) * (pre > self.threshold)

    def _extra_inference_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.expand(self.cfg.d_sae)}

    def _load_extra_inference_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.threshold.copy_(tensors["threshold"].flatten()[0])


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK with nested dictionaries (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level
    Features with Matryoshka Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders"). With prefix
    widths m₁ < … < m_L = d_sae (``cfg.matryoshka_widths``) and f the one BatchTopK selection over all latents,

        L = Σ_ℓ ‖x − b_dec − Σ_{j < m_ℓ} f_j W_dec,j‖² + α·AuxK,

    so the first m₁ latents must reconstruct x on their own and learn the general features, while later ones add
    detail. That counters feature absorption (Chanin et al. 2024, "A is for Absorption"): when a parent feature is
    present whenever its child is, a plain sparse SAE saves L0 by folding the parent's direction into the child's
    latent and silencing the parent's latent on the child's tokens; here an inner prefix that holds the parent's
    latent but not the child's must still reconstruct those tokens, so the parent's latent keeps firing on them.

    The loss is SAELens's (``MatryoshkaBatchTopKTrainingSAE``: the full-width loss plus each inner prefix's MSE, all
    summed) and the paper's; Bussmann et al.'s reference code averages the levels instead, which under Adam only
    changes AuxK's weight relative to them. AuxK models the full reconstruction's residual, as in both (SAELens's
    default ``use_matryoshka_aux_loss=False``). Inference and the saved folder are BatchTopK's: SAELens saves its
    Matryoshka SAEs as ``jumprelu`` with the global threshold broadcast, and so do we.

    It skips BatchTopK's TopK warm-up: per-token TopK training folds parents into children as TopK does, and the
    nested loss cannot undo that in the steps left (absorption test: the parent latent fired on 0.001 of child tokens
    after a 90% warm-up, against 0.88–1.00 without).
    """

    @staticmethod
    def warms_up(target_l0: float | None) -> bool:
        return False

    def _train_forward(self, x_n, y_n, dead_mask, penalty_scale):  # type: ignore[no-untyped-def]
        x_hat, acts, loss, losses, l0, fire_counts = super()._train_forward(x_n, y_n, dead_mask, penalty_scale)
        # Cumulative partial decodes: each prefix adds only its own band [previous width, width) of the active
        # latents to the one before, so all inner reconstructions together decode each active latent at most once.
        partial, start = self._output_offset(0.0, x_n), 0
        for width in self.cfg.matryoshka_widths[:-1]:
            band = (acts.features >= start) & (acts.features < width)
            partial = partial + sparse_decode(SparseActs(*(t[band] for t in acts)), self.W_dec, len(x_n))
            mse = (partial - y_n).pow(2).sum(-1).mean()
            loss = loss + mse
            losses[f"mse_{width}"] = mse.detach()
            start = width
        return x_hat, acts, loss, losses, l0, fire_counts


class _JumpReLU(torch.autograd.Function):
    """f = z·H(z − θ) with the straight-through pseudo-derivative of Rajamanoharan et al.
    2024 ("Jumping Ahead", §4 and the pseudo-code in their appendix):
    ∂f/∂z = H(z − θ);  ∂f/∂θ := −(θ/ε)·K((z − θ)/ε), K the rectangle kernel 1{|u| < ½}."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        in_window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = -(theta / eps) * (grad * in_window).sum(0)
        return grad * (z > theta), grad_theta, None


class _Step(torch.autograd.Function):
    """H(z − θ) for the L0 penalty; ∂/∂z := 0, ∂/∂θ := −(1/ε)·K((z − θ)/ε) (same source)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        in_window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        return None, -(grad * in_window).sum(0) / eps, None


class JumpReLUSAE(SAE):
    """JumpReLU SAE trained on L0 directly (Rajamanoharan et al. 2024, "Jumping Ahead"):
    L = ‖x − x̂‖² + λ‖f‖₀ with per-latent thresholds θ learnt through the pseudo-derivatives
    above. Decoder rows are kept unit-norm, the L0 penalty being blind to their scale.

    θ is the trainable parameter itself, kept ≥ 0 by projection after each step, not
    log θ as in the paper's Appendix J: Adam moves a parameter by ~lr per step, so in log
    space θ moves by only ~θ·lr and a small θ₀ stays frozen in a short run (SAELens issue
    #494, fixed the same way in SAELens PR #718; dictionary_learning's ``JumpReluTrainer``
    also trains θ directly for this reason).

    ε and θ₀ default to 1.0 in our units, not the paper's 0.001. The paper's inputs have unit mean
    squared norm; ours are centred with E‖x_n‖² = d_in, so a unit-norm encoder direction's
    pre-activation has variance ≈ 1 on isotropic data whatever d_in is, and the kernel is best of
    that width: a window ε much narrower than the pre-activations' spread catches almost no
    tokens, so θ gets almost no gradient in a run of a few hundred steps. Measured on the CI-sized
    hard configuration of `sae planted` (d_in 32, 128 true features, 781 steps, target_l0 3):
    mean max cosine 0.61 with the old 0.001·√d_in, 0.67 with ε = θ₀ = 1 (0.72 with 0.5), and 0.74
    to 0.81 when the lr is also raised 3–9× (which the default now does at d_in 32; see ``paper_d_in``).

    Training recipe beyond the paper's loss:

    * ``cfg.target_l0`` set → dictionary_learning's ``JumpReluTrainer`` sparsity loss
      λ·(L0/target_l0 − 1)² (``trainers/jumprelu.py``), which holds L0 at the target rather
      than trading it against MSE at a λ that must be searched for.
    * Adam β₁ = 0, β₂ = 0.999 (Jumping Ahead's training details; also ``JumpReluTrainer``):
      the STE gradients of θ are sparse, noisy and sign-flipping, and momentum smears them.
    * b_enc starts so that each latent fires on ``init_fire_rate`` of the init sample
      (Anthropic, "Circuits Updates – January 2025": b_e chosen so each feature is active on
      a small, fixed fraction of the data), rather than at 0, where most latents fire.
    * With ``target_l0``, a per-token TopK warm-up (``sae.train.TrainConfig.topk_warmup_frac``): each row keeps its
      k = round(target_l0) largest pre-activations, θ unused, while ``warmup_threshold`` follows the batch-wide
      threshold that would keep k per row on average (the (k·B)-th largest pre-activation, as BatchTopK's); at the
      first step after the warm-up every θ starts there, so L0 starts at the target. As for BatchTopK, the L0
      budget alone gives no latent to tokens whose features have none yet; on the CI-sized hard planted data this
      takes mean max cosine from 0.77 to 0.956 (with the lr below; ``BatchTopKSAE`` has other seeds).
    * AuxK on dead latents (Gao et al. §A.2, as in ``_TopKFamily``), weight
      ``cfg.aux_coefficient``: a dead JumpReLU latent gets no gradient from either loss (its
      pre-activations sit outside the ε window), and AuxK gives it the residual to model.
      Anthropic's pre-act loss λ_P·ReLU(θ − z)·‖W_dec‖ on dead latents revives them too, but
      with no direction to learn they come back as duplicates: in the planted test it cut
      dead latents 592 → 120 but mean max cosine stayed 0.87, against 0.98 with AuxK α 0.5.
    """

    sae_lens_architecture = "jumprelu"
    apply_b_dec_default = False
    unit_norm_decoder = True
    dense_act_copies = 5  # ReLU+L1's four and the step mask
    reference_steps = 200_000

    paper_d_in = 2304  # Gemma 2 2B's residual stream, where Gemma Scope set its lr

    @staticmethod
    def paper_lr(d_sae: int) -> float:
        return 7e-5  # Gemma Scope (Lieberum et al. 2024)

    adam_betas = (0.0, 0.999)
    """Read by ``SAETrainer`` when it builds the optimiser (default (0.9, 0.999))."""
    init_fire_rate = 0.004

    @staticmethod
    def warms_up(target_l0: float | None) -> bool:
        return target_l0 is not None  # the warm-up's k

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        theta0 = cfg.init_threshold or 1.0
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), theta0, dtype=self.W_enc.dtype))
        self.register_buffer("warmup_threshold", torch.zeros((), dtype=self.W_enc.dtype))
        """The warm-up's running batch-wide threshold; > 0 until the first step after the warm-up copies it into θ."""

    @property
    def bandwidth(self) -> float:
        return self.cfg.bandwidth or 1.0

    @torch.no_grad()
    def initialise_from_data(self, sample: Tensor, target: Tensor | None = None) -> None:
        super().initialise_from_data(sample, target)
        # b_enc = θ − (1 − p)-quantile of W_enc·x: each latent fires on a fraction p at init.
        pre = self.pre_acts(self.normalise(sample.to(self.W_enc.device))) - self.b_enc
        q = torch.quantile(pre.float(), 1 - self.init_fire_rate, dim=0).to(pre.dtype)
        self.b_enc.copy_(self.threshold - q)

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        pre = self.pre_acts(x_n)
        return pre * (pre > self.threshold)

    @torch.no_grad()
    def _warmup_mask(self, pre: Tensor) -> Tensor:
        """The warm-up's active latents: each row's top k pre-activations that are positive (ReLU(TopK)), a bool mask
        [batch, d_sae]; also moves ``warmup_threshold`` towards the batch's (k·B)-th largest pre-activation (EMA
        rate threshold_momentum)."""
        k = max(1, round(self.cfg.target_l0 or 1))
        # Each row's top 4k, sorted: its first k are the row's selection, and all of them are the candidates for the
        # (k·B)-th largest, as in BatchTopK's selection (a full-matrix kthvalue is one slow select over B·d_sae on
        # CUDA). Inexact only if a row holds more than 4k of the batch's top k·B.
        cand = pre.topk(min(pre.shape[1], 4 * k), dim=-1)
        flat = cand.values.flatten()
        cut = flat.kthvalue(flat.numel() - k * len(pre) + 1).values.to(self.warmup_threshold.dtype).clamp_min(1e-6)
        self.warmup_threshold.copy_(torch.where(self.warmup_threshold > 0,
                                                self.warmup_threshold.lerp(cut, self.cfg.threshold_momentum), cut))
        return torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, cand.indices[:, :k], cand.values[:, :k] > 0)

    def _train_forward(self, x_n, y_n, dead_mask, penalty_scale):  # type: ignore[no-untyped-def]
        pre = self.pre_acts(x_n)
        if self.warming_up:
            mask = self._warmup_mask(pre)
            f = pre * mask  # the gradient reaches the kept pre-activations only
            x_hat = self._output_offset(f @ self.W_dec, x_n)
            mse = (x_hat - y_n).pow(2).sum(-1).mean()
            return self._with_auxk(x_hat, f, mse, {"mse": mse.detach()}, pre, y_n, dead_mask, mask)
        if self.cfg.target_l0 is not None:
            with torch.no_grad():  # the first step after a warm-up: every θ starts at its batch-wide threshold
                self.threshold.copy_(torch.where(self.warmup_threshold > 0, self.warmup_threshold, self.threshold))
                self.warmup_threshold.zero_()
        f = _JumpReLU.apply(pre, self.threshold, self.bandwidth)
        x_hat = self._output_offset(f @ self.W_dec, x_n)
        mse = (x_hat - y_n).pow(2).sum(-1).mean()
        l0_loss = _Step.apply(pre, self.threshold, self.bandwidth).sum(-1).mean()
        if self.cfg.target_l0 is None:
            sparsity = l0_loss
        else:
            sparsity = (l0_loss / self.cfg.target_l0 - 1) ** 2
        loss = mse + penalty_scale * self.cfg.l0_coefficient * sparsity
        return self._with_auxk(x_hat, f, loss, {"mse": mse.detach(), "l0": l0_loss.detach()}, pre, y_n, dead_mask,
                               f.detach() > 0)

    def _with_auxk(self, x_hat, f, loss, losses, pre, y_n, dead_mask, active):  # type: ignore[no-untyped-def]
        """The step's outputs, with AuxK on the dead latents added to ``loss`` (``active``: the latents that fired)."""
        n_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        if n_dead and self.cfg.aux_coefficient:
            rows, feats = self._select_aux(pre, dead_mask, min(self.aux_k, n_dead))
            term, losses["auxk"] = self._auxk(SparseActs(rows, feats, F.relu(pre[rows, feats])), y_n, x_hat, n_dead)
            loss = loss + term
        return x_hat, f, loss, losses, active.sum(-1).float().mean(), active.sum(0)

    @torch.no_grad()
    def project_parameters(self) -> None:
        super().project_parameters()
        # θ < 0 would let negative pre-activations through (SAELens PR #718 projects too).
        self.threshold.clamp_(min=0.0)

    def _extra_inference_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold}

    def _load_extra_inference_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.threshold.copy_(tensors["threshold"])


SAE_CLASSES: dict[str, type[SAE]] = {
    "relu_l1": ReLUL1SAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "jumprelu": JumpReLUSAE,  # last of the SAELens "jumprelu" savers: SAE.load reads plain jumprelu folders as it
}


def create_sae(cfg: SAEConfig) -> SAE:
    """Instantiate the variant named by ``cfg.architecture``."""
    if cfg.architecture not in SAE_CLASSES:
        raise SAEFormatError(
            f"unknown SAE architecture {cfg.architecture!r}; valid: {sorted(SAE_CLASSES)}"
        )
    return SAE_CLASSES[cfg.architecture](cfg)


DEAD_FRACTION_LIMIT = 0.5
"""More dead latents than this and most of the width is wasted: Gao et al. (2024, §A.2) name dead latents the main
failure of large SAEs; the demo's TopK and ReLU SAEs end with 3% (README, Benchmarks)."""
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
