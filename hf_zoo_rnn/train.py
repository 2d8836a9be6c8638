"""Train a ZooRnn language model: `accelerate launch -m hf_zoo_rnn.train [--config FILE] [--arg value ...]`, the
console script `hf-zoo-rnn-train`, or scripts/train.py in a checkout. A mistake the user can fix (a config, the data, a checkpoint, a run that
stalls) ends the run with one line naming its cause; under accelerate launch that line is also the root cause in
torch elastic's failure report, instead of "To enable traceback see ...".
"""

import errno
import json
import os
import sys
import time
from pathlib import Path

from .config_files import ConfigFileError, command_name
from .data import DataError
from .hub import PushFailedError
from .training import TrainingStalledError, ZooTrainer, parse_arguments
from .training.checkpoints import CheckpointError
from .training.preemption import Preempted
from .training.run_folder import OutputDirError

# what a disk or a folder's permissions cause (not a bug): one line naming the path
DISK_ERRORS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
)
USER_ERRORS = (ConfigFileError, DataError, CheckpointError, TrainingStalledError, OutputDirError, PushFailedError)


def main(argv: list[str] | None = None) -> None:
    try:
        trainer = ZooTrainer(*parse_arguments(argv))
        trainer.train()
    except USER_ERRORS as error:
        exit_with(f"{command_name()}: error: {error}")
    except OSError as error:
        if error.errno not in DISK_ERRORS:
            raise
        exit_with(f"{command_name()}: error: cannot write {error.filename or 'the output folder'}: {error.strerror}")
    except Preempted as stop:
        trainer.accelerator.end_training()
        print(f"{command_name()}: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    trainer.accelerator.end_training()  # flush the trackers and end the process group


def exit_with(message: str) -> None:
    """Exit with one line on stderr; torch elastic shows a child's error file in its report (a plain-text message
    is shown as it is)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    raise SystemExit(message)


if __name__ == "__main__":
    main()
