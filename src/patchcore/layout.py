"""The run-folder layout, defined once for training, evaluation, export, sweeps and the dashboard.

    <results>/<log_project>/<log_group>/      one run
        results.csv                           one row per dataset and the mean
        models/<dataset>/                     --save_patchcore_model
        predictions/<dataset>/                --save_predictions
        segmentation_images/<dataset>/        --save_segmentation_images
        logs/<dataset>.log                    patchcore-sweep: each task's log

`<dataset>` is the evaluated dataset's name, e.g. `mvtec_bottle`. Importing this module
loads nothing heavy (no torch), so readers of runs stay fast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from patchcore.errors import ConfigurationError, OutputError

RESULTS_FILE = "results.csv"
MODELS_FOLDER = "models"
PREDICTIONS_FOLDER = "predictions"
SEGMENTATION_FOLDER = "segmentation_images"
LOGS_FOLDER = "logs"
RUN_CONTENT_FOLDERS = frozenset(
    {MODELS_FOLDER, PREDICTIONS_FOLDER, SEGMENTATION_FOLDER, LOGS_FOLDER}
)
MAX_RUNS_PER_GROUP = 10_000


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder."""

    folder: Path

    @property
    def results_csv(self) -> Path:
        return Path(self.folder) / RESULTS_FILE

    @property
    def models(self) -> Path:
        return Path(self.folder) / MODELS_FOLDER

    @property
    def predictions(self) -> Path:
        return Path(self.folder) / PREDICTIONS_FOLDER

    def model(self, dataset: str) -> Path:
        return self.models / dataset

    def dataset_predictions(self, dataset: str) -> Path:
        return self.predictions / dataset

    def segmentation_images(self, dataset: str) -> Path:
        return Path(self.folder) / SEGMENTATION_FOLDER / dataset

    def task_log(self, dataset: str) -> Path:
        return Path(self.folder) / LOGS_FOLDER / f"{dataset}.log"


def run_folder_path(results_path: Path, project: str, group: str) -> Path:
    """`results_path/project/group`: where a run of that project and group goes first."""
    return Path(results_path) / project / group


def _cannot_create(folder: Path, error: OSError) -> OutputError:
    return OutputError(
        f"{folder}: cannot create the run folder ({error.strerror}); choose a writable "
        "RESULTS_PATH or free space on its disk"
    )


def create_run_folder(results_path: Path, project: str, group: str) -> Path:
    """Creates `results_path/project/group`, or `group_0`, `group_1`, ... if taken; never reuses
    a folder, also when several processes start runs of the same group at once."""
    project_folder = Path(results_path) / project
    try:
        project_folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot_create(project_folder, error) from error
    candidates = [group] + [f"{group}_{counter}" for counter in range(MAX_RUNS_PER_GROUP)]
    for candidate in candidates:
        folder = project_folder / candidate
        try:
            os.mkdir(folder)  # atomic: exactly one process creates each name
        except FileExistsError:
            continue
        except OSError as error:
            raise _cannot_create(folder, error) from error
        return folder
    raise ConfigurationError(f"{project_folder}: too many runs named '{group}'")


@contextlib.contextmanager
def new_run_folder(results_path: Path, project: str, group: str) -> Iterator[Path]:
    """`create_run_folder` for the block; if the block fails before anything was written
    into the folder, the empty folder is removed, so a corrected rerun gets the same name."""
    folder = create_run_folder(results_path, project, group)
    try:
        yield folder
    except BaseException:
        with contextlib.suppress(OSError):  # not empty: what was written stays
            folder.rmdir()
        raise
