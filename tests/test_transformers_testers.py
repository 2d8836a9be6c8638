"""transformers' own model and config tests (ModelTesterMixin, ConfigTester) run against ZooRnn, LSTM and GRU, the
way transformers tests its RWKV / Mamba / xLSTM models.

Their files ship in the source distribution of the installed transformers version, which is downloaded from the
package registry once (`pip download --no-binary :all: --no-deps`, cached under ~/.cache/hf_zoo_rnn) and imported
in place; nothing of transformers' code is copied here. The sdist leaves out three modules those files import; they
are stood in for by empty ones (below), which only means the export and generate test suites they would add do
not run: tests/test_modeling.py tests generate, left padding and the pipeline itself.
"""

import importlib
import os
import subprocess
import sys
import tarfile
import unittest
from pathlib import Path
from unittest.mock import patch

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from hf_zoo_rnn import ZooRnnConfig, ZooRnnForCausalLM, ZooRnnModel

pytestmark = pytest.mark.transformers  # depends on the transformers release: CI runs it on the whole range

STAND_INS = {  # module -> source: what the sdist's test files import but the sdist does not hold
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}


def transformers_tests() -> Path | None:
    """A package `transformers_sdist_tests` holding the sdist's common test files; None when it cannot be had."""
    version = transformers.__version__
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_zoo_rnn" / f"transformers-{version}"
    package = cache / "transformers_sdist_tests"
    if not (package / "test_modeling_common.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        pip_download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
        download = [*pip_download, f"transformers=={version}", "--dest", str(cache)]
        if subprocess.run(download, capture_output=True, timeout=600).returncode != 0:
            return None
        with tarfile.open(next(cache.glob("transformers-*.tar.gz"))) as archive:
            for name in ("test_modeling_common.py", "test_configuration_common.py"):
                member = archive.getmember(f"transformers-{version}/tests/{name}")
                (package / name).parent.mkdir(parents=True, exist_ok=True)
                (package / name).write_bytes(archive.extractfile(member).read())
        for module, source in STAND_INS.items():
            (package / module).parent.mkdir(parents=True, exist_ok=True)
            (package / module).write_text(source)
        for folder in (package, *((package / m).parent for m in STAND_INS)):
            (folder / "__init__.py").touch()
    return cache


location = transformers_tests()
if location is None:
    pytest.skip("transformers' source distribution could not be downloaded", allow_module_level=True)
sys.path.insert(0, str(location))
ConfigTester = importlib.import_module("transformers_sdist_tests.test_configuration_common").ConfigTester
common = importlib.import_module("transformers_sdist_tests.test_modeling_common")


class ZooRnnModelTester:
    def __init__(self, parent, cell: str):
        self.parent, self.cell = parent, cell
        self.batch_size, self.seq_length, self.vocab_size = 3, 9, 99
        self.num_heads, self.head_dim, self.num_hidden_layers = 2, 8, 2
        self.hidden_size = self.num_heads * self.head_dim
        self.is_training = True

    def get_config(self) -> ZooRnnConfig:
        return ZooRnnConfig(
            cell=self.cell,
            vocab_size=self.vocab_size,
            embedding_size=16,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_hidden_layers=self.num_hidden_layers,
            chunk_size=4,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), {"input_ids": input_ids}


class ZooRnnLstmModelTest(common.ModelTesterMixin, unittest.TestCase):
    cell = "lstm"
    all_model_classes = (ZooRnnModel, ZooRnnForCausalLM)
    all_generative_model_classes = ()  # the generate suite is not in the sdist (see the module docstring)
    has_attentions = False  # a recurrence, as Mamba and xLSTM set it
    test_torch_exportable = False  # the export suite is not in the sdist

    def setUp(self):
        # transformers' tests tell a base model (no loss) from a causal LM (labels added) by its auto mappings' class
        # names, which list built-in models only: list ZooRnn there, as MambaModel and MambaForCausalLM are
        for mapping, name in (
            (MODEL_MAPPING_NAMES, "ZooRnnModel"),
            (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "ZooRnnForCausalLM"),
        ):
            patcher = patch.dict(mapping, {"zoo_rnn": name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = ZooRnnModelTester(self, self.cell)
        # no attention heads to compare, as Mamba's tester passes
        self.config_tester = ConfigTester(
            self, config_class=ZooRnnConfig, common_properties=["hidden_size", "num_hidden_layers"]
        )

    def test_config(self):
        self.config_tester.run_common_tests()


class ZooRnnGruModelTest(ZooRnnLstmModelTest):
    cell = "gru"
