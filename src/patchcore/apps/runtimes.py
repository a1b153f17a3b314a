"""Running exported models: one interface over torch, ONNX Runtime and OpenVINO.

`open_exported(path, runtime)` reads a file written by `patchcore-export`:
- `<name>.pth`: a `PatchCoreModule` state dict (runtime `torch`; any input size);
- `<name>.onnx`: the ONNX graph (runtime `onnxruntime`, or `openvino`, which reads ONNX too);
- `<name>.xml` (+ `.bin`): OpenVINO IR (runtime `openvino`).
ONNX and OpenVINO files carry their self-description (`ExportRecord`: format version, model
configuration, input size, threshold, normal-image statistics, opset, precision) inside
the file, as ONNX metadata (key `patchcore`; OpenVINO shows it as rt_info
`framework/patchcore`) or OpenVINO rt_info (`patchcore`), so one file is a whole model.

Every runtime takes float32 RGB images [B, 3, H, W] in [0, 1] and returns `RuntimeOutputs`:
image scores [B], anomaly maps [B, H, W] on the input's frame, and the decisions [B] when
the model carries a threshold. An ONNX or OpenVINO graph takes either one input size, fixed
at export (an input of another size is refused with a one-line error before it reaches the
runtime), or any size (`input_size` None): then the geometry inputs of each image size
(`patchcore.model.module.any_size_inputs`) are computed here, kept for the
`GEOMETRY_CACHE_SIZE` sizes used last, and fed with the images. `size_problem` says, before
scoring, why an image size cannot be scored (the fixed size differs, or the size's
`patchcore.data.preprocessing.input_size_problem`: the working image is smaller than the patch
grid or a tile needs, ...); the torch runtime takes any size the model can.
OpenVINO compiles with inference precision f32: on CPUs with bfloat16 units it would
otherwise compute in bfloat16, which changes scores by about a percent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patchcore import __version__
from patchcore.config import RUNTIMES, PatchCoreConfig
from patchcore.data.preprocessing import input_size_problem
from patchcore.errors import ConfigurationError, DataError, ModelFormatError, missing_dependency
from patchcore.model.calibration import NormalStatistics
from patchcore.model.serialization import (
    config_fields,
    config_from_meta,
    first_line,
    oldest_version,
    read_weights_file,
    records_backbone_statistics,
    records_image_score,
    records_scale,
)

LOGGER = logging.getLogger(__name__)

EXPORT_FORMAT_NAME = "patchcore-export"
# 2: preprocessing.scale; 3: backbone_statistics (the graph's constants hold the statistics
# either way; older records predate the reference's pass and describe "pretrained"); 4:
# image_score (records without it score by the largest patch score); 5: graphs of any input
# size (input_size null, geometry inputs). Each written only by exports that record it.
EXPORT_FORMAT_VERSION = 5
ANY_SIZE_EXPORT_FORMAT_VERSION = 5
IMAGE_SCORE_EXPORT_FORMAT_VERSION = 4
BACKBONE_STATISTICS_EXPORT_FORMAT_VERSION = 3
SCALE_EXPORT_FORMAT_VERSION = 2
WITHOUT_SCALE_EXPORT_FORMAT_VERSION = 1
METADATA_KEY = "patchcore"
INPUT_NAME = "images"
TORCH_SUFFIXES = (".pth", ".pt")
ONNX_SUFFIX = ".onnx"
OPENVINO_SUFFIX = ".xml"
# Which runtimes read which files; the first is the default for that file.
RUNTIMES_OF_SUFFIX = {
    ".pth": ("torch",),
    ".pt": ("torch",),
    ONNX_SUFFIX: ("onnxruntime", "openvino"),
    OPENVINO_SUFFIX: ("openvino",),
}
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
GEOMETRY_CACHE_SIZE = 64  # image sizes whose geometry inputs a model keeps


@dataclass(frozen=True)
class ExportRecord:
    """What an exported graph says about itself (stored as JSON inside the file)."""

    config: PatchCoreConfig
    input_size: tuple[int, int] | None  # None: any size (geometry inputs after images)
    threshold: float | None
    normal_statistics: NormalStatistics | None
    bank_size: int
    bank_chunk_size: int
    onnx_opset: int
    precision: str
    source: str
    library_version: str = __version__
    torch_version: str = torch.__version__

    @property
    def format_version(self) -> int:
        """The oldest export format version that describes this export."""
        version = oldest_version(
            self.config,
            WITHOUT_SCALE_EXPORT_FORMAT_VERSION,
            [
                (records_scale, SCALE_EXPORT_FORMAT_VERSION),
                (records_backbone_statistics, BACKBONE_STATISTICS_EXPORT_FORMAT_VERSION),
                (records_image_score, IMAGE_SCORE_EXPORT_FORMAT_VERSION),
            ],
        )
        return max(version, ANY_SIZE_EXPORT_FORMAT_VERSION if self.input_size is None else 0)

    def to_json(self) -> str:
        from patchcore.model.module import geometry_input_names

        data = dataclasses.asdict(self)
        data["config"] = config_fields(self.config)
        version = self.format_version
        any_size = self.input_size is None
        data["input_size"] = None if any_size else list(self.input_size)
        data["input"] = {
            "name": INPUT_NAME,
            "shape": ["batch", 3, *(("height", "width") if any_size else self.input_size)],
            "dtype": "float32",
            "channels": "RGB",
            "range": [0.0, 1.0],
        }
        if any_size:
            data["geometry_inputs"] = list(geometry_input_names(self.config))
        return json.dumps(
            {"format": EXPORT_FORMAT_NAME, "format_version": version, **data},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> ExportRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelFormatError(
                f"{where}: the patchcore description is not JSON ({error})"
            ) from error
        if not isinstance(data, dict):
            raise ModelFormatError(f"{where}: not a {EXPORT_FORMAT_NAME} description")
        config = config_from_meta(data, where, EXPORT_FORMAT_NAME, EXPORT_FORMAT_VERSION)
        try:
            statistics = data["normal_statistics"]
            return cls(
                config=config,
                input_size=_input_size(data["input_size"], data["format_version"]),
                threshold=None if data["threshold"] is None else float(data["threshold"]),
                normal_statistics=NormalStatistics(**statistics) if statistics else None,
                bank_size=int(data["bank_size"]),
                bank_chunk_size=int(data["bank_chunk_size"]),
                onnx_opset=int(data["onnx_opset"]),
                precision=str(data["precision"]),
                source=str(data["source"]),
                library_version=str(data["library_version"]),
                torch_version=str(data["torch_version"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ModelFormatError(
                f"{where}: incomplete patchcore description ({type(error).__name__}: {error})"
            ) from error


def _input_size(value, version: int) -> tuple[int, int] | None:
    """A record's input_size: (height, width), or None (any size, from version 5 on)."""
    if value is None and version >= ANY_SIZE_EXPORT_FORMAT_VERSION:
        return None
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class RuntimeOutputs:
    """Scores [B], anomaly maps [B, H, W] on the input frame, decisions [B] or None."""

    scores: np.ndarray
    maps: np.ndarray
    labels: np.ndarray | None


class ExportedModel:
    """An exported model opened in one runtime (see the module docstring)."""

    runtime: str = ""

    def __init__(self, path: Path, record: ExportRecord | None) -> None:
        self.path = Path(path)
        self.record = record
        self._geometry_cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._geometry_lock = threading.Lock()  # predict may be called from several threads

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The (height, width) the graph takes, or None when any size works."""
        return self.record.input_size if self.record else None

    @property
    def config(self) -> PatchCoreConfig:
        return self.record.config

    @property
    def threshold(self) -> float | None:
        return self.record.threshold

    @property
    def normal_statistics(self) -> NormalStatistics | None:
        return self.record.normal_statistics

    @property
    def any_size(self) -> bool:
        """Whether this is a graph for any input size, fed geometry inputs per size."""
        return self.record is not None and self.record.input_size is None

    def size_problem(self, size: tuple[int, int], name: str = "image") -> str:
        """Why images of (height, width) `size` cannot be scored, naming `name` (the file),
        or '' when they can: another size than the one fixed at export, or the size's
        `input_size_problem` (the rule `any_size_inputs` and the torch module apply)."""
        if self.input_size is not None:
            if tuple(size) == self.input_size:
                return ""
            return (
                f"{name}: image is {size[0]}x{size[1]} (height x width) but {self.path.name} "
                f"takes {self.input_size[0]}x{self.input_size[1]} images, the size fixed at "
                "export; resize the images or export again with --input_size (any: every size)"
            )
        return input_size_problem(tuple(size), self.config.preprocessing, name) or ""

    def _geometry(self, size: tuple[int, int], name: str = "image") -> dict[str, np.ndarray]:
        """The geometry inputs of `size` for a graph of any size ({} for others), kept for
        the `GEOMETRY_CACHE_SIZE` sizes used last."""
        from patchcore.model.module import any_size_inputs

        if not self.any_size:
            return {}
        with self._geometry_lock:
            inputs = self._geometry_cache.pop(size, None)
        if inputs is None:
            computed = any_size_inputs(size, self.config, name)
            inputs = {key: tensor.numpy() for key, tensor in computed.items()}
        with self._geometry_lock:
            cache = self._geometry_cache  # oldest first
            cache[size] = inputs
            while len(cache) > GEOMETRY_CACHE_SIZE:
                del cache[next(iter(cache))]
        return inputs

    def check_input(self, images: np.ndarray) -> None:
        """A one-line DataError unless `images` is float [B, 3, H, W] of a size the graph
        takes."""
        expected = (
            "[B, 3, H, W]"
            if self.input_size is None
            else f"[B, 3, {self.input_size[0]}, {self.input_size[1]}]"
        )
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype.kind != "f":
            raise DataError(
                f"{self.path.name} takes float RGB images {expected} in [0, 1], got "
                f"{images.dtype} {list(images.shape)}"
            )
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size:
            height, width = self.input_size
            raise DataError(
                f"{self.path.name} takes {height}x{width} (height x width) images, the size "
                f"fixed at export, got {images.shape[-2]}x{images.shape[-1]}; resize the "
                "images or export again with --input_size"
            )
        problem = self.size_problem(tuple(images.shape[-2:]), self.path.name)
        if problem:
            raise DataError(problem)

    def predict(self, images) -> RuntimeOutputs:
        """images float32 [B, 3, H, W] in [0, 1] (numpy or torch) -> `RuntimeOutputs`."""
        array = (
            images.detach().cpu().numpy()
            if isinstance(images, torch.Tensor)
            else np.asarray(images)
        )
        self.check_input(array)
        feeds = {
            INPUT_NAME: np.ascontiguousarray(array, dtype=np.float32),
            **self._geometry(tuple(array.shape[-2:]), self.path.name),
        }
        outputs = self._run(feeds)
        labels = outputs[2].astype(bool) if len(outputs) > 2 else None
        return RuntimeOutputs(outputs[0].astype(np.float32), outputs[1].astype(np.float32), labels)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs for its named inputs (images, and geometry inputs)."""
        raise NotImplementedError


class TorchModel(ExportedModel):
    """A `PatchCoreModule` weights file (`.pth`), run by torch; takes any input size."""

    runtime = "torch"

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        from patchcore.model.module import PatchCoreModule

        super().__init__(path, None)
        state = read_weights_file(path)
        self.module = PatchCoreModule()
        try:
            self.module.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise ModelFormatError(f"{path}: not a PatchCoreModule's weights ({first_line(error)})") from error
        self.module.to(device).eval()

    @property
    def config(self) -> PatchCoreConfig:
        return self.module.config

    @property
    def threshold(self) -> float | None:
        return self.module.decision_threshold

    @property
    def normal_statistics(self) -> NormalStatistics | None:
        return self.module.statistics()

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.module(torch.from_numpy(feeds[INPUT_NAME]))
        names = ("pred_score", "anomaly_map", "pred_label")
        return [outputs[name].cpu().numpy() for name in names if name in outputs]


def _require(module: str, package: str, feature: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise missing_dependency(feature, package, extra)


class OnnxRuntimeModel(ExportedModel):
    """An ONNX graph run by ONNX Runtime on the CPU."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        _require("onnxruntime", "onnxruntime", "running ONNX models", "export")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own untyped errors
            raise ModelFormatError(f"{path}: ONNX Runtime cannot load it ({error})") from error
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise ModelFormatError(
                f"{path}: not exported by patchcore (no '{METADATA_KEY}' metadata)"
            )
        super().__init__(path, ExportRecord.from_json(metadata[METADATA_KEY], str(path)))
        self.output_names = [output.name for output in self.session.get_outputs()]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)


class OpenVinoModel(ExportedModel):
    """OpenVINO IR (or an ONNX graph) compiled by OpenVINO for the CPU at f32 precision."""

    runtime = "openvino"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        _require("openvino", "openvino", "running OpenVINO models", "openvino")
        import openvino

        core = openvino.Core()
        try:
            model = core.read_model(str(path))
        except RuntimeError as error:
            raise ModelFormatError(f"{path}: OpenVINO cannot read it ({error})") from error
        key = [METADATA_KEY] if model.has_rt_info([METADATA_KEY]) else ["framework", METADATA_KEY]
        if not model.has_rt_info(key):
            raise ModelFormatError(
                f"{path}: not exported by patchcore (no '{METADATA_KEY}' metadata)"
            )
        record = ExportRecord.from_json(model.get_rt_info(key).astype(str), str(path))
        super().__init__(path, record)
        config = dict(OPENVINO_CONFIG)
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        return [np.array(results[output]) for output in self.compiled.outputs]


def default_runtime(path: Path) -> str:
    """The runtime a file is read with when none is named."""
    suffix = Path(path).suffix.lower()
    if suffix not in RUNTIMES_OF_SUFFIX:
        raise ConfigurationError(
            f"{path}: not an exported model file (expected {', '.join(RUNTIMES_OF_SUFFIX)})"
        )
    return RUNTIMES_OF_SUFFIX[suffix][0]


def open_exported(
    path: Path,
    runtime: str | None = None,
    device: torch.device | str = "cpu",
    threads: int | None = None,
) -> ExportedModel:
    """The exported model file `path` opened in `runtime` (default: by the file's suffix)."""
    path = Path(path)
    if runtime is not None and runtime not in RUNTIMES:
        raise ConfigurationError(f"--runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if not path.is_file():
        raise ModelFormatError(f"{path}: exported model file does not exist")
    runtime = runtime or default_runtime(path)
    readers = RUNTIMES_OF_SUFFIX.get(path.suffix.lower(), ())
    if runtime not in readers:
        kinds = ", ".join(
            f"{suffix} ({'/'.join(names)})" for suffix, names in RUNTIMES_OF_SUFFIX.items()
        )
        raise ConfigurationError(
            f"{path}: runtime '{runtime}' does not read {path.suffix or 'this'} files; files "
            f"and their runtimes: {kinds}"
        )
    if runtime == "torch":
        return TorchModel(path, device)
    if runtime == "onnxruntime":
        return OnnxRuntimeModel(path, threads)
    return OpenVinoModel(path, threads)
