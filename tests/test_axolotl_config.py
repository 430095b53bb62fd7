"""The Axolotl plugin's config side: schema, validation through Axolotl, config checks, CLI wiring.

Runs Axolotl's own config validation in-process (no model is loaded). Axolotl's PluginManager is a
process-wide singleton, so every test that touches it gets a fresh one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("axolotl")

from gere_plugin.axolotl.args import (  # noqa: E402
    PLUGIN_COLON_PATHS,
    PLUGIN_PATH,
    PLUGIN_PATHS,
    GeReArgs,
    check_gere_request,
    gere_arguments_from_cfg,
    loss_family_for_rl,
)
from gere_plugin.axolotl.check import check_config  # noqa: E402
from gere_plugin.axolotl.compat import axolotl_facts  # noqa: E402
from gere_plugin.config import GeReArguments, GeReConfigError, gere_defaults, gere_fields  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes" / "axolotl").glob("*.yml"))
GPU_CAPS = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}
CPU_CAPS = {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1, "compute_capability": None}


def load_recipe(name: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / "axolotl" / name).read_text())


@pytest.fixture
def plugin_manager():
    """A fresh Axolotl PluginManager singleton (and none left behind)."""
    from axolotl.integrations.base import PluginManager

    PluginManager._instance = None
    PluginManager._cfg = None
    yield PluginManager.get_instance()
    PluginManager._instance = None
    PluginManager._cfg = None


def axolotl_validate(raw: dict, gpu: bool = False, n_gpu: int = 1):
    """What ``axolotl train`` does with a YAML before loading anything: register plugins, validate."""
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(copy.deepcopy(raw))
    prepare_plugins(cfg)
    caps = dict(GPU_CAPS if gpu else CPU_CAPS, n_gpu=n_gpu)
    return validate_config(cfg, capabilities=caps, env_capabilities={"torch_version": "2.13.0"})


# ------------------------------------------------------------------------------------------------
# The generated schema
# ------------------------------------------------------------------------------------------------
def test_schema_declares_every_gere_key_with_none_default():
    names = [f.name for f in gere_fields()]
    assert sorted(GeReArgs.model_fields) == sorted(names)
    assert all(GeReArgs.model_fields[n].default is None for n in names)
    assert all(GeReArgs.model_fields[n].description for n in names)


def test_schema_normalises_yaml_scalars():
    args = GeReArgs(gere_replay="r.jsonl", gere_weight=100, gere_layers=-1, gere_sigma=2)
    assert args.gere_weight == "100.0"
    assert args.gere_layers == [-1]
    assert GeReArgs().gere_replay is None


@pytest.mark.parametrize(
    "key,value",
    [
        ("gere_sigma", -1.0),
        ("gere_replay_size", 0),
        ("gere_replay_per_step", 0),
        ("gere_regularizer", "ewc"),
        ("gere_weight", -3),
        ("gere_weight", "heavy"),
        ("gere_freeze_layers", -2),
        ("gere_tm_reduction", "sum"),
        ("gere_layers", []),
    ],
)
def test_schema_rejects_out_of_range_values_naming_the_key(key, value):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        GeReArgs(**{key: value})
    assert key in str(err.value)


def test_schema_rejects_misspelled_gere_key_with_suggestion():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        GeReArgs.model_validate({"gere_replay_sise": 10})
    assert "gere_replay_sise" in str(err.value) and "gere_replay_size" in str(err.value)


def test_gere_arguments_from_cfg_uses_defaults_for_unset_keys():
    args = gere_arguments_from_cfg({"gere_replay": "x.jsonl", "gere_sigma": None, "gere_freeze_layers": 2})
    assert isinstance(args, GeReArguments)
    assert args.gere_replay == "x.jsonl" and args.gere_freeze_layers == 2
    assert args.gere_sigma == gere_defaults()["gere_sigma"]
    assert args.gere_replay_size == gere_defaults()["gere_replay_size"]


# ------------------------------------------------------------------------------------------------
# Through Axolotl's own validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_passes_axolotl_validation_with_the_plugin(recipe, plugin_manager):
    raw = yaml.safe_load(recipe.read_text())
    assert PLUGIN_PATH in raw["plugins"]
    gpu = not recipe.name.startswith("tiny-")
    cfg = axolotl_validate(raw, gpu=gpu, n_gpu=8 if "zero2" in recipe.name else 1)
    assert type(plugin_manager.plugins[PLUGIN_PATH]).__name__ == "GeRePlugin"
    # the plugin's schema keeps every gere_* key the YAML sets (Axolotl drops undeclared keys)
    for key, value in raw.items():
        if key.startswith("gere_"):
            assert cfg[key] == value, key
    assert check_config(recipe).uses_gere


def test_continual_recipes_share_the_original_base_cache():
    t1, t2 = load_recipe("continual-task1.yml"), load_recipe("continual-task2.yml")
    assert t1["gere_state_cache"] == t2["gere_state_cache"]
    assert t2["base_model"] == t1["base_model"]
    assert Path(t2["lora_model_dir"]) == Path(t1["output_dir"])
    for key in ("gere_replay", "gere_replay_size", "gere_replay_max_length", "gere_seed"):
        assert t1[key] == t2[key], key
    assert t2["gere_freeze_layers"] == 3 and t2["gere_freeze_embeddings"] is True
    assert not t1.get("gere_freeze_layers") and not t1.get("gere_freeze_embeddings")


@pytest.mark.parametrize(
    "key,value",
    [
        ("gere_sigma", -1),
        ("gere_replay_per_step", 0),
        ("gere_regularizer", "ewc"),
        ("gere_state_batch_size", 0),
        ("gere_monitor_action", "halt"),
        ("gere_monitor_steps", 0),
    ],
)
def test_axolotl_validation_error_names_the_key(key, value, plugin_manager):
    raw = load_recipe("tiny-cpu-sft-full.yml")
    raw[key] = value
    with pytest.raises(Exception) as err:
        axolotl_validate(raw)
    assert key in str(err.value)


def test_axolotl_validation_rejects_misspelled_gere_key(plugin_manager):
    raw = load_recipe("tiny-cpu-sft-lora.yml")
    raw["gere_freeze_layer"] = 2
    with pytest.raises(Exception) as err:
        axolotl_validate(raw)
    assert "gere_freeze_layers" in str(err.value)


def test_plugin_without_gere_replay_is_a_clear_error(plugin_manager):
    raw = load_recipe("tiny-cpu-sft-full.yml")
    del raw["gere_replay"]
    with pytest.raises(GeReConfigError, match="gere_replay is not set"):
        axolotl_validate(raw)


def test_unsupported_rl_mode_is_rejected(plugin_manager):
    raw = load_recipe("tiny-cpu-dpo-full.yml")
    raw["rl"] = "kto"
    with pytest.raises(GeReConfigError, match="rl: kto"):
        axolotl_validate(raw)
    assert check_config(raw, raise_on_error=False).problems


def test_grpo_is_accepted_but_its_async_and_sequence_parallel_trainers_are_refused(plugin_manager):
    raw = load_recipe("tiny-cpu-grpo-full.yml")
    assert raw["rl"] == "grpo"
    cfg = axolotl_validate(raw)
    assert cfg["rl"] == "grpo" and cfg["gere_replay_per_step"] == 3
    assert check_config(raw, raise_on_error=False).problems == []
    for key in ("async_prefetch", "use_data_producer"):
        bad = copy.deepcopy(raw)
        bad["trl"][key] = True
        with pytest.raises(GeReConfigError, match=f"trl.{key}: true switches Axolotl to its asynchronous GRPO"):
            check_gere_request(bad)
        assert any(f"trl.{key}" in p for p in check_config(bad, raise_on_error=False).problems)
    bad = dict(copy.deepcopy(raw), context_parallel_size=2)
    with pytest.raises(GeReConfigError, match="context_parallel_size > 1 with rl: grpo"):
        check_gere_request(bad)


@pytest.mark.parametrize(("rl", "family"), [(None, "sft"), ("dpo", "dpo"), ("ipo", "dpo"), ("grpo", "grpo")])
def test_each_supported_training_mode_has_a_loss_family(rl, family):
    assert loss_family_for_rl(rl) == family


# ------------------------------------------------------------------------------------------------
# Every plugin-line form on the installed Axolotl: GeRe runs exactly once, or a clear error
# ------------------------------------------------------------------------------------------------
FACTS = axolotl_facts()
NEW_AXOLOTL = FACTS.loads_entry_points  # >= 0.21: entry points loaded for every config
PLUGIN_FORMS = [*PLUGIN_PATHS, *PLUGIN_COLON_PATHS, None]  # None = no plugins: line at all


def test_installed_axolotl_is_one_the_suite_claims():
    assert FACTS.version in ("0.19.0", "0.21.0"), FACTS.version
    assert FACTS.entry_point, "gere-plugin's axolotl.plugins entry point is not installed (pip install -e .)"


def _gere_plugins_in(manager) -> list:
    from gere_plugin.axolotl.plugin import GeRePlugin

    return [p for p in manager.plugins.values() if isinstance(p, GeRePlugin)]


def _served_trainers(manager, cfg, tiny_dir, tmp_path):
    """Run Axolotl's post_trainer_create over every registered plugin; return the GeRe set-ups made."""
    from gere_plugin.trainer import GeReCheckpointCallback

    trainer = _plain_trainer(tiny_dir, tmp_path)
    manager.post_trainer_create(cfg, trainer)
    return [c for c in trainer.callback_handler.callbacks if isinstance(c, GeReCheckpointCallback)], trainer


def _tiny_gere_raw(replay_file, tmp_path, plugins) -> dict:
    raw = load_recipe("tiny-cpu-sft-full.yml")
    raw.update(
        gere_replay=str(replay_file), gere_replay_size=16, gere_replay_max_length=16, gere_replay_per_step=3,
        gere_state_cache=str(tmp_path / "states"), gere_freeze_layers=0, gere_freeze_embeddings=False,
    )
    if plugins is None:
        raw.pop("plugins", None)
    else:
        raw["plugins"] = plugins
    return raw


@pytest.mark.parametrize("form", PLUGIN_FORMS, ids=lambda f: f or "no-line")
def test_every_plugin_line_form_runs_gere_once_or_fails_clearly(form, plugin_manager, tiny_dir, replay_file, tmp_path):
    raw = _tiny_gere_raw(replay_file, tmp_path, None if form is None else [form])
    check = check_config(raw, raise_on_error=False)
    colon = form is not None and ":" in form
    if form is None and not NEW_AXOLOTL:
        # Axolotl 0.19 never loads the plugin: the keys are dropped silently, which only the check sees.
        cfg = axolotl_validate(raw)
        assert not any(k.startswith("gere_") for k in cfg)
        assert not check.ok and "silently drops" in check.problems[0] and PLUGIN_PATH in check.problems[0]
        return
    if colon and not NEW_AXOLOTL:
        # 0.19's loader splits at the last '.': a crash, named by our module's __getattr__ where it can be.
        with pytest.raises((AttributeError, ValueError)) as err:
            axolotl_validate(raw)
        if isinstance(err.value, AttributeError):
            assert "module:Class" in str(err.value) and PLUGIN_PATH in str(err.value)
        assert not check.ok and "module:Class" in check.problems[0]
        return
    cfg = axolotl_validate(raw)  # no "duplicate base class", whatever the spelling
    assert check.ok and check.uses_gere, check.report()
    assert check.via_entry_point == (form is None)
    for key, value in raw.items():
        if key.startswith("gere_"):
            assert cfg[key] == value, key
    instances = _gere_plugins_in(plugin_manager)
    assert instances, "no GeRePlugin registered"
    # one schema merge, one set-up: exactly one instance acts
    assert [p.get_input_args() for p in instances].count("gere_plugin.axolotl.args.GeReArgs") == 1
    setups, trainer = _served_trainers(plugin_manager, cfg, tiny_dir, tmp_path)
    assert len(setups) == 1 and trainer.gere_step is not None and trainer.gere_step.per_step == 3


def test_two_spellings_in_one_yaml_act_once(plugin_manager, tiny_dir, replay_file, tmp_path):
    raw = _tiny_gere_raw(replay_file, tmp_path, ["gere_plugin.GeRePlugin", "gere_plugin.axolotl.GeRePlugin"])
    cfg = axolotl_validate(raw)
    assert len(_gere_plugins_in(plugin_manager)) >= 2
    setups, _ = _served_trainers(plugin_manager, cfg, tiny_dir, tmp_path)
    assert len(setups) == 1


def test_config_without_gere_is_untouched_by_the_loaded_plugin(plugin_manager, tiny_dir, tmp_path):
    plain = {k: v for k, v in load_recipe("tiny-cpu-sft-full.yml").items() if not k.startswith("gere_")}
    plain["plugins"] = ["axolotl.integrations.grokfast.GrokfastPlugin"]
    cfg = axolotl_validate(plain)
    assert cfg["gere_replay"] is None
    if NEW_AXOLOTL:
        assert _gere_plugins_in(plugin_manager), "0.21 should load the plugin through its entry point"
    setups, trainer = _served_trainers(plugin_manager, cfg, tiny_dir, tmp_path)
    assert not setups and getattr(trainer, "gere_step", None) is None


@pytest.mark.parametrize("line", [True, False], ids=["plugin-line", "entry-point-only"])
def test_monitor_only_config_passes_axolotl_validation_and_attaches_the_monitor(line, plugin_manager, tiny_dir,
                                                                                tmp_path):
    """Only the forgetting monitor's keys (no replay): Axolotl's own validation keeps them, and the plugin
    attaches the monitor (and no replay step) to the trainer Axolotl built. On 0.19 the plugin line is
    needed (without it Axolotl never loads the plugin); on 0.21 the entry point alone acts."""
    from .conftest import general_texts, write_jsonl

    if not line and not NEW_AXOLOTL:
        pytest.skip("Axolotl 0.19 loads plugins only from the plugins: line")
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in general_texts(20, seed=99)])
    raw = {k: v for k, v in load_recipe("tiny-cpu-sft-full.yml").items() if not k.startswith("gere_")}
    if not line:
        raw.pop("plugins", None)
    raw.update(gere_monitor=str(heldout), gere_monitor_steps=25, gere_monitor_size=8, gere_monitor_max_length=24,
               gere_monitor_task_size=0, gere_monitor_max_ppl_rise=0.3, gere_monitor_action="stop")
    cfg = axolotl_validate(raw)
    assert cfg["gere_monitor"] == str(heldout) and cfg["gere_monitor_steps"] == 25
    assert cfg["gere_monitor_max_ppl_rise"] == 0.3 and cfg["gere_monitor_action"] == "stop"
    assert cfg["gere_replay"] is None
    setups, trainer = _served_trainers(plugin_manager, cfg, tiny_dir, tmp_path)
    assert not setups and trainer.gere_step is None  # no replay, no checkpoint callback
    monitor = trainer.gere_monitor
    assert monitor is not None and monitor in trainer.callback_handler.callbacks
    assert monitor.every == 25 and monitor.max_rise == 0.3 and monitor.action == "stop"
    assert len(monitor.texts.texts) == 8


def test_gere_keys_without_gere_replay_are_an_error_not_a_silent_skip(plugin_manager):
    raw = load_recipe("tiny-cpu-sft-full.yml")
    del raw["gere_replay"]
    if not NEW_AXOLOTL:
        del raw["plugins"]  # 0.19 never sees the keys without the line; the check does
        assert any("gere_replay is not set" in p for p in check_config(raw, raise_on_error=False).problems)
        return
    raw.pop("plugins")  # 0.21: the entry point alone
    with pytest.raises(Exception, match="gere_replay is not set") as err:
        axolotl_validate(raw)
    assert "gere_freeze_layers" in str(err.value)  # names what asked for GeRe


def test_misspelled_module(plugin_manager):
    raw = load_recipe("tiny-cpu-sft-full.yml")
    raw["plugins"] = ["gere_plugins.GeRePlugin"]
    with pytest.raises(GeReConfigError, match="does not load the GeRe plugin") as err:
        check_config(raw)
    if NEW_AXOLOTL:
        assert "raises at start-up" in str(err.value)
        with pytest.raises(ModuleNotFoundError):
            axolotl_validate(raw)  # configured plugins are required on 0.21
    else:
        assert "WITHOUT GeRe" in str(err.value)
        cfg = axolotl_validate(raw)  # 0.19 logs the ImportError and goes on without GeRe
        assert not _gere_plugins_in(plugin_manager)
        assert cfg["gere_replay"] is None


@pytest.mark.parametrize(
    "entry,axolotl_error", [("gere", ValueError), ("gere_plugin.GerePlugin", AttributeError)]
)
def test_other_plugin_typos_crash_axolotl_and_are_caught_earlier(entry, axolotl_error, plugin_manager):
    raw = load_recipe("tiny-cpu-sft-full.yml")
    raw["plugins"] = [entry]
    with pytest.raises(axolotl_error):
        axolotl_validate(raw)
    result = check_config(raw, raise_on_error=False)
    assert not result.ok and not result.uses_gere
    assert entry in result.problems[0]


@pytest.mark.parametrize("entry", PLUGIN_PATHS + (PLUGIN_COLON_PATHS if NEW_AXOLOTL else ()))
def test_every_documented_plugin_path_loads_with_axolotls_loader(entry):
    from gere_plugin.axolotl.check import plugin_is_loadable

    assert plugin_is_loadable(entry)
    assert check_config({"plugins": [entry], "gere_replay": "x.jsonl"}).uses_gere


@pytest.mark.parametrize("version,entry_point", [("0.19.0", True), ("0.21.0", True), ("0.21.0", False), (None, True)])
def test_check_advice_is_true_for_each_axolotl_version(version, entry_point):
    """The check's verdict on the same YAMLs for every version it knows (None = Axolotl not installed)."""
    from gere_plugin.axolotl.compat import AxolotlFacts

    facts = AxolotlFacts(version=version, entry_point=entry_point)

    def run(cfg):
        return check_config(cfg, raise_on_error=False, axolotl=facts)

    keys_only = {"gere_replay": "r.jsonl", "gere_replay_per_step": 2}
    no_line = run(keys_only)
    if version == "0.21.0" and entry_point:
        assert no_line.ok and no_line.via_entry_point and "entry point" in no_line.report()
    else:
        assert not no_line.ok and PLUGIN_PATH in no_line.problems[0]
        if version == "0.21.0":
            assert "entry point is not installed" in no_line.problems[0]
        elif version == "0.19.0":
            assert "silently drops" in no_line.problems[0]
    colon = run(dict(keys_only, plugins=["gere_plugin:GeRePlugin"]))
    # 0.19 crashes on it; unknown version: nothing to claim, so the colon form is not flagged
    assert colon.ok == (version != "0.19.0"), colon.report()
    dotted = run(dict(keys_only, plugins=[PLUGIN_PATH]))
    assert dotted.ok and dotted.uses_gere
    typo = run(dict(keys_only, plugins=["gere_plugins.GeRePlugin"]))
    assert not typo.ok
    assert ("raises at start-up" in typo.problems[0]) == (version == "0.21.0")


def test_check_config_reports_every_problem_at_once(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        yaml.safe_dump({"base_model": "x", "gere_replay": "r.jsonl", "gere_sigma": 0, "plugins": ["gere"]})
    )
    result = check_config(bad, raise_on_error=False)
    assert len(result.problems) == 2
    assert any("is not a plugin path" in p for p in result.problems)
    assert any("gere_sigma" in p for p in result.problems)
    missing = check_config({"plugins": [PLUGIN_PATH]}, raise_on_error=False)
    assert any("gere_replay is not set" in p for p in missing.problems)
    assert check_config({"base_model": "x"}).ok  # no GeRe at all is fine
    (tmp_path / "list.yml").write_text("- a\n- b\n")
    with pytest.raises(GeReConfigError, match="mapping"):
        check_config(tmp_path / "list.yml")


# ------------------------------------------------------------------------------------------------
# CLI wiring
# ------------------------------------------------------------------------------------------------
def test_cli_entry_point_is_a_click_command_axolotl_can_load():
    from importlib.metadata import entry_points

    import click
    from axolotl.cli.plugins import ENTRY_POINT_GROUP, _import_command

    (ep,) = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == "gere"]
    command = _import_command(ep.value)
    assert isinstance(command, click.Group)
    assert {"check", "build-cache", "tiny-model", "keys"} <= set(command.commands)


def test_axolotl_cli_lists_and_runs_gere_check(tmp_path):
    from axolotl.cli.main import cli
    from click.testing import CliRunner

    good = str(REPO / "recipes" / "axolotl" / "tiny-cpu-sft-full.yml")
    bad = tmp_path / "no-plugin.yml"
    raw = load_recipe("tiny-cpu-sft-full.yml")
    del raw["plugins"]
    bad.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    assert "gere" in runner.invoke(cli, ["--help"]).output
    ok = runner.invoke(cli, ["gere", "check", good])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output
    both = runner.invoke(cli, ["gere", "check", good, str(bad)])
    if NEW_AXOLOTL:  # the keys alone run GeRe on 0.21: the check says so and passes
        assert both.exit_code == 0, both.output
        assert "runs through its entry point" in both.output and FACTS.version in both.output
    else:
        assert both.exit_code == 1
        assert "silently drops" in both.output and PLUGIN_PATH in both.output
    typo = tmp_path / "typo.yml"
    typo.write_text(yaml.safe_dump(dict(raw, plugins=["gere_plugin.GerePlugin"])))
    fail = runner.invoke(cli, ["gere", "check", str(typo)])
    assert fail.exit_code == 1 and "gere_plugin.GeRePlugin" in fail.output


def test_tiny_model_command_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gere_plugin.axolotl.cli import make_tiny_model

    out = make_tiny_model(str(tmp_path / "tiny"), hidden=16, layers=2)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("Review: The film was great. Sentiment: positive", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)
    assert model.config.num_hidden_layers == 2


# ------------------------------------------------------------------------------------------------
# The post_trainer_create hook on a real (plain transformers) trainer
# ------------------------------------------------------------------------------------------------
def _plain_trainer(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        use_cpu=True,
        report_to=[],
    )
    return Trainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(str(tiny_dir)))


def _gere_cfg(replay_file, tmp_path, **extra):
    from axolotl.utils.dict import DictDefault

    cfg = {
        "plugins": [PLUGIN_PATH],
        "gere_replay": str(replay_file),
        "gere_replay_size": 16,
        "gere_replay_max_length": 16,
        "gere_replay_per_step": 3,
        "gere_state_cache": str(tmp_path / "states"),
    }
    cfg.update(extra)
    return DictDefault(cfg)


def test_post_trainer_create_swaps_class_freezes_and_builds_cache(
    tiny_dir, replay_file, tmp_path, plugin_manager
):
    from gere_plugin.axolotl.plugin import GeRePlugin
    from gere_plugin.trainer import GeReTrainerMixin

    trainer = _plain_trainer(tiny_dir, tmp_path)
    cfg = _gere_cfg(replay_file, tmp_path, gere_freeze_layers=2, gere_freeze_embeddings=True)
    GeRePlugin().post_trainer_create(cfg, trainer)
    assert isinstance(trainer, GeReTrainerMixin) and type(trainer).__name__ == "GeReTrainer"
    assert trainer.gere_combine == "mean"
    assert trainer.gere_step.per_step == 3
    assert (tmp_path / "states" / "meta.json").exists()
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in frozen
    assert any("layers.1." in n for n in frozen) and not any("layers.2." in n for n in frozen)


def test_post_trainer_create_uses_sum_for_dpo_and_ignores_configs_without_gere(
    tiny_dir, replay_file, tmp_path, plugin_manager
):
    from axolotl.utils.dict import DictDefault

    from gere_plugin.axolotl.plugin import GeRePlugin
    from gere_plugin.trainer import GeReTrainerMixin

    trainer = _plain_trainer(tiny_dir, tmp_path)
    GeRePlugin().post_trainer_create(DictDefault({"plugins": [], "learning_rate": 1e-3}), trainer)
    assert not isinstance(trainer, GeReTrainerMixin)
    GeRePlugin().post_trainer_create(_gere_cfg(replay_file, tmp_path, rl="dpo"), trainer)
    assert trainer.gere_combine == "sum" and trainer.gere_family == "dpo"
    # gere_* keys without the plugin line are served too (on 0.21 that is how the entry point runs GeRe)
    keys_only = _gere_cfg(replay_file, tmp_path)
    keys_only["plugins"] = []
    trainer2 = _plain_trainer(tiny_dir, tmp_path)
    GeRePlugin().post_trainer_create(keys_only, trainer2)
    assert isinstance(trainer2, GeReTrainerMixin) and trainer2.gere_combine == "mean"


def test_post_trainer_create_refuses_to_freeze_after_the_optimizer_exists(
    tiny_dir, replay_file, tmp_path, plugin_manager
):
    from gere_plugin.axolotl.plugin import GeRePlugin

    trainer = _plain_trainer(tiny_dir, tmp_path)
    trainer.create_optimizer()
    with pytest.raises(RuntimeError, match="optimizer already exists"):
        GeRePlugin().post_trainer_create(_gere_cfg(replay_file, tmp_path, gere_freeze_layers=1), trainer)


# ------------------------------------------------------------------------------------------------
# FLOW / EWC / task KL: methods that need no replay
# ------------------------------------------------------------------------------------------------
def _without_replay(**keys) -> dict:
    raw = {k: v for k, v in load_recipe("tiny-cpu-sft-full.yml").items() if not k.startswith("gere_")}
    raw.update(keys)
    return raw


@pytest.mark.parametrize(
    "keys",
    [dict(gere_flow=True), dict(gere_ewc_lambda=100), dict(gere_task_kl=0.1), dict(gere_wise_alpha=0.7),
     dict(gere_flow=True, gere_flow_tau=2.0, gere_ewc_lambda=10.0, gere_freeze_layers=1)],
    ids=["flow", "ewc", "task_kl", "wise", "combined"],
)
def test_methods_without_replay_are_valid_configs(keys, plugin_manager):
    raw = _without_replay(**keys)
    cfg = axolotl_validate(raw)
    for key, value in keys.items():
        assert cfg[key] == value, key
    assert check_config(raw).ok
    args = gere_arguments_from_cfg(cfg)
    assert args.gere_replay is None and all(getattr(args, k) == v for k, v in keys.items())


def test_replay_keys_without_gere_replay_stay_an_error_with_a_method_on(plugin_manager):
    raw = _without_replay(gere_flow=True, gere_replay_per_step=2, gere_regularizer="kl")
    with pytest.raises(Exception, match="gere_replay is not set") as err:
        axolotl_validate(raw)
    assert "gere_replay_per_step" in str(err.value) and "gere_regularizer" in str(err.value)
    problems = check_config(raw, raise_on_error=False).problems
    assert any("gere_replay_per_step" in p and "only act on replay rows" in p for p in problems)
    # keys without replay and without a method: the error also names the methods that need no replay
    with pytest.raises(Exception, match="gere_flow: true") as err:
        axolotl_validate(_without_replay(gere_freeze_layers=1))


def test_methods_with_earlier_task_replay_only(tmp_path, plugin_manager):
    """gere_task_replay without gere_replay: gere_seed seeds the earlier-task schedule, so it is no stray
    key next to FLOW; a key of the general replay still is."""
    earlier = tmp_path / "task1.jsonl"
    earlier.write_text(json.dumps({"prompt": "Is it long?\nAnswer:", "completion": " yes"}) + "\n")
    raw = _without_replay(gere_flow=True, gere_task_replay=[str(earlier)], gere_seed=7)
    cfg = axolotl_validate(raw)
    assert cfg["gere_flow"] is True and cfg["gere_seed"] == 7
    with pytest.raises(Exception, match="gere_regularizer"):
        axolotl_validate({**raw, "gere_regularizer": "kl"})
    with pytest.raises(Exception, match="gere_seed"):  # without earlier tasks, gere_seed seeds nothing
        axolotl_validate(_without_replay(gere_flow=True, gere_seed=7))


def test_methods_without_replay_refuse_dpo_and_stray_sub_keys(plugin_manager):
    raw = load_recipe("tiny-cpu-dpo-full.yml")
    raw["gere_flow"] = True
    with pytest.raises(Exception, match="gere_flow is supported for SFT only"):
        axolotl_validate(raw)
    with pytest.raises(Exception, match="gere_flow_tau is set but gere_flow is false"):
        axolotl_validate(_without_replay(gere_ewc_lambda=1.0, gere_flow_tau=2.0))
    problems = check_config(_without_replay(gere_ewc_lambda=1.0, gere_flow_tau=2.0), raise_on_error=False).problems
    assert any("gere_flow_tau is set but gere_flow is false" in p for p in problems)


def test_wise_works_with_dpo_where_the_sft_only_methods_are_refused(plugin_manager):
    raw = load_recipe("tiny-cpu-dpo-full.yml")
    raw["gere_wise_alpha"] = 0.6
    assert axolotl_validate(raw)["gere_wise_alpha"] == 0.6
    raw["gere_ewc_lambda"] = 1.0  # the refusal names the SFT-only method, not gere_wise_alpha
    with pytest.raises(Exception, match="gere_ewc_lambda is supported for SFT only") as err:
        axolotl_validate(raw)
    assert "gere_wise_alpha" not in str(err.value)


def test_check_reports_an_ewc_state_that_is_not_one(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("x")
    raw = _without_replay(gere_ewc_lambda=1.0, gere_ewc_state=str(other), output_dir=str(tmp_path / "out"))
    problems = check_config(raw, raise_on_error=False).problems
    assert any("gere_ewc_state=" in p and "not empty" in p for p in problems)
