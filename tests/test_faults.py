"""Faults a user meets — bad settings, broken caches, NaN rows, a full disk, no network, kill -9 — driven through the
CLI: each must end in one line on stderr (exit 2) that says what is wrong and leave nothing half-written behind, or be
recovered by running the same command again to exactly the result of a clean run.

Every test here injects one fault (unless marked `fault(None)`); what it ended in is tallied for the whole session
(conftest) and printed at the end: `pytest tests/test_faults.py` gives the counts docs/faults.md quotes."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae.cli import main as cli_main
from sae.data.store import ActivationStore, CacheError

RECOVERED, REFUSED, FINISHED = "recovered exactly", "refused with a message", "finished before the kill"


@pytest.fixture(autouse=True)
def fault(request, record_property) -> dict:
    """The test's fault outcome for the session tally: its `fault` marker's, else refused with a message. A test may
    change it (a kill that landed after the run had finished); if the test fails, the tally counts it as lost."""
    marker = request.node.get_closest_marker("fault")
    outcome = {"kind": marker.args[0] if marker else REFUSED}
    yield outcome
    if outcome["kind"] is not None:
        record_property("fault", outcome["kind"])


def refused(capsys, *argv: str) -> str:
    """Run `sae argv...`; it must exit 2 with its message as one line (the last on stderr, after any progress bars of
    model loading), which is returned."""
    assert cli_main(list(argv)) == 2
    err = capsys.readouterr().err
    *before, line = err.rstrip("\n").split("\n")
    assert line.startswith(f"sae {argv[0]}: error: ") and "Traceback" not in err, err
    assert all("\r" in b for b in before), err  # only carriage-return progress bars may come before it
    return line


# ----- SAE settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("architecture: topk, expansion_factor: 2, k: 0",
     r"SAE topk_k0_x2_\S+: invalid topk SAE settings: k=0 must be between 1 and d_sae=64$"),
    ("architecture: topk, expansion_factor: 2, k: 65", r"k=65 must be between 1 and d_sae=64$"),
    ("architecture: relu_l1, l1_coefficient: -1", r"l1_coefficient=-1.0 must be ≥ 0$"),
    ("architecture: topk, aux_coefficient: -0.5, aux_k: 0", r"aux_coefficient=-0.5 must be ≥ 0; aux_k=0 must be > 0 \(or unset\)$"),
    ("architecture: topk, expansion_factor: 0", r"expansion_factor=0 must be > 0"),
    ("architecture: topk, d_sae: 0", r"d_sae=0 must be > 0$"),
    ("architecture: jumprelu, target_l0: 8, l0_coefficient: 5",
     r"l0_coefficient=5 has no effect with target_l0=8 \(the L0 controller sets the penalty's weight\); drop one$"),
    ("architecture: matryoshka_batchtopk, expansion_factor: 2, k: 4, matryoshka_widths: [16, 32]",
     r"matryoshka_widths=\[16, 32\] must be strictly increasing, ≥ 1 and end at d_sae=64$"),
])
def test_train_refuses_bad_sae_settings(spec, message, tiny_cache, hook, tmp_path, capsys):
    err = refused(capsys, "train", f"cache={tiny_cache}", f"out={tmp_path / 'saes'}", f"saes=[{{{spec}, hook: {hook}}}]")
    assert re.search(message, err.strip()), err


@pytest.mark.parametrize("setting", ["shuffle_rows=0", "checkpoint_every=0", "log_every=-1", "batch_size=0",
                                     "dead_window_tokens=0"])
def test_train_refuses_counts_below_one(setting, tiny_cache, tmp_path, capsys):
    """A zero step count would divide by zero mid-run, a negative shuffle would silently stop shuffling."""
    err = refused(capsys, "train", f"cache={tiny_cache}", f"out={tmp_path / 'saes'}", setting)
    assert err.endswith(f"{setting}: must be ≥ 1")


@pytest.mark.parametrize("setting, said", [
    ("grad_clip=-1", "grad_clip=-1.0 must be > 0"),  # ran to FVU 2 before
    ("lr_warmup_frac=2", "lr_warmup_frac=2.0: fractions of the run must be in [0, 1]"),
    ("l1_warmup_frac=-3", "l1_warmup_frac=-3.0: fractions"),
    ("lr_decay_frac=0.6 lr_warmup_frac=0.6", "lr_warmup_frac + lr_decay_frac: fractions"),
    ("total_tokens=true", "total_tokens: expected int, got True"),  # trained on 1 token before
    ("resume=true overwrite=true", "resume=true continues the run in `out` and overwrite=true deletes it"),  # resumed
])
def test_train_refuses_schedules_that_cannot_train_before_work(setting, said, tiny_cache, tmp_path, capsys):
    line = refused(capsys, "train", f"cache={tiny_cache}", f"out={tmp_path / 'saes'}", *setting.split())
    assert said in line, line
    assert not (tmp_path / "saes").exists()


@pytest.mark.parametrize("name", ["/tmp/elsewhere/mine", "../up", "a/b", "checkpoints", "wandb", ".", "..", ".hidden"])
def test_train_refuses_sae_names_that_are_not_a_folder_inside_out(name, tiny_cache, hook, tmp_path, capsys):
    """`name: /tmp/r/mine` overwrote the user's mine.safetensors with a checkpoint and wrote the SAE outside `out`;
    `../x` escaped too, `checkpoints` or `wandb` failed after training, `a/b` at the first checkpoint."""
    line = refused(capsys, "train", f"cache={tiny_cache}", f"out={tmp_path / 'saes'}",
                   f"saes=[{{architecture: topk, k: 4, hook: {hook}, name: '{name}'}}]")
    assert line.endswith("(the run's own folders); set `name`") and repr(name) in line, line
    assert not (tmp_path / "saes").exists()


@pytest.mark.parametrize("value", ["1", "-0.1"])
def test_train_refuses_a_topk_warmup_with_no_steps_after_it(value, tiny_cache, tmp_path, capsys):
    """A warm-up over the whole run would leave BatchTopK's threshold at 0 and JumpReLU's θ at their initial values."""
    err = refused(capsys, "train", f"cache={tiny_cache}", f"out={tmp_path / 'saes'}", f"topk_warmup_frac={value}")
    assert err.endswith("steps after the warm-up to set its thresholds") and f"topk_warmup_frac={float(value)}" in err


@pytest.mark.parametrize("theirs", ['{"my": "settings"}', "not json at all"])
def test_train_refuses_an_sae_folder_whose_cfg_json_is_not_an_saes_before_work(theirs, tiny_cache, hook, tmp_path,
                                                                              capsys):
    """`name: mine` into an out/ whose mine/ holds the user's own cfg.json: it was replaced by the SAE's at the end
    of the run. Refused before any work now, the file intact; a folder an earlier run saved is still replaced."""
    out = tmp_path / "saes"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "cfg.json").write_text(theirs)
    args = ["train", f"cache={tiny_cache}", f"out={out}", "batch_size=64", "total_tokens=128", "wandb_mode=disabled",
            f"saes=[{{architecture: topk, expansion_factor: 2, k: 4, hook: {hook}, name: mine}}]"]
    line = refused(capsys, *args)
    assert line.endswith(f"cannot save an SAE to {out / 'mine'}: saving replaces the folder, and it holds other files "
                         "(a cfg.json that is not an SAE's); save to a new or empty folder"), line
    assert (out / "mine" / "cfg.json").read_text() == theirs and sorted(p.name for p in out.iterdir()) == ["mine"]
    (out / "mine" / "cfg.json").unlink()
    assert cli_main(args) == 0 and cli_main([*args, "overwrite=true"]) == 0  # ours, replaced by the second run
    assert (out / "mine" / "sae_weights.safetensors").is_file()


# ----- a damaged manifest ---------------------------------------------------------------------------------------


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    """A writable copy of the session's tiny cache."""
    return Path(shutil.copytree(tiny_cache, tmp_path / "cache"))


def edit_manifest(cache: Path, edit) -> None:
    file = cache / "manifest.json"
    manifest = json.loads(file.read_text())
    edit(manifest)
    file.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("context_size"), "key 'context_size' is missing"),
    (lambda m: m.update(eval_fraction="0.25"), "'eval_fraction' should be int or float, not '0.25'"),
    (lambda m: m.update(dtype="float8"), "'dtype' 'float8' is not one of float16, bfloat16, float32"),
    (lambda m: m["shards"][1].pop("sha256"), "shards\\[1\\]: key 'sha256' is missing"),
    (lambda m: m["hooks"].update({"blocks.1.hook_resid_post": 48}),
     r"hooks\['blocks.1.hook_resid_post'\] says d_model 48 but shard_00000.safetensors holds blocks.1.hook_resid_post of shape \[\d+, 32\]"),
    (lambda m: m["hooks"].update({"blocks.2.hook_mlp_out": 32}), "hook 'blocks.2.hook_mlp_out' is listed but shard_00000.safetensors holds no such tensor"),
])
def test_damaged_manifest_is_named_on_open(edit, message, cache_copy):
    edit_manifest(cache_copy, edit)
    with pytest.raises(CacheError, match=f"{re.escape(str(cache_copy / 'manifest.json'))} is damaged: {message}; restore it"):
        ActivationStore(cache_copy)


@pytest.mark.parametrize("stage", ["train", "eval", "analyse"])
def test_every_stage_refuses_a_manifest_whose_width_disagrees_with_its_shards(stage, cache_copy, hand_sae, tmp_path, capsys):
    import torch

    hand_sae(torch.eye(32), torch.eye(32)).save(tmp_path / "sae")
    edit_manifest(cache_copy, lambda m: m["hooks"].update({"blocks.1.hook_resid_post": 48}))
    sae_key = {"train": "saes=[{architecture: topk, hook: blocks.1.hook_resid_post, k: 4}]", "eval": f"saes=[{tmp_path / 'sae'}]",
               "analyse": f"sae={tmp_path / 'sae'}"}[stage]
    err = refused(capsys, stage, f"cache={cache_copy}", f"out={tmp_path / 'out'}", sae_key)
    assert f"{cache_copy / 'manifest.json'} is damaged: hooks['blocks.1.hook_resid_post'] says d_model 48" in err


# ----- NaN/inf rows and strict JSON -------------------------------------------------------------------------------


def poison(cache: Path, every: int = 7) -> None:
    """Every `every`-th row of every shard set to NaN, checksums updated: what a model that overflowed writes."""
    import hashlib

    from safetensors.torch import load_file, save

    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in manifest["shards"]:
        tensors = load_file(cache / entry["file"])
        for hook in manifest["hooks"]:
            tensors[hook][::every] = float("nan")
        data = save(tensors)
        (cache / entry["file"]).write_bytes(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def saved_sae(hand_sae, tmp_path) -> Path:
    import torch

    torch.manual_seed(0)
    return hand_sae(torch.randn(32, 16), torch.randn(16, 32)).save(tmp_path / "sae")


@pytest.mark.parametrize("setting, said", [*((s, re.escape(said)) for s, said in [
    ("n_top=0", "analyse: n_top=0 must be ≥ 1"), ("n_top=-1", "analyse: n_top=-1 must be ≥ 1"),
    ("reservoir=0", "analyse: reservoir=0 must be ≥ 1"), ("batch_rows=0", "analyse: batch_rows=0 must be ≥ 1"),
    ("window_left=-2", "analyse: window_left=-2 must be ≥ 0"),
    ("split=test", "analyse: split='test' must be all, train or eval"),
    ("logit_tokens=100000000", "logit_tokens=100000000 is more than the model's vocabulary of 512 tokens; use "
                               "logit_tokens=512 or less")]),
    ("n_top=1000000000", r"analysing sae \(d_sae 16\) needs about [\d.]+ GiB but [\d.]+ [GM]iB is free on cpu; lower "
                         "n_top, reservoir, the windows or batch_rows"),
])
def test_analyse_refuses_settings_it_cannot_run_before_the_pass(setting, said, tiny_cache, saved_sae, tmp_path,
                                                                  capsys):
    """Each was a traceback (n_top=0, reservoir=0, batch_rows=0 in the pass, logit_tokens past the vocabulary in
    the logit lens), and n_top=10⁶ at d_sae 4,608 was killed for memory with no word: one line now, before the pass
    (the memory estimate before the model loads), and no output folder left."""
    out = tmp_path / "analysis"
    line = refused(capsys, "analyse", f"cache={tiny_cache}", f"sae={saved_sae}", f"out={out}", "device=cpu", setting)
    assert re.search(f"{said}$", line), line
    assert not out.exists()


@pytest.mark.parametrize("stage, extra", [("eval", "saes=[{sae}]"), ("analyse", "sae={sae}"), ("score", "sae={sae}")])
def test_nan_rows_stop_every_stage_and_leave_no_output(stage, extra, cache_copy, saved_sae, tmp_path, capsys):
    poison(cache_copy)
    args = [stage, f"cache={cache_copy}", extra.format(sae=saved_sae)]
    args += ["text=def f(x): return x"] if stage == "score" else [f"out={tmp_path / 'out'}"]
    err = refused(capsys, *args)
    assert re.search(rf"\d+ of \d+ rows of .*blocks.1.hook_resid_post in {re.escape(str(cache_copy))}.* hold NaN/inf", err), err
    assert not (tmp_path / "out").exists()


def test_analyse_failing_midway_leaves_no_partial_folder(cache_copy, saved_sae, tmp_path, capsys, monkeypatch):
    import sae.analysis.dashboard.export as export
    from sae.data.store import NonFiniteError

    written = []

    def write_then_fail(path, variable, data):
        written.append(path)
        if len(written) == 2:
            raise NonFiniteError(f"refusing to write {path}: injected")
        export_write(path, variable, data)

    export_write = export.write_js
    monkeypatch.setattr(export, "write_js", write_then_fail)
    err = refused(capsys, "analyse", f"cache={cache_copy}", f"sae={saved_sae}", f"out={tmp_path / 'out'}")
    assert "injected" in err and len(written) == 2 and not (tmp_path / "out").exists()


def test_analyse_into_a_project_folder_never_touches_its_files(tiny_cache, saved_sae, tmp_path, capsys, monkeypatch):
    """`sae analyse out=.` in a project with its own data/ folder (or index.html) is refused with nothing changed;
    a folder `sae analyse` wrote is replaced on a second run, and only its own files go: a user's file inside it
    stays (issue 17: analyse used to delete <out>/data recursively)."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "notes.txt").write_text("mine")
    monkeypatch.chdir(project)
    err = refused(capsys, "analyse", f"cache={tiny_cache}", f"sae={saved_sae}", "out=.", "device=cpu")
    assert "holds data that `sae analyse` did not write" in err and "nothing was changed" in err
    assert sorted(p.name for p in project.rglob("*")) == ["data", "notes.txt"]
    (project / "data" / "notes.txt").unlink()
    (project / "data").rmdir()
    (project / "index.html").write_text("<html>my project page</html>")
    err = refused(capsys, "analyse", f"cache={tiny_cache}", f"sae={saved_sae}", "out=.", "device=cpu")
    assert "index.html" in err and (project / "index.html").read_text() == "<html>my project page</html>"

    out = tmp_path / "an"
    assert cli_main(["analyse", f"cache={tiny_cache}", f"sae={saved_sae}", f"out={out}", "device=cpu"]) == 0
    (out / "data" / "keep.txt").write_text("a user's file in the toolkit's folder")
    assert cli_main(["analyse", f"cache={tiny_cache}", f"sae={saved_sae}", f"out={out}", "device=cpu", "n_top=3"]) == 0
    assert (out / "data" / "keep.txt").read_text() == "a user's file in the toolkit's folder"
    assert (out / "data" / "index.js").is_file() and (out / "index.html").is_file()


@pytest.mark.parametrize("blocked", ["file", "under a file"])
@pytest.mark.parametrize("stage", ["harvest", "train", "eval", "analyse"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_work(stage, blocked, tiny_cache, tiny_llama,
                                                                          text_dir, saved_sae, tmp_path, capsys):
    """out= naming an existing file, or a path below one, is one line naming the setting (was an OSError,
    FileExistsError or NotADirectoryError traceback once the work was done), and the file is left as it was."""
    (tmp_path / "taken").write_text("a user's file")
    out = tmp_path / "taken" if blocked == "file" else tmp_path / "taken" / "out"
    args = {"harvest": [f"model={tiny_llama}", f"dataset={text_dir}", "max_tokens=200", "context_size=16"],
            "train": [f"cache={tiny_cache}", "saes=[{hook: blocks.1.hook_resid_post, d_sae: 32, k: 4}]",
                      "total_tokens=256", "wandb_mode=disabled"],
            "eval": [f"cache={tiny_cache}", f"saes=[{saved_sae}]"],
            "analyse": [f"cache={tiny_cache}", f"sae={saved_sae}"]}[stage]
    line = refused(capsys, stage, *args, f"out={out}", "device=cpu")
    assert line.endswith(f"out={out}: {tmp_path / 'taken'} is a file, not a folder; name a folder"), line
    assert (tmp_path / "taken").read_text() == "a user's file"


def test_planted_refuses_a_file_a_foreign_report_and_too_few_tokens_before_work(tmp_path, capsys):
    """`sae planted` out= naming a file was a NotADirectoryError once the data was drawn; a planted.json of the user's
    was replaced; tokens below one training batch ended in a traceback after training. Each is one line now, and
    the user's files are left as they were."""
    (tmp_path / "taken").write_text("a user's file")
    line = refused(capsys, "planted", f"out={tmp_path / 'taken'}", "tokens=1000")
    assert line.endswith(f"{tmp_path / 'taken'} is a file, not a folder; name a folder"), line
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "planted.json").write_text('{"my": "results"}')
    line = refused(capsys, "planted", f"out={mine}", "tokens=1000")
    assert line.endswith(f"out={mine} already holds planted.json that `sae planted` did not write; use a new or "
                         "empty folder (out=...), nothing was changed"), line
    assert (mine / "planted.json").read_text() == '{"my": "results"}' and len(list(mine.iterdir())) == 1
    line = refused(capsys, "planted", f"out={tmp_path / 'few'}", "tokens=100")
    assert line.endswith("tokens=100 must be at least 256 (one training batch)"), line
    assert (tmp_path / "taken").read_text() == "a user's file" and not (tmp_path / "few").exists()


def test_harvest_touches_no_file_of_the_users_in_its_folder(tiny_llama, text_dir, hook, tmp_path, capsys):
    """A harvest into a project folder deleted its hidden `.env.old`, `.draft.tmpl` and `.git.old/` (taken for
    stale temp files), and replaced a `shard_00000.safetensors` of the user's. Only its own temp names are
    cleaned now, and a shard-named file that is not a shard is refused before anything is written."""
    out = tmp_path / "project"
    (out / ".git.old").mkdir(parents=True)
    (out / ".git.old" / "HEAD").write_text("ref")
    for name in (".env.old", ".draft.tmpl", ".notes.tmp1"):
        (out / name).write_text(name)
    assert cli_main(tiny_harvest_args(tiny_llama, text_dir, hook, out)) == 0, capsys.readouterr().err
    assert all((out / name).read_text() == name for name in (".env.old", ".draft.tmpl", ".notes.tmp1"))
    assert (out / ".git.old" / "HEAD").read_text() == "ref" and ActivationStore(out).complete
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "shard_00000.safetensors").write_text("MINE")
    line = refused(capsys, *tiny_harvest_args(tiny_llama, text_dir, hook, mine))
    assert line.endswith(f"{mine / 'shard_00000.safetensors'} is not a shard this toolkit wrote, and a harvest would "
                         "replace it; use another `out` folder (nothing was changed)"), line
    assert [p.name for p in mine.iterdir()] == ["shard_00000.safetensors"]


def test_train_on_a_cache_with_no_training_rows_is_one_line(tiny_llama, text_dir, hook, tmp_path, capsys):
    """One context, held out (context 0 always is): train ended in torch.cat's ValueError while fitting its scale."""
    cache = tmp_path / "one"
    args = tiny_harvest_args(tiny_llama, text_dir, hook, cache)
    assert cli_main([*args, "max_tokens=31"]) == 0
    line = refused(capsys, "train", f"cache={cache}", f"out={tmp_path / 'saes'}", "wandb_mode=disabled",
                   f"saes=[{{architecture: topk, k: 4, hook: {hook}}}]")
    assert line.endswith(f"the cache at {cache} has no training rows (every context is held out); harvest more "
                         "tokens or lower eval_fraction"), line


def test_unreadable_inputs_are_one_line(tiny_cache, hook, tmp_path, capsys, monkeypatch):
    """A junk .gguf (the gguf reader's ValueError), a model path that is a file, `sae steer` of a planted SAE (a
    hub lookup of "planted" for ~40 s), and a folder that cannot be written, found by its lock (an OSError)."""
    import errno

    import sae.data.store as store

    (tmp_path / "junk.gguf").write_text("junk")
    line = refused(capsys, "harvest", f"model={tmp_path / 'junk.gguf'}", f"out={tmp_path / 'c'}", f"hooks=[{hook}]")
    assert f"GGUF file '{tmp_path / 'junk.gguf'}' cannot be read (" in line, line
    line = refused(capsys, "harvest", f"model={tmp_path / 'junk.gguf'}x", f"out={tmp_path / 'c'}")
    assert line.endswith("does not exist; pass a local folder, a .gguf file, a hub id or 'smollm2'"), line
    (tmp_path / "weights.bin").write_text("x")
    line = refused(capsys, "harvest", f"model={tmp_path / 'weights.bin'}", f"out={tmp_path / 'c'}")
    assert line.endswith("is a file; pass a .gguf file, a Hugging Face model folder or a hub id"), line
    line = refused(capsys, "harvest", "model=planted", f"out={tmp_path / 'c'}")
    assert "is what `sae planted` records" in line, line
    assert not (tmp_path / "c").exists()

    def read_only(path, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(store.os, "open", read_only)
    with pytest.raises(store.UserError, match=r"is not writable \(read-only, or no permission\), and `sae explain` "
                                              r"writes there; copy it somewhere writable$"):
        with store.folder_lock(tmp_path, "sae explain"):
            pass


def test_ctrl_c_is_one_line_saying_how_to_continue(tiny_cache, tmp_path, capsys, monkeypatch):
    import sae.training.train as train_module

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert cli_main(["train", f"cache={tiny_cache}", f"out={tmp_path / 's'}"]) == 130
    assert capsys.readouterr().err == ("\nsae train: interrupted; run the same command with resume=true to continue "
                                       "from its last checkpoint (it starts over if none was written yet)\n")


def test_demo_checks_every_stage_before_the_first_runs(tmp_path, capsys, monkeypatch):
    """`sae demo eval.max_tokens=0` harvested and trained for minutes before eval refused the setting."""
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, "demo", "eval.max_tokens=0")
    assert line.endswith("eval: max_tokens=0 must be ≥ 1"), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage, extra", [("eval", "saes=[{sae}] out={out}"), ("analyse", "sae={sae} out={out}"),
                                          ("score", "sae={sae} text=return")])
def test_an_interrupted_cache_is_finished_first_not_measured_half_made(stage, extra, cache_copy, saved_sae, tmp_path,
                                                                       capsys):
    """eval, analyse and score read a cache whose harvest was interrupted (train refused it): its held-out rows and
    contexts are a prefix of the data asked for. They refuse it now as train does, saying how to finish it."""
    edit_manifest(cache_copy, lambda m: m.update(complete=False))
    line = refused(capsys, stage, f"cache={cache_copy}", *extra.format(sae=saved_sae, out=tmp_path / "o").split(),
                   "device=cpu")
    assert line.endswith(f"the cache at {cache_copy} is incomplete (harvest interrupted?); run `sae harvest` again "
                         "with the same config to finish it"), line


def test_analyse_of_a_split_the_cache_lacks_is_refused(cache_copy, saved_sae, tmp_path, capsys):
    """split=eval on a cache without held-out rows wrote an empty browser."""
    edit_manifest(cache_copy, lambda m: m.update(eval_fraction=0.0))
    out = tmp_path / "o"
    line = refused(capsys, "analyse", f"cache={cache_copy}", f"sae={saved_sae}", f"out={out}", "split=eval")
    assert line.endswith(f"the cache at {cache_copy} has no eval rows to analyse; use split=all (or a cache harvested "
                         "with eval_fraction > 0 for split=eval)"), line
    assert not out.exists()


def test_a_planted_cache_of_other_settings_names_what_changed(tmp_path, capsys):
    """The refusal printed the whole planted settings dict on each side, not what differed."""
    args = ["planted", f"out={tmp_path / 'p'}", "d_in=16", "n_features=32", "l0=2", "eval_tokens=2000",
            "saes=[{architecture: topk, k: 2, d_sae: 64}]"]
    assert cli_main([*args, "tokens=20000"]) == 0, capsys.readouterr().err
    line = refused(capsys, *args, "tokens=30000", "seed=1")
    assert "made with other settings (" in line and "planted.tokens: 20000 → 30000" in line, line
    assert "planted.seed: 0 → 1" in line and "'d_in'" not in line, line


def test_score_refuses_a_reference_with_no_spread_or_a_text_with_nothing_to_score(tiny_cache, saved_sae, capsys,
                                                                                   monkeypatch):
    """A text whose tokens all fall before the cache's first position (a one-token text on a cache that drops
    position 0) scored nothing and exited 0."""
    line = refused(capsys, "score", "text=def f(x): return x", "reference_tokens=0")
    assert line.endswith("score: reference_tokens=0 must be ≥ 2"), line
    monkeypatch.setattr("sae.data.model.prompt_ids", lambda tokenizer, text, bos, key: [5])  # one token, as "x" is
    line = refused(capsys, "score", f"cache={tiny_cache}", f"sae={saved_sae}", "text=x", "device=cpu")
    assert line.endswith("text='x' is 1 token(s), and the cache (so the SAE) starts at position 1; give a longer "
                         "text"), line


@pytest.mark.parametrize("stage", ["harvest", "planted"])
def test_a_cache_the_disk_cannot_hold_is_refused_before_writing(stage, tiny_llama, text_dir, hook, tmp_path, capsys,
                                                                monkeypatch):
    """`sae planted tokens=10¹²` wrote until the disk was full. The contexts still to write, at their stored size,
    are checked against the free space first (here the disk reports 64 KiB free): one line, nothing written."""
    import collections

    import sae.data.store as store

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**16, 2**16))
    out = tmp_path / "out"
    args = (tiny_harvest_args(tiny_llama, text_dir, hook, out) if stage == "harvest"
            else ["planted", f"out={out}", "tokens=20000"])  # 20,032 rows of d_in 64: 5.4 MB
    line = refused(capsys, *args)
    assert re.search(rf"this cache needs \S+ MiB more but {re.escape(str(out))}(/cache)? has 0.1 MiB free; ask for "
                     r"fewer tokens, or free space \(or use another folder\) first$", line), line
    assert not out.exists()
    monkeypatch.undo()
    if stage == "harvest":  # with room, the same command runs
        assert cli_main(args) == 0 and ActivationStore(out).complete


@pytest.mark.parametrize("stage", ["harvest", "train", "eval", "analyse", "explain"])
def test_a_folder_in_use_is_refused_naming_its_writer(stage, tiny_cache, tiny_llama, text_dir, hook, saved_sae,
                                                      tmp_path, capsys):
    """While one command writes a folder, another command writing it stops at once with one line naming the
    holder, and leaves the folder as it was; once the holder is gone (here: its lock released; the kernel releases it
    when a process dies, kill -9 included) the same command runs."""
    from sae.data.store import LOCK_FILE, folder_lock

    out = tmp_path / "out"
    args = {"harvest": ["harvest", f"model={tiny_llama}", f"dataset={text_dir}", f"hooks=[{hook}]", "max_tokens=300",
                        "context_size=16", f"out={out}"],
            "train": tiny_train_args(tiny_cache, hook, out, total_tokens=128, checkpoint_every=100),
            "eval": ["eval", f"cache={tiny_cache}", f"saes=[{saved_sae}]", f"out={out}", "lm_loss_contexts=2"],
            "analyse": ["analyse", f"cache={tiny_cache}", f"sae={saved_sae}", f"out={out}"],
            "explain": ["explain", f"analysis={out}", f"cache={tiny_cache}", f"model={tiny_llama}",
                        "n_top_features=1", "n_random_features=0", "max_new_tokens=2"]}[stage]
    if stage == "explain":  # an analysis to explain
        assert cli_main(["analyse", f"cache={tiny_cache}", f"sae={saved_sae}", f"out={out}", "n_top=3"]) == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    with folder_lock(out, "sae train"):
        line = refused(capsys, *args, "device=cpu")
        assert re.search(rf"{re.escape(str(out))} is in use by sae train \(pid {os.getpid()} on .*, started .*\); "
                         "wait for it to finish, or use another folder$", line), line
        after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
        assert {p: t for p, t in after.items() if p.name != LOCK_FILE} == before  # nothing written or touched
    assert cli_main([*args, "device=cpu"]) == 0, capsys.readouterr().err


@pytest.mark.slow  # two processes importing torch
def test_two_harvests_started_together_never_mix(tiny_llama, text_dir, hook, tmp_path):
    """Two `sae harvest` into one folder with different settings, started at the same moment: exactly one writes the
    cache and says so; the other is refused naming it, and the cache holds the winner's settings and shards only."""
    import subprocess
    import sys

    out = tmp_path / "cache"
    base = [sys.executable, "-m", "sae", "harvest", f"model={tiny_llama}", f"dataset={text_dir}", f"hooks=[{hook}]",
            "max_tokens=2000",
            "context_size=16", "shard_tokens=400", f"out={out}", "device=cpu"]
    procs = [subprocess.Popen([*base, f"exclude_first={n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = [n for n, (code, _) in zip((1, 2), results) if code == 0][0]
    loser_err = [err for code, err in results if code == 2][0].strip().splitlines()[-1]
    assert "is in use by sae harvest" in loser_err, loser_err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exclude_first"] == winner and manifest["complete"]
    assert sorted(p.name for p in out.glob("shard_*")) == sorted(s["file"] for s in manifest["shards"])


def test_json_writer_refuses_nan_and_writes_nothing(tmp_path):
    from sae.analysis.dashboard import write_js
    from sae.data.store import NonFiniteError, atomic_write_json

    for write in (lambda p: atomic_write_json(p, {"fvu": float("nan")}), lambda p: write_js(p, "X", [float("inf")])):
        with pytest.raises(NonFiniteError, match=r"refusing to write .*out\.json: a value is NaN or infinite"):
            write(tmp_path / "out.json")
        assert list(tmp_path.iterdir()) == []


@pytest.mark.fault(None)  # an edge case of the numbers, not a fault
def test_undefined_ce_recovered_is_null_not_nan(tiny_cache, saved_sae, tmp_path, monkeypatch):
    """When zero-ablating the hook costs nothing, CE recovered is undefined: JSON null and "n/a" in the table."""
    import sae.analysis.evaluate as ev

    real = ev.lm_losses

    def no_gap(*a, **k):
        return {n: ev.LMLoss(**{**vars(l), "ce_zero": l.ce_clean, "ce_recovered": None}) for n, l in real(*a, **k).items()}

    monkeypatch.setattr(ev, "lm_losses", no_gap)
    results = ev.evaluate(ev.EvalConfig(cache=str(tiny_cache), saes=[str(saved_sae)], out=str(tmp_path / "eval"),
                                        lm_loss_contexts=2, device="cpu"))
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["saes"][0]["ce_recovered"] is None
    assert "    n/a" in ev.format_table(results)


# ----- offline ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("dataset=nobody/no-such-dataset", "dataset 'nobody/no-such-dataset' is a hub id but HF_HUB_OFFLINE is set"),
    ("model=nobody/no-such-model", "model 'nobody/no-such-model' is a hub id not in the local cache, and HF_HUB_OFFLINE is set"),
])
def test_hub_ids_while_offline_fail_at_once_leaving_nothing(override, message, tiny_llama, text_dir, hook, tmp_path,
                                                            capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    err = refused(capsys, "harvest", f"model={tiny_llama}", f"dataset={text_dir}", f"hooks=[{hook}]", override,
                  f"out={tmp_path / 'out'}")
    assert message in err and time.monotonic() - start < 10  # no network retries
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_dataset_is_one_line(tiny_llama, hook, tmp_path, capsys, monkeypatch):
    import datasets

    def no_network(*a, **k):
        raise ConnectionError("Couldn't reach 'nobody/ds' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    err = refused(capsys, "harvest", f"model={tiny_llama}", "dataset=nobody/ds", f"hooks=[{hook}]", f"out={tmp_path / 'out'}")
    assert "cannot reach the Hugging Face hub for dataset 'nobody/ds' (ConnectionError)" in err
    assert not (tmp_path / "out").exists()


# ----- disk full ----------------------------------------------------------------------------------------------------


def tiny_harvest_args(tiny_llama: Path, text_dir: Path, hook: str, out: Path) -> list[str]:
    """`sae harvest` with the settings of the session's `tiny_cache` (conftest), so its shards are the clean run."""
    return ["harvest", f"model={tiny_llama}", f"dataset={text_dir}", f"hooks=[{hook}]", "context_size=32",
            "max_tokens=2400", "batch_size=8", "shard_tokens=600", "dtype=float32", "eval_fraction=0.25", "exclude_first=1",
            f"out={out}"]


def tiny_train_args(cache: Path, hook: str, out: Path, total_tokens: int, checkpoint_every: int) -> list[str]:
    """`sae train` of one small TopK SAE on the tiny cache, 64 rows a step."""
    return ["train", f"cache={cache}", f"out={out}", "batch_size=64", f"total_tokens={total_tokens}",
            f"checkpoint_every={checkpoint_every}", f"saes=[{{architecture: topk, expansion_factor: 2, k: 4, hook: {hook}}}]",
            "wandb_mode=disabled"]


def fill_disk_at(monkeypatch, n: int) -> None:
    """The n-th synced write (1-based) stops half-way with ENOSPC, as a full disk does."""
    import errno

    import sae.data.store as store

    real, calls = store.write_synced, []

    def write(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == n:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(store, "write_synced", write)


def shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard_*.safetensors"))}


@pytest.mark.fault(RECOVERED)
def test_disk_full_during_harvest_is_one_line_then_resumes_exactly(tiny_llama, text_dir, hook, tiny_cache, tmp_path,
                                                                 capsys, monkeypatch):
    out = tmp_path / "cache"
    fill_disk_at(monkeypatch, 3)  # shard 0, manifest, then shard 1
    err = refused(capsys, *tiny_harvest_args(tiny_llama, text_dir, hook, out))
    assert err.endswith(f"no space left on device while writing in {out}; free some space there (or use another "
                        "folder), then run the same command again to continue")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_00000.safetensors"]  # no temp file
    monkeypatch.undo()
    (out / ".shard_00001.safetensors.tmp4242").write_bytes(b"left by a process killed mid-write")
    assert cli_main(tiny_harvest_args(tiny_llama, text_dir, hook, out)) == 0
    assert not list(out.glob(".*"))  # the stale temp file is gone
    assert shard_bytes(out) == shard_bytes(tiny_cache) and len(shard_bytes(out)) == 4


def test_disk_full_while_saving_an_sae_keeps_the_old_folder(saved_sae, monkeypatch):
    import errno

    from sae.saes import SAE
    from sae.data.store import DiskFullError

    before = {p.name: p.read_bytes() for p in saved_sae.iterdir()}

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError, match=f"no space left on device while writing in {re.escape(str(saved_sae.parent))}"):
        SAE.load(saved_sae).save(saved_sae)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in saved_sae.iterdir()} == before
    assert not list(saved_sae.parent.glob(".*"))


# ----- missing and corrupt shards ------------------------------------------------------------------------------------


@pytest.mark.fault(RECOVERED)
def test_corrupt_and_missing_shards_are_repaired_byte_identical(tiny_llama, text_dir, hook, cache_copy, tiny_cache,
                                                                tmp_path, capsys):
    data = bytearray((cache_copy / "shard_00001.safetensors").read_bytes())
    data[-100:-90] = bytes(10)  # flipped activation bytes: only the checksum can tell
    (cache_copy / "shard_00001.safetensors").write_bytes(bytes(data))
    (cache_copy / "shard_00002.safetensors").unlink()

    err = refused(capsys, "train", f"cache={cache_copy}", f"out={tmp_path / 'saes'}",
                  f"saes=[{{architecture: topk, hook: {hook}, k: 4}}]", "total_tokens=2000")
    assert re.search(r"shard \S+shard_0000[12].safetensors (is corrupt \(checksum mismatch\)|listed in the manifest is "
                     r"missing); run `sae harvest` again with the cache's config plus repair=true", err), err

    assert cli_main(tiny_harvest_args(tiny_llama, text_dir, hook, cache_copy) + ["repair=true"]) == 0
    assert "repair: 2 of 4 shards re-harvested (shard_00001.safetensors, shard_00002.safetensors)" in capsys.readouterr().out
    assert shard_bytes(cache_copy) == shard_bytes(tiny_cache)
    assert (cache_copy / "manifest.json").read_bytes() == (tiny_cache / "manifest.json").read_bytes()


def test_a_removed_manifest_entry_is_named_not_misread(cache_copy):
    edit_manifest(cache_copy, lambda m: m["shards"].pop(1))
    with pytest.raises(CacheError, match=r"shards\[1\] is 'shard_00002.safetensors', not shard_00001.safetensors"):
        ActivationStore(cache_copy)


@pytest.mark.parametrize("raised", ["OSError", "SafetensorError"])
def test_train_out_of_space_at_a_checkpoint_says_where_and_how_to_resume(raised, tiny_cache, hook, tmp_path, capsys,
                                                                         monkeypatch):
    """ENOSPC while writing the second checkpoint: one line naming the folder and the checkpoint to resume from,
    the half-written checkpoint removed at once, and resume=true finishing the run. safetensors' writer reports a
    full disk as its own SafetensorError, with the message below (seen on a full tmpfs), not as an OSError."""
    import errno

    from safetensors import SafetensorError

    import sae.training.train

    real_save, calls = sae.training.train.save_file, {"n": 0}

    def full_disk(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's SAE file (the first wrote an SAE file and rng)
            if raised == "OSError":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path)

    monkeypatch.setattr(sae.training.train, "save_file", full_disk)
    out = tmp_path / "saes"
    args = tiny_train_args(tiny_cache, hook, out, total_tokens=768, checkpoint_every=4)
    line = refused(capsys, *args)
    assert "no space left on device while writing in" in line and "checkpoints" in line
    assert "last good checkpoint is step 4" in line and "resume=true" in line
    assert not list((out / "checkpoints").glob(".tmp_step_*"))  # what the full disk interrupted is gone
    assert (out / "checkpoints" / "step_000000004").is_dir()
    monkeypatch.setattr(sae.training.train, "save_file", real_save)
    assert cli_main([*args, "resume=true"]) == 0
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 12


# ----- kill -9 at random moments ----------------------------------------------------------------------------------
# Each trial starts `python -m sae ...` as a process, SIGKILLs it at a moment drawn by a seeded RNG, runs the same
# command again (train: with resume=true) and compares the result with a clean uninterrupted run.

KILL_TRIALS = 3


def kill_at_random(argv: list[str], rng: random.Random, progress, done, stages: int, log: Path) -> str:
    """Run `python -m sae argv...` and SIGKILL it at a drawn stage (shards or checkpoints written, per `progress()`)
    plus a drawn fraction of that stage, its length guessed from the stage before (the first two, which include the
    start-up, are taken as 0.05 s): kills land
    inside the work, not in the imports before it. Returns where the kill landed, or FINISHED if the process had
    already exited (it must have exited 0) or `done()` said its output was complete (a kill while the interpreter
    shuts down tests nothing)."""
    import sae

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(sae.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    stage, fraction, reached_at = rng.randrange(stages), rng.random(), {}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sae", *argv], stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while proc.poll() is None and progress() < stage and time.monotonic() < deadline:
            reached_at.setdefault(progress(), time.monotonic())
            time.sleep(0.005)
        now = time.monotonic()
        extra = fraction * (now - reached_at[stage - 1] if stage >= 2 and stage - 1 in reached_at else 0.05)
        time.sleep(extra)
        reached, complete = progress(), done()
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
    if code != -signal.SIGKILL:  # it had exited before the signal
        assert code == 0, log.read_text()
        return FINISHED
    if complete:
        return FINISHED
    return f"killed after {reached} of {stages} (+{extra:.2f} s)"


def shards_listed(cache: Path) -> int:
    """Shards the manifest lists (-1 before harvest has made its folder): how far a harvest has come."""
    manifest = cache / "manifest.json"
    if not manifest.exists():
        return 0 if cache.exists() else -1
    return len(json.loads(manifest.read_text())["shards"])


@pytest.mark.slow  # ~10 s a trial: most of it the subprocess importing torch
@pytest.mark.fault(RECOVERED)
@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_harvest_killed_at_random_then_rerun_is_byte_identical(trial, tiny_llama, text_dir, hook, tiny_cache, tmp_path,
                                                               fault, record_property):
    """The session's `tiny_cache` is the clean run; shards, manifest and the folder's listing (no temp files) must
    come out byte-identical after a kill anywhere from the first shard to the last."""
    out = tmp_path / "cache"
    args = tiny_harvest_args(tiny_llama, text_dir, hook, out)
    landed = kill_at_random(args, random.Random(trial), lambda: shards_listed(out),
                            lambda: shards_listed(out) > 0 and json.loads((out / "manifest.json").read_text())["complete"],
                            stages=len(shard_bytes(tiny_cache)),
                            log=tmp_path / "log")
    record_property("kill", f"harvest {landed}")
    if landed == FINISHED:
        fault["kind"] = FINISHED
    else:
        assert cli_main(args) == 0, landed
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_cache.iterdir()), landed
    assert shard_bytes(out) == shard_bytes(tiny_cache), landed
    assert (out / "manifest.json").read_bytes() == (tiny_cache / "manifest.json").read_bytes(), landed


KILL_TRAIN = dict(total_tokens=64 * 192, checkpoint_every=32)  # 192 steps, 6 checkpoints: ~1-2 s of training


@pytest.fixture(scope="module")
def clean_train(tiny_cache, hook, tmp_path_factory) -> Path:
    """The uninterrupted training run the killed ones are compared with."""
    out = tmp_path_factory.mktemp("clean_train") / "saes"
    assert cli_main(tiny_train_args(tiny_cache, hook, out, **KILL_TRAIN)) == 0
    return out


def checkpoint_step(out: Path) -> int:
    latest = out / "checkpoints" / "latest.json"
    return json.loads(latest.read_text())["step"] if latest.exists() else 0


@pytest.mark.slow  # ~10 s a trial: most of it the subprocess importing torch
@pytest.mark.fault(RECOVERED)
@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_train_killed_at_random_then_resumed_matches_clean_run(trial, tiny_cache, hook, clean_train, tmp_path, fault,
                                                               record_property):
    """Weights equal to the clean run's at fp32 resolution (resume is exact; see test_train), the same final
    checkpoint step, and no half-written checkpoint left."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "saes"
    args = tiny_train_args(tiny_cache, hook, out, **KILL_TRAIN)
    every = KILL_TRAIN["checkpoint_every"]
    landed = kill_at_random(args, random.Random(100 + trial), lambda: checkpoint_step(out) // every,
                            lambda: all((out / p.relative_to(clean_train)).exists() for p in clean_train.rglob("*")),
                            stages=KILL_TRAIN["total_tokens"] // 64 // every, log=tmp_path / "log")
    record_property("kill", f"train {landed}")
    if landed == FINISHED:
        fault["kind"] = FINISHED
    else:
        assert cli_main([*args, "resume=true"]) == 0, landed
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(clean_train) for p in clean_train.rglob("*"))
    assert checkpoint_step(out) == checkpoint_step(clean_train)
    for weights in clean_train.glob("*/sae_weights.safetensors"):
        clean, resumed = load_file(weights), load_file(out / weights.relative_to(clean_train))
        for name, tensor in clean.items():
            torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=f"{landed}: {weights.parent.name} {name}")


# ----- issue 17, second probe -------------------------------------------------------------------------------------


@pytest.fixture
def steer_sae(hand_sae, tiny_llama, tmp_path) -> Path:
    """A hand-built SAE that records the tiny Llama as its model, so `sae steer` loads that model."""
    import torch

    torch.manual_seed(0)
    return hand_sae(torch.randn(32, 48), torch.randn(48, 32), model=str(tiny_llama)).save(tmp_path / "steer_sae")


@pytest.mark.parametrize("value", ["1.0e+30", "1e30"])  # 1e30: YAML 1.1 text, read as the number (was "not finite")
@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_steering_that_overflows_the_model_stops_with_a_message(mode, value, steer_sae, capsys):
    """α = 1e30 turns the residual stream into numbers whose square overflows: the model's final norm then gives
    all-zero (or NaN) logits, and the steered text used to be printed empty with exit 0."""
    line = refused(capsys, "steer", f"sae={steer_sae}", "prompt=def f(x):", f"features={{1: {value}}}", f"mode={mode}",
                   "max_new_tokens=4", "device=cpu")
    assert line.endswith("overflowed to NaN/inf at generated token 1 with the features steered: the steering "
                         "value(s) overflow this model's activations; use smaller ones"), line


def test_binary_files_are_refused_naming_them_with_one_rule_for_files_and_folders(tiny_llama, hook, tmp_path, capsys):
    """A file that is mostly not text is refused, naming it, whether it is the dataset or one file of a folder (a
    folder of binaries was harvested as replacement characters, a single .txt gave a UnicodeDecodeError traceback);
    a text with a few bytes that are not UTF-8 is read the same way in both cases."""
    from sae.data.text import load_texts

    rng = random.Random(0)
    noise = bytes(rng.randrange(256) for _ in range(20_000))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a_notes.txt").write_text("def f(x):\n    return x\n")
    (folder / "b_photo.png").write_bytes(noise)
    (tmp_path / "noise.txt").write_bytes(noise)
    for dataset, named in ((folder, folder / "b_photo.png"), (tmp_path / "noise.txt", tmp_path / "noise.txt")):
        out = tmp_path / "out"
        line = refused(capsys, "harvest", f"model={tiny_llama}", f"dataset={dataset}", f"hooks=[{hook}]",
                       "context_size=16", "max_tokens=200", f"out={out}", "device=cpu")
        assert f"{named} is not text: " in line and "undecodable bytes or control characters" in line, line
        assert not out.exists()
    latin = tmp_path / "latin" / "café.txt"
    latin.parent.mkdir()
    latin.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e, na\xefve r\xe9sum\xe9 of a long enough text".encode("latin-1"))
    assert list(load_texts(str(latin))) == list(load_texts(str(latin.parent))) == [
        "caf\ufffd cr\ufffdme br\ufffdl\ufffde, na\ufffdve r\ufffdsum\ufffd of a long enough text"]


def test_context_size_beyond_the_models_positions_is_refused_naming_the_maximum(tiny_llama, text_dir, hook, tmp_path,
                                                                               capsys):
    out = tmp_path / "cache"
    line = refused(capsys, "harvest", f"model={tiny_llama}", f"dataset={text_dir}", f"hooks=[{hook}]",
                   "context_size=257", "max_tokens=600", f"out={out}", "device=cpu")
    assert line.endswith("context_size=257 is more than this model's maximum of 256 positions (its config's "
                         "max_position_embeddings); use context_size=256 or less"), line
    assert not out.exists()


@pytest.mark.parametrize("setting, named", [
    ("lr=-0.001", "lr=-0.001"), ("lr=0", "lr=0.0"), ("lr=.inf", "lr=inf"),
    ("saes=[{architecture: topk, hook: blocks.1.hook_resid_post, k: 4, lr: -1e-3}]", "saes[0].lr=-0.001"),
])
def test_train_refuses_a_learning_rate_not_above_zero_before_any_work(setting, named, tiny_cache, tmp_path, capsys):
    """Was torch's ValueError traceback after the plan was printed (and lr=0 silently meant the default)."""
    assert cli_main(["train", f"cache={tiny_cache}", f"out={tmp_path / 'saes'}", setting, "wandb_mode=disabled"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured  # one line, and no plan before it
    assert captured.err.startswith(f"sae train: error: {named}: a learning rate must be a finite number > 0")
    assert not (tmp_path / "saes").exists()


@pytest.mark.parametrize("stage", ["harvest", "train"])
def test_a_device_backend_this_machine_lacks_is_one_line(stage, tiny_cache, tiny_llama, text_dir, hook, tmp_path,
                                                         capsys):
    """device=mps without Apple's backend was a RuntimeError traceback (cuda and unknown names were one line)."""
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    args = (tiny_train_args(tiny_cache, hook, tmp_path / "out", total_tokens=128, checkpoint_every=100)
            if stage == "train" else tiny_harvest_args(tiny_llama, text_dir, hook, tmp_path / "out"))
    line = refused(capsys, *args, "device=mps")
    assert line.endswith("device 'mps' is not available here (no mps backend on this machine); use device=auto or "
                         "cpu"), line
    assert not (tmp_path / "out").exists()


def test_nan_in_the_cache_is_named_by_train_not_blamed_on_the_learning_rate(cache_copy, hook, tmp_path, capsys):
    """The initial fit read the NaN rows first, so the first step's loss was NaN: the message blamed the learning
    rate and pointed to a 'step 0' checkpoint that does not exist. It names the data and its shards now."""
    poison(cache_copy)
    line = refused(capsys, *tiny_train_args(cache_copy, hook, tmp_path / "saes", total_tokens=256, checkpoint_every=2))
    assert re.search(rf"\d+ of \d+ rows of {hook} in {re.escape(str(cache_copy))} \(the sample the initial fit reads; "
                     r"shards holding such rows: shard_00000.safetensors, shard_00001.safetensors, "
                     r"shard_00002.safetensors, shard_00003.safetensors\) hold NaN/inf values", line), line
    assert "learning rate" not in line and "checkpoint" not in line
    assert not (tmp_path / "saes").exists()


def test_a_run_that_diverges_before_its_first_checkpoint_points_to_none(tiny_cache, hook, tmp_path, capsys):
    """A NaN loss before any checkpoint was written pointed to a 'step 0' checkpoint to resume from that does not
    exist; it says that there is none yet."""
    args = tiny_train_args(tiny_cache, hook, tmp_path / "saes", total_tokens=640, checkpoint_every=4)
    line = refused(capsys, *args[:-2], "saes=[{architecture: relu_l1, expansion_factor: 2, hook: " + hook + "}]",
                   "wandb_mode=disabled", "lr=1e30")
    assert re.search(r"NaN/inf loss for SAE \S+ at step [123]; lower the learning rate or check the data; no checkpoint "
                     r"was written yet \(the first is at step 4\): run again to start over$", line), line
    assert not (tmp_path / "saes" / "checkpoints").exists()


@pytest.mark.parametrize("dataset", ["data/missing.txt", "./missing", "../missing", "missing.jsonl", "a/b/c",
                                     "corpus/missing"])
def test_a_missing_local_dataset_is_no_such_file_at_once(dataset, tiny_llama, hook, tmp_path, capsys, monkeypatch):
    """Relative paths that do not exist were taken for hub ids (30 s of retries, then the hub was blamed). A path
    that looks local — ./ or ../, a file suffix, more than one slash, or under a folder that exists — is not."""
    import datasets

    def no_hub(*a, **k):
        raise AssertionError(f"asked the hub for {a} {k}")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    line = refused(capsys, "harvest", f"model={tiny_llama}", f"dataset={dataset}", f"hooks=[{hook}]", "out=cache",
                   "device=cpu")
    assert line.endswith(f"dataset path {dataset!r} does not exist: no such file or folder "
                         f"({(tmp_path / dataset).absolute()})"), line
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("stage, extra", [("score", ["text=def f(x): return x"]),
                                          ("steer", ["prompt=def", "features={3: 1}", "max_new_tokens=2"]),
                                          ("attribute", ["prompt=def f(x):"])])
def test_one_sae_stages_without_sae_use_the_config_files_train_out(stage, extra, steer_sae, tiny_cache, tmp_path,
                                                                   capsys, monkeypatch):
    """score/steer/attribute read the config's own train.out (as eval and analyse do), not the demo's SAE; without
    a config the missing demo folder is named as a missing folder, not as the hub repo `runs/demo`."""
    monkeypatch.chdir(tmp_path)
    saes = tmp_path / "trained"
    shutil.copytree(steer_sae, saes / "only")
    config = tmp_path / "run.yaml"
    config.write_text(f"harvest: {{out: {tiny_cache}}}\ntrain: {{out: {saes}}}\n")
    assert cli_main([stage, "--config", str(config), *extra, "device=cpu"]) == 0, capsys.readouterr().err
    line = refused(capsys, stage, *extra, "device=cpu", *([f"cache={tiny_cache}"] if stage == "score" else []))
    assert re.search(r"error: runs/demo/saes/\S+ does not exist: no such folder \(the default: the demo's SAE", line)
    assert "hub repo 'runs" not in line


@pytest.mark.fault(None)  # what a finished run prints, not a fault
def test_train_prints_its_folders_one_per_line_and_counts_steps(tiny_cache, hook, tmp_path, capsys):
    out = tmp_path / "saes"
    assert cli_main(tiny_train_args(tiny_cache, hook, out, total_tokens=64, checkpoint_every=1)) == 0
    printed = capsys.readouterr().out
    assert " in 1 step of 64 on cpu" in printed and "PosixPath" not in printed
    assert printed.rstrip("\n").splitlines()[-1] == str(out / "topk_k4_x2_blocks.1.hook_resid_post"), printed


def test_eval_that_refuses_leaves_no_empty_out_folder(cache_copy, saved_sae, tmp_path, capsys):
    """A corrupt shard met after the held-out rows are read (here: by the baseline fit) used to leave `out` behind,
    made and empty."""
    shard = max(cache_copy.glob("shard_*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 1
    shard.write_bytes(bytes(data))
    out = tmp_path / "eval"
    line = refused(capsys, "eval", f"cache={cache_copy}", f"saes=[{saved_sae}]", f"out={out}", "max_tokens=10",
                   "device=cpu")
    assert f"shard {shard} is corrupt (checksum mismatch)" in line and not out.exists()


def _corrupt_cfg(folder: Path) -> str:
    (folder / "cfg.json").write_text('{"architecture": "standard", "d_in": 32,')  # cut off mid-write
    return rf"{re.escape(str(folder / 'cfg.json'))} is not valid JSON \(Expecting property name .*line 1 column 41.*\)"


def _wrong_shapes(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "sae_weights.safetensors")
    tensors["b_enc"] = tensors["b_enc"][:1]  # copy_ would broadcast it silently
    tensors["W_dec"] = tensors["W_dec"][:, :20].contiguous()
    save_file(tensors, folder / "sae_weights.safetensors")
    return (rf"{re.escape(str(folder / 'sae_weights.safetensors'))}: b_enc is \[1\], not \[48\]; W_dec is \[48, 20\], "
            r"not \[48, 32\], the shapes its cfg.json \(d_in=32, d_sae=48\) needs$")


@pytest.mark.parametrize("damage", [_corrupt_cfg, _wrong_shapes])
@pytest.mark.parametrize("stage", ["steer", "score"])
def test_a_damaged_sae_folder_is_named_with_what_is_wrong(stage, damage, steer_sae, tiny_cache, capsys):
    """A cfg.json cut off mid-write used to end in a bare JSONDecodeError naming no file, and weights of another shape
    than cfg.json says in a RuntimeError deep inside steer/score (or, broadcast by copy_, in none at all)."""
    message = damage(steer_sae)
    args = ["prompt=def f(x):", "features={1: 2.0}", "max_new_tokens=2"] if stage == "steer" else \
        [f"cache={tiny_cache}", "text=def f(x): return x"]
    line = refused(capsys, stage, f"sae={steer_sae}", *args, "device=cpu")
    assert re.search(message, line), line
