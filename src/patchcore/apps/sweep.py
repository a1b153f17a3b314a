"""The job behind `patchcore-sweep SWEEP_FILE`: a grid of training runs on Ray.

A sweep file (YAML or TOML) names the data, the categories and the configurations:

    data_path: /data/mvtec            # relative paths are relative to the sweep file
    dataset: mvtec                    # or folder; default mvtec
    categories: [bottle, cable]
    results_path: results             # default: results/ beside the sweep file
    log_project: MVTecAD_Results      # default: the sweep file's name
    configurations:
      IM224_WR50_P01:                 # the name is the run's log_group
        save_patchcore_model: true    # options of patchcore-train, as a mapping ...
        patch_core: {backbone_names: [wideresnet50], layers_to_extract_from: [layer2, layer3]}
        sampler: {name: approx_greedy_coreset, percentage: 0.1}
        dataset: {resize: 256, imagesize: 224}
      IM224_WR50_P001:                # ... or as the literal arguments of sample_training.sh
        args: [--save_patchcore_model, patch_core, -b, wideresnet50, -le, layer2, -le, layer3,
               sampler, -p, "0.01", approx_greedy_coreset, dataset, --resize, "256"]

The sweep supplies RESULTS_PATH, --log_project/--log_group, the device, `-d CATEGORY` and
the dataset's NAME and DATA_PATH; a configuration giving any of them is refused. Every
configuration is parsed and validated by `patchcore-train`'s own parser before anything
runs. Each (category, configuration) pair is one Ray task running `train_run`, the job of
`patchcore-train`, into `<results_path>/<log_project>/<configuration>/`: tasks of one
configuration merge their rows into its one `results.csv` under a lock. A pair whose row is
already in that results.csv is skipped unless `force`. A task that fails or is killed is
reported by name; the others run to the end. Each task logs to `logs/<dataset>.log` in its
run folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import click
import tomllib

from patchcore.errors import ConfigurationError, DataError, PatchCoreError, missing_dependency
from patchcore.layout import RunLayout, run_folder_path
from patchcore.progress import track

LOGGER = logging.getLogger(__name__)

SUB_COMMANDS = ("patch_core", "sampler", "dataset")
TOP_LEVEL_KEYS = ("data_path", "dataset", "categories", "results_path", "log_project",
                  "configurations")  # fmt: skip
# Options the sweep sets itself, per part of the command line.
RESERVED = {
    None: {"results_path", "log_group", "log_project", "gpu", "device", "log_level",
           "no_progress", "debug"},
    "dataset": {"name", "data_path", "subdatasets"},
}  # fmt: skip
RESERVED_FLAGS = {"--log_group", "--log_project", "--gpu", "--device", "-d", "--subdatasets",
                  "--log_level", "--no_progress", "--debug"}  # fmt: skip
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024
ADDRESS_TIMEOUT_SECONDS = 5.0
AUTHENTICATION_FAILURE = "InvalidAuthToken"  # in Ray's client log when a token is missing


# ---------------------------------------------------------------------- sweep file
@dataclass(frozen=True)
class SweepFile:
    """A parsed sweep file: every path absolute, every configuration as train arguments
    (options, then sub-commands, without what the sweep supplies)."""

    path: Path
    data_path: Path
    dataset: str
    categories: tuple[str, ...]
    results_path: Path
    log_project: str
    configurations: dict[str, tuple[str, ...]]


def _read_document(path: Path) -> dict:
    if not path.is_file():
        raise ConfigurationError(f"{path}: sweep file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigurationError(f"{path}: not valid TOML ({error})") from error
    elif path.suffix.lower() in (".yaml", ".yml"):
        document = _load_yaml(path, text)
    else:
        raise ConfigurationError(f"{path}: a sweep file ends with .yaml, .yml or .toml")
    if not isinstance(document, dict):
        raise ConfigurationError(f"{path}: expected a mapping of {', '.join(TOP_LEVEL_KEYS)}")
    return document


def _load_yaml(path: Path, text: str):
    try:
        import yaml
    except ImportError as error:
        raise missing_dependency("a YAML sweep file", "pyyaml", "cluster") from error

    class UniqueKeyLoader(yaml.SafeLoader):
        """A safe loader refusing a key given twice (YAML would keep the last silently)."""

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            repeated = sorted({str(key) for key in keys if keys.count(key) > 1})
            if repeated:
                raise ConfigurationError(
                    f"{path}:{node.start_mark.line + 1}: key(s) {', '.join(repeated)} given twice"
                )
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as error:
        raise ConfigurationError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from error


def read_sweep_file(path: Path) -> SweepFile:
    """Reads and checks a sweep file; one-line ConfigurationErrors name the file and key."""
    path = Path(path).resolve()
    document = _read_document(path)
    unknown = sorted(set(document) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigurationError(
            f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(TOP_LEVEL_KEYS)}"
        )
    for key in ("data_path", "categories", "configurations"):
        if key not in document:
            raise ConfigurationError(f"{path}: '{key}' is missing")
    categories = document["categories"]
    if isinstance(categories, str):
        categories = [categories]
    if not isinstance(categories, list) or not categories or not all(
        isinstance(category, str) and category for category in categories
    ):
        raise ConfigurationError(f"{path}: 'categories' must be a list of category folder names")
    if len(set(categories)) != len(categories):
        raise ConfigurationError(f"{path}: 'categories' names a category twice")
    configurations = document["configurations"]
    if not isinstance(configurations, dict) or not configurations:
        raise ConfigurationError(
            f"{path}: 'configurations' must map each configuration's name to its options"
        )
    return SweepFile(
        path=path,
        data_path=path.parent / str(document["data_path"]),
        dataset=str(document.get("dataset", "mvtec")),
        categories=tuple(categories),
        results_path=path.parent / str(document.get("results_path", "results")),
        log_project=str(document.get("log_project", path.stem)),
        configurations={
            str(name): configuration_arguments(path, str(name), options)
            for name, options in configurations.items()
        },
    )


def _scalar_text(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigurationError(f"{where}: expected a string or number, got {value!r}")
    return str(value)


def configuration_arguments(path: Path, name: str, options) -> tuple[str, ...]:
    """A configuration (a mapping of options, or {'args': [...]}) as train arguments."""
    where = f"{path}: configuration '{name}'"
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigurationError(f"{where}: a configuration's name is its run folder's name; "
                                 "it may not be empty or contain '/'")  # fmt: skip
    if not isinstance(options, dict):
        raise ConfigurationError(f"{where}: expected a mapping of options or 'args: [...]'")
    if "args" in options:
        if len(options) > 1:
            raise ConfigurationError(f"{where}: give either 'args' or options, not both")
        arguments = options["args"]
        if not isinstance(arguments, list):
            raise ConfigurationError(f"{where}: 'args' must be a list of command-line words")
        words = tuple(_scalar_text(word, f"{where}, args") for word in arguments)
        reserved = sorted(set(words) & RESERVED_FLAGS)
        if reserved:
            raise ConfigurationError(
                f"{where}: {', '.join(reserved)} is set by the sweep (data_path, categories, "
                "the configuration's name, --address/--gpu/--device); leave it out"
            )
        return words
    return _mapping_arguments(where, options)


def _mapping_arguments(where: str, options: dict) -> tuple[str, ...]:
    from patchcore.cli.runs import train_cli

    context = click.Context(train_cli)
    words = list(_command_words(where, train_cli, {k: v for k, v in options.items()
                                                  if k not in SUB_COMMANDS}, None))  # fmt: skip
    for command_name in SUB_COMMANDS:
        if command_name in options:
            values = options[command_name]
            if not isinstance(values, dict):
                raise ConfigurationError(f"{where}: '{command_name}' must be a mapping of options")
            command = train_cli.get_command(context, command_name)
            words += [command_name, *_command_words(f"{where}, {command_name}", command, values,
                                                    command_name)]  # fmt: skip
    return tuple(words)


def _command_words(where: str, command: click.Command, values: dict, part: str | None):
    """Command-line words for `values` (option or argument name -> value) of `command`."""
    parameters = {parameter.name: parameter for parameter in command.params}
    allowed = sorted(set(parameters) - RESERVED.get(part, set()))
    if part is None:
        allowed += list(SUB_COMMANDS)
    arguments = []
    for key, value in values.items():
        if key not in parameters or key in RESERVED.get(part, set()):
            set_by_sweep = key in RESERVED.get(part, set())
            raise ConfigurationError(
                f"{where}: {'the sweep sets ' if set_by_sweep else 'unknown key '}'{key}'"
                + ("" if set_by_sweep else f"; known: {', '.join(sorted(allowed))}")
            )
        parameter = parameters[key]
        if value is None:
            continue
        if isinstance(parameter, click.Argument):
            arguments.append(_scalar_text(value, f"{where}, {key}"))
            continue
        flag = max(parameter.opts, key=len)
        if parameter.is_flag:
            if not isinstance(value, bool):
                raise ConfigurationError(f"{where}, {key}: expected true or false, got {value!r}")
            if value:
                yield flag
            continue
        items = value if isinstance(value, list) else [value]
        if len(items) > 1 and not parameter.multiple:
            raise ConfigurationError(f"{where}, {key}: takes one value, got {value!r}")
        for item in items:
            yield flag
            yield _scalar_text(item, f"{where}, {key}")
    yield from arguments


# ----------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class SweepTask:
    """One (configuration, category) pair: the full train command line and where it writes."""

    configuration: str
    category: str
    dataset_name: str  # e.g. mvtec_bottle: the results.csv row
    run_folder: Path
    arguments: tuple[str, ...]
    order: tuple[str, ...]  # the configuration's dataset names, in sweep order
    done: bool = False

    @property
    def label(self) -> str:
        return f"{self.configuration}/{self.dataset_name}"


def _split_sub_commands(words: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    main, parts, current = [], {}, None
    for word in words:
        if word in SUB_COMMANDS:
            current = word
            parts.setdefault(word, [])
        elif current is None:
            main.append(word)
        else:
            parts[current].append(word)
    return main, parts


def task_arguments(sweep: SweepFile, name: str, words: tuple[str, ...], category: str,
                   device: str, num_cpus: int) -> list[str]:  # fmt: skip
    """The complete `patchcore-train` command line of one task. Unless the configuration
    sets them, image-loading processes and FAISS threads follow the task's CPUs."""
    main, parts = _split_sub_commands(words)
    parts.setdefault("dataset", [])
    arguments = [*main, "--device", device, "--no_progress", "--log_project",
                 sweep.log_project, "--log_group", name, str(sweep.results_path)]  # fmt: skip
    for command in SUB_COMMANDS:
        if command not in parts:
            continue
        given = parts[command]
        extra = []
        if command == "patch_core" and "--faiss_num_workers" not in given:
            extra = ["--faiss_num_workers", str(num_cpus)]
        if command == "dataset":
            extra = [] if "--num_workers" in given else ["--num_workers", str(num_cpus)]
            extra += ["-d", category, sweep.dataset, str(sweep.data_path)]
        arguments += [command, *given, *extra]
    return arguments


def plan_sweep(sweep: SweepFile, device: str, num_cpus: int, force: bool) -> list[SweepTask]:
    """Every (configuration, category) task, parsed by patchcore-train's own parser; pairs
    with a results.csv row are marked done unless `force`."""
    from patchcore.cli.runs import parse_train_arguments
    from patchcore.evaluation.reporting import read_results_csv

    tasks = []
    for name, words in sweep.configurations.items():
        run_folder = run_folder_path(sweep.results_path, sweep.log_project, name)
        results = RunLayout(run_folder).results_csv
        finished = read_results_csv(results) if results.is_file() and not force else {}
        requests = []
        for category in sweep.categories:
            arguments = task_arguments(sweep, name, words, category, device, num_cpus)
            try:
                request = parse_train_arguments(arguments)
            except click.ClickException as error:
                raise ConfigurationError(
                    f"{sweep.path}: configuration '{name}': {error.format_message()}"
                ) from error
            requests.append((category, request.dataset.run_name(category), arguments))
        order = tuple(dataset_name for _, dataset_name, _ in requests)
        tasks += [
            SweepTask(name, category, dataset_name, run_folder, tuple(arguments), order,
                      done=dataset_name in finished)
            for category, dataset_name, arguments in requests
        ]  # fmt: skip
    return tasks


# ---------------------------------------------------------------------- running
@dataclass(frozen=True)
class TaskOutcome:
    """How one task ended: its rows, or why it did not."""

    task: SweepTask
    status: str  # done, skipped, failed, killed
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    error: str = ""


def run_sweep_task(arguments: tuple[str, ...], order: tuple[str, ...], num_cpus: int) -> dict:
    """One task, in a Ray worker: patchcore-train's job (`train_run`) on one category, its
    rows merged into the configuration's results.csv (datasets in `order`); the task logs
    to the run's logs/<dataset>.log."""
    import torch

    from patchcore.apps.runs import OutputOptions, train_run
    from patchcore.cli.common import configure_logging
    from patchcore.cli.runs import parse_train_arguments
    from patchcore.progress import disable_bars

    request = parse_train_arguments(list(arguments))
    folder = run_folder_path(request.results_path, request.log_project, request.log_group)
    log_file = RunLayout(folder).task_log(request.dataset.run_name(request.dataset.categories[0]))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    configure_logging(request.common.log_level)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        disable_bars()
        torch.set_num_threads(num_cpus)
        LOGGER.info("patchcore-train %s", " ".join(arguments))
        output = OutputOptions(**request.outputs, merge_results=True, results_order=order)
        device = request.common.torch_device()
        return train_run(folder, list(request.configs), request.dataset, device,
                         request.search, output)  # fmt: skip
    finally:
        root.removeHandler(handler)
        handler.close()


Runner = Callable[[tuple[str, ...], tuple[str, ...], int], dict]


def _timed(runner: Runner, arguments: tuple[str, ...], order: tuple[str, ...],
           num_cpus: int) -> tuple[dict, float]:  # fmt: skip
    start = time.monotonic()
    rows = runner(arguments, order, num_cpus)
    return rows, time.monotonic() - start


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how tasks run."""

    address: str | None = None  # None: a local Ray instance, started and stopped here
    num_cpus: float = 1.0  # per task
    gpu: bool | None = None  # one GPU per task; None: when the cluster has GPUs
    local_cpus: int | None = None  # CPUs of the local instance [all]
    max_retries: int = 0

    def __post_init__(self) -> None:
        if self.num_cpus <= 0:
            raise ConfigurationError(f"--num_cpus must be > 0, got {self.num_cpus}")
        if self.local_cpus is not None and self.local_cpus < 1:
            raise ConfigurationError(f"--local_cpus must be >= 1, got {self.local_cpus}")
        if self.max_retries < 0:
            raise ConfigurationError(f"--max_retries must be >= 0, got {self.max_retries}")


def _ray():
    try:
        import ray
    except ImportError as error:
        raise missing_dependency("patchcore-sweep", "ray[default]", "cluster") from error
    return ray


def _check_reachable(address: str) -> None:
    """A one-line error, in seconds rather than Ray's minutes, when HOST:PORT is not open."""
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit() or not host:
        raise ConfigurationError(f"--address {address}: expected auto or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_SECONDS).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigurationError(
            f"--address {address}: no Ray cluster reachable there ({reason}); start one with "
            "'ray start --head' or leave out --address for a local one"
        ) from error


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[Path]:
    """Redirects file descriptor 2 to a temporary file for the block (Ray's C++ client logs a
    warning a second there while it retries a connection); yields the file's path."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile(prefix="patchcore-ray-", suffix=".log") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield Path(capture.name)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _connection_error(options: ClusterOptions, error: Exception, native_log: str) -> str:
    """The one-line reason Ray could not be started or reached."""
    where = "a local Ray instance" if options.address is None else f"--address {options.address}"
    if AUTHENTICATION_FAILURE in native_log:
        return (
            f"{where}: the Ray cluster there asks for an authentication token; set "
            "RAY_AUTH_MODE=token and give its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token "
            "copied from the head node)"
        )
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else repr(error)
    return f"{where}: cannot start or connect to Ray ({reason})"


@contextlib.contextmanager
def ray_session(options: ClusterOptions) -> Iterator:
    """Ray connected to the cluster at `options.address`, or to a local instance started
    for the sweep (and stopped after it)."""
    ray = _ray()
    settings = {"logging_level": logging.WARNING, "log_to_driver": False}
    if options.address is None:
        settings.update(num_cpus=options.local_cpus, include_dashboard=False,
                        object_store_memory=LOCAL_OBJECT_STORE_BYTES)  # fmt: skip
        connecting = contextlib.nullcontext(None)
    else:
        if options.address != "auto":
            _check_reachable(options.address)
        settings["address"] = options.address
        connecting = _native_stderr_captured()  # only a connection: no process inherits it
    with connecting as native_log:
        try:
            ray.init(**settings)
            failure = None
        except (ConnectionError, RuntimeError, TimeoutError) as error:
            failure = error
            log = native_log.read_text(errors="replace") if native_log is not None else ""
    if failure is not None:
        raise ConfigurationError(_connection_error(options, failure, log)) from failure
    try:
        yield ray
    finally:
        ray.shutdown()


def wants_gpu(options: ClusterOptions, ray) -> bool:
    """One GPU per task when asked, or (by default) when the cluster has GPUs."""
    if options.gpu is not None:
        return options.gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def with_device(task: SweepTask, device: str) -> SweepTask:
    """`task` with its command line's --device replaced."""
    arguments = list(task.arguments)
    arguments[arguments.index("--device") + 1] = device
    return replace(task, arguments=tuple(arguments))


def _finished(ray, references: list) -> Iterator:
    """Each reference as soon as its task ends, in the order they end."""
    pending = list(references)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield done[0]


def _failure(ray, error: Exception) -> tuple[str, str]:
    """(status, one-line reason) of a task that raised `error` on ray.get."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None) or error
        lines = str(cause).strip().splitlines()
        text = lines[-1] if lines else repr(cause)
        kind = "" if isinstance(cause, PatchCoreError) else f"{type(cause).__name__}: "
        return "failed", kind + text
    if isinstance(error, ray.exceptions.TaskCancelledError):
        return "killed", "cancelled"
    return "killed", (f"{type(error).__name__}: the worker died (killed, out of memory, or its "
                      "node was lost)")  # fmt: skip


def execute(tasks: list[SweepTask], options: ClusterOptions,
            runner: Runner = run_sweep_task) -> list[TaskOutcome]:  # fmt: skip
    """Runs the tasks not done yet on Ray, one task per (configuration, category); returns
    an outcome per task in plan order. Ray is started or joined only when there is work."""
    outcomes: dict[int, TaskOutcome] = {
        position: TaskOutcome(task, "skipped") for position, task in enumerate(tasks) if task.done
    }
    todo = [(position, task) for position, task in enumerate(tasks) if not task.done]
    if not todo:
        return [outcomes[position] for position in range(len(tasks))]
    with ray_session(options) as ray:
        gpu = wants_gpu(options, ray)
        remote = ray.remote(_timed)
        references = {}
        for position, task in todo:
            task = with_device(task, "cuda" if gpu else "cpu")
            reference = remote.options(
                num_cpus=options.num_cpus, num_gpus=1 if gpu else 0,
                max_retries=options.max_retries, name=task.label,
            ).remote(runner, task.arguments, task.order, max(1, int(options.num_cpus)))  # fmt: skip
            references[reference] = (position, task)
        LOGGER.info("Sweep: %d task(s) submitted (%g CPU%s each)", len(references),
                    options.num_cpus, " and 1 GPU" if gpu else "")  # fmt: skip
        for reference in track(_finished(ray, list(references)), "Sweep", len(references),
                               unit="task"):  # fmt: skip
            position, task = references[reference]
            try:
                rows, seconds = ray.get(reference)
                outcomes[position] = TaskOutcome(task, "done", seconds, rows.get(task.dataset_name, {}))
            except ray.exceptions.RayError as error:
                status, reason = _failure(ray, error)
                outcomes[position] = TaskOutcome(task, status, error=reason)
                LOGGER.error("%s %s: %s", task.label, status, reason)
    return [outcomes[position] for position in range(len(tasks))]


# ----------------------------------------------------------------------- report
def format_outcomes(outcomes: list[TaskOutcome]) -> str:
    """One line per task: status, name, seconds and image/pixel AUROC, or the reason."""
    width = max(len(outcome.task.label) for outcome in outcomes)
    lines = []
    for outcome in outcomes:
        head = f"{outcome.status:<8} {outcome.task.label:<{width}}"
        if outcome.status == "done":
            metrics = "  ".join(
                f"{title} {100 * outcome.metrics[key]:.2f}"
                for key, title in (("instance_auroc", "image AUROC"),
                                   ("full_pixel_auroc", "pixel AUROC"))
                if not math.isnan(outcome.metrics.get(key, math.nan))
            )  # fmt: skip
            lines.append(f"{head}  {outcome.seconds:7.1f} s  {metrics}".rstrip())
        elif outcome.status == "skipped":
            lines.append(f"{head}  already in results.csv (--force runs it again)")
        else:
            log = RunLayout(outcome.task.run_folder).task_log(outcome.task.dataset_name)
            where = f"  [log: {log}]" if log.is_file() else ""
            lines.append(f"{head}  {outcome.error}{where}")
    return "\n".join(lines)


@dataclass(frozen=True)
class SweepOptions:
    """A sweep job."""

    sweep_file: Path
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    force: bool = False
    dry_run: bool = False


def run_sweep(options: SweepOptions, runner: Runner = run_sweep_task) -> tuple[str, list[TaskOutcome]]:
    """Plans and runs the sweep; returns the report and every task's outcome (see
    `unfinished_error` for the tasks that failed or were killed)."""
    sweep = read_sweep_file(options.sweep_file)
    if not sweep.data_path.is_dir():
        raise DataError(f"{sweep.path}: data_path {sweep.data_path} is not a folder")
    missing = [c for c in sweep.categories if not (sweep.data_path / c).is_dir()]
    if missing:
        raise DataError(
            f"{sweep.path}: no category folder {', '.join(missing)} in {sweep.data_path}"
        )
    tasks = plan_sweep(sweep, "cpu", max(1, int(options.cluster.num_cpus)), options.force)
    if options.dry_run:
        plan = [TaskOutcome(task, "skipped" if task.done else "planned") for task in tasks]
        return "\n".join(f"{o.status:<8} {o.task.label}" for o in plan), plan
    outcomes = execute(tasks, options.cluster, runner)
    results = sorted({str(RunLayout(task.run_folder).results_csv) for task in tasks})
    return format_outcomes(outcomes) + "\n\nResults: " + ", ".join(results), outcomes


def unfinished_error(outcomes: list[TaskOutcome]) -> PatchCoreError | None:
    """The one-line error naming the tasks that failed or were killed, if any."""
    failed = [outcome for outcome in outcomes if outcome.status in ("failed", "killed")]
    if not failed:
        return None
    return PatchCoreError(
        f"{len(failed)} of {len(outcomes)} sweep task(s) did not finish: "
        + "; ".join(f"{o.task.label} {o.status} ({o.error})" for o in failed)
    )
