"""Model config files: the paper's shapes have the paper's parameter counts, and bad files fail clearly."""

from pathlib import Path

import pytest
import torch

from hf_zoo_rnn import ZooRnnForCausalLM
from hf_zoo_rnn.config_files import ConfigFileError, load_model_config
from hf_zoo_rnn.training import parse_arguments

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"

# The paper's table (which includes an accidental trainable initial state of 2 * hidden parameters).
PAPER_PARAMETERS = {
    "tiny": 150_740,
    "small": 1_139_700,
    "medium": 10_627_700,
    "large": 112_606_100,
    "xlarge": 1_162_045_100,
    "xxlarge": 4_506_010_100,
}
NOMINAL_PARAMETERS = {"zoo-20m": 20e6, "zoo-125m": 125e6, "zoo-1b": 1e9}


def count_parameters(config) -> int:
    with torch.device("meta"):  # no memory for the billion-parameter shapes
        return ZooRnnForCausalLM(config).num_parameters()


@pytest.mark.parametrize("name,expected", PAPER_PARAMETERS.items())
def test_paper_shapes_match_the_paper_parameter_count(name, expected):
    config = load_model_config(CONFIGS / f"{name}.yaml")
    count = count_parameters(config)
    assert abs(count - expected) / expected < 0.01
    assert count == expected - 2 * config.hidden_size  # exactly the paper's count without the initial state


@pytest.mark.parametrize("name,nominal", NOMINAL_PARAMETERS.items())
def test_modern_shapes_are_near_their_nominal_size(name, nominal):
    count = count_parameters(load_model_config(CONFIGS / f"{name}.yaml"))
    assert abs(count - nominal) / nominal < 0.1


def test_every_model_config_file_loads():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) >= 9
    for path in files:
        load_model_config(path)


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("cell: lstm\nnum_head: 4\n")
    with pytest.raises(ConfigFileError, match=r"typo\.yaml: unknown key\(s\) \['num_head'\]"):
        load_model_config(path)


def test_invalid_value_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_heads: 0\n")
    with pytest.raises(ConfigFileError, match=r"bad\.yaml: .*num_heads must be a positive integer"):
        load_model_config(path)
    path.write_text("num_heads: four\n")
    with pytest.raises(ConfigFileError, match=r"bad\.yaml: .*num_heads"):
        load_model_config(path)


def test_missing_and_malformed_files_fail_clearly(tmp_path):
    with pytest.raises(ConfigFileError, match="config file not found"):
        load_model_config(tmp_path / "nope.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("cell: [lstm\n")
    with pytest.raises(ConfigFileError, match=r"broken\.yaml: not valid YAML"):
        load_model_config(path)
    path.write_text("- lstm\n")
    with pytest.raises(ConfigFileError, match="expected a mapping"):
        load_model_config(path)


def test_built_in_configs_are_reachable_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout, as an installed package is used
    assert load_model_config("tiny") == load_model_config("configs/model/tiny.yaml")
    assert load_model_config("tiny") == load_model_config(CONFIGS / "tiny.yaml")
    with pytest.raises(ConfigFileError, match=r"config file not found: tinny \(built-in model configs: .*tiny"):
        load_model_config("tinny")
    model_args, _, train_args, _ = parse_arguments(["--config", "char-lm"])
    assert model_args.model_config == "tiny" and train_args.estimator == "probes"
