"""Reward training from Python with ESTrainer, written as a TRL GRPO script is (run `make train` first):

    python scripts/es_example.py [--model outputs/default] [--output_dir outputs/es-example] [--max_steps 60]

The `make train` model continues 4-word openings of KJV verses; the reward is the distinct-4-gram ratio of 40 greedy
tokens (text that does not repeat itself) plus 0.1 x their fluency under the frozen starting model (so that the text
stays text). 64 rank-1 members per step generate as one batch; about a minute on a 2-core CPU. It prints the held-out
greedy reward before and after, and leaves a `from_pretrained` folder with its model card in --output_dir.
"""

import argparse
import copy
import statistics

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_zoo_rnn import ESConfig, ESTrainer
from hf_zoo_rnn.data.prompts import kjv_openings
from hf_zoo_rnn.rewards import Fluency, RewardObjective, distinct_4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/default")
    parser.add_argument("--output_dir", default="outputs/es-example")
    parser.add_argument("--max_steps", type=int, default=60)
    options = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(options.model)
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    fluency = Fluency(copy.deepcopy(model).eval().requires_grad_(False), tokenizer)  # scored by the frozen start
    train_dataset = Dataset.from_list(kjv_openings("train", 4))
    # 32 openings from Jude and Revelation, never trained on: the evaluation reads 4 batches of 8, each prompt once
    eval_dataset = Dataset.from_list(kjv_openings("validation", 4)[:32])

    args = ESConfig(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        per_device_train_batch_size=8,  # prompts per step
        max_completion_length=40,
        reward_weights=[1.0, 0.1],
        population_size=64,  # 32 antithetic pairs of rank-1 members, generating as one batch
        sigma=0.01,
        learning_rate=1e-3,
        anchor_decay=0.1,
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        overwrite_output_dir=True,
        use_cpu=True,
    )
    trainer = ESTrainer(
        model=model,
        reward_funcs=[distinct_4, fluency],
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    before = RewardObjective(tokenizer, [distinct_4, fluency], [1.0, 0.1], max_new_tokens=40)
    start = statistics.mean(before.prompt_rewards(model, list(eval_dataset["prompt"]), {}))
    final = trainer.train()
    print(
        f"held-out greedy reward (32 prompts): {start:.4f} at the start, {final['eval_reward']:.4f} after "
        f"{options.max_steps} steps"
    )
    print(f"saved to {options.output_dir}")


if __name__ == "__main__":
    main()
