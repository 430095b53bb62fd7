"""The external baselines (TRL's SDFT trainer, PEFT's OSF) run through the sequence runner on CPU.

They need ``trl.experimental.sdft`` (TRL >= 1.9) and ``peft.OSFConfig`` (PEFT >= 0.20): both test
environments of ``make test`` (Axolotl 0.19 stack, newest TRL) have them; elsewhere the tests skip with the
reason :func:`~gere_plugin.baselines.baseline_problem` gives.
"""

from __future__ import annotations

import pytest

from gere_plugin.baselines import SDFT_TEMPLATE, baseline_problem, osf_preserved_fraction, sdft_rows
from gere_plugin.config import GeReConfigError
from gere_plugin.continual import METHODS, TrainSettings, run_sequence

from .test_continual import TASKS

SETTINGS = TrainSettings(max_steps=2, per_device_train_batch_size=4, max_length=48, learning_rate=1e-3, logging_steps=1,
                         eval_batch_size=8, warmup_ratio=0.0, print_logs=False)


def test_sdft_rows_and_osf_schedule_by_hand():
    rows = sdft_rows([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    assert rows == [{"prompt": "Q: 2+2?\nA:", "privileged_context": "Q: 2+2?\nA: 4"}]
    teacher = SDFT_TEMPLATE.format(**rows[0])
    assert teacher.endswith("\n\nQ: 2+2?\nA:")  # the demonstration comes first, the prompt last
    with pytest.raises(GeReConfigError, match="prompt/completion"):
        sdft_rows([{"text": "no prompt"}])
    assert [osf_preserved_fraction(k, 4) for k in range(4)] == [0.5, 0.625, 0.75, 0.875]
    with pytest.raises(GeReConfigError, match="unknown external baseline"):
        baseline_problem("lwf")
    assert METHODS["sdft"].external == "sdft" and METHODS["osf"].external == "osf"
    assert not METHODS["sdft"].replay and not METHODS["osf"].replay


@pytest.mark.skipif(baseline_problem("sdft") is not None, reason=str(baseline_problem("sdft")))
def test_sdft_baseline_runs_a_sequence_on_cpu(tiny_dir, tmp_path):
    result = run_sequence(str(tiny_dir), TASKS[:1], "sdft", tmp_path / "sdft", settings=SETTINGS, seed=3)
    (stage,) = result["stages"]
    assert stage["steps"] == 2
    assert stage["start_fingerprint"] != stage["end_fingerprint"], "SDFT did not change the weights"
    assert [r["step"] for r in stage["history"] if "loss" in r] == [1, 2]


@pytest.mark.skipif(baseline_problem("osf") is not None, reason=str(baseline_problem("osf")))
def test_osf_baseline_runs_a_sequence_and_merges_after_each_task(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from gere_plugin.continual import model_fingerprint

    result = run_sequence(str(tiny_dir), TASKS, "osf", tmp_path / "osf", settings=SETTINGS, seed=3,
                          save_final_model=True)
    s0, s1 = result["stages"]
    assert s1["start_fingerprint"] == s0["end_fingerprint"] != s0["start_fingerprint"]
    assert s1["end_fingerprint"] != s1["start_fingerprint"]
    # merged back after each task: the saved model is a plain transformers model with the base's parameter
    # names (no OSF layer left), holding exactly the weights the sequence ended with
    final = AutoModelForCausalLM.from_pretrained(str(tmp_path / "osf" / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    assert [n for n, _ in final.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert model_fingerprint(final) == s1["end_fingerprint"]
