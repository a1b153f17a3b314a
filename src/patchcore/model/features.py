"""Patch features: a frozen backbone's intermediate maps, turned into one vector per patch.

`FeatureExtractor` traces the backbone into a graph that ends at the deepest requested
layer, so the forward pass computes nothing past it (no hooks, no exceptions to stop early).
Eager torch runs that graph by default, with its BatchNorm layers folded into the
convolutions before them (`FoldedBackbone`, `patchcore.model.folding`);
`FeatureExtractor.use_runtime` runs the graph's layers as they are instead, or hands it to
another CPU runtime (`CompiledBackbone`: TorchScript with oneDNN graph fusion). All compute
the same maps up to float rounding.

`PatchFeatureAggregator` builds the locally aware patch features of the PatchCore paper and
the reference implementation. For each layer: every position's p x p neighbourhood (zero
padded, stride s) is flattened in (channel, row, column) order and average-pooled to
`pretrain_embed_dimension` values. The deeper layers' grids are bilinearly resized to the
first layer's grid. The per-layer vectors are concatenated and average-pooled once more to
`target_embed_dimension`. The reference resizes the flattened neighbourhoods and pools
afterwards; every step is linear, so we compose the unfolding and both poolings into one
grouped convolution per layer and resize its output instead (see the class), getting the
same features up to float rounding.

`PatchEmbedder` chains the two, and `build_embedder` is the one place where a model
configuration becomes an embedder: the estimator and the exported module both use it. It
gives the backbone the statistics the configuration asks for: by default the reference's
(`FeatureExtractor.reproduce_reference_statistics`: the training-mode pass of a constant
image that the reference's `PatchCore.load` makes before any feature is taken).
"""

from __future__ import annotations

import itertools
import math
import threading
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_true
from torchvision.models.feature_extraction import create_feature_extractor

from patchcore.config import PatchCoreConfig
from patchcore.errors import BackboneError, ConfigurationError, DataError
from patchcore.model.backbones import Backbone, load_backbone
from patchcore.model.folding import fold_batch_norms


class FeatureExtractor(torch.nn.Module):
    """Normalises images in [0, 1] with the backbone's statistics and returns layer outputs."""

    def __init__(self, backbone: Backbone, layers: tuple[str, ...]) -> None:
        super().__init__()
        _check_layers_exist(backbone, layers)
        self.layers = tuple(layers)
        with warnings.catch_warnings():
            # torchvision warns that train- and eval-mode graphs may differ; we only use eval.
            warnings.filterwarnings("ignore", message=".*subsequence of those obtained in train")
            self.graph = create_feature_extractor(
                backbone.network, return_nodes={layer: layer for layer in layers}
            )
        _end_at_last_layer(self.graph.train_graph, layers)
        self.graph.eval()
        self.graph.requires_grad_(False)
        self.generator_state = backbone.generator_state
        # the generator's state after what the reference draws while building the model:
        # the backbone, then its statistics pass (reproduce_reference_statistics)
        self.later_generator_state = backbone.generator_state
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))
        self._folded: FoldedBackbone | None = None
        # Channels-last (NHWC) weights and inputs: oneDNN's and cuDNN's fastest convolution
        # layouts (EfficientNet-Lite0 extraction about 1.25x faster on CPU, docs/explanations/performance.md);
        # the same arithmetic up to float rounding.
        self.use_memory_format(torch.channels_last)
        self.runtime = "torch"
        self._compiled: CompiledBackbone | None = None

    def reproduce_reference_statistics(self, image_size: tuple[int, int]) -> None:
        """The reference implementation's statistics pass, which moves the backbone's
        BatchNorm running statistics before any feature is taken.

        The reference's `PatchCore.load` asks its feature aggregator for the layers' channel
        counts by passing `torch.ones(1, 3, imagesize, imagesize)` through the freshly
        built backbone, which is still in training mode: every BatchNorm layer the pass
        reaches blends that constant image's batch statistics into its running mean and
        variance (momentum 0.1 in torchvision's ResNets, 0.01 in EfficientNet-Lite), and
        random layers (drop-connect) draw from the generator. The pass stops at the last
        extracted layer. Here: the same ones (in the space the backbone sees, not
        normalised), the training-mode graph cut after the last layer (the modules the
        reference's pass reaches), NCHW layout as the reference, without gradients, on
        the CPU, drawing from the generator as it stood after the backbone was built
        (`Backbone.generator_state`); then back to eval mode. Deterministic: the same
        configuration always gives the same statistics. The generator's state after the
        pass is kept as `later_generator_state`: where the reference's global generator
        stands next (see `PatchCore.reference_projection_state`).
        """
        layout = self.memory_format
        self.use_memory_format(torch.contiguous_format)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if self.generator_state is not None:
                torch.set_rng_state(self.generator_state)
            self.graph.train(True)
            self.graph(torch.ones(1, 3, *image_size, device=self.mean.device))
            self.graph.train(False)
            if self.generator_state is not None:
                self.later_generator_state = torch.get_rng_state()
        self.use_memory_format(layout)

    def use_memory_format(self, memory_format: torch.memory_format) -> None:
        """Runs the backbone's weights and inputs in `memory_format` (`torch.contiguous_format`
        is torch's default NCHW, the reference's)."""
        self.memory_format = memory_format
        self.graph.to(memory_format=memory_format)
        self._compiled = None
        self._folded = None

    def use_runtime(self, runtime: str) -> None:
        """Runs the backbone with `runtime` (`patchcore.config.BACKBONE_RUNTIMES`) from the
        next call on: `torch` (the default) eager over the graph with BatchNorm folded,
        `torch-unfolded` eager over the graph's own layers, `torchscript` compiled (CPU
        only). A folded or compiled form is built at that call from the weights and
        statistics as they then are (after the reference's statistics pass)."""
        if runtime != "torch" and self.mean.device.type != "cpu":
            raise ConfigurationError(
                f"--backbone_runtime {runtime} runs on the CPU only; use --backbone_runtime "
                f"torch on {self.mean.device}"
            )
        self.runtime = runtime
        self._compiled = None
        self._folded = None

    def train(self, mode: bool = True) -> FeatureExtractor:
        """The backbone stays frozen in eval mode whatever the caller asks."""
        return super().train(False)

    def _apply(self, fn, recurse=True):
        # moving or casting the weights (`to`, `cuda`, `float`, ...) makes the folded copy stale
        self._folded = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # so do new weights or statistics
        self._folded = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: [B, 3, H, W] in [0, 1] -> one [B, C_i, H_i, W_i] map per layer, in order."""
        normalised = ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        if self.runtime == "torch-unfolded" or _tracing():
            # graphs traced or exported for other runtimes take the layers as they are
            # (ONNX Runtime and OpenVINO fold BatchNorm themselves)
            outputs = self.graph(normalised)
            return [outputs[layer] for layer in self.layers]
        if self.runtime == "torch":
            if self._folded is None:
                self._folded = FoldedBackbone(self.graph, self.layers)
            outputs = self._folded.network(normalised)
            return [outputs[layer] for layer in self.layers]
        if self._compiled is None:
            self._compiled = CompiledBackbone(LayerMaps(self.graph, self.layers), normalised)
        return self._compiled(normalised)


class LayerMaps(torch.nn.Module):
    """A feature-extraction graph's eval-mode pass with its layers' maps as a tuple, in the
    layers' order (what tracers and converters take). torchvision's extractor holds a
    training and an eval graph; the eval one becomes a plain GraphModule of its own (sharing
    the submodules), which `torch.export` can follow."""

    def __init__(self, graph: torch.nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        eval_graph = getattr(graph, "eval_graph", None)
        # not named `graph`: an exported program's module has a `graph` attribute of its own
        self.network = graph if eval_graph is None else torch.fx.GraphModule(graph, eval_graph)
        self.layers = layers

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.network(images)
        return tuple(outputs[layer] for layer in self.layers)


def _tracing() -> bool:
    """Whether this call is being traced or exported (torch.export, dynamo, the ONNX
    exporter, TorchScript's tracer)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class FoldedBackbone:
    """A feature-extraction graph's eval-mode pass with BatchNorm folded into the
    convolutions (`patchcore.model.folding.fold_batch_norms`), built from the weights and
    statistics as they are; a plain object, so that it never enters a module's state dict
    (the extractor saves and loads the graph's own layers). It shares every weight but the
    folded convolutions' with the graph. EfficientNet-Lite0's backbone runs in 0.74x to
    0.77x the time of its layers as they are, WideResNet50's in about the same time
    (docs/explanations/performance-inference.md); maps within 1e-5 relative of theirs."""

    def __init__(self, graph: torch.nn.Module, layers: tuple[str, ...]) -> None:
        with torch.inference_mode(False), torch.no_grad():
            self.network = fold_batch_norms(LayerMaps(graph, layers).network)


class CompiledBackbone:
    """`LayerMaps` traced for TorchScript, once per input image size (each from a plain
    example of that size, the inputs' layout and a batch of 2; a plain object, so that it
    never enters a module's state dict): frozen (BatchNorm folded into the convolutions,
    weights constant) and run with oneDNN graph fusion (`torch.jit.enable_onednn_fusion`, a
    process-wide switch that affects TorchScript graphs only); under a second to build.
    Calls are serialised.

    OpenVINO's CPU runtime is not offered for the backbone in process: in whole `predict` it
    was no faster on 2 cores (1.00x eager), and a process that had compiled the backbone with
    it later crashed (segmentation fault) in unrelated torch work, reproduced in the test
    suite; bench/bench_backbone_runtimes.py still measures it."""

    def __init__(self, module: LayerMaps, example: torch.Tensor) -> None:
        self.module = module.eval()
        self.memory_format = (torch.channels_last if example.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format)  # fmt: skip
        self._built: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        with self._lock:
            if size not in self._built:
                self._built[size] = self._build(images)
            return self._built[size](images)

    def _build(self, images: torch.Tensor):
        example = torch.zeros(2, *images.shape[1:]).contiguous(memory_format=self.memory_format)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's deprecation and layout notices
            torch.jit.enable_onednn_fusion(True)
            traced = torch.jit.freeze(torch.jit.trace(self.module, example))
        return lambda batch: list(traced(batch))


def _end_at_last_layer(graph: torch.fx.Graph, layers: tuple[str, ...]) -> None:
    """Cuts a traced training-mode graph after the node of the requested layer computed
    last, as the reference's forward hook stops its pass there. Tracing keeps nodes past
    the layers that it cannot prove free of side effects (drop-connect's random draws and
    the BatchNorm layers feeding them); they are removed, so the pass neither draws nor
    updates statistics beyond the last layer."""
    output = next(node for node in graph.nodes if node.op == "output")
    wanted = set(output.args[0].values())
    last = [node for node in graph.nodes if node in wanted][-1]
    for node in reversed(list(graph.nodes)):
        if node is last:
            break
        if node is not output:
            graph.erase_node(node)
    graph.lint()


def reference_pass_size(config: PatchCoreConfig) -> tuple[int, int]:
    """The image size of the reference's statistics pass: the backbone's input, which is
    the centre crop (`--imagesize`, the reference's only input shape) or, with tiles, a
    tile. Whole images (`--crop none`) vary in size, so they use `--imagesize` too (224 by
    default, as the reference's default): a model's statistics then depend on its
    configuration only, never on the images it meets."""
    preprocessing = config.preprocessing
    side = preprocessing.tile if preprocessing.tile is not None else preprocessing.imagesize
    return side, side


def _check_layers_exist(backbone: Backbone, layers: tuple[str, ...]) -> None:
    module_names = {name for name, _ in backbone.network.named_modules() if name}
    for layer in layers:
        if layer not in module_names:
            top_level = [name for name, _ in backbone.network.named_children()]
            raise BackboneError(
                f"layer '{layer}' does not exist in backbone '{backbone.name}'; its top-level "
                f"layers are: {', '.join(top_level)}"
            )


def patch_grid_size(size: int, patchsize: int, stride: int) -> int:
    """Number of patch positions along one axis of a feature map of `size`."""
    padding = (patchsize - 1) // 2
    return (size + 2 * padding - patchsize) // stride + 1


class PatchFeatureAggregator(torch.nn.Module):
    """Turns a list of layer feature maps into one feature vector per patch position.

    Unfolding, both average poolings and the concatenation are linear in the layer maps, and
    the poolings act on (channel, row, column) neighbourhoods, so for each layer they compose
    into one convolution (p x p kernel, the patch stride, zero padding) whose output channels
    are that layer's share of the final features. Each output averages a short run of
    neighbourhood values, so only a few input channels feed it: the convolution is grouped as
    finely as that allows (depthwise for WideResNet50's layer2 at 1024/1024). A deeper layer's
    share is computed on its own grid and resized bilinearly to the first layer's, as the
    reference resizes its unfolded neighbourhoods (resizing and channel pooling commute).
    The features equal the reference's up to float rounding (`tests/test_patch_features.py`)
    and need no unfolded copy, 9x the layer's size.
    """

    def __init__(
        self,
        patchsize: int,
        stride: int,
        pretrain_embed_dimension: int,
        target_embed_dimension: int,
    ) -> None:
        super().__init__()
        self.patchsize = patchsize
        self.stride = stride
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        # (layer channels, dtype, device) -> each layer's convolution; shapes decide them
        self._convolutions: dict[tuple, list[LayerPooling]] = {}

    def layer_poolings(self, channels: tuple[int, ...], like: torch.Tensor) -> list[LayerPooling]:
        """The composed convolution of each layer for layers of `channels` channels, with
        weights of `like`'s dtype and device."""
        key = (channels, like.dtype, like.device)
        if key not in self._convolutions:
            poolings = composed_poolings(
                channels, self.patchsize, self.pretrain_embed_dimension,
                self.target_embed_dimension,
            )  # fmt: skip
            self._convolutions[key] = [
                replace(pooling, weight=pooling.weight.to(like.device, like.dtype))
                for pooling in poolings
            ]
        return self._convolutions[key]

    def forward(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Returns features [B*h*w, target_dim] in (image, row, column) order and the grid (h, w)."""
        channels = tuple(int(feature_map.shape[1]) for feature_map in feature_maps)
        poolings = self.layer_poolings(channels, feature_maps[0])
        padding = (self.patchsize - 1) // 2
        grid = None
        shares = []
        for feature_map, pooling in zip(feature_maps, poolings):
            share = F.conv2d(
                feature_map, pooling.weight, stride=self.stride, padding=padding,
                groups=pooling.groups,
            )  # fmt: skip
            if grid is None:
                grid = tuple(share.shape[-2:])
            elif _may_differ(tuple(share.shape[-2:]), grid):
                share = F.interpolate(share, size=grid, mode="bilinear", align_corners=False)
            shares.append(share)
        features = torch.cat(_summed_segments(shares, poolings), dim=1)  # [B, T, h, w]
        features = features.permute(0, 2, 3, 1).reshape(-1, self.target_embed_dimension)
        return features, (grid[0], grid[1])


def _may_differ(size: tuple, other: tuple) -> bool:
    """Whether two grid sizes differ; True when it depends on a symbolic input size (an
    export with dynamic height and width), where resizing to the same size changes nothing:
    a bilinear resize to the same size copies each value exactly."""
    return any(guard_or_true(a != b) for a, b in zip(size, other, strict=True))


@dataclass(frozen=True)
class LayerPooling:
    """One layer's share of the final features: outputs [first, first + len(weight)) are
    `conv2d(layer map, weight, groups=groups)` (plus other layers' shares where a final
    average straddles two layers)."""

    first: int
    weight: torch.Tensor  # [outputs, channels / groups, p, p]
    groups: int


def composed_poolings(
    channels: tuple[int, ...], patchsize: int, pretrain_dimension: int, target_dimension: int
) -> list[LayerPooling]:
    """Composes the reference's two adaptive average poolings (each layer's flattened p x p
    neighbourhoods to `pretrain_dimension`, then all layers' to `target_dimension`) into one
    grouped convolution per layer, weights summed in float64."""
    area = patchsize * patchsize
    weights: list[dict[int, dict[int, float]]] = [{} for _ in channels]  # output -> input -> w
    first_stage = [_pooling_windows(count * area, pretrain_dimension) for count in channels]
    second_stage = _pooling_windows(len(channels) * pretrain_dimension, target_dimension)
    for output, window in enumerate(second_stage):
        for pooled in window:
            layer, position = divmod(pooled, pretrain_dimension)
            inputs = first_stage[layer][position]
            share = weights[layer].setdefault(output, {})
            for value in inputs:
                share[value] = share.get(value, 0.0) + 1.0 / (len(window) * len(inputs))
    return [
        _grouped_convolution(layer_weights, count, patchsize)
        for layer_weights, count in zip(weights, channels)
    ]


def _grouped_convolution(
    weights: dict[int, dict[int, float]], channels: int, patchsize: int
) -> LayerPooling:
    """The most finely grouped convolution computing the outputs in `weights` (output ->
    flattened neighbourhood input -> weight): `groups` blocks of consecutive outputs, each fed
    only by its own block of consecutive channels."""
    area = patchsize * patchsize
    first, last = min(weights), max(weights)
    outputs = last - first + 1
    # the channels feeding each output (windows are contiguous, so every output in between
    # has some)
    feeding = [
        (min(weights[output]) // area, max(weights[output]) // area)
        for output in range(first, last + 1)
    ]
    common = math.gcd(outputs, channels)
    groups = max(
        count
        for count in range(1, common + 1)
        if common % count == 0
        and all(
            low >= index // (outputs // count) * (channels // count)
            and high < (index // (outputs // count) + 1) * (channels // count)
            for index, (low, high) in enumerate(feeding)
        )
    )
    per_group = channels // groups
    weight = torch.zeros(outputs, per_group, patchsize, patchsize, dtype=torch.float64)
    rows, columns, values = [], [], []
    for output, inputs in weights.items():
        block = (output - first) // (outputs // groups)
        for value_index, value in inputs.items():
            channel, offset = divmod(value_index, area)
            rows.append(output - first)
            columns.append((channel - block * per_group) * area + offset)
            values.append(value)
    weight.view(outputs, -1)[rows, columns] = torch.tensor(values, dtype=torch.float64)
    return LayerPooling(first, weight, groups)


def _summed_segments(shares: list[torch.Tensor], poolings: list[LayerPooling]) -> list[torch.Tensor]:
    """Consecutive pieces of the final features, in order: where layers' output ranges meet
    in one output (a final average over values of two layers), their shares are added."""
    edges = sorted({p.first for p in poolings} | {p.first + len(p.weight) for p in poolings})
    pieces = []
    for start, end in itertools.pairwise(edges):
        parts = [
            share[:, start - pooling.first : end - pooling.first]
            for share, pooling in zip(shares, poolings)
            if pooling.first <= start and end <= pooling.first + len(pooling.weight)
        ]
        pieces.append(sum(parts[1:], parts[0]))
    return pieces


def _pooling_windows(length: int, size: int) -> list[range]:
    """The inputs averaged by each of `size` adaptive average-pooling windows over `length`
    values: floor(j length / size) up to ceil((j + 1) length / size)."""
    return [range(j * length // size, -(-(j + 1) * length // size)) for j in range(size)]


class PatchEmbedder(torch.nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> patch features [B*h*w, D] and the patch grid (h, w)."""

    def __init__(self, extractor: FeatureExtractor, aggregator: PatchFeatureAggregator) -> None:
        super().__init__()
        self.extractor = extractor
        self.aggregator = aggregator

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.aggregator(self.extractor(_checked_images(images)))

    def maps_and_features(self, images: torch.Tensor):
        """(layer maps, patch features, grid): `forward`'s features and grid with the
        backbone's maps they were aggregated from."""
        maps = self.extractor(_checked_images(images))
        return (maps, *self.aggregator(maps))


def _checked_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
    return images


def build_embedder(config: PatchCoreConfig, placeholder_weights: bool = False) -> PatchEmbedder:
    """The embedder `config` describes, with the backbone statistics it asks for
    (`config.backbone_statistics`). `placeholder_weights=True` builds random weights and
    statistics (never downloads, no statistics pass) for a caller that loads the weights
    and buffers itself, e.g. from an exported module's state dict."""
    pretrained = config.pretrained and not placeholder_weights
    backbone = load_backbone(config.backbone_name, pretrained, init_seed=config.seed)
    aggregator = PatchFeatureAggregator(
        config.patchsize,
        config.patchstride,
        config.pretrain_embed_dimension,
        config.target_embed_dimension,
    )
    extractor = FeatureExtractor(backbone, config.layers)
    if config.backbone_statistics == "reference" and not placeholder_weights:
        extractor.reproduce_reference_statistics(reference_pass_size(config))
    return PatchEmbedder(extractor, aggregator)
