"""Train a ZooRnn language model: hf_zoo_rnn/train.py, run from a checkout (installed: `hf-zoo-rnn-train`, or
`accelerate launch -m hf_zoo_rnn.train`).

accelerate launch scripts/train.py                                   # the embedded default: KJV, ~2.5 min on 2 cores
accelerate launch scripts/train.py --config configs/train/copy.yaml --max_steps 50
accelerate launch --multi_gpu --num_processes 2 ... scripts/train.py # probes split over processes
"""

from hf_zoo_rnn.train import main

if __name__ == "__main__":
    main()
