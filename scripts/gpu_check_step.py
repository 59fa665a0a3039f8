"""Judge one step of scripts/gpu_check.sh from what it left behind, or sum the steps up; prints ONE JSON line.

The shell script only runs commands (each under a time limit, so one hang cannot eat the others' time); deciding
whether a step proved what it should (GPU tests ran rather than skipped, host syncs kept their budget, the memory plan
covered every peak, SAE folders were written, a DDP run really ran on N ranks) needs parsing, which is clearer here.
No torch import: judging must cost nothing next to the steps.

    python scripts/gpu_check_step.py step NAME --mode gpu --rc 0 --started EPOCH_S --log L [--stdout S] [--path P]
        [--world N]
    python scripts/gpu_check_step.py summary SUMMARY.jsonl --mode gpu --seconds 300
"""

from __future__ import annotations

import argparse
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

Judgement = tuple[bool, str | None, dict]
"""(passed, why it failed or None, figures worth keeping)."""


class NotExercised(Exception):
    """The step cannot prove anything on this machine (DDP with fewer than 2 GPUs): neither passed nor failed."""


def _json_doc(path: Path | None) -> dict:
    """The one JSON document a bench script printed (raises if it printed none)."""
    if path is None:
        raise ValueError("no --stdout given")
    return json.loads(path.read_text())


def judge_tests(args: argparse.Namespace) -> Judgement:
    """On a GPU every test must run: a GPU test that skipped there proves nothing. On the CPU they all skip."""
    suite = ET.parse(args.path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    if counts["failures"] or counts["errors"]:
        return False, f"{counts['failures']} failed, {counts['errors']} errors", counts
    if args.mode == "gpu" and counts["skipped"]:
        return False, f"{counts['skipped']} GPU tests skipped (CUDA not visible to pytest?)", counts
    return True, None, counts


def judge_bench_train(args: argparse.Namespace) -> Judgement:
    doc = _json_doc(args.stdout)
    t = doc["throughput"]
    detail = {
        "config": {k: doc["config"].get(k) for k in ("d_in", "d_sae", "batch", "dtype", "device", "gpu")},
        "ceiling_gflop_per_s": t["ceiling"]["gflop_per_s"],
        "ceiling_tokens_per_s": t["ceiling"]["tokens_per_s"],
        "ours": {a: {"tokens_per_s": e["tokens_per_s"], "ratio_to_ceiling": e["ratio_to_ceiling"]}
                 for a, e in t["ours"].items()},
        "verdict": doc["verdict"],
        "goals": doc["goals"],
    }
    auxk = t.get("topk_auxk")  # issue 19 §3: TopK's step with AuxK at its full k_aux, against the same without
    if auxk is None:
        return False, "no topk_auxk part: AuxK's share of TopK's step was not measured", detail
    detail["topk_auxk"] = {k: auxk[k] for k in ("k_aux", "auxk_share_of_step", "tokens_per_s", "step_ms", "path",
                                               "auxk_ms", "dense_speedup")}
    return True, None, detail


def judge_bench_syncs(args: argparse.Namespace) -> Judgement:
    """On a GPU every case must keep its budget under CUDA's sync debug mode. The CPU has no such mode: there the
    steps only have to run, each case on the AuxK path it meant (its counts are null)."""
    doc = _json_doc(args.stdout)
    cases = {f"{c['arch']}/{'auxk' if c['auxk'] else 'no-auxk'}/{'in' if c['topk_warmup'] else 'after'}-warmup":
             c for c in doc["cases"]}
    detail: dict = {"shape": doc["shape"], "device": doc["device"], "gpu": doc["gpu"], "budget": doc["budget"],
                    "max_syncs_per_step": {name: c["max_syncs"] for name, c in cases.items()}}
    not_set_up = sorted(name for name, c in cases.items() if not c["set_up"])
    if not_set_up:
        return False, f"AuxK did not run as meant in {', '.join(not_set_up)}", detail
    if not doc["measurable"]:
        if args.mode == "gpu":
            return False, f"syncs not measured on {doc['device']}: {doc['note']}", detail
        detail["syncs"] = doc["note"]
        return True, None, detail
    over = {name: c for name, c in cases.items() if not c["ok"]}
    detail["over_budget"] = {name: {k: c[k] for k in ("max_syncs", "budget", "where")} for name, c in over.items()}
    why = ", ".join(f"{name} {c['max_syncs']} > {c['budget']}" for name, c in over.items())
    return not over, f"syncs per step over budget: {why}" if over else None, detail


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def judge_bench_memory(args: argparse.Namespace) -> Judgement:
    """The plan must never under-count a peak (a run it admits could run out of memory): on a GPU that fails the
    step, JumpReLU's initial fit against its own plan figure included. Over-counting by more than 1.3× is a goal
    missed. At the CPU run's tiny sizes constant overheads (code pages, JumpReLU's fixed quantile workspace) swamp
    the plan's model, so there the figures are only reported."""
    doc = _json_doc(args.stdout)
    results = doc["results"]
    # issue 19 §2: JumpReLU's initial fit at d_sae 65,536 (its per-latent quantile in chunks), against its own figure
    jumprelu_init = {case.split("/")[1]: {"init_peak_mib": _mib(r["init_peak_bytes"]),
                                          "init_plan_mib": _mib(r["init_plan_bytes"]),
                                          "within_plan": r["init_peak_bytes"] <= r["init_plan_bytes"]}
                     for case, r in results.items() if case.startswith("jumprelu/")}
    detail: dict = {"shape": doc["shape"], "device": doc["device"], "meter": doc["meter"],
                    "peaks": {case: {"peak_mib": _mib(r["peak_bytes"]), "plan_mib": _mib(r["plan_bytes"]),
                                     "plan_over_peak": r["plan_over_peak"]} for case, r in results.items()},
                    "jumprelu_init": jumprelu_init}
    if not results or not jumprelu_init:
        return False, "no variant (or no JumpReLU) was measured", detail
    ratios = [r["plan_over_peak"] for r in results.values()]
    detail["verdict"] = {"plan_over_peak_min_max": [min(ratios), max(ratios)],
                         "plan_over_peak_meets_goal": all(r["plan_bytes"] <= doc["goal_max_ratio"] * r["peak_bytes"]
                                                          for r in results.values())}
    if args.mode == "cpu":
        return True, None, detail
    under = [case for case, r in results.items() if r["peak_bytes"] > r["plan_bytes"]]
    under += [f"jumprelu/{mode} initial fit" for mode, e in jumprelu_init.items() if not e["within_plan"]]
    return not under, f"the plan under-counts: {', '.join(under)}" if under else None, detail


def judge_bench_harvest(args: argparse.Namespace) -> Judgement:
    doc = _json_doc(args.stdout)
    detail = {k: doc[k] for k in ("model", "device", "model_dtype", "tokens", "batch_size")}
    detail["bare_full_forward_tok_s"] = round(doc["bare_full_forward_tok_s"])
    detail["hooks"] = {h: {"harvest_tok_s": round(e["harvest_tok_s"]),
                           "ratio_vs_same_depth": round(e["ratio_vs_same_depth"], 3)} for h, e in doc["hooks"].items()}
    return True, None, detail


def judge_cache(args: argparse.Namespace) -> Judgement:
    manifest = json.loads((args.path / "manifest.json").read_text())
    detail = {"shards": len(manifest["shards"]), "model_dtype": manifest.get("model_dtype"),
              "hooks": manifest["hooks"], "complete": manifest["complete"]}
    return bool(manifest["complete"]), None if manifest["complete"] else "the cache is not complete", detail


def _sae_folders(out: Path) -> list[str]:
    return sorted(p.parent.name for p in out.glob("*/cfg.json") if (p.parent / "sae_weights.safetensors").is_file())


def judge_train(args: argparse.Namespace) -> Judgement:
    saes = _sae_folders(args.path)
    return bool(saes), None if saes else f"no SAE folders in {args.path}", {"saes": saes}


def _world_size(out: Path) -> int | None:
    """The world size a run recorded in its checkpoint (issue 8 §2: resume must know it), if any."""
    for state in sorted((out / "checkpoints").glob("step_*/state.json")):
        found = _find_key(json.loads(state.read_text()), "world_size")
        if found is not None:
            return int(found)
    return None


def _find_key(node: object, key: str) -> object | None:
    if isinstance(node, dict):
        if key in node:
            return node[key]
        node = list(node.values())
    if isinstance(node, list):
        for v in node:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def judge_ddp(args: argparse.Namespace) -> Judgement:
    """Exit 0 and SAE folders are not enough: N plain processes sharing one `out` also get there. The checkpoint
    must say it came from a run of world size N, and N must be at least 2: torchrun with one process creates no
    process group, so nothing distributed ran."""
    if args.world < 2:
        raise NotExercised(f"{args.world} GPU(s) visible to torch: DDP needs 2 or more")
    passed, why, detail = judge_train(args)
    detail["world_size"] = world = _world_size(args.path)
    detail["expected_world_size"] = args.world
    if passed and world != args.world:
        passed, why = False, f"checkpoint records world_size {world}, expected {args.world} (not a DDP run?)"
    return passed, why, detail


def judge_ran(args: argparse.Namespace) -> Judgement:
    return True, None, {}


JUDGES: dict[str, Callable[[argparse.Namespace], Judgement]] = {
    "model": judge_ran, "tests": judge_tests, "bench_train": judge_bench_train, "bench_syncs": judge_bench_syncs,
    "bench_memory": judge_bench_memory, "bench_harvest": judge_bench_harvest,
    "cache": judge_cache, "on_the_fly": judge_train, "ddp": judge_ddp,
}


def _last_words(log: Path | None, n: int = 400) -> str | None:
    """The end of a failed step's log: usually the error message itself."""
    if log is None or not log.is_file():
        return None
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][-n:] if lines else None


def step(args: argparse.Namespace) -> dict:
    seconds = round(time.time() - args.started, 1)
    record: dict = {"step": args.name, "ok": False, "rc": args.rc, "seconds": seconds, "why": None,
                    "detail": {}, "log": str(args.log) if args.log else None}
    if args.rc in (124, 137):
        record["why"] = (f"timed out ({args.limit} s)" if (args.limit or 0) >= 5
                         else "not run: the script's overall deadline had passed")
        return record
    if args.rc != 0:
        record["why"] = f"exit {args.rc}: {_last_words(args.log)}"
        return record
    try:
        record["ok"], record["why"], record["detail"] = JUDGES[args.name](args)
    except NotExercised as err:
        record.update(ok=None, exercised=False, why=f"not exercised: {err}")
    except Exception as err:  # noqa: BLE001 - an unreadable result is this step's failure, not the script's
        record["why"] = f"could not read the step's result: {type(err).__name__}: {err}"
    goals = [k for k, v in record["detail"].get("verdict", {}).items() if k.endswith("meets_goal")]
    if goals and args.mode == "gpu":  # the goals are for full sizes on a GPU, not for the CPU smoke run
        record["goals_met"] = all(record["detail"]["verdict"][k] for k in goals)
    return record


def summary(args: argparse.Namespace) -> dict:
    records = [json.loads(ln) for ln in args.file.read_text().splitlines() if ln.strip()]
    steps = [r for r in records if "step" in r]
    run = [r for r in steps if r.get("exercised", True)]
    return {
        "summary": True, "mode": args.mode, "ok": bool(run) and all(r["ok"] for r in run),
        "passed": [r["step"] for r in run if r["ok"]], "failed": [r["step"] for r in run if not r["ok"]],
        "not_exercised": [r["step"] for r in steps if not r.get("exercised", True)],
        "goals_missed": [r["step"] for r in steps if r.get("goals_met") is False],
        "seconds": args.seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step")
    s.add_argument("name", choices=sorted(JUDGES))
    s.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    s.add_argument("--rc", type=int, required=True)
    s.add_argument("--started", type=float, required=True, help="when the step started (seconds since the epoch)")
    s.add_argument("--limit", type=int, help="the step's time limit (reported when it ran out)")
    s.add_argument("--log", type=Path, help="the step's stderr (and stdout, for commands that print no JSON)")
    s.add_argument("--stdout", type=Path, help="a bench script's JSON document")
    s.add_argument("--path", type=Path, help="what the step wrote: junit XML, a cache, a training `out` folder")
    s.add_argument("--world", type=int, help="ddp: the number of processes started")
    m = sub.add_parser("summary")
    m.add_argument("file", type=Path)
    m.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    m.add_argument("--seconds", type=float, required=True)
    args = p.parse_args()
    print(json.dumps(step(args) if args.command == "step" else summary(args)), flush=True)


if __name__ == "__main__":
    main()
