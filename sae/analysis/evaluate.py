"""Score trained SAEs on held-out activations, on the language model they were cut out of, and against PCA.

Reconstruction numbers alone flatter an SAE: a low FVU can come with a model that no longer predicts text, and an
SAE can lose to plain PCA with as many dimensions as it has active features. So every SAE is reported with the
language-model loss when it is spliced into the forward pass, and next to the PCA reconstruction of the same rank;
an SAE that PCA beats at its own L0 is flagged as broken, and so is one with L0 = 0 or more than half its latents dead.

A transcoder (an SAE config with `hook_name_out`) is scored on its output: FVU of the activation it predicts, the
language model's loss with its prediction in place of that activation (the MLP's output, for an MLP transcoder), and,
as its baseline, the least-squares linear map of the same rank from its input to its output.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Iterable

import torch
from torch import Tensor
from torch.nn import functional as F

from sae.config import HelpSections, UserError
from sae.analysis.splice import keep_first, spliced
from sae.data.model import PLANTED_MODEL
from sae.data.store import ActivationStore, atomic_write_json, check_finite

#: The demo's TopK SAE (`configs/demo.yaml`'s first): the default of the stages that read one SAE.
DEMO_SAE = "runs/demo/saes/topk_k32_x8_blocks.15.hook_resid_post"
#: Rows encoded at once; bounds the dense [rows, d_sae] feature matrix (4096 x 9216 floats = 150 MB).
ROW_CHUNK = 4096


@dataclass
class EvalConfig:
    """The `eval:` section: the SAEs to measure on a cache's held-out rows (FVU, L0, dead latents, against PCA at
    the same L0) and, with the model, the LM loss with each SAE spliced in (CE recovered)."""

    help_sections: ClassVar[HelpSections] = (
        ("what to evaluate", ("saes", "cache", "out")),
        ("measurement", ("max_tokens", "lm_loss_contexts", "pca_fit_tokens", "dense_threshold", "batch_size", "device")),
    )
    """`--help` groups, most used first (``sae.config.describe``)."""

    cache: str = "runs/demo/cache"
    """Activation cache the SAEs were trained on; its held-out contexts are what every metric is measured on."""
    saes: list[str] = field(default_factory=lambda: ["runs/demo/saes"])
    """SAE folders, or folders of SAE folders (a `sae train` output), hub ids (owner/name[/folder]) or SAELens
    release/sae_id names; every SAE found is evaluated."""
    out: str = "runs/demo/eval"
    """Folder for eval.json, the Pareto plot (L0 vs FVU against PCA) and one density histogram per SAE."""
    max_tokens: int = 20_000
    """Held-out rows used for L0, FVU, MSE, densities and the PCA curve."""
    lm_loss_contexts: int = 32
    """Held-out contexts run through the model clean, zero-ablated and with the SAE spliced in (CE and KL); 0 skips
    the language model (not loaded: CE and KL are null), for the reconstruction metrics of many SAEs at once."""
    batch_size: int = 4
    """Contexts per forward pass of the language model."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", ..."""
    dense_threshold: float = 0.1
    """A feature active on more than this fraction of tokens counts as dense."""
    pca_fit_tokens: int = 50_000
    """Training rows the PCA baseline is fitted on (never the held-out rows it is scored on)."""

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)} must be ≥ 1" for k in ("max_tokens", "batch_size", "pca_fit_tokens")
               if not getattr(self, k) >= 1]
        if not self.lm_loss_contexts >= 0:
            bad.append(f"lm_loss_contexts={self.lm_loss_contexts} must be ≥ 0 (0: no LM loss)")
        if not 0 < self.dense_threshold <= 1:
            bad.append(f"dense_threshold={self.dense_threshold} must be in (0, 1]")
        if not self.saes:
            bad.append("saes is empty: name the SAE folders to evaluate (saes=[runs/demo/saes])")
        if bad:
            raise UserError(f"eval: {'; '.join(bad)}")


# --------------------------------------------------------------------------------------------- finding SAEs


def load_saes(specs: Iterable[str | Path], device: torch.device, single: bool = False) -> dict[str, torch.nn.Module]:
    """Every SAE named by `specs` (folders, folders of folders, hub ids, SAELens release/sae_id: see
    `sae.saes.pretrained`), by folder name, in eval mode on `device`; `single` as for `find_saes`."""
    from sae.saes.pretrained import find_saes
    from sae.saes import SAE

    return {name: SAE.load(path, device) for name, path in find_saes(specs, single).items()}


def load_sae(path: str | Path, device: torch.device) -> tuple[str, torch.nn.Module]:
    """The one SAE `path` names and its name, in eval mode on `device`; a folder of several is an error naming them."""
    from sae.saes.pretrained import find_sae
    from sae.saes import SAE

    if isinstance(path, str) and path.startswith("runs/") and not Path(path).exists():
        # the toolkit's own output folders (the demo's SAE is the default): a missing folder, not a hub repo `runs/…`
        demo = " (the default: the demo's SAE, which `sae demo` trains)" if path == DEMO_SAE else ""
        raise UserError(f"{path} does not exist: no such folder{demo}; pass sae=<an SAE folder>, a hub repo id "
                        "owner/name[/folder] or a SAELens release/sae_id")
    name, folder = find_sae(path)
    return name, SAE.load(folder, device)


def load_model_of(sae, spec: str, device: torch.device):
    """(model, tokenizer): `spec`, or when it is empty the model the SAE's cfg.json names."""
    from sae.data.model import load_model

    if not (spec or sae.cfg.model_name):
        raise UserError("this SAE does not record its model; pass model=<the model it was trained on>")
    return load_model(spec or sae.cfg.model_name, str(device))


def sae_hooks(sae) -> list[str]:
    """The hooks an SAE reads: its input and, for a transcoder, the output it predicts."""
    return [sae.cfg.hook_name] + ([sae.cfg.hook_name_out] if sae.cfg.is_transcoder else [])


def output_hook(sae) -> str:
    """The hook whose activation an SAE reproduces: its input for an SAE, its output hook for a transcoder."""
    return sae.cfg.hook_name_out if sae.cfg.is_transcoder else sae.cfg.hook_name


def baseline_key(sae) -> str:
    """What an SAE's rank-r baseline is fitted to: its hook (PCA), or a transcoder's `<in>_to_<out>` (linear map)."""
    return f"{sae.cfg.hook_name}_to_{sae.cfg.hook_name_out}" if sae.cfg.is_transcoder else sae.cfg.hook_name


def check_matches(sae, store, name: str) -> None:
    """An SAE must read the cache's hooks at the cache's widths; a different model name is only worth a warning
    (SAELens and hub ids spell the same model differently)."""
    from sae.saes import SAEFormatError

    store.check_hooks(sae_hooks(sae))
    for hook, width, what in zip(sae_hooks(sae), (sae.cfg.d_in, sae.cfg.d_out), ("d_in", "d_out")):
        if width != store.hooks[hook]:
            raise SAEFormatError(f"SAE {name} has {what} {width} but the cache's {hook} has width {store.hooks[hook]}")
    if sae.cfg.model_name and sae.cfg.model_name != store.model_name:
        print(f"warning: SAE {name} was trained on {sae.cfg.model_name!r}, the cache comes from {store.model_name!r}")


# --------------------------------------------------------------------------------------------- reconstruction


def reconstruct(sae, x: Tensor) -> Tensor:
    """The SAE's output for x (x̂, or a transcoder's prediction) in the caller's dtype, whatever dtype it computes in."""
    return sae(x.to(sae.W_dec.dtype)).to(x.dtype)


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: squared error over the variance of `x` about its own mean."""
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@dataclass
class Reconstruction:
    l0: float
    fvu: float
    mse: float
    dead_fraction: float
    dense_fraction: float
    n_tokens: int
    density: Tensor  # [d_sae] fraction of tokens each feature is active on


@torch.no_grad()
def reconstruction_metrics(sae, x: Tensor, dense_threshold: float, y: Tensor | None = None) -> Reconstruction:
    """L0, FVU, MSE and feature densities over rows `x` [n, d_in], encoded in chunks; the errors are those of the
    target rows `y` [n, d_out] (a transcoder's output hook), x itself by default."""
    x = x.to(sae.W_dec.device)
    y = x if y is None else y.to(x.device)
    active = torch.zeros(sae.W_dec.shape[0], dtype=torch.float64, device=x.device)
    l0 = sq_err = 0.0
    for chunk, target in zip(x.split(ROW_CHUNK), y.split(ROW_CHUNK)):
        chunk = chunk.to(sae.W_dec.dtype)
        f = sae.encode(chunk)
        fired = f != 0
        active += fired.sum(0)
        l0 += float(fired.sum())
        sq_err += float(((target.double() - sae.decode(f, chunk).double()) ** 2).sum())
    n = x.shape[0]
    density = (active / n).float().cpu()
    total_var = float(((y.double() - y.double().mean(0)) ** 2).sum())
    return Reconstruction(
        l0=l0 / n,
        fvu=sq_err / total_var,
        mse=sq_err / y.numel(),
        dead_fraction=float((density == 0).float().mean()),
        dense_fraction=float((density > dense_threshold).float().mean()),
        n_tokens=n,
        density=density,
    )


# --------------------------------------------------------------------------------------------- PCA baseline


@dataclass
class PCA:
    mean: Tensor  # [d]
    components: Tensor  # [d, d], column i is the i-th principal direction (variance descending)


def fit_pca(x: Tensor) -> PCA:
    """Principal directions of `x` from the eigendecomposition of its covariance (d x d, cheap for any n)."""
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    _, vecs = torch.linalg.eigh(xc.T @ xc)
    return PCA(mean=mean, components=vecs.flip(1))


def pca_fvu_curve(pca: PCA, x: Tensor) -> Tensor:
    """FVU of the rank-r PCA reconstruction of `x` for every r = 0..d (index r).

    With orthonormal components the rank-r residual energy is the total energy about the fitted mean minus the energy
    of the first r coordinates, so one projection gives the whole curve.
    """
    x = x.double().to(pca.mean.device)
    xc = x - pca.mean
    coord_energy = ((xc @ pca.components) ** 2).sum(0)
    residual = (xc**2).sum() - torch.cat([coord_energy.new_zeros(1), coord_energy.cumsum(0)])
    return (residual.clamp_min(0) / ((x - x.mean(0)) ** 2).sum()).float().cpu()


@dataclass
class LinearMap:
    """Least-squares affine map x → y and the principal directions of its fitted values, for the rank-r maps."""

    x_mean: Tensor  # [d_in]
    y_mean: Tensor  # [d_out]
    coef: Tensor  # [d_in, d_out]
    components: Tensor  # [d_out, d_out], column i the i-th principal direction of the fitted values


def fit_linear(x: Tensor, y: Tensor) -> LinearMap:
    """Ordinary least squares of y on x; the best rank-r map is its fit projected onto the top r principal directions
    of the fitted values (reduced-rank regression, Izenman 1975), so one fit gives every rank."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    ridge = 1e-10 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram + ridge, xc.T @ yc)  # the ridge only guards a singular Gram matrix
    fitted = xc @ coef
    _, vecs = torch.linalg.eigh(fitted.T @ fitted)
    return LinearMap(x_mean, y_mean, coef, vecs.flip(1))


def linear_fvu_curve(m: LinearMap, x: Tensor, y: Tensor) -> Tensor:
    """FVU of y predicted by the rank-r map for every r = 0..d_out (index r; rank 0 predicts the fitted mean).

    With orthonormal directions v_i the rank-r prediction is P V_r V_rᵀ, P the full-rank one, so its squared error
    about the fitted mean is ‖y_c‖² − Σ_{i≤r} (2⟨y_c v_i, P v_i⟩ − ‖P v_i‖²): one projection gives the whole curve.
    """
    x, y = x.double().to(m.coef.device), y.double().to(m.coef.device)
    yc = y - m.y_mean
    pv, yv = ((x - m.x_mean) @ m.coef) @ m.components, yc @ m.components
    gain = (2 * pv * yv - pv**2).sum(0)
    residual = (yc**2).sum() - torch.cat([gain.new_zeros(1), gain.cumsum(0)])
    return (residual.clamp_min(0) / ((y - y.mean(0)) ** 2).sum()).float().cpu()


# --------------------------------------------------------------------------------------------- language-model loss


@dataclass
class LMLoss:
    """Next-token losses with an SAE spliced in; every field None when the evaluation ran no model
    (``EvalConfig.lm_loss_contexts`` 0)."""

    ce_clean: float | None = None
    ce_zero: float | None = None
    ce_spliced: float | None = None
    ce_recovered: float | None = None
    """None also when zero-ablation costs nothing (the ratio is undefined); JSON has no NaN to say so."""
    kl: float | None = None
    """Mean KL(clean || spliced) of the next-token distribution, nats per token."""


@torch.no_grad()
def lm_losses(model, tokens: Tensor, hook_name: str, saes: dict[str, Any], first: int, batch_size: int) -> dict[str, LMLoss]:
    """Next-token CE of `tokens` [n, T] clean, with `hook_name` zero-ablated, and with each SAE's output in its place
    (SAEs on `hook_name`, or transcoders whose output hook it is; see `sae.analysis.splice.spliced`).

    The clean and zero-ablated runs are shared by every SAE on the hook, so a sweep of n SAEs costs n + 2 forward
    passes per batch rather than 3n. Positions before `first` are left un-spliced and their predictions are not
    scored (they are identical in all runs, so they would only dilute the KL).
    """
    from sae.data.model import hooks

    device = next(model.parameters()).device
    sums = {name: dict(spliced=0.0, kl=0.0) for name in saes}
    clean_sum = zero_sum = 0.0
    count = 0
    for ids in tokens.split(batch_size):
        ids = ids.to(device)
        targets = ids[:, first + 1 :].reshape(-1)

        def logprobs(splice: ContextManager[None] = nullcontext()) -> Tensor:
            with splice:
                logits = model(input_ids=ids, use_cache=False).logits[:, first:-1].float()
            return logits.log_softmax(-1).reshape(-1, logits.shape[-1])

        clean = logprobs()
        clean_sum += float(F.nll_loss(clean, targets, reduction="sum"))
        zero_sum += float(F.nll_loss(logprobs(hooks(model, {hook_name: keep_first(first, torch.zeros_like)})), targets, reduction="sum"))
        for name, sae in saes.items():
            lp = logprobs(spliced(model, sae, keep_error=False, first=first))
            sums[name]["spliced"] += float(F.nll_loss(lp, targets, reduction="sum"))
            sums[name]["kl"] += float(F.kl_div(lp, clean, log_target=True, reduction="sum"))
        count += targets.numel()
    ce_clean, ce_zero = clean_sum / count, zero_sum / count
    gap = ce_zero - ce_clean
    out = {}
    for name, s in sums.items():
        ce_spliced = s["spliced"] / count
        out[name] = LMLoss(ce_clean=ce_clean, ce_zero=ce_zero, ce_spliced=ce_spliced,
                           ce_recovered=(ce_zero - ce_spliced) / gap if gap else None, kl=s["kl"] / count)
    return out


def training_rows(store, hook_names: list[str], n: int) -> dict[str, Tensor]:
    """The first `n` training rows of hooks (the same tokens for each), for fitting a baseline away from the rows
    it is scored on."""
    parts: list[dict[str, Tensor]] = []
    have = 0
    for rows in store.iter_ordered(hook_names, split="train"):
        parts.append(rows.acts)
        have += rows.acts[hook_names[0]].shape[0]
        if have >= n:
            break
    if not parts:
        from sae.data.store import CacheError

        raise CacheError(f"the cache at {store.path} has no training rows to fit the baseline on")
    out = {h: torch.cat([p[h] for p in parts])[:n] for h in hook_names}
    for h, t in out.items():
        check_finite(t, f"the training rows of {h} in {store.path} (baseline fit)")
    return out


# --------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_density(density: Tensor, title: str, path: Path) -> None:
    """Histogram of log10 feature density; dead features have no logarithm, so the title counts them."""
    plt = _pyplot()
    alive = density[density > 0]
    lowest = math.log10(float(alive.min())) if len(alive) else -1.0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(alive.log10().numpy(), bins=50, range=(min(lowest, -1.0), 0.0), color="#4c72b0")
    ax.set_xlabel("log10 feature density (fraction of tokens active)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}: {len(density) - len(alive)} dead of {len(density)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BASELINE_LABEL = {"pca": "PCA (rank r)", "linear": "least-squares linear map in → out (rank r)"}


def plot_pareto(results: dict, path: Path) -> None:
    """L0 vs FVU of every SAE with the PCA curve (FVU vs rank) of its hook on the same axes, one panel per hook."""
    plt = _pyplot()
    hooks_ = sorted(results["pca"])
    fig, axes = plt.subplots(1, len(hooks_), figsize=(6 * len(hooks_), 4.5), squeeze=False)
    for ax, hook in zip(axes[0], hooks_):
        curve = results["pca"][hook]["fvu"]
        ranks = range(1, len(curve))
        ax.plot(list(ranks), curve[1:], color="grey", label=BASELINE_LABEL[results["pca"][hook].get("baseline", "pca")])
        rows = [r for r in results["saes"] if r["hook"] == hook]
        for beaten, style in ((False, dict(color="#4c72b0", label="SAE")),
                              (True, dict(color="red", label="SAE beaten by PCA at its L0 (broken)"))):
            group = [r for r in rows if r["beats_pca_at_l0"] != beaten]
            if group:
                ax.scatter([r["l0"] for r in group], [r["fvu"] for r in group], zorder=3, **style)
        for row in rows:
            ax.annotate(row["name"], (row["l0"], row["fvu"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (SAE) / rank r (baseline)")
        ax.set_ylabel("FVU (held out)")
        ax.set_title(hook)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- driver


def evaluate_saes(cfg: EvalConfig, store, saes: dict[str, torch.nn.Module], model) -> dict:
    """Every metric for SAEs already loaded on the model's device and checked against the cache (`check_matches`);
    `evaluate` does both. model None: the reconstruction metrics alone (``EvalConfig.lm_loss_contexts`` 0)."""
    from sae.saes import failure_signs

    first = store.first_pos
    hooks_ = sorted({h for s in saes.values() for h in sae_hooks(s)})
    heldout = store.holdout(hooks_, cfg.max_tokens)
    for hook, x in heldout.items():
        check_finite(x, f"the held-out rows of {hook} in {store.path}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "cache": str(cfg.cache),
        "model": store.model_name,
        "position_0_spliced": not first,
        "first_spliced_position": first,
        "position_0_note": (
            f"the cache dropped positions < {first} (BOS and attention-sink outliers the SAEs never saw), so they are "
            "left un-spliced and their predictions unscored"
            if first
            else "the cache kept position 0, so every position is spliced and scored"
        ),
        "pca": {},
        "saes": [],
    }
    contexts = store.context_tokens(store.holdout_seqs(cfg.lm_loss_contexts)) if model is not None else []
    losses: dict[str, LMLoss] = {name: LMLoss() for name in saes}
    for key, sae in {baseline_key(s): s for s in saes.values()}.items():
        fit = training_rows(store, sae_hooks(sae), cfg.pca_fit_tokens)
        if sae.cfg.is_transcoder:
            x_in, x_out = sae.cfg.hook_name, sae.cfg.hook_name_out
            curve = linear_fvu_curve(fit_linear(fit[x_in], fit[x_out]), heldout[x_in], heldout[x_out])
        else:
            curve = pca_fvu_curve(fit_pca(fit[key]), heldout[key])
        results["pca"][key] = {"fit_rows": len(fit[sae.cfg.hook_name]), "fvu": curve.tolist(),
                               "baseline": "linear" if sae.cfg.is_transcoder else "pca"}
    for hook in sorted({output_hook(s) for s in saes.values()}) if model is not None else []:
        on_hook = {name: sae for name, sae in saes.items() if output_hook(sae) == hook}
        losses.update(lm_losses(model, contexts, hook, on_hook, first, cfg.batch_size))
    for name, sae in saes.items():
        hook = baseline_key(sae)
        rec = reconstruction_metrics(sae, heldout[sae.cfg.hook_name], cfg.dense_threshold, heldout[output_hook(sae)])
        loss = losses[name]
        curve = results["pca"][hook]["fvu"]
        d_in = len(curve) - 1
        r_l0 = min(max(round(rec.l0), 1), d_in)
        fires = rec.n_tokens * rec.l0 / sae.cfg.d_sae  # an average latent's firings over the rows measured
        hist = out / f"density_{name}.png"
        plot_density(rec.density, name, hist)
        results["saes"].append(
            {
                "name": name,
                "hook": hook,
                "hook_out": output_hook(sae),
                "architecture": sae.cfg.architecture,
                "transcoder": sae.cfg.is_transcoder,
                "skip": sae.cfg.skip,
                "d_in": sae.cfg.d_in,
                "d_out": sae.cfg.d_out,
                "d_sae": sae.cfg.d_sae,
                "n_tokens": rec.n_tokens,
                "l0": rec.l0,
                "fvu": rec.fvu,
                "mse": rec.mse,
                "dead_fraction": rec.dead_fraction,
                "dense_fraction": rec.dense_fraction,
                "dense_threshold": cfg.dense_threshold,
                **asdict(loss),
                "lm_loss_contexts": len(contexts),
                "pca_rank_at_l0": r_l0,
                "pca_fvu_at_l0": curve[r_l0],
                "pca_rank_quarter": d_in // 4,
                "pca_fvu_at_quarter": curve[d_in // 4],
                "beats_pca_at_l0": rec.fvu <= curve[r_l0],  # a tie (both exact) is not a loss
                "fires_per_latent": fires,
                "failures": failure_signs(rec.l0, rec.dead_fraction, fires),
                "density_histogram": hist.name,
            }
        )
    plot_pareto(results, out / "pareto.png")
    results["pareto_plot"] = "pareto.png"
    atomic_write_json(out / "eval.json", results)
    return results


def evaluate(cfg: EvalConfig) -> dict:
    """Load the cache, the SAEs and the model, evaluate, and write `<out>/eval.json` plus the plots."""
    from sae.data.model import pick_device
    from sae.data.store import check_output_folder, check_report_is_ours, folder_lock

    check_output_folder(cfg.out)
    out = Path(cfg.out)
    check_report_is_ours(out, "eval.json", {"cache", "saes", "pca"}, "sae eval",
                         [out / "pareto.png", *out.glob("density_*.png")])
    with folder_lock(cfg.out, "sae eval"):
        store = ActivationStore(cfg.cache)
        check_not_planted(store)
        device = pick_device(cfg.device)
        # Before the model: a bad SAE name, an offline hub or an SAE of a hook the cache lacks fails in a moment.
        saes = load_saes(cfg.saes, device)
        for name, sae in saes.items():
            check_matches(sae, store, name)
        model = load_cache_model(store, device)[0] if cfg.lm_loss_contexts else None
        earlier = _density_plots(out)
        results = evaluate_saes(cfg, store, saes, model)
        written = {s["density_histogram"].casefold() for s in results["saes"]}  # one file on a case-blind disk
        stale = sorted(n for n in earlier if n.casefold() not in written)
        for name in stale:
            with suppress(OSError):
                (out / name).unlink(missing_ok=True)
        if stale:
            print(f"removed the earlier eval's density plots of SAEs not scored now: {', '.join(stale)}")
        return results


def _density_plots(out: Path) -> set[str]:
    """The density plots the eval.json in `out` lists (one `sae eval` wrote, ``check_report_is_ours``): a later eval
    of other SAEs removes those it does not write again, so the folder describes one eval."""
    try:
        rows = json.loads((out / "eval.json").read_text())["saes"]
        names = {r["density_histogram"] for r in rows}
    except (OSError, ValueError, TypeError, KeyError):
        return set()
    return {n for n in names if isinstance(n, str) and re.fullmatch(r"density_[^/\\\0]+\.png", n)}


def load_cache_model(store: ActivationStore, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) the cache was harvested from, in the dtype it ran in (``cache_model_dtype``). A cache
    `sae planted` wrote has no model: refused in one line (a hub lookup of "planted" retried for ~30 s)."""
    from sae.data.model import load_model

    check_not_planted(store)
    return load_model(store.model_name, str(device), cache_model_dtype(store))


def check_not_planted(store: ActivationStore) -> None:
    """A cache `sae planted` wrote has no model and no held-out rows: refused in one line."""
    if store.model_name == PLANTED_MODEL:
        raise UserError(f"the cache at {store.path} was written by `sae planted`: it has no language model or held-out "
                        "rows to evaluate or analyse on; its SAEs' scores against the true dictionary are in the "
                        "planted.json beside it")


def cache_model_dtype(store: ActivationStore) -> str:
    """The dtype the cache's harvest ran its model in, for `eval` and `analyse` to run it in: the activations they
    splice and score are then those the SAE was trained on, at that dtype's memory (half of float32 for bfloat16).
    Caches harvested before the manifest recorded it get float32, as every cache did then."""
    return store.manifest.get("model_dtype", "float32")


#: Width `format_table` keeps to: a terminal's default.
TABLE_WIDTH = 80


def format_table(results: dict) -> str:
    """One row per SAE, grouped by hook, within 80 columns; a PCA-beaten SAE, or one with L0 = 0 or mostly dead
    latents, gets a "!" and an explanation below.

    Names drop their hook suffix (the group heading says it); a name too long for its column gets a line of its own.
    """
    from sae.saes.base import DEAD_FRACTION_LIMIT, MIN_FIRES_TO_JUDGE_DEAD

    name_width = 23
    head = f"  {'sae':<{name_width}} {'L0':>7} {'FVU':>7} {'PCA@L0':>7} {'dead':>6} {'dense':>6} {'CE rec':>7} {'KL':>7}"
    lines = []
    for hook in sorted({r["hook"] for r in results["saes"]}):
        lines += [hook, head, "  " + "-" * (len(head) - 2)]
        for r in (r for r in results["saes"] if r["hook"] == hook):
            mark = "  " if r["beats_pca_at_l0"] and not r["failures"] else "! "
            name = r["name"].removesuffix(f"_{hook}")
            metrics = (
                f"{r['l0']:>7.1f} {r['fvu']:>7.3f} {r['pca_fvu_at_l0']:>7.3f} {r['dead_fraction']:>6.1%} "
                f"{r['dense_fraction']:>6.1%} {'n/a' if r['ce_recovered'] is None else format(r['ce_recovered'], '.3f'):>7} "
                f"{'n/a' if r['kl'] is None else format(r['kl'], '.3f'):>7}"
            )
            if len(name) > name_width:
                lines += [mark + name, f"  {'':<{name_width}} {metrics}"]
            else:
                lines.append(f"{mark}{name:<{name_width}} {metrics}")
    notes = [
        f"! BROKEN: {r['name']}: the rank-{r['pca_rank_at_l0']} "
        f"{'linear map from its input' if r.get('transcoder') else 'PCA'} reconstructs held-out rows better (FVU "
        f"{r['pca_fvu_at_l0']:.3f}) than this SAE with L0 {r['l0']:.1f} (FVU {r['fvu']:.3f}); it is not learning a "
        "useful sparse code."
        for r in results["saes"]
        if not r["beats_pca_at_l0"]
    ]
    notes += [f"! FAILED: {r['name']} on {r['n_tokens']:,} held-out rows: {sign}." for r in results["saes"]
              for sign in r["failures"]]
    notes += [f"{r['name']}'s dead fraction is from {r['n_tokens']:,} held-out rows, where an average latent fires "
              f"{r['fires_per_latent']:.0f} times: too few to tell a dead latent from a rare one (raise max_tokens, or "
              "harvest with a larger eval_fraction)" for r in results["saes"]  # L0 = 0 has its own verdict
              if r["dead_fraction"] > DEAD_FRACTION_LIMIT and r["l0"] > 0
              and r.get("fires_per_latent", math.inf) < MIN_FIRES_TO_JUDGE_DEAD]
    if any(r.get("transcoder") for r in results["saes"]):
        notes.append("transcoders (<in>_to_<out>): FVU of the output hook, CE with their output in place of it, and "
                     "PCA@L0 is the rank-L0 least-squares linear map from input to output")
    if any(r["lm_loss_contexts"] for r in results["saes"]):  # the note is about the splice, which scores CE
        notes.append(f"position 0 spliced: {results['position_0_spliced']} ({results['position_0_note']})")
    for note in notes:
        lines += textwrap.wrap(note, TABLE_WIDTH, subsequent_indent="    ")
    return "\n".join(lines)
