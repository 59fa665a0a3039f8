"""Config loading: nested dataclasses, overrides, errors that name the key, and --help text from field docs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sae.config import ConfigError, describe, field_docs, from_dict, merge, parse_overrides


@dataclass
class Inner:
    k: int = 32
    """Active latents."""
    lr: float | None = None
    """Learning rate; None picks a default."""


@dataclass
class Outer:
    name: str = "run"
    """Run name."""
    items: list[Inner] = field(default_factory=list)
    """One entry per SAE."""
    scale: float = 1.0


def test_nested_lists_of_dataclasses_and_coercion():
    cfg = from_dict(Outer, {"items": [{"k": 8, "lr": 1}, {}], "scale": 2, "name": "x"})
    assert cfg.items == [Inner(k=8, lr=1.0), Inner()] and isinstance(cfg.items[0].lr, float) and cfg.scale == 2.0
    assert from_dict(Inner, {"k": 1e3}).k == 1000  # YAML's 1e3 is a float; a whole number is fine for an int


def test_numbers_in_exponent_form_without_a_dot_are_numbers():
    """PyYAML (YAML 1.1) reads `1e-3` and `2e3` as text, from a file as from the command line."""
    import yaml

    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}
    assert from_dict(Inner, yaml.safe_load("lr: 1e-3\nk: 2e3")) == Inner(k=2000, lr=0.001)
    assert from_dict(Inner, parse_overrides(["lr=5e-4", "k=1E2"])) == Inner(k=100, lr=0.0005)
    with pytest.raises(ConfigError, match=r"k: expected int, got 2.5"):
        from_dict(Inner, parse_overrides(["k=25e-1"]))


def test_numbers_in_exponent_form_are_numbers_inside_a_mapping_too():
    """`features="{1: 1e30}"` (a dict[int, float]) was refused as not finite: YAML 1.1 read 1e30 as text (issue 17).
    Keys and values of a numeric type are read as numbers; other text is left for the stage to name."""

    @dataclass
    class Steer:
        features: dict[int, float] = field(default_factory=dict)

    assert from_dict(Steer, parse_overrides(["features={1: 1e30, 2e0: -5E-1, 3: 2}"])).features == {1: 1e30, 2: -0.5, 3: 2}
    assert from_dict(Steer, parse_overrides(["features={a: x}"])).features == {"a": "x"}


def test_unknown_and_mistyped_keys_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'items\[1\]\.kk'\. Did you mean 'k'\?"):
        from_dict(Outer, {"items": [{}, {"kk": 3}]}, where="")
    with pytest.raises(ConfigError, match=r"scale: expected float, got 'big'"):
        from_dict(Outer, {"scale": "big"})
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["scale"])


@dataclass
class Flat:
    batch_size: int = 4
    hooks: list[str] = field(default_factory=list)
    flag: bool = True
    name: str = "run"
    note: str | None = None


def test_overrides_parse_yaml_values_and_merge_deeply():
    extra = parse_overrides(["train.batch_size=512", "train.hooks=[a, b]", "train.flag=false", "train.name="])
    merged = merge({"train": {"note": "kept", "batch_size": 4}}, extra)["train"]
    assert from_dict(Flat, merged) == Flat(batch_size=512, hooks=["a", "b"], flag=False, name="", note="kept")


def test_override_of_a_text_field_is_the_string_as_typed():
    """YAML would read `def f(x): return x` as a mapping and `[1, 2]` as a list; a `str` field keeps the text."""
    typed = ["name=def f(x): return x", "note=[1, 2]", "hooks=blocks.1.hook_resid_post", "batch_size=2048"]
    assert from_dict(Flat, parse_overrides(typed)) == Flat(
        batch_size=2048, hooks=["blocks.1.hook_resid_post"], name="def f(x): return x", note="[1, 2]")
    assert from_dict(Flat, parse_overrides(["note=null", "name=null"])) == Flat(name="null", note=None)
    with pytest.raises(ConfigError, match="batch_size: expected int"):
        from_dict(Flat, parse_overrides(["batch_size=def f(x): return x"]))


def test_help_lists_every_key_with_its_doc():
    assert field_docs(Inner) == {"k": "Active latents.", "lr": "Learning rate; None picks a default."}
    text = describe(Outer)
    for line in ["name: str = 'run'", "Run name.", "items[].k: int = 32", "Active latents.", "scale: float = 1.0"]:
        assert line in text


def test_help_groups_keys_by_section_most_used_first(capsys):
    """`sae train --help` opens with what to train (the SAE specs, whose own keys are grouped too) and leaves the
    knobs few people turn for last; a stage's help_sections must name every field exactly once."""
    import dataclasses

    from sae.cli import STAGES
    from sae.cli import main as cli_main
    from sae.config import help_groups

    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    order = ["what to train:", "  saes: ", "saes[] — the SAE:", "saes[].architecture:", "saes[].k:",
             "saes[] — variant details:", "saes[].bandwidth:", "  total_tokens:", "optimisation:", "  lr:", "running:",
             "  wandb_mode:"]
    assert [text.index(o) for o in order] == sorted(text.index(o) for o in order)
    for stage in STAGES.values():  # each grouping names every field once (help_groups raises otherwise)
        cls = stage.load()[0]
        assert sorted(f.name for _, group in help_groups(cls) for f in group) == sorted(f.name for f in dataclasses.fields(cls))

    @dataclass
    class Half:
        help_sections = (("first", ("a",)),)
        a: int = 1
        b: int = 2

    with pytest.raises(ValueError, match=r"must name each field once; missing \['b'\]"):
        help_groups(Half)


def test_every_stage_documents_every_key_and_has_defaults():
    """`sae <stage> --help` is generated from field docstrings: none may be missing."""
    import dataclasses

    from sae.cli import STAGES
    from sae.training.train import SAESpec

    classes = [stage.load()[0] for stage in STAGES.values()] + [SAESpec]
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(field_docs(cls)) == names, (cls.__name__, names - set(field_docs(cls)))
    required = [(cls.__name__, f.name) for cls in classes for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    # Only what has no sensible default: the text to score, the prompt and features to steer, the prompt to attribute.
    assert required == [("ScoreConfig", "text"), ("SteerConfig", "prompt"), ("SteerConfig", "features"),
                        ("AttributeConfig", "prompt")]


def test_a_required_key_left_out_is_named_as_the_user_sets_it(capsys):
    from sae.cli import main as cli_main

    assert cli_main(["steer", "prompt=def"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "steer: features has no default; set features=..." in err[0], err
    assert cli_main(["attribute"]) == 2
    assert "attribute: prompt has no default; set prompt=..." in capsys.readouterr().err


def test_an_override_of_a_section_the_stage_does_not_read_is_refused(tmp_path):
    """`sae planted train.lr=5` was silently ignored (planted reads only its own section). An override of another
    section is accepted where it reaches the stage's settings (eval reads the cache from harvest.out and its SAEs
    from train.out; train runs the harvest section's model live), refused in one line naming it where it does not."""
    from sae.cli import stage_config
    from sae.config import ConfigError

    with pytest.raises(ConfigError, match=r"^train.lr, train.bogus: not read by `sae planted`; set its own keys "
                                          r"\(`sae planted --help`\) as key=value or planted.key=value$"):
        stage_config("planted", None, ["d_in=16", "train.lr=5", "train.bogus=1"])
    with pytest.raises(ConfigError, match=r"^analyse.n_top: not read by `sae eval`"):
        stage_config("eval", None, ["train.out=my_saes", "analyse.n_top=3"])
    cfg = stage_config("eval", None, ["harvest.out=my_cache", "train.out=my_saes"])
    assert (cfg.cache, cfg.saes) == ("my_cache", ["my_saes"])
    assert stage_config("train", None, ["harvest.model=gpt2", "source=model"]).harvest.model == "gpt2"
    # A config file's eval: section that names its SAEs wins over the link, so train.out would go nowhere.
    config = tmp_path / "c.yaml"
    config.write_text("eval:\n  saes: [mine]\n")
    with pytest.raises(ConfigError, match=r"^train.out: not read by `sae eval`"):
        stage_config("eval", str(config), ["train.out=other"])
    assert stage_config("eval", str(config), ["train.out=other"], strict=False).saes == ["mine"]


def test_config_files_that_are_not_yaml_mappings_are_one_line(tmp_path):
    """A section that is not a mapping (`planted: 5`) was a TypeError, a file that is not UTF-8 a
    UnicodeDecodeError, a folder "does not exist"; a bool where a number goes ran harvests on 1 token."""
    from sae.cli import stage_config
    from sae.config import ConfigError, UserError

    cases = {"section.yaml": ("planted: 5\n", r"section\(s\) \['planted'\] must each hold a mapping of keys"),
             "binary.yaml": (b"\xff\xfe x", r"is not UTF-8 text; pass a YAML config file$")}
    for name, (text, said) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError, match=said):
            stage_config("planted", str(path), [])
    with pytest.raises(ConfigError, match=r"is a folder; pass a YAML file$"):
        stage_config("planted", str(tmp_path), [])
    for override in ("d_in=true", "l0=false"):
        with pytest.raises(ConfigError, match=r"expected (int|float), got (True|False)"):
            stage_config("planted", None, [override])
    with pytest.raises(UserError, match=r"saes is empty: name the SAE folders to evaluate"):
        stage_config("eval", None, ["saes=[]"])
