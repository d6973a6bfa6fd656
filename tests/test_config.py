"""Config validation (every section refuses impossible values when built, RunConfig.validate re-checks them
and the cross-section rules) and the layering defaults < preset < config file, or a resumed run's config."""

import json
import math

import pytest

from gptforge.config import (PRESETS, ConfigError, EvalConfig, GPTConfig, OptimConfig, RunConfig, TrainConfig,
                             layered_defaults, merge_sections, read_config_file, read_config_json)
from gptforge.errors import UserError

SECTIONS = {"model": GPTConfig, "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig}


@pytest.mark.parametrize("section, name, value, says", [
    ("optim", "beta1", 2.0, "in [0, 1)"), ("optim", "beta1", -0.1, "in [0, 1)"), ("optim", "beta2", 1.0, "in [0, 1)"),
    ("optim", "eps", -1.0, "> 0"), ("optim", "eps", 0.0, "> 0"), ("optim", "weight_decay", -1.0, ">= 0"),
    ("optim", "lr", 0.0, "> 0"), ("optim", "min_lr", -1e-5, ">= 0"), ("optim", "grad_clip", -1.0, ">= 0"),
    ("optim", "warmup_iters", -1, ">= 0"), ("optim", "warmup_frac", 1.0, "in [0, 1)"),
    ("optim", "cooldown_frac", 1.5, "in [0, 1]"), ("optim", "muon_lr", 0.0, "> 0"),
    ("optim", "muon_momentum", 1.0, "in [0, 1)"), ("optim", "muon_ns_steps", 0, "at least 1"),
    ("optim", "decay_iters", -5, ">= 0"),
    ("model", "norm_eps", -1.0, "> 0"), ("model", "norm_eps", 0.0, "> 0"), ("model", "rope_theta", 0.0, "> 0"),
    ("model", "dropout", 1.0, "in [0, 1)"), ("model", "n_layer", 0, "at least 1"),
    ("train", "batch_size", 0, "at least 1"), ("train", "eval_interval", 0, "at least 1"),
    ("train", "max_iters", -1, ">= 0"), ("train", "time_budget", 0.0, "> 0"), ("train", "stop_after", 0, "at least 1"),
    ("train", "total_batch_size", 0, "at least 1"),
    ("eval", "hellaswag_every", -1, ">= 0"), ("eval", "hellaswag_batch_size", 0, "at least 1"),
    ("eval", "hellaswag_limit", 0, "at least 1"),
])
def test_impossible_values_are_refused_in_one_line_naming_the_field(section, name, value, says):
    with pytest.raises(ConfigError) as e:
        SECTIONS[section](**{name: value})
    assert str(e.value) == f"{section}.{name} must be {says}, got {value}"


@pytest.mark.parametrize("section, name", [("optim", "lr"), ("optim", "beta1"), ("optim", "eps"),
                                           ("model", "norm_eps"), ("model", "rope_theta"), ("model", "dropout"),
                                           ("train", "time_budget")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(section, name, value):
    # nan passes no comparison, so a range check alone would let `not 0 <= nan < 1`-style tests slip either way
    with pytest.raises(ConfigError, match=f"{section}.{name} must be a finite number"):
        SECTIONS[section](**{name: value})


@pytest.mark.parametrize("section, values, says", [
    ("optim", {"lr": "3e-4"}, "optim.lr must be a finite number, got '3e-4'"),  # YAML 1.1 reads 3e-4 as a string
    ("model", {"n_layer": 4.5}, "model.n_layer must be an integer, got 4.5"),
    ("model", {"n_layer": True}, "model.n_layer must be an integer, got True"),
    ("model", {"pos": "sideways"}, "model.pos must be one of learned | rope, got 'sideways'"),
    ("train", {"compile": "yes"}, "train.compile must be true or false, got 'yes'"),
    ("optim", {"decay_iters": "x"}, "optim.decay_iters must be an integer or null, got 'x'"),
])
def test_wrong_types_from_a_config_file_are_refused(section, values, says):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({section: values})
    assert str(e.value) == says


def test_defaults_presets_and_boundaries_are_accepted():
    RunConfig().validate()
    for name, p in PRESETS.items():
        RunConfig.from_dict(json.loads(json.dumps(p))).validate(world_size=8)
    OptimConfig(beta1=0.0, weight_decay=0.0, min_lr=0.0, grad_clip=0.0, warmup_frac=0.0, cooldown_frac=1.0, lr=1)
    GPTConfig(dropout=0.0, norm_eps=1e-12, pos="rope", rope_theta=500000)  # an int is a fine float


def test_run_validate_rechecks_fields_set_after_construction():
    cfg = RunConfig()
    cfg.optim.beta1 = 2.0  # the CLI and tests set fields on a built config; train validates before it starts
    with pytest.raises(ConfigError, match=r"optim.beta1 must be in \[0, 1\)"):
        cfg.validate()
    cfg = RunConfig()
    cfg.model.norm_eps = -1.0
    with pytest.raises(ConfigError, match="model.norm_eps"):
        cfg.validate()


def test_muon_with_fsdp_is_refused_only_across_several_processes():
    cfg = RunConfig.from_dict({"optim": {"optimizer": "muon"}, "train": {"dist": "fsdp"}})
    cfg.validate()  # one process: no sharding, nothing to refuse
    cfg.validate(world_size=1)
    with pytest.raises(ConfigError, match="optim.optimizer muon works with --train.dist ddp, not yet with fsdp"):
        cfg.validate(world_size=2)
    RunConfig.from_dict({"optim": {"optimizer": "muon"}, "train": {"dist": "ddp"}}).validate(world_size=2)


def test_layering_preset_then_file_and_resume_replaces_both(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layer: 6\noptim:\n  lr: 0.002\n")
    d = layered_defaults("shakespeare-char-cpu", f)
    assert d["model"]["n_layer"] == 6 and d["optim"]["lr"] == 0.002  # the file over the preset
    assert d["model"]["n_embd"] == 128 and d["optim"]["beta2"] == 0.99  # the preset over the defaults
    assert d["model"]["n_kv_head"] is None  # derived again from the final shape, not frozen at 12
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"n_layer": 3, "n_head": 2, "n_embd": 16}}))
    d = layered_defaults("gpt2", f, run)
    assert d["model"]["n_layer"] == 3 and d["optim"]["lr"] == OptimConfig().lr


def test_merge_names_the_file_of_an_unknown_field():
    with pytest.raises(ConfigError, match="c.yaml: unknown field.s. in model: n_layers"):
        merge_sections(RunConfig().to_dict(), {"model": {"n_layers": 4}}, "c.yaml: ")
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        merge_sections(RunConfig().to_dict(), {"modle": {}})


@pytest.mark.parametrize("name, content, says", [
    ("bin.yaml", b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 20, "is not UTF-8 text"),
    ("broken.yaml", b"model: [\n", "cannot parse config file"),
    ("list.yaml", b"- 1\n- 2\n", "must hold a mapping of sections"),
    ("bad.json", b'{"model": ', "cannot parse config file"),
])
def test_unreadable_config_files_are_one_line_user_errors(tmp_path, name, content, says):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError) as e:
        read_config_file(tmp_path / name)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_saved_config_says_which_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model": ')
    with pytest.raises(UserError, match="config.json is not valid JSON .*damaged"):
        read_config_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"optim": {"beta1": 2}}')
    with pytest.raises(ConfigError, match=r"config.json: optim.beta1 must be in \[0, 1\)"):
        read_config_json(tmp_path / "config.json")
