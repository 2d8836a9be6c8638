"""Train a ZooRnn language model with zero-order optimisation (or a BPTT baseline).

accelerate launch scripts/train.py                                   # the embedded default: KJV, ~7 min on 2 cores
accelerate launch scripts/train.py --config configs/train/copy.yaml --max_steps 50
accelerate launch --multi_gpu --num_processes 2 ... scripts/train.py # probes split over processes
"""

from hf_zoo_rnn.training import ZooTrainer, parse_arguments


def main() -> None:
    trainer = ZooTrainer(*parse_arguments())
    trainer.train()
    trainer.accelerator.end_training()  # flush the trackers and end the process group


if __name__ == "__main__":
    main()
