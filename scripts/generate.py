"""Continue a prompt with a trained model: hf_zoo_rnn/generate.py, run from a checkout (installed: `hf-zoo-rnn-generate`)."""

from hf_zoo_rnn.generate import main

if __name__ == "__main__":
    main()
