"""What the training loop tells whoever listens: ESTrainer bridges these to transformers' TrainerCallbacks."""

from pathlib import Path


class TrainingEvents:
    """The loop's events, each a no-op here. A hook that returns True asks the loop to stop after this step, as a
    callback's `control.should_training_stop` does."""

    def train_begin(self, trainer) -> None:
        """The run is set up (model, estimator and any resumed state in place); training starts."""

    def step_end(self, step: int, metrics: dict) -> bool:
        return False

    def logged(self, record: dict) -> bool:
        return False

    def saved(self, folder: Path) -> None:
        pass

    def train_end(self, final: dict) -> None:
        pass
