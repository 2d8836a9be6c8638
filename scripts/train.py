"""Train a ZooRnn language model with zero-order optimisation, local gradients, or a BPTT baseline.

accelerate launch scripts/train.py                                   # the embedded default: KJV, ~2.5 min on 2 cores
accelerate launch scripts/train.py --config configs/train/copy.yaml --max_steps 50
accelerate launch --multi_gpu --num_processes 2 ... scripts/train.py # probes split over processes
Installed from a wheel, the same is `accelerate launch -m hf_zoo_rnn.train ...`.
"""

from hf_zoo_rnn.train import main

if __name__ == "__main__":
    main()
