"""The package's shape: public names, one command-line layer with one set of shared options."""

import importlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

SUBPACKAGES = ("patchcore", "patchcore.data", "patchcore.model", "patchcore.evaluation",
               "patchcore.apps")  # fmt: skip
COMMANDS = {
    "patchcore.cli.runs": ("train_cli", "evaluate_cli"),
    "patchcore.cli.predict": ("predict_cli",),
    "patchcore.cli.export": ("export_cli", "export_deployment_cli"),
    "patchcore.cli.challenge": ("challenge_cli",),
    "patchcore.cli.dashboard": ("dashboard_cli",),
    "patchcore.cli.demo": ("demo_cli",),
    "patchcore.cli.synthetic": ("synthetic_cli",),
    "patchcore.cli.sweep": ("sweep_cli",),
    "patchcore.cli.compare": ("compare_cli",),
    "patchcore.cli.update": ("update_cli",),
}


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_public_name_of_a_subpackage_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_the_readme_imports_work():
    from patchcore import PatchCore, PatchCoreConfig, load_models, save_models
    from patchcore.model import PatchCoreModule, decide

    assert PatchCore.__name__ == "PatchCore" and PatchCoreConfig().backbone_name == "wideresnet50"
    assert callable(save_models) and callable(load_models) and callable(decide)
    assert PatchCoreModule.__module__ == "patchcore.model.module"


def test_command_modules_do_not_import_torch():
    """`--help` stays instant: no command module loads torch before its job starts."""
    modules = ", ".join(COMMANDS)
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("module", "command"), [(m, c) for m, commands in COMMANDS.items() for c in commands]
)
def test_every_command_has_the_shared_options_and_describes_them(module, command):
    cli = getattr(importlib.import_module(module), command)
    names = {name for parameter in cli.params for name in parameter.opts}
    assert {"--gpu", "--device", "--log_level", "--no_progress", "--debug"} <= names
    for parameter in cli.params:
        if parameter.param_type_name == "option":
            assert parameter.help, f"{command} {parameter.opts[0]} has no help text"
    output = CliRunner().invoke(cli, ["--help"]).output
    assert "--gpu" in output and "--device" in output


def test_chained_sub_commands_describe_every_option():
    from patchcore.cli.runs import evaluate_cli, train_cli

    for group in (train_cli, evaluate_cli):
        for command in group.commands.values():
            for parameter in command.params:
                if parameter.param_type_name == "option":
                    assert parameter.help, f"{command.name} {parameter.opts[0]} has no help"
