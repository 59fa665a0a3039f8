"""Every command the README and docs/ show, run as written against a tiny model, so the documentation cannot drift.

The `sae` commands are read from the bash blocks of README.md and docs/*.md (in the order of `PAGES`); each runs with
its own arguments (the demo config included) plus section overrides that swap the embedded model for the tiny test
Llama and shrink the sizes. The test runs in a temporary folder holding a copy of `configs/`, so the config's relative
`runs/demo/...` paths land there. The README's Python tour runs likewise, then the Python blocks of docs/ in its
namespace.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from sae.cli import main as cli_main
from sae.cli import stage_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/harvest.md", "docs/train.md", "docs/analyse.md", "docs/planted.md", "docs/benchmarks.md",
         "docs/gpu.md", "docs/faults.md", "docs/api.md", "docs/architecture.md", "docs/known-gaps.md"]
"""Every page of the documentation, README first; a test checks no page is missing from it."""
TEXTS = {page: (ROOT / page).read_text() for page in PAGES}
DEMO = "configs/demo.yaml"
TRANSCODER = "configs/transcoder.yaml"


def _blocks(language: str, pages: list[str] = PAGES) -> list[str]:
    return [block for page in pages for block in re.findall(rf"```{language}\n(.*?)```", TEXTS[page], re.S)]


def _bash_lines() -> list[str]:
    return [line for block in _blocks("bash") for line in block.splitlines()]


def test_every_page_is_read():
    """A new page under docs/ must join PAGES, or its commands would go untested; and the README stays short."""
    assert sorted(PAGES[1:]) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    assert len(TEXTS["README.md"].splitlines()) <= 150
    for page, text in TEXTS.items():  # links between pages resolve
        for target in re.findall(r"\]\(([\w./-]+\.md)\)", text):
            assert ((ROOT / page).parent / target).is_file(), (page, target)


def readme_commands() -> list[list[str]]:
    """The arguments of every `sae` command in the README's bash blocks, split as a shell would (comments dropped)."""
    commands = []
    for line in _bash_lines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["sae"]:
                commands.append(words[1:])
    return commands


def readme_torchrun_commands() -> list[list[str]]:
    """The `torchrun ... -m sae <stage> ...` lines: (launcher arguments, sae arguments)."""
    commands = []
    for line in _bash_lines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["torchrun"]:
            commands.append(words)
    return commands


def readme_alternatives() -> list[tuple[str, list[str]]]:
    """`sae <stage> ... # or: key=value ...`: the overrides a comment offers instead, with their stage."""
    found = []
    for line in _bash_lines():
        match = re.match(r"sae (\w+) .*# or: (.*)$", line)
        if match:
            found.append((match[1], shlex.split(match[2])))
    return found


def tiny_overrides(tiny_llama: Path, text_dir: Path, hook: str, config: str = DEMO) -> list[str]:
    """A config's run on the tiny Llama: same SAE recipes, its hooks moved to the tiny model's layer 1 (`hook` is
    the demo's), a 2.4k-token cache."""
    demo = yaml.safe_load((ROOT / config).read_text())

    def tiny(name: str) -> str:
        return re.sub(r"^blocks\.\d+\.", "blocks.1.", name)

    specs = [{**spec, **{k: tiny(spec[k]) for k in ("hook", "hook_out") if k in spec}} for spec in demo["train"]["saes"]]
    hooks = [tiny(h) for h in demo["harvest"]["hooks"]]
    assert config != DEMO or hooks == [hook]
    from sae.training.train import SAESpec

    first = Path(demo["train"]["out"]) / SAESpec(**specs[0]).run_name
    return [
        f"harvest.model={tiny_llama}", f"harvest.dataset={text_dir}", f"harvest.hooks=[{','.join(hooks)}]",
        "harvest.context_size=32", "harvest.max_tokens=2400", "harvest.batch_size=8", "harvest.shard_tokens=600",
        "harvest.eval_fraction=0.25", f"train.saes={json.dumps(specs)}", "eval.lm_loss_contexts=4",
        "analyse.n_top=5", f"score.sae={first}", f"explain.model={tiny_llama}", "explain.n_top_features=2",
        "explain.n_random_features=1", "explain.max_new_tokens=4", f"steer.sae={first}", "steer.max_new_tokens=4",
        f"attribute.sae={first}", "train.total_tokens=1536", "train.shuffle_rows=600",
    ]


def demo_stage_commands() -> list[list[str]]:
    """The README's stage commands on the demo config (the transcoder demo has a test of its own)."""
    return [c for c in readme_commands()[1:] if c[1:3] == ["--config", DEMO]]


def transcoder_command() -> list[str]:
    (command,) = [c for c in readme_commands() if c[1:3] == ["--config", TRANSCODER]]
    return command


def test_readme_shows_each_stage_and_the_demo():
    assert [c[0] for c in readme_commands()] == ["demo", "harvest", "train", "eval", "analyse", "explain", "score", "demo",
                                                 "train", "steer", "attribute", "planted"]
    assert len(demo_stage_commands()) == 9 and transcoder_command() == ["demo", "--config", TRANSCODER]
    assert len(readme_torchrun_commands()) == 2


def test_readme_alternative_overrides_are_valid():
    (stage, overrides), = readme_alternatives()
    cfg = stage_config(stage, str(ROOT / DEMO), overrides)
    assert (cfg.out, cfg.max_tokens, cfg.hooks) == ("runs/big/cache", 2_000_000, ["blocks.20.hook_mlp_out"])


def test_score_default_is_the_demo_topk_sae():
    """`sae score --config configs/demo.yaml` relies on ScoreConfig's default naming the demo's first SAE."""
    from sae.analysis.analyse import ScoreConfig
    from sae.training.train import SAESpec

    demo = yaml.safe_load((ROOT / DEMO).read_text())
    assert ScoreConfig(text="x").sae == str(Path(demo["train"]["out"]) / SAESpec(**demo["train"]["saes"][0]).run_name)


@pytest.mark.parametrize("stage", ["harvest", "train", "eval", "analyse", "explain", "score", "steer", "attribute",
                                   "planted", "demo"])
def test_help_of_every_command(stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main([stage, "--help"])
    assert exit_.value.code == 0 and "--config" in capsys.readouterr().out


def _in_copy(tmp_path: Path, name: str, monkeypatch, tiny: list[str] = ()) -> Path:
    """A working folder with a copy of configs/, its demo config shrunk by the `tiny` overrides written into it (a
    stage refuses overrides of sections it does not read, so the README's commands run as written on it)."""
    folder = tmp_path / name
    shutil.copytree(ROOT / "configs", folder / "configs")
    config = folder / DEMO
    data = yaml.safe_load(config.read_text())
    for item in tiny:
        key, value = item.split("=", 1)
        section, leaf = key.split(".")
        data.setdefault(section, {})[leaf] = yaml.safe_load(value)
    config.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(folder)
    return folder


def test_readme_stage_commands_run_as_written(tiny_llama, text_dir, hook, tmp_path, monkeypatch, capsys):
    tiny = tiny_overrides(tiny_llama, text_dir, hook)
    folder = _in_copy(tmp_path, "stages", monkeypatch, tiny)
    printed = {}
    for args in demo_stage_commands():  # its own section's tiny settings win over the command's (total_tokens)
        own = [o for o in tiny if o.startswith(f"{args[0]}.")]
        assert cli_main([*args, *own]) == 0, (args, capsys.readouterr().err)
        printed[args[0]] = capsys.readouterr().out
    runs = folder / "runs" / "demo"
    assert len(json.loads((runs / "eval" / "eval.json").read_text())["saes"]) == 2
    assert (runs / "analysis" / "index.html").is_file() or any((runs / "analysis").glob("*/index.html"))
    assert "feature browser:" in printed["analyse"] and "return" in printed["score"]
    for explained in (runs / "analysis").glob("*/explanations.json"):  # one per SAE, 3 features each
        assert json.loads(explained.read_text())["summary"]["n_explained"] == 3
    assert "3 features explained" in printed["explain"] and len(list((runs / "analysis").glob("*/explanations.json"))) == 2
    assert "| steered (add #42 +8)" in printed["steer"] and "features for" in printed["attribute"]
    assert (runs / "saes" / "topk_k32_x8_" f"{hook}" / "cfg.json").is_file()
    assert (folder / "runs" / "live" / "saes" / "checkpoints" / "latest.json").is_file()  # the on-the-fly line


def test_readme_planted_command_runs_as_written(tmp_path, monkeypatch, capsys):
    """`sae planted` as the README shows it, shrunk (tests/test_planted.py runs the CI-sized benchmark)."""
    monkeypatch.chdir(tmp_path)
    args = readme_commands()[-1]
    assert args[0] == "planted"
    small = ["d_in=16", "n_features=32", "l0=2", "tokens=20000", "eval_tokens=2000"]
    assert cli_main([*args, *small]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "mean max cos" in printed and "reference_topk_k2_plain_pytorch" in printed
    assert "PCA FVU at L0: PCA keeping as many components as the model's L0" in printed  # the columns' legend
    assert len(json.loads((tmp_path / "runs" / "planted" / "planted.json").read_text())["scores"]) == 5


def test_readme_torchrun_commands_run_as_written(tiny_llama, text_dir, hook, tmp_path, monkeypatch):
    """The torchrun lines, launched as written (2 gloo processes on this CPU) on a tiny demo cache."""
    import os
    import subprocess
    import sys

    folder = _in_copy(tmp_path, "torchrun", monkeypatch, tiny_overrides(tiny_llama, text_dir, hook))
    assert cli_main(["harvest", "--config", DEMO]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for words in readme_torchrun_commands():
        launcher = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
        done = subprocess.run(launcher, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (words, done.stderr[-3000:])
        out = folder / words[-1].split("=", 1)[1]
        assert len([p for p in out.iterdir() if (p / "cfg.json").is_file()]) == 2, words


def test_readme_demo_command_runs_as_written(tiny_llama, text_dir, hook, tmp_path, monkeypatch, capsys):
    folder = _in_copy(tmp_path, "demo", monkeypatch)
    args = readme_commands()[0]
    assert cli_main([*args, *tiny_overrides(tiny_llama, text_dir, hook)]) == 0, capsys.readouterr().err
    assert "demo finished" in capsys.readouterr().out
    assert (folder / "runs" / "demo" / "eval" / "eval.json").is_file()


def test_readme_transcoder_demo_runs_as_written(tiny_llama, text_dir, hook, tmp_path, monkeypatch, capsys):
    """`sae demo --config configs/transcoder.yaml` on the tiny Llama's layer-1 MLP: both transcoders are trained,
    evaluated on the MLP's output against the linear baseline, and analysed."""
    folder = _in_copy(tmp_path, "transcoder", monkeypatch)
    assert cli_main([*transcoder_command(), *tiny_overrides(tiny_llama, text_dir, hook, TRANSCODER)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "demo finished" in printed and "least-squares linear map" in printed
    results = json.loads((folder / "runs" / "transcoder" / "eval" / "eval.json").read_text())
    assert [(r["transcoder"], r["skip"], r["hook_out"]) for r in results["saes"]] == [
        (True, False, "blocks.1.hook_mlp_out"), (True, True, "blocks.1.hook_mlp_out")]
    assert all(entry["baseline"] == "linear" for entry in results["pca"].values())
    assert any((folder / "runs" / "transcoder" / "analysis").glob("*/index.html"))


TOUR_ON_TINY = [
    ('model="smollm2"', 'model={model!r}, dataset={texts!r}, context_size=32, batch_size=8, shard_tokens=600, '
                        'eval_fraction=0.25'),
    ("max_tokens=200_000", "max_tokens=2400"),
    ('hook = "blocks.15.hook_resid_post"', "hook = {hook!r}"),
    ('out="runs/x/saes"', 'out="runs/x/saes", total_tokens=1536, shuffle_rows=600, wandb_mode="disabled"'),
    ('out="runs/x/eval"', 'out="runs/x/eval", lm_loss_contexts=4'),
    ('out="runs/x/analysis"', 'out="runs/x/analysis", n_top=5'),
    ("holdout([hook], 1000)", "holdout([hook], 100)"),
    ('sae.load_model("smollm2")', "sae.load_model({model!r})"),
    ("max_new_tokens=8", "max_new_tokens=4"),
]
"""(as written, on the tiny Llama at tiny sizes): what the README's Python tour runs with here."""


def test_python_tour_and_docs_python_blocks_run(tiny_llama, text_dir, hook, tmp_path, monkeypatch, capsys):
    """The README's 15-line tour, as written but for the model and the sizes, then every Python block of docs/ in
    the tour's namespace."""
    monkeypatch.chdir(tmp_path)
    (tour,) = _blocks("python", ["README.md"])
    assert len(tour.strip().splitlines()) <= 16  # the import and 15 lines
    for old, new in TOUR_ON_TINY:
        assert tour.count(old) == 1, old
        tour = tour.replace(old, new.format(model=str(tiny_llama), texts=str(text_dir), hook=hook))
    namespace: dict = {}
    exec(compile(tour, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "| steered (add #" in printed and "features for" in printed
    assert [r["name"] for r in namespace["results"]["saes"]] == [namespace["folders"][0].name]
    assert namespace["browser"].name == "index.html" and namespace["browser"].is_file()
    assert namespace["f"].shape == (100, namespace["model"].cfg.d_sae)
    docs = _blocks("python", PAGES[1:])
    assert docs
    for block in docs:
        exec(compile(block, "docs", "exec"), namespace)
    assert namespace["spliced"].shape[:2] == namespace["ids"].shape
