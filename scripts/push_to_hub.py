"""Push a trained output folder to the Hub: hf_zoo_rnn/push_to_hub.py, run from a checkout (installed: `hf-zoo-rnn-push`)."""

from hf_zoo_rnn.push_to_hub import main

if __name__ == "__main__":
    main()
