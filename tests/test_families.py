"""Loss families: which combine rule and dynamic weight each trainer gets, and which trainers are refused."""

from __future__ import annotations

import importlib

import pytest
from transformers import Trainer

from gere_plugin import (
    GeReConfigError,
    GeReDPOTrainer,
    GeReGRPOTrainer,
    GeReSFTTrainer,
    enable_gere,
    with_gere,
)
from gere_plugin.families import FAMILIES, family_for
from gere_plugin.trainer import GeReTrainerMixin


def _trl(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(
    ("cls", "family", "combine", "basis"),
    [
        ("trl.SFTTrainer", "sft", "mean", "task"),
        ("trl.DPOTrainer", "dpo", "sum", "task"),
        ("trl.GRPOTrainer", "grpo", "sum", "replay_ce"),
        ("transformers.Trainer", "sft", "mean", "task"),
    ],
)
def test_known_trainers_get_their_family(cls, family, combine, basis):
    got = family_for(_trl(cls))
    assert (got.name, got.combine, got.weight_basis) == (family, combine, basis)


def test_the_gere_trainers_declare_the_family_of_their_parent():
    assert [FAMILIES[c.gere_family].name for c in (GeReSFTTrainer, GeReDPOTrainer, GeReGRPOTrainer)] == ["sft", "dpo", "grpo"]
    assert FAMILIES["grpo"].batch_unit == "prompts" and FAMILIES["sft"].batch_unit == FAMILIES["dpo"].batch_unit == "rows"


def test_subclasses_outside_trl_keep_the_family_of_their_trl_parent():
    from trl import GRPOTrainer

    class MyGRPO(GRPOTrainer):
        pass

    assert family_for(MyGRPO).name == "grpo"
    made = with_gere(MyGRPO)
    assert made.gere_family == "grpo" and issubclass(made, GeReTrainerMixin)


@pytest.mark.parametrize(
    "cls",
    [
        "trl.KTOTrainer",
        "trl.RLOOTrainer",
        "trl.RewardTrainer",
        "trl.experimental.online_dpo.OnlineDPOTrainer",
        "trl.experimental.orpo.ORPOTrainer",
        "trl.experimental.gkd.GKDTrainer",  # an SFTTrainer subclass with a distillation loss: not SFT's CE
    ],
)
def test_other_trl_trainers_are_refused_by_name(cls):
    klass = _trl(cls)
    with pytest.raises(GeReConfigError, match=rf"{klass.__name__}.*family='sft' \| 'dpo' \| 'grpo'"):
        with_gere(klass)
    # the caller may state the family of a loss it knows
    assert with_gere(klass, family="dpo").gere_family == "dpo"


def test_combine_that_contradicts_the_trainer_is_refused():
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    with pytest.raises(GeReConfigError, match="combine='mean' is wrong for GRPOTrainer"):
        with_gere(GRPOTrainer, combine="mean")  # would halve the policy-gradient term
    with pytest.raises(GeReConfigError, match="combine='mean' is wrong for DPOTrainer"):
        with_gere(DPOTrainer, combine="mean")
    assert with_gere(SFTTrainer, combine="mean").gere_family == "sft"
    with pytest.raises(GeReConfigError, match="contradicts family='grpo'"):
        with_gere(Trainer, combine="mean", family="grpo")
    with pytest.raises(GeReConfigError, match="family='ppo' is not one of"):
        with_gere(Trainer, family="ppo")


def test_a_plain_trainer_takes_the_older_combine_spelling():
    assert with_gere(Trainer).gere_family == "sft"
    assert with_gere(Trainer, combine="sum").gere_family == "dpo"
    assert with_gere(Trainer, family="grpo").gere_family == "grpo"


def test_enable_gere_refuses_a_built_kto_trainer_and_leaves_it_alone(tmp_path, tiny_model, tiny_tokenizer, replay_file):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from gere_plugin import GeReArguments

    data = Dataset.from_list([{"prompt": f"Q{i}: good?", "completion": " yes" if i % 2 else " no", "label": bool(i % 2)}
                              for i in range(8)])
    args = KTOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True)
    trainer = KTOTrainer(model=tiny_model, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    gere = GeReArguments(gere_replay=str(replay_file), gere_replay_size=16, gere_state_cache=str(tmp_path / "c"))
    with pytest.raises(GeReConfigError, match="KTOTrainer"):
        enable_gere(trainer, gere)
    assert type(trainer) is KTOTrainer and not hasattr(trainer, "gere_step")
    assert not (tmp_path / "c").exists(), "refused before any state was built"
