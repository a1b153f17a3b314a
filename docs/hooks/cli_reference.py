"""MkDocs hook: the command reference is generated from pyproject.toml's console scripts.

Every entry of `[project.scripts]` names a `main` function that runs one click command.
`on_page_markdown` replaces the marker `<!-- commands -->` in `reference/cli.md` with one
section per script, each an `mkdocs-click` directive on that click command, so a new command
or option appears in the reference without anyone editing a page (and a script whose
click command cannot be found fails the build). `tests/test_docs.py` imports this module
to check the generated reference against the click parameters.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # the docs and dev extras install tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- commands -->"
PAGE = "reference/cli.md"


def console_scripts(root: Path = ROOT) -> dict[str, str]:
    """`{script name: "module:function"}` from the project's pyproject.toml."""
    with open(root / "pyproject.toml", "rb") as file:
        return dict(tomllib.load(file)["project"]["scripts"])


def click_command_of(target: str) -> tuple[str, str, click.Command]:
    """The click command an entry point runs: `(module, attribute, command)`.

    The entry point is a function of its module that calls exactly one module-level click
    command (the convention of every `patchcore.cli` module); an entry point that is itself
    a click command is taken as it is.
    """
    module_name, function_name = target.split(":")
    module = importlib.import_module(module_name)
    function = getattr(module, function_name)
    if isinstance(function, click.Command):
        return module_name, function_name, function
    called = [
        name
        for name in function.__code__.co_names
        if isinstance(getattr(module, name, None), click.Command)
    ]
    if len(called) != 1:
        raise ValueError(
            f"{target}: expected the entry point to call one click command of its module, "
            f"found {called or 'none'}"
        )
    return module_name, called[0], getattr(module, called[0])


def reference_markdown(root: Path = ROOT) -> str:
    """One mkdocs-click directive per console script (each makes its own headings)."""
    sections = []
    for script, target in sorted(console_scripts(root).items()):
        module_name, attribute, _ = click_command_of(target)
        sections.append(
            f"::: mkdocs-click\n"
            f"    :module: {module_name}\n"
            f"    :command: {attribute}\n"
            f"    :prog_name: {script}\n"
            f"    :depth: 1\n"
            f"    :style: table\n"
        )
    return "\n".join(sections)


def on_config(config, **_):
    """Document the commands of this working tree, not of another installed copy."""
    source = str(ROOT / "src")
    if source not in sys.path:
        sys.path.insert(0, source)
    return config


def on_page_markdown(markdown, page, **_):
    """Fills the command reference page."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} must hold the marker {MARKER}")
    return markdown.replace(MARKER, reference_markdown())
