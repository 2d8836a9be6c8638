"""Evaluate a trained model: hf_zoo_rnn/evaluate.py, run from a checkout (installed: `hf-zoo-rnn-evaluate`)."""

from hf_zoo_rnn.evaluate import main

if __name__ == "__main__":
    main()
