"""BatchNorm and zero padding folded into convolutions (patchcore.model.folding), and the
extractor's folded copy (the default `--backbone_runtime torch`)."""

import pytest
import torch
import torch.nn.functional as F

from patchcore.model.backbones import load_backbone
from patchcore.model.features import FeatureExtractor
from patchcore.model.folding import fold_batch_norms


def _batch_norm(channels: int, seed: int, affine: bool = True) -> torch.nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.BatchNorm2d(channels, affine=affine).eval()
    layer.running_mean.copy_(torch.randn(channels, generator=generator))
    layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)
    if affine:
        layer.weight.data.copy_(torch.randn(channels, generator=generator))
        layer.bias.data.copy_(torch.randn(channels, generator=generator))
    return layer


class Patterns(torch.nn.Module):
    """Every pattern the folding looks for, and the look-alikes it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_module = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm_module = _batch_norm(8, 1)
        self.pad_symmetric = torch.nn.ZeroPad2d(1)
        self.function_weight = torch.nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.function_bias = torch.nn.Parameter(torch.randn(8))
        self.norm_function = _batch_norm(8, 2, affine=False)
        self.pad_asymmetric = torch.nn.ZeroPad2d((0, 1, 0, 1))
        self.strided = torch.nn.Conv2d(8, 8, 3, stride=2)
        self.norm_strided = _batch_norm(8, 3)
        self.shared = torch.nn.Conv2d(8, 8, 1)  # its output has two users: not folded
        self.norm_shared = _batch_norm(8, 4)
        self.norm_training = _batch_norm(8, 5).train()  # batch statistics: not folded
        self.norm_training.momentum = 0.0  # (its running statistics stay as they are)
        self.norm_untracked = torch.nn.BatchNorm2d(8, track_running_stats=False).eval()

    def forward(self, x):
        x = torch.relu(self.norm_module(self.conv_module(x)))
        x = self.norm_function(F.conv2d(self.pad_symmetric(x), self.function_weight,
                                        self.function_bias))  # fmt: skip
        x = self.norm_strided(self.strided(self.pad_asymmetric(x)))
        shared = self.shared(x)
        return {"a": self.norm_shared(shared) + shared, "b": self.norm_training(x),
                "c": self.norm_untracked(x)}


def _modules_called(module: torch.fx.GraphModule, kind: type) -> int:
    return sum(
        node.op == "call_module" and type(module.get_submodule(node.target)) is kind
        for node in module.graph.nodes
    )


def test_folding_gives_the_same_outputs_and_leaves_the_original_alone():
    network = torch.fx.symbolic_trace(Patterns())
    before = {name: value.clone() for name, value in network.state_dict().items()
              if value.is_floating_point()}  # (a training-mode layer counts its batches)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(images)
        folded = fold_batch_norms(network)
        got = folded(images)
    for key in expected:
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(got[key], expected[key], rtol=0.0, atol=1e-5 * scale)
    # three BatchNorm layers folded (module conv, function conv without affine, strided),
    # the shared output's, the training-mode and the untracked one kept; the symmetric
    # padding folded, the asymmetric one kept
    assert _modules_called(network, torch.nn.BatchNorm2d) == 6
    assert _modules_called(folded, torch.nn.BatchNorm2d) == 3
    assert _modules_called(folded, torch.nn.ZeroPad2d) == 1
    assert folded.pad_asymmetric.padding == (0, 1, 0, 1)
    # the original's graph, weights and statistics are untouched, and shared, not copied
    assert all(torch.equal(network.state_dict()[name], value) for name, value in before.items())
    assert folded.shared.weight is network.shared.weight
    assert network.norm_training.training and not network.norm_module.training


def test_an_unfoldable_network_comes_back_unchanged_in_results():
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    network = torch.fx.symbolic_trace(plain)
    images = torch.rand(1, 3, 8, 8)
    assert torch.equal(fold_batch_norms(network)(images), network(images))


@pytest.mark.parametrize(
    "name, layers",
    [("resnet18", ("layer2", "layer3")), ("efficientnet_lite0", ("_blocks.4", "_blocks.10"))],
)
def test_the_extractor_folds_by_default_within_float_rounding(name, layers):
    """The default runtime folds every BatchNorm of these backbones (EfficientNet-Lite0 with
    its ImageNet weights; ResNet18's random ones with statistics made other than the
    initial zeros and ones); its maps equal the unfolded layers' within 1e-5 of their
    largest value, and the folded copy never enters the extractor's state dict."""
    pretrained = name == "efficientnet_lite0"
    extractor = FeatureExtractor(load_backbone(name, pretrained=pretrained), layers)
    generator = torch.Generator().manual_seed(3)
    for module in extractor.graph.modules():
        if isinstance(module, torch.nn.BatchNorm2d) and not pretrained:
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    extractor.use_runtime("torch")
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        folded = extractor(images)
        extractor.use_runtime("torch-unfolded")
        layers_as_they_are = extractor(images)
    assert extractor._folded is None
    extractor.use_runtime("torch")
    with torch.inference_mode():
        extractor(images)
    assert _modules_called(extractor._folded.network, torch.nn.BatchNorm2d) == 0
    for got, expected in zip(folded, layers_as_they_are, strict=True):
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-5 * scale)
    assert not any("folded" in key for key in extractor.state_dict())


def test_the_folded_copy_follows_new_weights_statistics_and_casts():
    """Loading a state dict, the reference's statistics pass and `to(dtype)` each rebuild
    the folded copy from the weights as they then are."""
    extractor = FeatureExtractor(load_backbone("resnet18", pretrained=False), ("layer2",))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    def folded_and_unfolded():
        extractor.use_runtime("torch")
        with torch.inference_mode():
            folded = extractor(images)[0]
        extractor.use_runtime("torch-unfolded")
        with torch.inference_mode():
            unfolded = extractor(images)[0]
        extractor.use_runtime("torch")
        with torch.inference_mode():
            again = extractor(images)[0]  # a fresh folded copy after use_runtime
        assert torch.equal(folded, again)
        return folded, unfolded

    first, _ = folded_and_unfolded()
    extractor.use_runtime("torch")
    with torch.inference_mode():
        extractor(images)  # builds the folded copy
    state = extractor.state_dict()
    state["graph.layer2.0.bn1.running_mean"] = state["graph.layer2.0.bn1.running_mean"] + 3.0
    extractor.load_state_dict(state)
    with torch.inference_mode():
        loaded = extractor(images)[0]
    _, unfolded = folded_and_unfolded()
    assert not torch.allclose(loaded, first)
    torch.testing.assert_close(loaded, unfolded, rtol=0.0, atol=1e-5 * float(unfolded.abs().max()))

    with torch.inference_mode():
        extractor(images)
    extractor.reproduce_reference_statistics((64, 64))
    with torch.inference_mode():
        after_pass = extractor(images)[0]
    _, unfolded = folded_and_unfolded()
    torch.testing.assert_close(after_pass, unfolded, rtol=0.0,
                               atol=1e-5 * float(unfolded.abs().max()))  # fmt: skip

    extractor.to(torch.float64)
    with torch.inference_mode():
        doubled = extractor(images.double())[0]
    assert doubled.dtype == torch.float64
