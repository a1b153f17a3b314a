"""patchcore-sweep: sweep files, planning and skipping, Ray execution, failures, errors."""

import importlib.util
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchcore.apps.sweep import (
    ClusterOptions,
    SweepOptions,
    read_sweep_file,
    run_sweep,
    run_sweep_task,
    unfinished_error,
)
from patchcore.cli.runs import train_cli
from patchcore.cli.sweep import sweep_cli
from patchcore.evaluation.reporting import read_results_csv, write_results_csv

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (the cluster extra)"
)
needs_yaml = pytest.mark.skipif(
    importlib.util.find_spec("yaml") is None, reason="pyyaml is not installed (the cluster extra)"
)

SMALL = ["-b", "resnet18", "--random_backbone_weights", "--pretrain_embed_dimension", "64",
         "--target_embed_dimension", "48"]  # fmt: skip
ARGS_CONFIGURATION = f"""
  small_p10:
    args: [--save_patchcore_model, patch_core, {", ".join(SMALL)},
           sampler, -p, 0.1, approx_greedy_coreset,
           dataset, --resize, 72, --imagesize, 64, --batch_size, 4]
"""
MAPPING_CONFIGURATION = """
  small_p25:
    seed: 1
    patch_core: {backbone_names: [resnet18], random_backbone_weights: true,
                 pretrain_embed_dimension: 64, target_embed_dimension: 48}
    sampler: {name: approx_greedy_coreset, percentage: 0.25}
    dataset: {resize: 72, imagesize: 64, batch_size: 4}
"""


def write_sweep(folder: Path, data: Path, categories: str, configurations: str,
                name: str = "sweep.yaml", extra: str = "") -> Path:  # fmt: skip
    path = folder / name
    path.write_text(f"data_path: {data}\ncategories: [{categories}]\nlog_project: demo\n"
                    f"{extra}configurations:{configurations}")  # fmt: skip
    return path


def sweep(*arguments) -> tuple[int, str]:
    outcome = CliRunner().invoke(sweep_cli, [str(a) for a in arguments])
    return outcome.exit_code, outcome.output


STATUSES = ("planned", "done", "skipped", "failed", "killed")


def task_lines(output: str) -> list[list[str]]:
    """(status, task) of the report's task lines (Ray's own log lines left out)."""
    return [line.split()[:2] for line in output.splitlines() if line.startswith(STATUSES)]


# ------------------------------------------------------------------- sweep files
@needs_yaml
def test_mapping_and_argument_list_configurations_become_train_command_lines(
    synthetic_root, tmp_path
):
    path = write_sweep(tmp_path, synthetic_root, "texture",
                       ARGS_CONFIGURATION + MAPPING_CONFIGURATION)  # fmt: skip
    parsed = read_sweep_file(path)
    assert parsed.results_path == tmp_path / "results" and parsed.log_project == "demo"
    assert parsed.configurations["small_p10"][:3] == ("--save_patchcore_model", "patch_core", "-b")
    assert parsed.configurations["small_p25"] == (
        "--seed", "1", "patch_core", "--backbone_names", "resnet18", "--random_backbone_weights",
        "--pretrain_embed_dimension", "64", "--target_embed_dimension", "48",
        "sampler", "--percentage", "0.25", "approx_greedy_coreset",
        "dataset", "--resize", "72", "--imagesize", "64", "--batch_size", "4",
    )  # fmt: skip


def test_toml_sweep_files_are_read_too(synthetic_root, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(f'data_path = "{synthetic_root}"\ncategories = ["texture", "object"]\n'
                    '[configurations.tiny]\nargs = ["patch_core", "-b", "resnet18", "sampler", '
                    '"identity", "dataset", "--resize", "72", "--imagesize", "64"]\n')  # fmt: skip
    code, output = sweep(path, "--dry_run")
    assert code == 0, output
    assert output.split() == ["planned", "tiny/mvtec_texture", "planned", "tiny/mvtec_object"]


@needs_yaml
@pytest.mark.parametrize(
    ("configurations", "extra", "message"),
    [
        ("\n  a: {patch_core: {backbone: resnet18}}", "",
         "configuration 'a', patch_core: unknown key 'backbone'; known: "),
        ("\n  a: {dataset: {subdatasets: [x]}}", "", "configuration 'a', dataset: the sweep sets 'subdatasets'"),
        ("\n  a: {args: [dataset, -d, x]}", "", "configuration 'a': -d is set by the sweep"),
        ("\n  a: {args: [patch_core]}\n  a: {args: [sampler]}", "", "key(s) a given twice"),
        ("\n  a: {args: [patch_core, sampler, -p, 2, identity, dataset]}", "",
         "configuration 'a': sampler --percentage must be in (0, 1], got 2.0"),
        ("\n  a: {args: [sampler, identity, dataset]}", "",
         "configuration 'a': missing sub-command(s): patch_core"),
        ("\n  a: {args: []}", "gpus: 2\n", "unknown key(s) gpus; expected data_path"),
        ("\n  a: {args: []}", "", "no category folder cable in"),
    ],
)  # fmt: skip
def test_bad_sweep_files_get_one_line_errors(synthetic_root, tmp_path, configurations, extra,
                                             message):  # fmt: skip
    categories = "texture, cable" if "category folder" in message else "texture"
    path = write_sweep(tmp_path, synthetic_root, categories, configurations, extra=extra)
    code, output = sweep(path, "--dry_run")
    assert code == 1, output
    assert len(output.strip().splitlines()) == 1 and output.startswith("Error: ")
    assert message in output


@needs_yaml
def test_pairs_with_a_results_row_are_skipped_unless_forced(synthetic_root, tmp_path):
    path = write_sweep(tmp_path, synthetic_root, "texture, object", ARGS_CONFIGURATION)
    write_results_csv(tmp_path / "results" / "demo" / "small_p10" / "results.csv",
                      {"mvtec_object": {"instance_auroc": 0.5}})  # fmt: skip
    code, output = sweep(path, "--dry_run")
    assert code == 0, output
    assert output.split() == ["planned", "small_p10/mvtec_texture", "skipped",
                              "small_p10/mvtec_object"]  # fmt: skip
    code, output = sweep(path, "--dry_run", "--force")
    assert output.split()[::2] == ["planned", "planned"]


@needs_ray
def test_an_unreachable_ray_address_is_one_line(synthetic_root, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(f'data_path = "{synthetic_root}"\ncategories = ["texture"]\n'
                    '[configurations.tiny]\nargs = ["patch_core", "sampler", "identity"]\n')  # fmt: skip
    code, output = sweep(path, "--address", "127.0.0.1:1")
    assert code == 1
    assert output.strip().splitlines() == [(
        "Error: --address 127.0.0.1:1: no Ray cluster reachable there (Connection refused); "
        "start one with 'ray start --head' or leave out --address for a local one"
    )]
    code, output = sweep(path, "--address", "nowhere")
    assert code == 1 and "--address nowhere: expected auto or HOST:PORT" in output


def test_a_cluster_asking_for_a_token_is_named_in_one_line():
    """Ray's C++ client only logs (to file descriptor 2) why it could not connect; the sweep
    keeps that log out of the terminal and names the missing token."""
    from patchcore.apps.sweep import _connection_error, _native_stderr_captured

    with _native_stderr_captured() as native_log:
        os.write(2, b"gcs_client.cc:210: Failed to get cluster ID: Unauthenticated: "
                    b"RPC error: InvalidAuthToken: Authentication token is missing\n")  # fmt: skip
        text = native_log.read_text()
    assert "InvalidAuthToken" in text
    options = ClusterOptions(address="10.0.0.5:6379")
    error = ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379\nmore")
    assert _connection_error(options, error, text) == (
        "--address 10.0.0.5:6379: the Ray cluster there asks for an authentication token; set "
        "RAY_AUTH_MODE=token and give its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token copied "
        "from the head node)"
    )
    assert _connection_error(options, error, "") == (
        "--address 10.0.0.5:6379: cannot start or connect to Ray (Failed to connect to Ray "
        "cluster at 10.0.0.5:6379)"
    )


@needs_ray
@pytest.mark.skipif(Path("/tmp/ray/ray_current_cluster").exists(), reason="a Ray cluster runs here")
def test_address_auto_without_a_cluster_is_one_line(synthetic_root, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(f'data_path = "{synthetic_root}"\ncategories = ["texture"]\n'
                    '[configurations.tiny]\nargs = ["patch_core", "sampler", "identity"]\n')  # fmt: skip
    code, output = sweep(path, "--address", "auto")
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert output.startswith("Error: --address auto: cannot start or connect to Ray (")


# ------------------------------------------------------------- task resources
class RecordingRay:
    """Stands in for the `ray` module: records each task's resource request, and runs
    nothing (every task returns no rows)."""

    class exceptions:  # mirrors ray.exceptions
        RayError = RuntimeError

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus
        self.requests = []

    def cluster_resources(self) -> dict:
        return {"CPU": 8.0, **({"GPU": float(self.gpus)} if self.gpus else {})}

    def remote(self, function):
        ray = self

        class Remote:
            def options(self, **settings):
                ray.requests.append(settings)
                return self

            def remote(self, _runner, arguments, _order, threads):
                ray.requests[-1]["device"] = arguments[arguments.index("--device") + 1]
                return (arguments, threads)

        return Remote()

    def wait(self, pending, num_returns):
        return pending[:num_returns], pending[num_returns:]

    def get(self, _reference):
        return {}, 0.0


@needs_yaml
@pytest.mark.parametrize(("gpus", "device_flags", "expected_gpus", "device"), [
    (0, [], 0, "cpu"), (2, [], 1, "cuda"), (2, ["--device", "cpu"], 0, "cpu"),
    (0, ["--gpu", "0"], 1, "cuda"),
])  # fmt: skip
def test_tasks_ask_ray_for_one_gpu_when_a_gpu_is_used(synthetic_root, tmp_path, monkeypatch,
                                                      gpus, device_flags, expected_gpus, device):  # fmt: skip
    import contextlib

    import patchcore.apps.sweep as sweep_module

    fake = RecordingRay(gpus)
    monkeypatch.setattr(sweep_module, "ray_session",
                        lambda _options: contextlib.nullcontext(fake))  # fmt: skip
    path = write_sweep(tmp_path, synthetic_root, "texture, object", ARGS_CONFIGURATION)
    code, output = sweep(path, "--num_cpus", "2", *device_flags)
    assert code == 0, output
    assert [(r["num_gpus"], r["num_cpus"], r["device"], r["name"]) for r in fake.requests] == [
        (expected_gpus, 2.0, device, "small_p10/mvtec_texture"),
        (expected_gpus, 2.0, device, "small_p10/mvtec_object"),
    ]  # fmt: skip


# -------------------------------------------------------------------- on Ray
def killing_runner(arguments, order, num_cpus):
    """Runs the task, except the 'doomed' category's, whose worker is killed."""
    if "doomed" in arguments:
        os.kill(os.getpid(), signal.SIGKILL)
    return run_sweep_task(arguments, order, num_cpus)


@needs_ray
@pytest.mark.slow
def test_a_sweep_on_ray_runs_like_patchcore_train_and_reports_failed_and_killed_tasks(
    synthetic_root, tmp_path, monkeypatch
):
    import ray.cloudpickle

    import patchcore.apps.sweep as sweep_module

    progress = []  # (description, total, items) of every progress display the driver shows

    def recorded_track(iterable, description, total=None, unit="it"):
        progress.append([description, total, 0])
        for item in iterable:
            progress[-1][2] += 1
            yield item

    monkeypatch.setattr(sweep_module, "track", recorded_track)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the runner above
    data = tmp_path / "data"
    for category, source in (("texture", "texture"), ("object", "object"),
                             ("broken", "texture"), ("doomed", "texture")):  # fmt: skip
        shutil.copytree(synthetic_root / source, data / category)
    broken_image = min((data / "broken" / "train" / "good").iterdir())
    broken_image.write_bytes(b"not an image")
    path = write_sweep(tmp_path, data, "texture, broken, object, doomed", MAPPING_CONFIGURATION)

    options = SweepOptions(path, ClusterOptions(num_cpus=1, local_cpus=2))
    report, outcomes = run_sweep(options, runner=killing_runner)
    assert "killed" in report and "failed" in report
    assert progress == [["Sweep", 4, 4]]  # one bar, over the tasks

    assert [(o.task.label, o.status) for o in outcomes] == [
        ("small_p25/mvtec_texture", "done"), ("small_p25/mvtec_broken", "failed"),
        ("small_p25/mvtec_object", "done"), ("small_p25/mvtec_doomed", "killed"),
    ]  # fmt: skip
    assert str(broken_image) in outcomes[1].error
    message = str(unfinished_error(outcomes))
    assert message.startswith("2 of 4 sweep task(s) did not finish: small_p25/mvtec_broken failed")
    assert "small_p25/mvtec_doomed killed" in message and "\n" not in message
    run_folder = tmp_path / "results" / "demo" / "small_p25"
    rows = read_results_csv(run_folder / "results.csv")
    assert list(rows) == ["mvtec_texture", "mvtec_object", "Mean"]  # merged, in sweep order
    assert sorted(p.name for p in (run_folder / "logs").iterdir()) == [
        "mvtec_broken.log", "mvtec_object.log", "mvtec_texture.log"]  # the killed one had none
    assert "patchcore-train" in (run_folder / "logs" / "mvtec_object.log").read_text()

    # The same pair through patchcore-train gives the same row.
    single = CliRunner().invoke(train_cli, [
        "--seed", "1", "--gpu", "-1", "--log_project", "single", str(tmp_path / "results"),
        "patch_core", *SMALL, "sampler", "-p", "0.25", "approx_greedy_coreset",
        "dataset", "--resize", "72", "--imagesize", "64", "--batch_size", "4",
        "--num_workers", "0", "-d", "object", "mvtec", str(data),
    ])  # fmt: skip
    assert single.exit_code == 0, single.output
    expected = read_results_csv(tmp_path / "results" / "single" / "group" / "results.csv")
    assert rows["mvtec_object"] == pytest.approx(expected["mvtec_object"], abs=1e-5)

    # Running again runs only what did not finish.
    code, output = sweep(path, "--dry_run")
    assert code == 0, output
    assert task_lines(output) == [
        ["skipped", "small_p25/mvtec_texture"], ["planned", "small_p25/mvtec_broken"],
        ["skipped", "small_p25/mvtec_object"], ["planned", "small_p25/mvtec_doomed"],
    ]  # fmt: skip


# ------------------------------------------------------------ merged results
def merge_rows(path: Path, worker: int) -> None:
    from patchcore.evaluation.reporting import merge_results_csv

    for row in range(15):
        merge_results_csv(path, {f"w{worker}_r{row}": {"instance_auroc": worker + row / 100}})


def test_processes_merging_into_one_results_csv_lose_no_row(tmp_path):
    import multiprocessing

    path = tmp_path / "results.csv"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=merge_rows, args=(path, worker)) for worker in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join()
    assert [process.exitcode for process in workers] == [0] * 4
    rows = read_results_csv(path)
    assert len(rows) == 4 * 15 + 1
    assert rows["w3_r7"] == {"instance_auroc": 3.07}
    assert rows["Mean"]["instance_auroc"] == pytest.approx(sum(w + r / 100 for w in range(4)
                                                               for r in range(15)) / 60)  # fmt: skip


def test_merging_replaces_a_row_and_orders_the_named_ones_first(tmp_path):
    from patchcore.evaluation.reporting import merge_results_csv

    path = tmp_path / "results.csv"
    merge_results_csv(path, {"b": {"pro": 0.1}}, order=("a", "b"))
    merge_results_csv(path, {"z": {"pro": 0.3}}, order=("a", "b"))
    merge_results_csv(path, {"a": {"pro": 0.2}, "b": {"pro": 0.5}}, order=("a", "b"))
    assert read_results_csv(path) == {"a": {"pro": 0.2}, "b": {"pro": 0.5}, "z": {"pro": 0.3},
                                      "Mean": {"pro": pytest.approx(1.0 / 3)}}  # fmt: skip
