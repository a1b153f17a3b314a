import pytest

from patchcore.config import DatasetConfig, PatchCoreConfig, PreprocessingConfig, SearchConfig
from patchcore.errors import ConfigurationError


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patchsize": 4}, "--patchsize must be an odd integer >= 1, got 4"),
        ({"patchsize": 0}, "--patchsize must be an odd integer >= 1, got 0"),
        ({"num_nn": 0}, "--anomaly_scorer_num_nn must be >= 1"),
        ({"layers": ()}, "at least one layer"),
        ({"distance": "cosine"}, "distance must be one of squared_l2, l2"),
        ({"target_embed_dimension": 0}, "--target_embed_dimension must be >= 1"),
    ],
)
def test_invalid_model_options_name_the_option(changes, message):
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        PatchCoreConfig(**changes)


def test_other_configurations_are_validated_once_on_construction():
    with pytest.raises(ConfigurationError, match="--imagesize must be between 32 and --resize"):
        PreprocessingConfig(resize=200, imagesize=224)
    with pytest.raises(ConfigurationError, match="backend must be one of rerank, faiss, torch"):
        SearchConfig(backend="annoy")
    with pytest.raises(ConfigurationError, match="--train_val_split must be in"):
        DatasetConfig("mvtec", "/data", ("bottle",), train_val_split=0.0)
    with pytest.raises(ConfigurationError, match="dataset must be one of mvtec, folder"):
        DatasetConfig("kolektor", "/data", ("bottle",))


def test_loader_workers_leave_the_cores_to_the_backbone_on_a_small_machine():
    from patchcore.config import MAX_DEFAULT_LOADER_WORKERS, default_loader_workers, usable_cores

    counts = [default_loader_workers(cores) for cores in (1, 2, 3, 4, 6, 8, 10, 64)]
    assert counts == [0, 0, 0, 1, 2, 3, 4, 4]
    assert MAX_DEFAULT_LOADER_WORKERS == 4
    expected = default_loader_workers(usable_cores())
    assert DatasetConfig("mvtec", "data", ("a",)).num_workers == expected


def test_every_command_defaults_its_loader_workers_to_the_same_rule():
    from patchcore.cli.predict import predict_cli
    from patchcore.cli.runs import evaluate_cli, train_cli
    from patchcore.cli.update import update_cli
    from patchcore.config import default_loader_workers

    commands = [predict_cli, update_cli, train_cli.commands["dataset"],
                evaluate_cli.commands["dataset"]]  # fmt: skip
    defaults = [next(p.default for p in c.params if p.name == "num_workers") for c in commands]
    assert defaults == [default_loader_workers()] * len(commands)
