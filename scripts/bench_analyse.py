"""`sae analyse` speed and output size on a real cache, against the bare encoder in the same process.

The reference is `sae.encode` over the same rows in the same batch size, with the rows already in memory: the
streaming pass cannot beat it, so `stream_vs_encode` (streaming rows/s over encoding rows/s, at most 1) says how
much the bookkeeping costs whatever the machine's speed; with --repeats it is the median over back-to-back pairs,
since on a shared machine the load changes between runs. Prints one JSON object.

Usage: python scripts/bench_analyse.py [--cache runs/demo/cache] [--sae FOLDER | --d-sae 9216] [--repeats 3]
Without --sae an untrained TopK SAE (k=32) is made and fitted to the data's scale: speed does not need training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sae.analysis.analyse import AnalyseConfig, logit_lens, stream_features
from sae.analysis.dashboard.export import write_analysis
from sae.data.model import final_norm, load_model
from sae.saes import SAE, SAEConfig, create_sae
from sae.data.store import ActivationStore


def untrained_topk(store: ActivationStore, d_sae: int) -> SAE:
    hook = next(iter(store.hooks))
    torch.manual_seed(0)
    sae = create_sae(SAEConfig("topk", store.hooks[hook], d_sae, hook_name=hook, model_name=store.model_name, k=32))
    sae.initialise_from_data(next(store.iter_ordered([hook], batch_rows=8192)).acts[hook])
    return sae.eval()


def timed(fn):
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="runs/demo/cache")
    parser.add_argument("--sae", help="SAE folder, hub id or SAELens release/sae_id (default: an untrained TopK SAE of "
                                      "--d-sae features)")
    parser.add_argument("--d-sae", type=int, default=9216)
    parser.add_argument("--repeats", type=int, default=1, help="times to run the encode reference and the stream")
    args = parser.parse_args()

    store = ActivationStore(args.cache)
    sae = SAE.from_pretrained(args.sae) if args.sae else untrained_topk(store, args.d_sae)
    hook = sae.cfg.hook_name
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AnalyseConfig(sae=args.sae or "untrained", cache=args.cache, out=tmp, device="cpu")
        rows = [r.acts[hook] for r in store.iter_ordered([hook], batch_rows=cfg.batch_rows)]  # also verifies shards
        n_rows = sum(len(r) for r in rows)
        encode_s, stream_s = [], []
        for _ in range(args.repeats):  # interleaved, so a change in machine load hits both alike
            encode_s.append(timed(lambda: [sae.encode(r) for r in rows])[1])
            stats, t = timed(lambda: stream_features(store, sae, cfg))
            stream_s.append(t)
        (model, tokenizer), load_s = timed(lambda: load_model(store.model_name, "cpu"))
        live = (stats.n_active > 0).nonzero().squeeze(1)
        W_U = model.get_output_embeddings().weight
        lens, lens_s = timed(lambda: logit_lens(sae.W_dec[live], final_norm(model), W_U, cfg.logit_tokens))
        _, write_s = timed(lambda: write_analysis(Path(tmp), Path(cfg.sae), stats, lens, sae, store, tokenizer, cfg))
        files = [p for p in Path(tmp).rglob("*") if p.is_file()]
        encode, stream = statistics.median(encode_s), statistics.median(stream_s)
        print(json.dumps({
            "rows": n_rows, "d_sae": sae.cfg.d_sae, "architecture": sae.cfg.architecture,
            "threads": torch.get_num_threads(),
            "encode_rows_per_s": round(n_rows / encode), "stream_rows_per_s": round(n_rows / stream),
            "stream_vs_encode": round(statistics.median(e / s for e, s in zip(encode_s, stream_s)), 3),
            "stream_s": round(stream, 2), "logit_lens_s": round(lens_s, 2), "write_s": round(write_s, 2),
            "analyse_s_without_model_load": round(stream + lens_s + write_s, 2), "model_load_s": round(load_s, 2),
            "output_bytes": sum(p.stat().st_size for p in files), "output_files": len(files),
            "encode_s_runs": [round(t, 2) for t in encode_s], "stream_s_runs": [round(t, 2) for t in stream_s],
        }))


if __name__ == "__main__":
    main()
