"""ESTrainer / ESConfig: reward training from Python as TRL users write it. A GRPO quickstart runs after renaming two
classes; any transformers causal LM trains (member by member); rewards get TRL's keywords and may return None;
callbacks see TRL's metric names; the run equals the command line's bitwise and resumes bitwise."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import train_add_model
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainerCallback

from hf_zoo_rnn import ESConfig, ESTrainer
from hf_zoo_rnn.data.prompts import PromptStream
from hf_zoo_rnn.training import ZooTrainer, parse_arguments
from hf_zoo_rnn.training.es_config import ESConfigError

PROMPTS = ["12+30 ", "5+5 ", "7+8 ", "20+22 ", "3+4 ", "9+9 "]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return train_add_model(tmp_path_factory.mktemp("es") / "ce", max_steps=30)


def exact_sum(prompts, completions, **_):
    values = []
    for prompt, completion in zip(prompts, completions, strict=True):
        a, b = prompt.strip().split("+")
        values.append(float(completion.strip().split(" ")[0] == str(int(a) + int(b))))
    return values


def digits(prompts, completions, completion_ids, trainer_state, **_):
    """The share of digits in a completion; None (not applicable) for an empty one."""
    assert trainer_state.global_step >= 0 and len(completion_ids) == len(completions)
    return [sum(c.isdigit() for c in text) / len(text) if text.strip() else None for text in completions]


GRPO_SCRIPT = """
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

dataset = Dataset.from_dict({"prompt": PROMPTS})
training_args = GRPOConfig(output_dir=OUTPUT, max_steps=2, per_device_train_batch_size=4, num_generations=2,
                           max_completion_length=6, reward_weights=[1.0, 0.1], logging_steps=1, use_cpu=True,
                           report_to="none", save_strategy="no", learning_rate=1e-3)
trainer = GRPOTrainer(model=MODEL, reward_funcs=[exact_sum, digits], args=training_args, train_dataset=dataset)
trainer.train()
"""


def run_script(source: str, **names) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    scope = {"PROMPTS": PROMPTS, "exact_sum": exact_sum, "digits": digits, **names}
    exec(compile(source, "grpo_quickstart.py", "exec"), scope)
    return scope


def test_a_grpo_quickstart_runs_as_es_after_renaming_two_classes(start, tmp_path):
    pytest.importorskip("trl")
    run_script(GRPO_SCRIPT, OUTPUT=str(tmp_path / "grpo"), MODEL=str(start))  # the script as TRL runs it
    ported = GRPO_SCRIPT.replace(
        "from trl import GRPOConfig, GRPOTrainer", "from hf_zoo_rnn import ESConfig, ESTrainer"
    )
    ported = ported.replace("GRPOConfig", "ESConfig").replace("GRPOTrainer", "ESTrainer")
    scope = run_script(ported, OUTPUT=str(tmp_path / "es"), MODEL=str(start))
    trained, initial = load_file(tmp_path / "es" / "model.safetensors"), load_file(start / "model.safetensors")
    assert not all(torch.equal(trained[k], initial[k]) for k in initial)
    card = (tmp_path / "es" / "README.md").read_text()
    assert "exact_sum,digits" in card and "(weights 1.0,0.1)" in card and str(start) in card
    assert scope["trainer"].state.global_step == 2


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs, self.events = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step", state.global_step))

    def on_save(self, args, state, control, **kwargs):
        self.events.append(("save", state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("end", state.global_step))


def test_callbacks_see_trls_metric_names_and_none_rewards_are_left_out(start, tmp_path):
    recorder = Recorder()
    config = ESConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=3,
        logging_steps=1,
        save_steps=1,
        population_size=4,
        max_completion_length=4,
        use_cpu=True,
    )
    prompts = Dataset.from_dict({"prompt": PROMPTS})
    trainer = ESTrainer(str(start), [exact_sum, digits], config, train_dataset=prompts, callbacks=[recorder])
    trainer.train()
    names = {
        "reward",
        "reward_std",
        "rewards/exact_sum/mean",
        "rewards/exact_sum/std",
        "rewards/digits/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/min_length",
        "completions/max_length",
    }
    assert names <= set(recorder.logs[0]) and all(math.isfinite(recorder.logs[0][n]) for n in names)
    assert recorder.events[:3] == [("step", 1), ("save", 1), ("step", 2)] and recorder.events[-1] == ("end", 2)
    trainer.args.hub_model_id = "tester/es-trainer"  # the suite's loopback Hub (conftest)
    assert "es-trainer" in trainer.push_to_hub()
    pushed = AutoModelForCausalLM.from_pretrained("tester/es-trainer")
    local = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(pushed.state_dict()[k], v) for k, v in local.items())


def test_any_causal_lm_trains_member_by_member(bpe_tokenizer, tmp_path):
    config = GPT2Config(
        vocab_size=len(bpe_tokenizer),
        n_positions=64,
        n_embd=16,
        n_layer=1,
        n_head=2,
        eos_token_id=bpe_tokenizer.eos_token_id,
        pad_token_id=bpe_tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def length_reward(prompts, completions, **_):
        return [len(c) / 10 for c in completions]

    args = ESConfig(
        output_dir=str(tmp_path / "gpt2"),
        max_steps=2,
        per_device_train_batch_size=2,
        population_size=4,
        max_completion_length=5,
        sigma=0.1,
        use_cpu=True,
    )
    prompts = Dataset.from_dict({"prompt": ["You may", "the terms"]})
    trainer = ESTrainer(model, length_reward, args, train_dataset=prompts, processing_class=bpe_tokenizer)
    assert not trainer.engine and trainer.train() is not None
    assert trainer.engine.estimator.batched is False  # not an hf_zoo_rnn model: its own generate, one member at a time
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "gpt2" / "model.safetensors").exists() and "gpt2" in (
        tmp_path / "gpt2" / "README.md"
    ).read_text()


def test_the_python_api_equals_the_command_line_bitwise_and_resumes_bitwise(start, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a}+{2 * a + 1} "}) + "\n" for a in range(60)))
    # the command line holds out 5% of a file's prompts by hash: ESTrainer gets the same two parts as datasets
    train, held_out = (
        Dataset.from_list(PromptStream(str(rows), split, 1, 0).rows) for split in ("train", "validation")
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    command_line = ["--output_dir", str(tmp_path / "cli"), "--estimator", "es", "--init_from", str(start)]
    command_line += ["--prompts", str(rows)]
    command_line += ["--rewards", "test_es_trainer:exact_sum,test_es_trainer:digits", "--reward_weights", "1,0.1"]
    command_line += ["--zo_num_probes", "4", "--zo_eps", "0.05", "--zo_lr", "0.01", "--zo_update_rule", "adam"]
    command_line += ["--zo_lr_schedule", "constant", "--zo_warmup_steps", "0", "--anchor_decay", "0.1"]
    command_line += ["--zo_loss_shaping", "per_prompt", "--zo_perturbation", "lowrank", "--zo_perturbation_rank", "2"]
    command_line += ["--batch_size", "3", "--max_new_tokens", "4", "--max_steps", "4", "--save_steps", "2"]
    command_line += ["--eval_steps", "0", "--logging_steps", "1", "--log_with", "none"]
    ZooTrainer(*parse_arguments(command_line)).train()

    def es(folder, steps, resume=None):
        AcceleratorState._reset_state(reset_partial_state=True)
        config = ESConfig(
            output_dir=str(tmp_path / folder),
            max_steps=steps,
            per_device_train_batch_size=3,
            population_size=8,
            sigma=0.05,
            learning_rate=0.01,
            rank=2,
            fitness_shaping="per_prompt",
            anchor_decay=0.1,
            max_completion_length=4,
            save_steps=2,
            logging_steps=1,
            use_cpu=True,
            seed=0,
            reward_weights=[1.0, 0.1],
        )
        ESTrainer(str(start), [exact_sum, digits], config, train, held_out).train(resume_from_checkpoint=resume)

    es("python", 4)
    es("resumed", 2)
    es("resumed", 4, resume=True)
    cli, python, resumed = (load_file(tmp_path / n / "model.safetensors") for n in ("cli", "python", "resumed"))
    assert all(torch.equal(cli[k], python[k]) and torch.equal(python[k], resumed[k]) for k in cli)


def test_grpo_only_options_and_impossible_settings_are_one_clear_error(start, tmp_path):
    with pytest.raises(ESConfigError, match="GRPO's beta, use_vllm .*beta: use anchor_decay"):
        ESConfig(output_dir=str(tmp_path), beta=0.04, use_vllm=True)
    with pytest.raises(ESConfigError, match="population_size must be even"):
        ESConfig(output_dir=str(tmp_path), population_size=5)
    with pytest.raises(ESConfigError, match="no 'prompt' column"):
        ESTrainer(str(start), exact_sum, ESConfig(output_dir=str(tmp_path)), Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ESConfigError, match="no chat template"):
        conversation = [{"role": "user", "content": "1+1"}]
        ESTrainer(
            str(start), exact_sum, ESConfig(output_dir=str(tmp_path)), Dataset.from_dict({"prompt": [conversation]})
        )
