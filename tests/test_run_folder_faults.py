"""A run folder handed over by someone else, and a new user's mistakes: nothing the trainer writes, reads or deletes
leaves the run folder (a symbolic link is refused in one line naming it, or never followed); a manifest names only
files inside its checkpoint and all of them; every malformed checkpoint or model file is one line naming it, and
`latest` falls back to the newest good checkpoint; only the trainer's own names are ever removed; the data state
stays flat whatever one row's length; options that cannot train are one line each."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import FAST_TRAINING, run_script
from safetensors.torch import load_file
from test_machines import can_unshare

from hf_zoo_rnn.config_files import ConfigFileError
from hf_zoo_rnn.data import DataError, PackedStream, char_tokenizer, open_text_source
from hf_zoo_rnn.data.corpus import SEGMENT_CHARS
from hf_zoo_rnn.hub import not_pushed
from hf_zoo_rnn.training import CheckpointError, ZooTrainer, parse_arguments
from hf_zoo_rnn.training.checkpoints import (
    checkpoint_problem,
    latest_checkpoint,
    load_state,
    save_state,
    write_manifest,
)
from hf_zoo_rnn.training.run_folder import OutputDirError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = ["--save_steps", "1", "--eval_steps", "0", "--save_total_limit", "5", "--log_with", "none"]


def run(output_dir, *extra) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    return ZooTrainer(*parse_arguments(["--output_dir", str(output_dir), *FAST_TRAINING, *extra])).train()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run of 3 steps with checkpoint-1..3, and one of 4 steps to compare resumes with."""
    folder = tmp_path_factory.mktemp("finished")
    run(folder / "run", "--max_steps", "3", *STEPS)
    run(folder / "whole", "--max_steps", "4", *STEPS)
    return folder


def copy_run(finished, tmp_path):
    return shutil.copytree(finished / "run", tmp_path / "run", symlinks=True)


def same_final_weights(a, b) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# -- writes outside the run folder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".run.lock", "metrics.jsonl", "tokenizer", "tokenizer/tokenizer.json", "hf_zoo_rnn"])
def test_a_link_where_the_trainer_writes_is_refused_and_its_target_kept(finished, tmp_path, name):
    out = copy_run(finished, tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "tokenizer.json").write_text("the user's own")
    link = out / name
    if link.is_dir():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    link.symlink_to(victim if name in ("tokenizer", "hf_zoo_rnn") else victim / "tokenizer.json")
    for resume in (["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]):
        with pytest.raises(OutputDirError, match=rf"{link} is a symbolic link"):
            run(out, "--max_steps", "4", *STEPS, *resume)
    assert [p.name for p in victim.iterdir()] == ["tokenizer.json"]
    assert (victim / "tokenizer.json").read_text() == "the user's own"


def test_an_output_folder_that_is_a_link_a_file_or_a_fifo_log_is_one_line(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputDirError, match=rf"{tmp_path / 'link'} is a symbolic link .* --output_dir {real}"):
        run(tmp_path / "link", "--max_steps", "1", *STEPS)
    (tmp_path / "file").write_text("notes")
    with pytest.raises(OutputDirError, match=rf"{tmp_path / 'file'} is a file, not a folder"):
        run(tmp_path / "file", "--max_steps", "1", *STEPS)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "metrics.jsonl")  # opening it to append would wait for a reader forever
    with pytest.raises(OutputDirError, match=rf"{fifo / 'metrics.jsonl'} is not a regular file"):
        run(fifo, "--max_steps", "1", *STEPS)
    os.mkfifo(tmp_path / "lock_fifo.run.lock")
    (tmp_path / "lockdir").mkdir()
    os.rename(tmp_path / "lock_fifo.run.lock", tmp_path / "lockdir" / ".run.lock")
    with pytest.raises(OutputDirError, match=r"\.run\.lock is not a regular file"):
        run(tmp_path / "lockdir", "--max_steps", "1", *STEPS)


def test_a_checkpoint_link_is_never_followed_and_latest_falls_back(finished, tmp_path, caplog):
    out = copy_run(finished, tmp_path)
    elsewhere = shutil.move(out / "checkpoint-3", tmp_path / "elsewhere")
    (out / "checkpoint-3").symlink_to(elsewhere)
    assert "checkpoint-3 is a symbolic link" in checkpoint_problem(out / "checkpoint-3")
    with pytest.raises(CheckpointError, match=r"checkpoint-3 is a symbolic link"):
        run(out, "--max_steps", "4", *STEPS, "--resume_from_checkpoint", str(out / "checkpoint-3"))
    with caplog.at_level("WARNING"):
        run(out, "--max_steps", "4", *STEPS, "--save_total_limit", "1", "--resume_from_checkpoint", "latest")
    assert "checkpoint-3 does not verify: " in caplog.text and same_final_weights(out, finished / "whole")
    assert not (out / "checkpoint-3").is_symlink() and (elsewhere / "model.safetensors").is_file()  # pruned as a link


def test_a_link_inside_a_checkpoint_or_its_staging_folder_is_never_followed(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not the run's")
    (out / "checkpoint-3" / "notes.txt").symlink_to(secret)
    assert "notes.txt is a symbolic link" in checkpoint_problem(out / "checkpoint-3")
    assert not_pushed(str(out / "checkpoint-3"), ["notes.txt", "model.safetensors"]) == {"notes.txt"}  # nor pushed
    (out / ".tmp-checkpoint-4").symlink_to(tmp_path)  # a save replaces the link, never writes through it
    run(out, "--max_steps", "4", *STEPS, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert secret.read_text() == "not the run's" and not (tmp_path / "model.safetensors").exists()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4").is_symlink()


# -- manifests -------------------------------------------------------------------------------------------------------


def edit_manifest(checkpoint, change) -> None:
    manifest = checkpoint / "manifest.json"
    data = json.loads(manifest.read_text())
    change(data["files"])
    manifest.write_text(json.dumps(data))


def test_a_manifest_names_only_and_all_the_files_of_its_checkpoint(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    checkpoint = out / "checkpoint-3"
    (tmp_path / "outside.bin").write_bytes(b"x")
    for name in ("../../outside.bin", "/etc/hostname", "sub/../../x"):
        edit_manifest(checkpoint, lambda files, n=name: files.update({n: {"bytes": 1, "sha256": "0" * 64}}))
        assert f"manifest.json names {name!r}, a path outside" in checkpoint_problem(checkpoint)
        edit_manifest(checkpoint, lambda files, n=name: files.pop(n))
    assert checkpoint_problem(checkpoint) is None
    edit_manifest(checkpoint, lambda files: files.pop("optimizer.safetensors"))
    assert "optimizer.safetensors is not in manifest.json (a partial manifest" in checkpoint_problem(checkpoint)
    (checkpoint / "manifest.json").write_text('{"files": {}}')
    assert checkpoint_problem(checkpoint).endswith("manifest.json lists no files")
    bad_manifests = [
        ('{"files": []}', "has no files object"),
        ("[1]", "holds a list, not a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "is nested too deep"),
        ("{", "is not valid JSON"),
        ('{"files": {"config.json": 3}}', "the entry of 'config.json' is not"),
    ]
    for text, message in bad_manifests:
        (checkpoint / "manifest.json").write_text(text)
        assert message in checkpoint_problem(checkpoint), text[:20]
    (checkpoint / "manifest.json").write_text('{"files": {}}')  # damaged: latest resumes checkpoint-2
    run(out, "--max_steps", "4", *STEPS, "--resume_from_checkpoint", "latest")
    assert same_final_weights(out, finished / "whole")


def test_a_checkpoint_without_a_required_file_is_incomplete(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    required_files = [
        ("tokenizer.json", "tokenizer.json is missing"),
        ("config.json", "config.json is missing"),
        ("process_0.json", "holds no process state"),
    ]
    for name, message in required_files:
        checkpoint = shutil.copytree(out / "checkpoint-3", tmp_path / name)
        (checkpoint / name).unlink()
        write_manifest(checkpoint)  # a consistent manifest, as a partial copy re-signed would have
        assert message in checkpoint_problem(checkpoint)


# -- malformed files -------------------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def safetensors_with(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


MALFORMED = {
    "model.safetensors": [
        (safetensors_with(b"not json"), "model.safetensors is not a safetensors file (its header is not JSON)"),
        (
            safetensors_with(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8),
            "tensor 'w' lies at bytes 0-16, past the end of the file's 8",
        ),
        (b"\xff" * 8 + b"{}", "header length 18446744073709551615 is past the end"),
        (
            safetensors_with(b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}', b"\0" * 16),
            "tensor 'w' takes 16 bytes, not what its shape [3] and dtype need",
        ),
    ],
    "trainer_state.json": [
        (b"[]", "trainer_state.json holds a list, not a JSON object"),
        (b'{"counters": "many", "history": [], "world_size": 1}', "counters must be an object of counts"),
        (b'{"counters": {"step": 3, "tokens": 1}, "history": {}, "world_size": 1}', "history must be a list"),
        (b'{"counters": {"step": 3, "tokens": 1}, "history": [], "world_size": 0}', "world_size must be"),
        (b'{"counters": {"step": 9, "tokens": 1}, "history": [], "world_size": 1}', "is of step 9, not of"),
        (b'{"counters": {"step": 3, "tokens": 1}, "history": [], "world_size": 1, "run": 5}', "run must be an object"),
        (DEEP.encode(), "trainer_state.json is nested too deep"),
    ],
    "process_0.json": [
        (b'{"data": [], "rng": {"__tensor__": "1"}}', "process_0.json must be an object with data"),
        (b'{"data": {}}', "process_0.json must be an object with data"),
        (b'{"data": {}, "rng": {"__tensor__": "0"}}', "rng must name a uint8 tensor of 5056 bytes"),
        (DEEP.encode(), "process_0.json is nested too deep"),
        (b"\xff\xfe", "process_0.json is not UTF-8 text"),
    ],
    "optimizer.json": [(b"[1, 2]", "optimizer.json holds a list, not a JSON object")],
    "config.json": [(b"[]", "config.json holds a list, not a JSON object")],
    "tokenizer.json": [(b'{"model": 3}', "tokenizer.json is not a tokenizer file")],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_every_malformed_checkpoint_file_is_one_line_naming_it(finished, tmp_path, name):
    out = copy_run(finished, tmp_path)
    checkpoint = out / "checkpoint-3"
    original = (checkpoint / name).read_bytes()
    for content, message in MALFORMED[name]:
        (checkpoint / name).write_bytes(content)
        write_manifest(checkpoint)  # re-signed, as whoever handed the folder over could
        problem = checkpoint_problem(checkpoint)
        assert problem is not None and message in problem and str(checkpoint) in problem, (content[:30], problem)
    with pytest.raises(CheckpointError, match=rf"cannot resume from {checkpoint}: .*{name}"):
        run(out, "--max_steps", "4", *STEPS, "--resume_from_checkpoint", str(checkpoint))
    assert latest_checkpoint(out) == out / "checkpoint-2"
    (checkpoint / name).write_bytes(original)
    write_manifest(checkpoint)
    assert checkpoint_problem(checkpoint) is None


def test_a_data_position_of_the_wrong_shape_is_one_line(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    checkpoint = out / "checkpoint-3"
    honest = load_state(checkpoint, "process_0")
    wrong_shapes = [
        ({"rows": None}, "has no 'buffer'"),
        ({**honest["data"], "buffer": "x"}, "buffer='x'"),
        ({**honest["data"], "rows": {"epoch": 0}}, "does not fit"),
    ]
    for data, message in wrong_shapes:
        save_state({"data": data, "rng": honest["rng"]}, checkpoint, "process_0")
        write_manifest(checkpoint)
        with pytest.raises(DataError, match=rf"the checkpoint's data position .*{message}"):
            run(out, "--max_steps", "4", *STEPS, "--resume_from_checkpoint", str(checkpoint))


# -- what --overwrite_output_dir removes -----------------------------------------------------------------------------


def test_only_the_trainers_own_names_are_removed_or_called_a_previous_run(finished, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-best").mkdir()
    (out / "checkpoint-best" / "weights.bin").write_text("the user's")
    (out / "metrics.jsonl.bak").write_text("the user's")
    run(out, "--max_steps", "1", *STEPS)  # the user's files alone are not "a previous run"
    with pytest.raises(OutputDirError, match=r"holds a previous run \(checkpoint-1, metrics.jsonl\)") as caught:
        run(out, "--max_steps", "1", *STEPS)
    assert "checkpoint-best" not in str(caught.value)
    run(out, "--max_steps", "1", *STEPS, "--overwrite_output_dir")
    assert (out / "checkpoint-best" / "weights.bin").read_text() == "the user's"
    assert (out / "metrics.jsonl.bak").read_text() == "the user's"


# -- the data state --------------------------------------------------------------------------------------------------


def test_the_data_state_is_flat_whatever_one_rows_length_and_resumes_exactly(tmp_path):
    """A 1 M-character JSON Lines row between short ones, interrupted inside the row many times: every state is
    below one block plus one piece of tokens, and the blocks are those of the uninterrupted stream."""
    path = tmp_path / "rows.jsonl"
    long_row = "".join(f"line {i} of one very long row.\n" for i in range(35_000))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("short one", long_row, "short two " * 50)))
    tokenizer = char_tokenizer()

    def stream():
        return PackedStream(open_text_source(str(path), "train", validation_fraction=0), tokenizer, 64, 4)

    whole = [block for block, _ in stream()]
    got, state, bound = [], None, (64 * 4 + SEGMENT_CHARS + 1) * 8
    for take in [1, 0, 50, 700, 1, 2000, 3, 500, 1000, 10_000]:
        current = stream()
        if state is not None:
            current.load_state_dict(state)
        iterator = iter(current)
        for _ in range(min(take, len(whole) - len(got))):
            got.append(next(iterator)[0])
        save_state(current.state_dict(), tmp_path, "process_0")
        state = load_state(tmp_path, "process_0")
        size = sum((tmp_path / f"process_0{suffix}").stat().st_size for suffix in (".json", ".safetensors"))
        assert size < bound + 4096, size
    assert len(got) == len(whole) and all(torch.equal(a, b) for a, b in zip(whole, got, strict=True))


# -- options that cannot train, messages that name the cause ---------------------------------------------------------


def test_options_that_cannot_train_are_one_line_each(finished, tmp_path):
    bad_options = [
        (["--context_length", "1"], "context_length must be at least 2 for text"),
        (["--max_steps", "0"], "max_steps and logging_steps must be at least 1"),
        (["--logging_steps", "0"], "max_steps and logging_steps must be at least 1"),
        (["--save_steps", "-1"], "save_steps must be 0 or more"),
        (["--output_dir", ""], "output_dir is empty"),
    ]
    for argv, message in bad_options:
        with pytest.raises(ConfigFileError, match=message):
            parse_arguments(argv)
    parse_arguments(["--task", "copy", "--context_length", "1"])  # tasks do not pack text into blocks
    out = copy_run(finished, tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint-3 is at step 3, past --max_steps 2: there is nothing"):
        run(out, "--max_steps", "2", *STEPS, "--resume_from_checkpoint", "latest")


def test_a_model_folder_without_tokenizer_files_names_the_missing_file(finished, tmp_path):
    model = shutil.copytree(finished / "run" / "checkpoint-3", tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    for script in ("generate.py", "evaluate.py"):
        with pytest.raises(subprocess.CalledProcessError) as caught:
            run_script(script, "--model", str(model))
        last = caught.value.stderr.strip().splitlines()[-1]
        assert f"{model} has no tokenizer: tokenizer.json is missing" in last and "sentencepiece" not in last
    with pytest.raises(ConfigFileError, match=r"init_from: .* has no tokenizer: tokenizer.json is missing"):
        parse_arguments(["--init_from", str(model)])
    with pytest.raises(DataError, match=r"--tokenizer .*: .* has no tokenizer files \(tokenizer.json is missing\)"):
        run(tmp_path / "out", "--max_steps", "1", *STEPS, "--tokenizer", str(model))
    (model / "model.safetensors").write_bytes(safetensors_with(b"{"))
    with pytest.raises(ConfigFileError, match=r"init_from: .*model.safetensors is not a safetensors file"):
        parse_arguments(["--init_from", str(model)])


def test_evaluate_and_generate_options_that_cannot_work_are_named(finished):
    model = str(finished / "run")
    bad_options = [
        ("evaluate.py", ["--batches", "0"], "--batches must be at least 1, got 0"),
        ("evaluate.py", ["--context_length", "1"], "--context_length must be at least 2"),
        ("evaluate.py", ["--split", "test"], "--split must be train or validation"),
        ("generate.py", ["--do_sample", "--temperature", "0"], "--temperature > 0"),
    ]
    for script, argv, message in bad_options:
        with pytest.raises(subprocess.CalledProcessError) as caught:
            run_script(script, "--model", model, *argv)
        assert message in caught.value.stderr.strip().splitlines()[-1] and "Traceback" not in caught.value.stderr


@pytest.mark.skipif(not can_unshare(), reason="needs unshare (user and mount namespaces) for a read-only folder")
def test_a_read_only_output_folder_is_one_line_naming_it(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    train = [sys.executable, "-m", "hf_zoo_rnn.train", "--output_dir", str(disk / "run"), *FAST_TRAINING]
    train += ["--tokenizer", "char", "--max_steps", "1", "--log_with", "none"]
    script = f"mount -t tmpfs -o size=1m,ro tmpfs {disk} || exit 99\n{' '.join(train)}"
    in_a_mount_namespace = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    result = subprocess.run(in_a_mount_namespace, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"cannot create {disk / 'run'}: Read-only file system" in result.stderr.strip().splitlines()[-1]
