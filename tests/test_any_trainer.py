"""The shared replay step on a plain transformers.Trainer (with_gere) and in place (enable_gere)."""

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gere_plugin import GeReArguments, enable_gere, with_gere

from .conftest import general_texts


@pytest.fixture
def lm_dataset(tiny_tokenizer):
    from datasets import Dataset

    enc = tiny_tokenizer(general_texts(16, seed=11), truncation=True, max_length=24)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=3,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2,
                             disable_tqdm=True)


@pytest.mark.parametrize("how", ["with_gere", "enable_gere"])
def test_plain_trainer_gets_gere(tmp_path, tiny_model, tiny_tokenizer, lm_dataset, replay_file, how):
    gere = GeReArguments(gere_replay=str(replay_file), gere_replay_size=32, gere_replay_max_length=32,
                         gere_replay_per_step=2, gere_state_cache=str(tmp_path / "c"), gere_freeze_layers=1)
    collator = DataCollatorForLanguageModeling(tiny_tokenizer, mlm=False)
    kw = dict(model=tiny_model, args=_args(tmp_path), train_dataset=lm_dataset, data_collator=collator,
              processing_class=tiny_tokenizer)
    if how == "with_gere":
        trainer = with_gere(Trainer)(gere_args=gere, **kw)
    else:
        trainer = Trainer(**kw)
        enable_gere(trainer, gere)
    emb = tiny_model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "gere/reg_loss" in h]
    assert len(logs) == 3 and logs[0]["gere/reg_loss"] < 1e-6 and logs[-1]["gere/reg_loss"] > 0
    assert [h["gere/replay_rows"] for h in logs] == [2.0, 2.0, 2.0]
    assert torch.equal(emb, tiny_model.model.layers[0].mlp.up_proj.weight)
    assert type(trainer).__name__ == "GeReTrainer"
