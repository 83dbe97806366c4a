"""Config parsing and validation: every error names its key path."""

from __future__ import annotations

import pytest

from kdcore import config as cfg
from kdcore.common.errors import ConfigError
from kdcore.plugins import default_registry

BASE = """
[run]
epochs = 2
[data]
name = "gaussian_mixture"
[student]
backbone = "mlp"
[[loss]]
name = "ce"
[[loss]]
name = "kd"
temperature = 4.0
"""
TEACHER = '[teacher]\nbackbone = "mlp"\ncheckpoint = "t.pt"\n'


def load_text(tmp_path, text, overrides=()):
    p = tmp_path / "c.toml"
    p.write_text(text)
    conf = cfg.load(p, overrides)
    cfg.check_components(conf, default_registry())
    return conf


def test_defaults_and_round_trip(tmp_path):
    conf = load_text(tmp_path, BASE + TEACHER)
    assert conf.run.batch_size == 64 and conf.optim.name == "sgd" and conf.loss[1].params == {"temperature": 4.0}
    again = cfg.from_dict(__import__("tomllib").loads(cfg.dumps(conf)))
    assert cfg.dumps(again) == cfg.dumps(conf)


@pytest.mark.parametrize("extra, message", [
    ("[bogus]\nx = 1\n", r"^bogus: unknown section"),
    ("[optim]\nlrr = 0.1\n", r"^optim\.lrr: unknown key"),
    ("[optim]\nlr = -1\n", r"^optim\.lr: must be > 0"),
    ("[optim]\nlr = 'fast'\n", r"^optim\.lr: must be a number"),
    ("[optim]\nname = 'adam'\n", r"^optim\.name: must be one of 'sgd', 'adamw'"),
    ("[optim]\nmilestones = [10, -5]\n", r"^optim\.milestones\[1\]"),
])
def test_section_errors(tmp_path, extra, message):
    text = BASE.replace("[run]\nepochs = 2\n", "[run]\nepochs = 2\n" if "[run]" not in extra else "")
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, text + TEACHER + extra)


def test_run_key_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^run\.epochs: must be > 0"):
        load_text(tmp_path, BASE.replace("epochs = 2", "epochs = 0") + TEACHER)
    with pytest.raises(ConfigError, match=r"^run\.epochs: must be an integer"):
        load_text(tmp_path, BASE.replace("epochs = 2", "epochs = 2.5") + TEACHER)
    with pytest.raises(ConfigError, match=r"^run\.device: must be one of"):
        load_text(tmp_path, BASE.replace("epochs = 2", "device = 'tpu'") + TEACHER)


def test_component_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^loss\[1\]\.temperature: must be > 0"):
        conf = load_text(tmp_path, BASE.replace("temperature = 4.0", "temperature = -1.0") + TEACHER)
        from kdcore.engine.objective import Objective
        Objective.from_config(conf, default_registry())
    with pytest.raises(ConfigError, match=r"^loss\[1\]\.temprature: unknown parameter of loss 'kd'"):
        load_text(tmp_path, BASE.replace("temperature", "temprature") + TEACHER)
    with pytest.raises(ConfigError, match=r"^loss\[1\]\.name: unknown loss 'kdd'; did you mean 'kd'"):
        load_text(tmp_path, BASE.replace('name = "kd"', 'name = "kdd"') + TEACHER)
    with pytest.raises(ConfigError, match=r"^data\.nn: unknown parameter of dataset"):
        load_text(tmp_path, BASE.replace('name = "gaussian_mixture"', 'name = "gaussian_mixture"\nnn = 3') + TEACHER)
    with pytest.raises(ConfigError, match=r"^student\.backbone: required"):
        load_text(tmp_path, BASE.replace('backbone = "mlp"', 'hidden = [3]') + TEACHER)
    with pytest.raises(ConfigError, match=r"^loss\[0\]\.schedule: unknown scheduler 'linaer'"):
        load_text(tmp_path, BASE.replace('name = "ce"', 'name = "ce"\nschedule = "linaer"') + TEACHER)
    with pytest.raises(ConfigError, match=r"^loss: required section"):
        load_text(tmp_path, '[data]\nname = "gaussian_mixture"\n[student]\nbackbone = "mlp"\n')


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_text(tmp_path, "[run\nepochs = ")
    with pytest.raises(ConfigError, match="config file not found"):
        cfg.load(tmp_path / "nope.toml")


def test_overrides(tmp_path):
    conf = load_text(tmp_path, BASE + TEACHER, [
        "run.epochs=7", "loss[1].temperature=2", "loss.0.weight=0.5", "optim.milestones=[3, 5]",
        "loss[1].divergence={name = \"rkl\"}", "data.seed=4", "student.hidden=[8]"])
    assert conf.run.epochs == 7 and conf.loss[1].params["temperature"] == 2
    assert conf.loss[0].weight == 0.5 and conf.optim.milestones == [3, 5]
    assert conf.loss[1].params["divergence"] == {"name": "rkl"} and conf.data.params == {"seed": 4}
    assert conf.student.params == {"hidden": [8]}
    with pytest.raises(ConfigError, match=r"loss has no entry \[5\]"):
        load_text(tmp_path, BASE + TEACHER, ["loss[5].weight=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_text(tmp_path, BASE + TEACHER, ["epochs"])


def test_term_ids_are_unique():
    conf = cfg.from_dict({"data": {"name": "gaussian_mixture"}, "student": {"backbone": "mlp"},
                          "loss": [{"name": "kd"}, {"name": "ce"}, {"name": "kd", "id": "kd_b"}, {"name": "kd"}]})
    assert conf.term_ids() == ["kd_1", "ce", "kd_b", "kd_2"]
    with pytest.raises(ConfigError, match=r"loss\[1\]\.id: 'a' is used by more than one term"):
        cfg.from_dict({"data": {"name": "g"}, "student": {"backbone": "mlp"},
                       "loss": [{"name": "kd", "id": "a"}, {"name": "ce", "id": "a"}]})


def test_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b"\xef\xbb\xbf" + (BASE + TEACHER).encode())
    assert cfg.load(p).run.epochs == 2


@pytest.mark.parametrize("extra, message", [
    ("[run]\nseed = 99999999999999999999\n", r"^run\.seed: must be in 0 \.\. 2\*\*63 - 1"),
    ("[optim]\nmilestones = [" + ", ".join(["1"] * 10_001) + "]\n",
     r"^optim\.milestones: a list of 10,001 entries is longer than the limit of 10,000"),
    ("[weighting]\nname = 'x'\nsizes = [[3000000000]]\n", r"^weighting\.sizes\[0\]\[0\]: 3000000000 is beyond"),
    ("[weighting]\nname = 'x'\nv = " + "[" * 40 + "]" * 40 + "\n", r"^weighting\.v(\[0\])+: nested more than 32"),
    ("[weighting]\nname = 'x'\nv = " + "[" * 600 + "]" * 600 + "\n", r"c\.toml: tables or lists nested more"),
])
def test_limits_name_the_key(tmp_path, extra, message):
    text = BASE.replace("[run]\nepochs = 2\n", "") if extra.startswith("[run]") else BASE
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, text + TEACHER + extra)


def test_limits_apply_to_mappings_and_seeds_up_to_2_63():
    base = {"data": {"name": "gaussian_mixture", "seed": 2**63 - 1}, "student": {"backbone": "mlp"},
            "loss": [{"name": "ce"}], "run": {"seed": 2**63 - 1}}
    assert cfg.from_dict(base).run.seed == 2**63 - 1
    with pytest.raises(ConfigError, match=r"^student\.hidden: a list of 20,000 entries"):
        cfg.from_dict({**base, "student": {"backbone": "mlp", "hidden": [1] * 20_000}})


def test_existing_paths_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "cfgs" / "data").mkdir(parents=True)
    (tmp_path / "cfgs" / "t.pt").write_bytes(b"")
    (tmp_path / "cfgs" / "c.toml").write_text(
        BASE.replace('name = "gaussian_mixture"', 'name = "gaussian_mixture"\nroot = "data"\nsplit_name = "data"')
        + '[teacher]\nbackbone = "mlp"\ncheckpoint = "t.pt"\n')
    monkeypatch.chdir(tmp_path)
    conf = cfg.load("cfgs/c.toml")
    assert conf.teacher.checkpoint == str((tmp_path / "cfgs" / "t.pt").resolve())
    assert conf.data.params["root"] == str((tmp_path / "cfgs" / "data").resolve())
    assert conf.data.params["split_name"] == "data"  # not a path key: unchanged
    assert cfg.load(tmp_path / "cfgs" / "c.toml", ["teacher.checkpoint=missing.pt"]).teacher.checkpoint == "missing.pt"


@pytest.mark.parametrize("term, message", [
    ('divergence = "klx"', r"^loss\[1\]\.divergence: unknown divergence 'klx'; did you mean 'kl'"),
    ('divergence = { name = "rklx" }', r"^loss\[1\]\.divergence\.name: unknown divergence 'rklx'"),
    ('divergence = { name = "kl", bogus = 1 }', r"^loss\[1\]\.divergence\.bogus"),
    ('transforms = ["temperature", { name = "label_smoothin" }]',
     r"^loss\[1\]\.transforms\[1\]\.name: unknown transform 'label_smoothin'"),
])
def test_components_named_inside_a_term_are_checked(tmp_path, term, message):
    """A term's nested divergence and transform tables are checked before the run
    starts, with the key path (so a missing plugin is named, not found mid-run)."""
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, BASE.replace("temperature = 4.0", f"temperature = 4.0\n{term}") + TEACHER)


def test_a_whole_section_is_set_by_a_toml_table_or_array_of_tables(tmp_path):
    """``--set loss=[{...}, ...]`` replaces the [[loss]] list, ``--set teacher={...}`` a
    table and ``--set loss[0]={...}`` one entry; later items may refine them."""
    conf = load_text(tmp_path, BASE + TEACHER, [
        'loss=[{name="ce"},{name="kd",temperature=2}]', "loss[1].weight=0.5",
        'teacher={backbone="mlp", checkpoint="x.pt", hidden=[4]}'])
    assert [t.name for t in conf.loss] == ["ce", "kd"] and conf.loss[1].params == {"temperature": 2}
    assert conf.loss[1].weight == 0.5
    assert conf.teacher.checkpoint == "x.pt" and conf.teacher.params == {"hidden": [4]}
    raw = cfg.apply_overrides({"loss": [{"name": "ce"}, {"name": "kd"}]}, ['loss[1]={name="kd", temperature=3}'])
    assert raw["loss"] == [{"name": "ce"}, {"name": "kd", "temperature": 3}]
    assert cfg.apply_overrides({}, ['run = {epochs = 3}']) == {"run": {"epochs": 3}}


@pytest.mark.parametrize("item, message", [
    ("loss=ce", "--set 'loss=ce': loss takes a table {key = value, ...} or an array of tables [{...}, ...] "
                "(invalid TOML: Invalid value (at line 1, column 1)); set one key with loss.KEY=VALUE"),
    ('loss=[{name="ce"}, 3]', "--set 'loss=[{name=\"ce\"}, 3]': loss takes a table {key = value, ...} or an "
                              "array of tables [{...}, ...]; set one key with loss.KEY=VALUE"),
    ('loss=[{name=}]', "--set 'loss=[{name=}]': loss takes a table {key = value, ...} or an array of tables "
                       "[{...}, ...] (invalid TOML: Invalid value (at line 1, column 8)); set one key with "
                       "loss.KEY=VALUE"),
    ("loss[0]=3", "--set 'loss[0]=3': loss[0] takes a table {key = value, ...}; set one key with "
                  "loss[0].KEY=VALUE"),
    ("loss[5]={name='ce'}", "--set loss[5]: loss has no entry [5]"),
    ("loss=" + "[" * 600 + "]" * 600, "--set 'loss=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[['...: nested more than "
                                      "32 levels deep"),
])
def test_a_bad_whole_section_value_is_one_line_naming_the_item(item, message):
    with pytest.raises(ConfigError) as exc:
        cfg.apply_overrides({"loss": [{"name": "ce"}]}, [item])
    assert str(exc.value) == message


def test_kdcore_train_sets_a_whole_section(tmp_path, capsys):
    """Through the command line: the run's resolved config.toml holds the new [[loss]]
    list and [student] table; a bad value is exit 2 and one line."""
    from kdcore.cli.commands import main

    path = tmp_path / "c.toml"
    path.write_text('[run]\nepochs = 1\nmax_steps = 2\nprogress = "off"\n[data]\nname = "gaussian_mixture"\n'
                    'n = 200\n[student]\nbackbone = "mlp"\n[[loss]]\nname = "kd"\n')
    sets = ["--set", 'loss=[{name="ce", weight=0.5}]', "--set", 'student={backbone="mlp", hidden=[4]}']
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet", *sets]) == 0
    written = __import__("tomllib").loads((tmp_path / "run" / "config.toml").read_text())
    assert written["loss"] == [{"name": "ce", "weight": 0.5}]
    assert written["student"]["hidden"] == [4]
    capsys.readouterr()
    assert main(["train", str(path), "--out", str(tmp_path / "bad"), "--set", "loss=ce"]) == 2
    assert capsys.readouterr().err == (
        "kdcore: error: --set 'loss=ce': loss takes a table {key = value, ...} or an array of tables [{...}, ...] "
        "(invalid TOML: Invalid value (at line 1, column 1)); set one key with loss.KEY=VALUE\n")
    assert not (tmp_path / "bad").exists()
