"""The `sae analyse` stage: load the SAEs and the model, run the streaming pass (`sae.analysis.analyse`) and write the browser's
data (`sae.analysis.dashboard.export`). It sits above both, so `sae.analysis.analyse` never imports the dashboard."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sae.analysis.analyse import AnalyseConfig, logit_lens, stream_features
from sae.analysis.dashboard import claim_data, write_dashboard
from sae.analysis.dashboard.export import write_analysis
from sae.analysis.evaluate import check_matches, load_cache_model, load_saes
from sae.analysis.explain import restore_browser_copy
from sae.config import UserError


def run(cfg: AnalyseConfig) -> Path:
    """The `sae analyse` stage (``sae.analyse``): the analysis, then the browser's pages; returns the index.html to
    open. The folder is held (``folder_lock``) throughout, so `sae explain` or a second analysis cannot write it
    meanwhile."""
    from sae.data.store import check_output_folder, folder_lock

    check_output_folder(cfg.out)
    with folder_lock(cfg.out, "sae analyse"):
        return write_dashboard(analyse(cfg))


def analyse(cfg: AnalyseConfig) -> Path:
    """Analyse the SAE (or each SAE of a folder) into the feature browser's data; returns `cfg.out`.

    With several SAEs the model (tokenizer, final norm, unembedding) is loaded once and each SAE is written to
    `<out>/<its folder name>/`; `sae.analysis.dashboard.write_dashboard(out)` then makes one browser per SAE plus an index.
    """
    from sae.data.model import final_norm, free_bytes, pick_device
    from sae.data.store import ActivationStore, check_output_folder, human_bytes

    check_output_folder(cfg.out)
    store = ActivationStore(cfg.cache)
    device = pick_device(cfg.device)
    rows = {"all": store.n_train_rows + store.n_eval_rows, "train": store.n_train_rows, "eval": store.n_eval_rows}
    if not rows[cfg.split]:  # an empty browser was written
        raise UserError(f"the cache at {store.path} has no {cfg.split} rows to analyse; use split=all (or a cache "
                        "harvested with eval_fraction > 0 for split=eval)")
    saes = load_saes([cfg.sae], device)
    free = free_bytes(device)
    for name, sae in saes.items():
        check_matches(sae, store, name)
        need = cfg.stats_bytes(sae.cfg.d_sae)
        if free is not None and need > free:  # before the model loads: n_top=10⁶ was killed for memory mid-pass
            raise UserError(f"analysing {name} (d_sae {sae.cfg.d_sae:,}) needs about {human_bytes(need)} but "
                            f"{human_bytes(free)} is free on {device}; lower n_top, reservoir, the windows or "
                            "batch_rows")
    out = Path(cfg.out)
    targets = {name: (out / name, Path(cfg.sae) / name) if len(saes) > 1 else (out, Path(cfg.sae)) for name in saes}
    # A stale data/index.js would mark a half-written folder done, or make a folder of analyses look like one; every
    # folder is checked before the model loads.
    claim_data(*{out, *(target for target, _ in targets.values())})
    model, tokenizer = load_cache_model(store, device)
    vocab = model.get_output_embeddings().weight.shape[0]
    if cfg.logit_tokens > vocab:
        raise UserError(f"logit_tokens={cfg.logit_tokens} is more than the model's vocabulary of {vocab:,} tokens; use "
                        f"logit_tokens={vocab} or less")
    for name, sae in saes.items():
        target, source = targets[name]
        stats = stream_features(store, sae, cfg)
        live = (stats.n_active > 0).nonzero().squeeze(1)
        lens = logit_lens(sae.W_dec[live], final_norm(model), model.get_output_embeddings().weight, cfg.logit_tokens)
        with discard_on_error(target):
            write_analysis(target, source, stats, lens, sae, store, tokenizer, cfg)
        restore_browser_copy(target)
    return out


@contextmanager
def discard_on_error(folder: Path) -> Iterator[None]:
    """Remove what a failed write put in `folder` (and the folder, if it made it): a half-written analysis would
    otherwise look like data."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        claim_data(folder)
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
