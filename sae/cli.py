"""The `sae` command: one subcommand per stage, each reading its section of a YAML config.

    sae harvest --config configs/demo.yaml max_tokens=100000
    sae train   --config configs/demo.yaml train.batch_size=2048
    sae demo

A config file has one section per stage (harvest:, train:, eval:, analyse:, explain:, planted:). Overrides are
`key=value` for the stage being run, or `section.key=value` for any section. Paths that link stages (the cache a trainer reads, the
SAEs an evaluation reads) default to the previous stage's output in the same file, so one file describes a run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from sae.config import ConfigError, UserError, describe, from_dict, merge, parse_overrides, read_yaml


@dataclass(frozen=True)
class Stage:
    """A subcommand: the YAML section it reads, its config class, and how to run it and report the result."""

    section: str
    module: str
    config: str
    run: Callable[[Any, Any], Any]
    """(stage module, config) → result; prints what a person at a terminal wants to see."""
    help: str

    def load(self) -> tuple[type, Callable[[Any], Any]]:
        mod = importlib.import_module(f"sae.{self.module}")
        return getattr(mod, self.config), lambda cfg: self.run(mod, cfg)


def _shown(run: str, show: str) -> Callable[[Any, Any], Any]:
    """A stage that runs `mod.<run>(cfg)` and prints `mod.<show>(result)`."""

    def stage(mod, cfg):
        result = getattr(mod, run)(cfg)
        print(getattr(mod, show)(result))
        return result

    return stage


def _analyse(mod, cfg):
    index = mod.run(cfg)
    print(f"feature browser: {index.resolve()}")
    return index


def _explain(mod, cfg):
    from sae.analysis.dashboard import write_dashboard

    for folder in mod.explain(cfg):
        print(mod.format_summary(folder))
    index = write_dashboard(cfg.analysis)  # refresh the pages, so they show the explanations
    print(f"feature browser: {index.resolve()}")
    return index


def _print(result):
    print(result)
    return result


def _folders(result):
    """The SAE folders a training run wrote, one per line."""
    print("\n".join(str(folder) for folder in result))
    return result


STAGES = {
    "harvest": Stage("harvest", "data.harvest", "HarvestConfig", lambda m, c: _print(m.harvest(c)), "cache activations of a model on a text dataset"),
    "train": Stage("train", "training.train", "TrainConfig", lambda m, c: _folders(m.train(c)), "train sparse autoencoders on a cache or a live model (torchrun for several processes)"),
    "eval": Stage("eval", "analysis.evaluate", "EvalConfig", _shown("evaluate", "format_table"), "metrics, PCA baseline and spliced LM loss"),
    "analyse": Stage("analyse", "analysis.dashboard.build", "AnalyseConfig", _analyse, "top contexts, logit lens and the HTML feature browser"),
    "explain": Stage("explain", "analysis.explain", "ExplainConfig", _explain, "explain features in words with a language model and score the explanations by detection"),
    "score": Stage("score", "analysis.analyse", "ScoreConfig", _shown("score_text", "format_scores"), "anomaly scores: per-token reconstruction error of a text"),
    "steer": Stage("steer", "analysis.steer", "SteerConfig", _shown("run", "format_steered"), "generate with features added or clamped, next to the plain text"),
    "attribute": Stage("attribute", "analysis.attribute", "AttributeConfig", _shown("run", "format_report"),
                       "which features drove a next-token prediction (activation × gradient)"),
    "planted": Stage("planted", "planted", "PlantedConfig", _shown("run_planted", "format_scores"),
                     "ground-truth benchmark: train the SAEs on activations built from a known dictionary and score "
                     "how much of it they recover"),
}

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
"""Shipped inside the package (so `sae demo` works from a wheel); the repository's configs/demo.yaml links to it."""


def _link(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the paths that connect stages from the stage before, unless the file sets them."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    if "harvest" in data:  # train.source=model runs the harvest section's model live
        data.setdefault("train", {}).setdefault("harvest", data["harvest"])
    cache = data.get("harvest", {}).get("out")
    saes = data.get("train", {}).get("out")
    for section in ("train", "eval", "analyse", "explain", "score"):
        if cache is not None and section in STAGES:
            data.setdefault(section, {}).setdefault("cache", cache)
    analysis = data.get("analyse", {}).get("out")
    if saes is not None and "sae" not in data.get("attribute", {}):  # the analysis of the SAE it is given (below)
        data.setdefault("attribute", {}).setdefault("analysis", analysis or "")
    # The stages that take one SAE get the folder of the sweep too: one SAE there is used, several are named.
    for section in ("eval", "analyse", "score", "steer", "attribute"):
        if saes is not None:
            data.setdefault(section, {}).setdefault("saes" if section == "eval" else "sae", saes)
    if analysis is not None:
        data.setdefault("explain", {}).setdefault("analysis", analysis)
    return data


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every value of nested dicts that is not itself a dict."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, tree


def _refuse_unread(name: str, scoped: dict[str, Any], used: dict[str, Any]) -> None:
    """Refuse `section.key=value` overrides that stage `name` never reads (`sae planted train.lr=…` was silently
    ignored): each override's value is its own object, so one the stage's settings do not hold went nowhere."""
    held = {id(value) for _, value in _leaves(used)}
    unread = [".".join(path) for path, value in _leaves(scoped) if id(value) not in held]
    if unread:
        raise ConfigError(f"{', '.join(unread)}: not read by `sae {name}`; set its own keys (`sae {name} --help`) "
                          f"as key=value or {STAGES[name].section}.key=value")


def stage_config(name: str, config_file: str | None, overrides: list[str], strict: bool = True) -> Any:
    """The dataclass for stage `name` from a YAML file (optional) plus overrides. strict: refuse an override of
    another section that this stage does not read (`sae demo` passes one set of overrides to every stage)."""
    stage = STAGES[name]
    cls, _ = stage.load()
    data = read_yaml(config_file) if config_file else {}
    unknown = [k for k in data if k not in {s.section for s in STAGES.values()}]
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in {config_file}; sections are {sorted({s.section for s in STAGES.values()})}")
    extra = parse_overrides(overrides)
    sections = {s.section for s in STAGES.values()}
    scoped = {k: v for k, v in extra.items() if k in sections and isinstance(v, dict)}
    bare = {k: v for k, v in extra.items() if k not in scoped}
    data = merge(data, scoped)
    data[stage.section] = merge(data.get(stage.section, {}) or {}, bare)
    linked = _link(data)[stage.section]
    fields = set(cls.__dataclass_fields__)
    # Links only fill keys the stage has; a stage without e.g. `sae` just ignores that link.
    linked = {k: v for k, v in linked.items() if k in fields or k in data[stage.section]}
    if strict:
        _refuse_unread(name, scoped, linked)
    return from_dict(cls, linked, where=stage.section)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, stage in STAGES.items():
        try:
            cls, _ = stage.load()
            keys = describe(cls)
        except (ImportError, AttributeError):
            keys = "  (this stage is not available in this build)\n"
        p = sub.add_parser(name, help=stage.help, description=f"{stage.help}.\n\nkeys of the {stage.section}: section:\n{keys}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML file with harvest:/train:/eval:/analyse:/explain: sections")
        p.add_argument("overrides", nargs="*", help="key=value (this stage) or section.key=value")
    demo = sub.add_parser("demo", help="harvest → train → eval → analyse on the embedded SmolLM2 and the stdlib corpus")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help="demo config (default: configs/demo.yaml)")
    demo.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def run_stage(name: str, config_file: str | None, overrides: list[str]) -> Any:
    cfg = stage_config(name, config_file, overrides)
    _, run = STAGES[name].load()
    return run(cfg)


def demo(config_file: str, overrides: list[str]) -> None:
    """The whole path on the embedded model, ending with the metrics table and where the browser is."""
    from sae.analysis.evaluate import format_table

    start = time.time()
    results = {}
    # A second `sae demo` continues the first (a finished training run just rewrites its SAE folders).
    overrides = ["train.resume=true", *overrides]
    # Every stage's settings are read and checked before the first stage runs.
    configs = {name: stage_config(name, config_file, overrides, strict=False)
               for name in ("harvest", "train", "eval", "analyse")}
    for name, cfg in configs.items():
        print(f"\n=== sae {name} ({time.time() - start:.0f} s) ===", flush=True)
        results[name] = STAGES[name].load()[1](cfg)
    print(f"\n=== demo finished in {time.time() - start:.0f} s ===\n{format_table(results['eval'])}")
    print(f"feature browser: {Path(results['analyse']).resolve()}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.config, args.overrides)
        else:
            run_stage(args.command, args.config, args.overrides)
    except (UserError, FileNotFoundError) as err:  # messages meant for the user; anything else is a bug: traceback
        # One write with its newline: torchrun's ranks share stderr, and print's two writes (text, then newline)
        # let another rank's line land between them.
        sys.stderr.write(f"sae {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not the traceback of wherever it landed
        if args.command == "train":
            again = ("run the same command with resume=true to continue from its last checkpoint (it starts over if none "
                     "was written yet)")
        elif args.command in ("harvest", "planted", "demo"):
            again = "run the same command again to continue"
        else:
            again = "nothing partial was kept; run it again"
        print(f"\nsae {args.command}: interrupted; {again}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
