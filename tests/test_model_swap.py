"""Replacing a model folder (`patchcore-update`, any save over an existing folder): at every
instant the folder is a complete version, a kill at any step loses nothing, leftovers are
recovered by the next load or update, readers never find the folder missing, and a folder
given as a symbolic link is updated at its target."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchcore import files
from patchcore.cli.update import update_cli
from patchcore.files import is_staging, recover_folder, staged_path
from patchcore.model.serialization import INDEX_FILE, load_models, save_models
from test_update import fitted_model

SOURCE = Path(__file__).resolve().parents[1] / "src"
VERSION_FILES = ("a.bin", "b.bin", "c.bin")  # a version's files, each holding its tag


def write_version(folder: Path, tag: str) -> None:
    for name in VERSION_FILES:
        (folder / name).write_text(tag)


def version_of(folder: Path) -> str | None:
    """The tag every file of `folder` holds; None when the folder is missing or mixed."""
    if not folder.is_dir() or sorted(p.name for p in folder.iterdir()) != list(VERSION_FILES):
        return None
    tags = {(folder / name).read_text() for name in VERSION_FILES}
    return tags.pop() if len(tags) == 1 else None


def save_version(path: Path, tag: str) -> None:
    with staged_path(path, folder=True) as staging:
        write_version(staging, tag)


def visible_leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.fixture(params=["exchange", "two renames"])
def swap_mode(request, monkeypatch):
    """Both ways a folder is replaced: the atomic exchange, and the renames used where the
    file system cannot exchange (forced here by hiding renameat2)."""
    if request.param == "two renames":
        monkeypatch.setattr(files, "_renameat2", lambda: None)
    return request.param


def test_the_folder_exchange_is_used_on_this_file_system(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    assert files.exchange_folders(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "a" and not any((tmp_path / "a").iterdir())


def test_the_folder_is_a_complete_version_after_every_step_of_an_exchange(tmp_path, monkeypatch):
    """Every file-system step of the replacement is followed by a look at the folder, as a
    reader would take: it always holds one complete version, the old one or the new one."""
    path = tmp_path / "model"
    save_version(path, "old")
    seen = []

    def observed(function):
        def step(*args, **kwargs):
            result = function(*args, **kwargs)
            seen.append(version_of(path))
            return result

        return step

    for name in ("rename", "replace", "mkdir"):
        monkeypatch.setattr(files.os, name, observed(getattr(os, name)))
    monkeypatch.setattr(files.Path, "rename", observed(Path.rename))
    monkeypatch.setattr(files, "exchange_folders", observed(files.exchange_folders))
    monkeypatch.setattr(files.shutil, "rmtree", observed(shutil.rmtree))
    save_version(path, "new")
    monkeypatch.undo()
    assert seen and set(seen) <= {"old", "new"}, seen
    assert seen[-1] == "new" and version_of(path) == "new"
    assert visible_leftovers(path) == []


# A child process replaces the folder and is killed (SIGKILL) just before its n-th
# file-system step; it prints "done" when no step was left to kill it at.
KILLED_SAVE = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from patchcore import files

    path, kill_at, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if mode == "two renames":
        files._renameat2 = lambda: None
    steps = [0]

    def killed(function):
        def step(*args, **kwargs):
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return step

    files.os.mkdir = killed(os.mkdir)
    files.os.replace = killed(os.replace)
    files.Path.rename = killed(Path.rename)
    files.Path.write_text = killed(Path.write_text)
    files.exchange_folders = killed(files.exchange_folders)
    files.shutil.rmtree = killed(shutil.rmtree)
    with files.staged_path(path, folder=True) as staging:
        for name in ("a.bin", "b.bin", "c.bin"):
            (staging / name).write_text("new")
    print("done")
""")


def test_a_kill_at_any_step_of_a_replacement_loses_no_version(tmp_path, swap_mode):
    """Killed before each step in turn: the folder (after the recovery the next load or
    update makes) is the old version or the new one, no leftover remains, and the next save
    works. With the exchange the folder needs no recovery at all."""
    environment = {**os.environ, "PYTHONPATH": str(SOURCE)}
    outcomes = []
    for kill_at in range(1, 30):
        path = tmp_path / f"kill-{kill_at}" / "model"
        path.parent.mkdir()
        save_version(path, "old")
        child = subprocess.run(
            [sys.executable, "-c", KILLED_SAVE, str(path), str(kill_at), swap_mode],
            env=environment, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if child.returncode == 0:
            assert child.stdout.strip() == "done"
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        if swap_mode == "exchange":
            assert version_of(path) in {"old", "new"}, (kill_at, visible_leftovers(path))
        recover_folder(path)
        outcomes.append(version_of(path))
        assert outcomes[-1] in {"old", "new"}, (kill_at, visible_leftovers(path))
        assert visible_leftovers(path) == [], kill_at
        save_version(path, "next")
        assert version_of(path) == "next" and visible_leftovers(path) == []
    else:
        pytest.fail("the save never completed")
    assert len(outcomes) >= 6 and "new" in outcomes and "old" in outcomes, outcomes


def _killed_between_the_renames(path: Path) -> tuple[Path, Path]:
    """The state a kill leaves between the two renames of a replacement without exchange:
    no folder, the complete new version `.ready-` and the old one `.retired-`, both of a
    process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    host = files._host()
    ready = path.parent / f".{path.name}.ready-{host}-{process.pid}-0123456789ab"
    retired = path.parent / f".{path.name}.retired-{host}-{process.pid}-0123456789ac"
    path.rename(retired)
    return ready, retired


@pytest.fixture(scope="module")
def two_models(synthetic_root, tmp_path_factory):
    """Two saved versions of a small model: the second with a larger bank."""
    folder = tmp_path_factory.mktemp("swap")
    model = fitted_model(synthetic_root)
    save_models(folder / "old", [model])
    return folder / "old", model


def test_the_next_load_recovers_a_model_killed_between_the_renames(two_models, tmp_path):
    source, model = two_models
    path = tmp_path / "models" / "model"
    shutil.copytree(source, path)
    ready, retired = _killed_between_the_renames(path)
    shutil.copytree(retired, ready)
    (ready / "update_history.json").write_text("[]")
    assert not path.exists()
    loaded = load_models(path)
    assert len(loaded[0].memory_bank) == len(model.memory_bank)
    assert (path / "update_history.json").is_file()  # the new version was put in place
    assert visible_leftovers(path) == []


def test_the_next_update_recovers_the_old_model_and_keeps_no_leftover(
    two_models, synthetic_root, tmp_path
):
    """Only the old version survived (the kill fell before the new one was ready): the
    update puts it back and updates it; a later save elsewhere to the same path neither
    fails nor loses it."""
    source, model = two_models
    path = tmp_path / "models" / "model"
    shutil.copytree(source, path)
    _killed_between_the_renames(path)
    image = max((synthetic_root / "texture" / "test").glob("*/*.png"))
    # --target_score 0: the image's features are added whatever the model's threshold
    outcome = CliRunner().invoke(update_cli, [str(path), str(image), "--gpu", "-1", "--num_workers",
                                              "0", "--target_score", "0"])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert len(load_models(path)[0].memory_bank) > len(model.memory_bank)
    assert [name for name in visible_leftovers(path) if name != ".model.lock"] == []


def test_readers_polling_the_folder_never_find_it_missing(tmp_path):
    """A separate process looks at the folder as fast as it can while twenty replacements
    run; it must always find a complete version."""
    path = tmp_path / "model"
    save_version(path, "0")
    poller = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import os, sys
            path, stop = sys.argv[1], sys.argv[2]
            looks = missing = 0
            while not os.path.exists(stop):
                looks += 1
                if not os.path.isfile(os.path.join(path, "a.bin")):
                    missing += 1
            print(looks, missing)
        """), str(path), str(tmp_path / "stop")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.3)
    for update in range(1, 21):
        save_version(path, str(update))
    (tmp_path / "stop").write_text("")
    looks, missing = map(int, poller.communicate(timeout=30)[0].split())
    assert looks > 1000 and missing == 0, (looks, missing)
    assert version_of(path) == "20"


def test_an_update_through_a_symbolic_link_updates_its_target(two_models, synthetic_root, tmp_path):
    source, model = two_models
    target = tmp_path / "store" / "model-v1"
    shutil.copytree(source, target)
    link = tmp_path / "deployed"
    link.symlink_to(target, target_is_directory=True)
    image = max((synthetic_root / "texture" / "test").glob("*/*.png"))
    outcome = CliRunner().invoke(update_cli, [str(link), str(image), "--gpu", "-1", "--num_workers",
                                              "0", "--target_score", "0"])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(load_models(target)[0].memory_bank) > len(model.memory_bank)
    assert (target / "update_history.json").is_file() and (target / INDEX_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir() if is_staging(p) or p.name.endswith(".lock")] == []
    assert [name for name in visible_leftovers(target) if name != ".model-v1.lock"] == []


def test_a_model_replaced_while_it_is_loaded_is_read_again_never_mixed(
    two_models, tmp_path, monkeypatch
):
    """The new version arrives after the old one's meta was read and before its bank: the
    loader notices and reads the folder again, so every part is the new version's."""
    import dataclasses

    from patchcore.model import serialization

    source, model = two_models
    path = tmp_path / "model"
    shutil.copytree(source, path)
    newer = dataclasses.replace(model.normal_statistics, threshold=123.0)
    new_folder = tmp_path / "new"
    model.normal_statistics, kept = newer, model.normal_statistics
    try:
        save_models(new_folder, [model])
    finally:
        model.normal_statistics = kept
    real_read = serialization.read_memory_bank
    replaced = []

    def read_after_a_replacement(bank_path):
        if not replaced:
            replaced.append(True)
            with staged_path(path, folder=True) as staging:
                shutil.copytree(new_folder, staging, dirs_exist_ok=True)
        return real_read(bank_path)

    monkeypatch.setattr(serialization, "read_memory_bank", read_after_a_replacement)
    loaded = load_models(path)
    assert replaced and loaded[0].normal_statistics.threshold == 123.0
