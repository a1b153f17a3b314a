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
