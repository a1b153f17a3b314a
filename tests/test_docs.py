"""The documentation runs: README.md and every page under docs/.

- Every ```python block runs, on its own, as a script in a fresh temporary folder (the
  test's working directory), on small synthetic data. A block that needs files first says so on the line
  just before its fence with an HTML comment, which the rendered page does not show:

      <!-- docs-test: setup=NAME -->

  where NAME is one of `SETUPS` below (`my_parts`: a small synthetic category in the folder
  layout at `my_parts/widget`; `exported`: a small calibrated model exported as
  `weights/bottle.pth` and `deploy/bottle.onnx`; `any_size`: a small whole-image model
  exported for any input size as `deploy/magnetic_tile.onnx`). Blocks without the comment get an empty
  folder. There is no way to skip a block, except that one importing `onnxruntime` or
  `openvino` is skipped where the `export`/`openvino` extra is not installed: an example
  that cannot run does not belong in the docs.
- Every command line in a ```bash block that runs a console script (`patchcore-*`, or one of
  the `bin/` scripts) names a real command of pyproject.toml's `[project.scripts]`, and every
  option it passes exists on that click command (or, for the chained commands, on the
  sub-command it follows), so renamed or removed options cannot linger in the docs.
- `mkdocs build --strict` passes (skipped when MkDocs is not installed: `pip install -e
  ".[docs]"`), and the generated command reference names every option of every command.
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SETUP_COMMENT = re.compile(r"<!--\s*docs-test:\s*setup=([\w-]+)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def _load_hook():
    spec = importlib.util.spec_from_file_location(
        "cli_reference", DOCS / "hooks" / "cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI_REFERENCE = _load_hook()


def documentation_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    setup: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the setup comment before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index].strip())
        if not opening:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        previous = lines[index - 1].strip() if index else ""
        setup = SETUP_COMMENT.fullmatch(previous)
        blocks.append(
            Block(path, index + 1, opening.group(1), "\n".join(lines[index + 1 : end]),
                  setup.group(1) if setup else None)
        )  # fmt: skip
        index = end + 1
    return blocks


def all_blocks(language: str) -> list[Block]:
    return [
        block
        for path in documentation_files()
        for block in code_blocks(path)
        if block.language == language
    ]


# ------------------------------------------------------------------------ setups
def _setup_my_parts(folder: Path) -> None:
    """`my_parts/widget`: a synthetic category (10 good training images, a few good and
    defective test images with masks) in the MVTec/folder layout."""
    from patchcore.data.synthetic import SyntheticSpec, generate_category

    spec = SyntheticSpec(image_size=96, num_train=10, num_test_good=2,
                         num_test_defective_per_type=1, seed=1)  # fmt: skip
    generate_category(folder / "my_parts", "texture", spec).rename(folder / "my_parts" / "widget")


def _setup_exported(folder: Path) -> None:
    """A small random-weight model, calibrated and saved as `models/mvtec_bottle`, exported
    by `patchcore-export` as `weights/bottle.pth` and (when ONNX Runtime is installed)
    `deploy/bottle.onnx`."""
    import torch
    from click.testing import CliRunner
    from tests.conftest import small_config

    from patchcore import PatchCore, save_models
    from patchcore.cli.export import export_deployment_cli

    model = PatchCore(small_config())
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.fit([images[:3]])
    model.calibrate([images[3:]])
    save_models(folder / "models" / "mvtec_bottle", [model])
    exports = [("weights", "torch")]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        exports.append(("deploy", "onnx"))
    for output, kind in exports:
        outcome = CliRunner().invoke(
            export_deployment_cli,
            [str(folder / "models" / "mvtec_bottle"), "-o", str(folder / output), "--format", kind],
        )
        assert outcome.exit_code == 0, outcome.output


def _setup_any_size(folder: Path) -> None:
    """A small random-weight whole-image model (`--crop none`), calibrated and exported by
    `patchcore-export` for any input size as `deploy/magnetic_tile.onnx` (when ONNX Runtime
    is installed)."""
    import torch
    from click.testing import CliRunner
    from tests.conftest import small_config

    from patchcore import PatchCore, save_models
    from patchcore.cli.export import export_deployment_cli
    from patchcore.config import PreprocessingConfig

    model = PatchCore(small_config(preprocessing=PreprocessingConfig(72, 64, crop="none")))
    images = torch.rand(4, 3, 72, 96, generator=torch.Generator().manual_seed(0))
    model.fit([images[:3]])
    model.calibrate([images[3:]])
    save_models(folder / "models" / "magnetic_tile", [model])
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        outcome = CliRunner().invoke(
            export_deployment_cli,
            [str(folder / "models" / "magnetic_tile"), "-o", str(folder / "deploy"),
             "--format", "onnx"],
        )  # fmt: skip
        assert outcome.exit_code == 0, outcome.output


SETUPS = {"my_parts": _setup_my_parts, "exported": _setup_exported,
          "any_size": _setup_any_size}  # fmt: skip


def _needs(block: Block) -> None:
    """Skips a block whose optional runtime is not installed (the `export` extra)."""
    for package in ("onnxruntime", "openvino"):
        if re.search(rf"^\s*import .*\b{package}\b", block.code, re.MULTILINE):
            pytest.importorskip(package)


PYTHON_BLOCKS = all_blocks("python")


def test_the_docs_hold_python_examples():
    assert len(PYTHON_BLOCKS) >= 3, [block.name for block in PYTHON_BLOCKS]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Each setup's files, made once and copied into every block's folder."""
    folders: dict[str, Path] = {}

    def prepare(name: str, into: Path) -> None:
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(f"setup_{name}")
            SETUPS[name](folders[name])
        shutil.copytree(folders[name], into, dirs_exist_ok=True)

    return prepare


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.name)
def test_every_python_example_runs(block, prepared, tmp_path, monkeypatch):
    if block.setup is not None:
        assert block.setup in SETUPS, f"{block.name}: unknown setup '{block.setup}'"
    _needs(block)
    monkeypatch.syspath_prepend(str(ROOT))
    if block.setup is not None:
        prepared(block.setup, tmp_path)
    monkeypatch.chdir(tmp_path)
    script = tmp_path / f"example_{block.path.stem}_{block.line}.py"
    script.write_text(f"# {block.name}\n{block.code}\n", encoding="utf-8")
    runpy.run_path(str(script), run_name="__docs_example__")


# ---------------------------------------------------------------- shell examples
def _commands() -> dict[str, click.Command]:
    return {
        script: CLI_REFERENCE.click_command_of(target)[2]
        for script, target in CLI_REFERENCE.console_scripts().items()
    }


def _bin_scripts() -> dict[str, str]:
    """`bin/<name>.py` -> the console script running the same entry point."""
    by_target = {target: script for script, target in CLI_REFERENCE.console_scripts().items()}
    mapping = {}
    for path in sorted((ROOT / "bin").glob("*.py")):
        found = re.search(
            r"^from (patchcore\.[\w.]+) import (\w+)$", path.read_text(), re.MULTILINE
        )
        assert found, f"{path}: no entry point import"
        mapping[f"bin/{path.name}"] = by_target[f"{found.group(1)}:{found.group(2)}"]
    return mapping


def shell_commands(code: str) -> list[list[str]]:
    """The argument lists of the console-script calls in a shell block: continuation lines
    joined, comments dropped, cut at `&&`, `|`, `;` and redirections; optional parts
    written as `[--crop none]` are read as given."""
    text = re.sub(r"\\\n", " ", code)
    calls = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        for part in re.split(r"&&|\|\||[|;]", line):
            try:
                words = shlex.split(part.replace("[", " ").replace("]", " "))
            except ValueError:
                continue
            for position, word in enumerate(words):
                base = word.rsplit("/", 1)[-1]
                bin_script = re.search(r"(^|/)bin/\w+\.py$", word)
                if (
                    base.startswith("patchcore-") and ("/" not in word or "/bin/" in word)
                ) or bin_script:
                    name = "bin/" + base if bin_script else base
                    arguments = []
                    for argument in words[position + 1 :]:
                        if argument.startswith(">") or argument in {"2>&1", "&"}:
                            break
                        arguments.append(argument)
                    calls.append([name, *arguments])
                    break
    return calls


def _options(command: click.Command) -> set[str]:
    names = {"--help"}
    for parameter in command.params:
        if isinstance(parameter, click.Option):
            names.update(parameter.opts, parameter.secondary_opts)
    return names


def unknown_options(command: click.Command, arguments: list[str]) -> list[str]:
    """Options in `arguments` that `command` (walking into a chained group's sub-commands
    by name) does not have."""
    current, unknown = command, []
    for argument in arguments:
        if isinstance(command, click.Group) and argument in command.commands:
            current = command.commands[argument]
            continue
        is_option = argument.startswith("-") and argument not in {"-", "--"}
        if (
            is_option
            and not _is_number(argument)
            and argument.split("=", 1)[0] not in _options(current)
        ):
            unknown.append(f"{argument} (on {current.name})")
    return unknown


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_every_command_line_in_the_docs_names_real_commands_and_options():
    commands, bin_scripts = _commands(), _bin_scripts()
    checked, problems = 0, []
    for block in all_blocks("bash"):
        for call in shell_commands(block.code):
            name, arguments = call[0], call[1:]
            name = bin_scripts.get(name, name)
            if name not in commands:
                problems.append(f"{block.name}: no command '{name}'")
                continue
            problems += [f"{block.name}: {name} {bad}"
                         for bad in unknown_options(commands[name], arguments)]  # fmt: skip
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 20  # the walk found the docs' command lines


def test_the_command_line_check_catches_a_wrong_option():
    commands = _commands()
    (train,) = shell_commands(
        "patchcore-train --log_group g results \\\n  patch_core -b resnet18 --no_such_option 3 "
        "sampler -p 0.1 approx_greedy_coreset dataset [--crop none] -d x mvtec DATA  # note"
    )
    assert unknown_options(commands["patchcore-train"], train[1:]) == [
        "--no_such_option (on patch_core)"
    ]
    (predict,) = shell_commands("python bin/predict_patchcore.py M in --heatmaps h -o x.csv")
    assert predict[0] == "bin/predict_patchcore.py"
    predict_command = commands["patchcore-predict"]
    assert unknown_options(predict_command, predict[2:]) == []
    assert unknown_options(predict_command, ["--log_group", "g"]) == [
        f"--log_group (on {predict_command.name})"
    ]


# ------------------------------------------------------------------ the site build
def test_the_site_builds_strictly_and_the_command_reference_names_every_option(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocs_click")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    outcome = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert outcome.returncode == 0, outcome.stderr[-4000:]
    reference = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    missing = []
    for script, command in _commands().items():
        if f'id="{script}"' not in reference:
            missing.append(f"section {script}")
        members = [command, *getattr(command, "commands", {}).values()]
        for member in members:
            for option in _options(member) - {"--help"}:
                if option not in reference:
                    missing.append(f"{script} {member.name} {option}")
    assert not missing, missing
