"""Exporting saved models: deployable files per model folder.

`export_models` (`patchcore-export`) writes, per saved model folder and named by category:
- `torch`: `<category>.pth`, the `PatchCoreModule` state dict (the challenge format below);
- `onnx`: `<category>.onnx`, the whole model as one ONNX graph (opset `ONNX_OPSET`), made by
  torch's ONNX exporter (`torch.onnx.export(..., dynamo=True)`, the torch.export-based one)
  from `FixedSizePatchCore`: preprocessing, backbone up to the last layer used, patch
  aggregation, the memory bank as a constant, the bank-chunked exact search, image score
  (Eq. 7 when configured), upsampled and smoothed map, and the decision against the saved
  threshold. Input `images` float32 [batch, 3, H, W] in [0, 1] with a dynamic batch and the
  fixed (H, W) given at export; outputs `pred_score` [batch], `anomaly_map` [batch, H, W]
  and, with a threshold, `pred_label` [batch] (bool). Graphs for any input size
  (`--input_size any`, the default of whole-image models, `--crop none`) are made from
  `AnySizePatchCore` with dynamic batch, height and width: after `images` they take the
  geometry inputs of the image size (`patchcore.model.module.any_size_inputs`; the runtimes
  of `patchcore.apps.runtimes` compute them); the same outputs;
- `openvino`: `<category>.xml` + `.bin`, OpenVINO IR converted from that ONNX graph by
  `openvino.convert_model`, FP32 weights, or FP16 weights with `fp16`.
ONNX and OpenVINO files describe themselves (`patchcore.apps.runtimes.ExportRecord`).

`export_challenge_models` (`patchcore-export-challenge`) writes a `PatchCoreModule` state dict
per saved model folder, named by category, plus a `requirements.txt` for evaluators.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from patchcore import __version__
from patchcore.apps.runtimes import (
    INPUT_NAME,
    METADATA_KEY,
    ONNX_SUFFIX,
    OPENVINO_SUFFIX,
    ExportRecord,
)
from patchcore.config import (
    DATASET_NAMES,
    EXPORT_FORMATS,
    MIN_IMAGE_SIDE,
    PatchCoreConfig,
    SearchConfig,
)
from patchcore.data.preprocessing import input_size_problem
from patchcore.errors import (
    ConfigurationError,
    ModelFormatError,
    OutputError,
    missing_dependency,
)
from patchcore.files import (
    atomic_write,
    atomic_write_text,
    check_writable,
    is_staging,
    staged_path,
)
from patchcore.layout import MODELS_FOLDER
from patchcore.model.backbones import EFFICIENTNET_LITE0, TORCHVISION_ALIASES
from patchcore.model.chunked_search import DEFAULT_BANK_CHUNK_SIZE
from patchcore.model.module import (
    AnySizePatchCore,
    FixedSizePatchCore,
    PatchCoreModule,
    any_size_inputs,
)
from patchcore.model.patchcore import PatchCore
from patchcore.model.serialization import PARAMS_FILE, exact_search_config, load_models

LOGGER = logging.getLogger(__name__)

ONNX_OPSET = 18
EXAMPLE_BATCH = 2  # traced with two images so that the batch stays a dynamic dimension
WEIGHTS_SUFFIX = ".pth"
ALTERNATIVE_SUFFIX = ".pt"
REQUIREMENTS_FILE = "requirements.txt"

# What importing patchcore.model.module needs besides the patchcore package itself.
BASE_REQUIREMENTS = (
    "torch>=2.1", "torchvision>=0.16", "numpy>=1.24", "pillow>=10.0", "tqdm>=4.60", "click>=8.1",
)  # fmt: skip
EFFICIENTNET_REQUIREMENTS = ("efficientnet-lite-pytorch==0.1.0",)
TIMM_REQUIREMENTS = ("timm",)


def _is_model_folder(folder: Path) -> bool:
    if not folder.is_dir() or not any(folder.glob(f"*{PARAMS_FILE}")):
        return False
    if is_staging(folder):
        LOGGER.warning(
            "Skipping %s: an unfinished copy left by an interrupted save (the next save of "
            "that model removes it; it can be deleted)",
            folder,
        )
        return False
    return True


def find_model_folders(path: Path) -> list[Path]:
    """Model folders of `path`: itself, its sub-folders, or the sub-folders of its models/."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigurationError(f"{path}: not a folder")
    if _is_model_folder(path):
        return [path]
    parent = path / MODELS_FOLDER if (path / MODELS_FOLDER).is_dir() else path
    folders = sorted(child for child in parent.iterdir() if _is_model_folder(child))
    if not folders:
        raise ModelFormatError(
            f"{path}: no model folders found (a model folder holds {PARAMS_FILE}; looked in "
            f"{path} and its sub-folders{f' and {MODELS_FOLDER}/' if parent != path else ''})"
        )
    return folders


def category_name(folder: Path) -> str:
    """A model folder's category: `mvtec_bottle` -> `bottle`; other names are kept."""
    dataset, separator, rest = Path(folder).name.partition("_")
    return rest if separator and rest and dataset in DATASET_NAMES else Path(folder).name


def backbone_requirements(backbone_name: str) -> tuple[str, ...]:
    """Packages beyond torch/torchvision that building `backbone_name` needs."""
    if backbone_name == EFFICIENTNET_LITE0:
        return EFFICIENTNET_REQUIREMENTS
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    if TORCHVISION_ALIASES.get(backbone_name, backbone_name) in torchvision_names:
        return ()
    return TIMM_REQUIREMENTS


def requirements_text(configs: Sequence[PatchCoreConfig]) -> str:
    """requirements.txt for evaluating modules of `configs`, with how to get PatchCoreModule."""
    extra = [line for config in configs for line in backbone_requirements(config.backbone_name)]
    lines = [
        "# Runtime requirements of patchcore.model.module.PatchCoreModule, written by",
        (
            f"# patchcore-export-challenge (patchcore {__version__}, exported with torch "
            f"{torch.__version__}, torchvision {torchvision.__version__})."
        ),
        "# PatchCoreModule (patchcore.model.module) is part of the patchcore package: install it as well",
        "# (pip install <patchcore source folder>) or put its src/ folder on PYTHONPATH.",
        *BASE_REQUIREMENTS,
        *dict.fromkeys(extra),
    ]
    return "\n".join(lines) + "\n"


def _load_exportable(folder: Path, device: torch.device | str, holder: str) -> PatchCore:
    """The model of a folder; ensembles are refused, with the reason. `holder` names what
    an export holds (a challenge module, an exported graph)."""
    models = load_models(folder, device, SearchConfig(backend="torch"))
    if len(models) != 1:
        raise ConfigurationError(
            f"{folder}: an ensemble of {len(models)} models cannot be exported: {holder} "
            "holds one model and its own score scale, while an ensemble decides on its "
            "members' combined normal-image scale (normalised scores, averaged). Score it "
            "with patchcore-predict, which uses that scale and the threshold saved with the "
            "members"
        )
    return models[0]


def _unique_categories(folders: list[Path]) -> dict[str, Path]:
    categories: dict[str, Path] = {}
    for folder in folders:
        name = category_name(folder)
        if name in categories:
            raise ConfigurationError(
                f"{folder} and {categories[name]} are both category '{name}'; export them "
                "to different output folders"
            )
        categories[name] = folder
    return categories


def _save(state: dict, temporary: Path, path: Path) -> None:
    """torch.save to `temporary`; its failed writes (a full disk) are RuntimeErrors, reported
    as an OutputError naming `path`."""
    try:
        torch.save(state, temporary)
    except RuntimeError as error:
        raise OutputError(
            f"{path}: cannot write the weights file ({str(error).splitlines()[0]}); free "
            "space on that disk, or write the export somewhere else"
        ) from error


def export_challenge_models(
    sources: Sequence[Path],
    output_folder: Path,
    also_pt: bool = False,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Writes `<category>.pth` (and `.pt` with also_pt) per model folder plus requirements.txt.

    `sources` are model folders, folders of model folders, or run folders with a models/
    folder. Models are loaded on `device`; the files hold CPU tensors. Returns the written
    paths.
    """
    output_folder = check_writable(Path(output_folder))
    folders = [folder for source in sources for folder in find_model_folders(Path(source))]
    categories = _unique_categories(folders)
    written, configs = [], []
    suffixes = (WEIGHTS_SUFFIX, ALTERNATIVE_SUFFIX) if also_pt else (WEIGHTS_SUFFIX,)
    for category, folder in categories.items():
        model = _load_exportable(folder, device, "a challenge module")
        state = PatchCoreModule.from_patchcore(model).cpu().state_dict()
        for suffix in suffixes:
            path = output_folder / f"{category}{suffix}"
            atomic_write(
                path, lambda temporary, state=state, path=path: _save(state, temporary, path)
            )
            written.append(path)
        configs.append(model.config)
        LOGGER.info("Exported %s as %s", folder, category)
    requirements = atomic_write_text(output_folder / REQUIREMENTS_FILE, requirements_text(configs))
    return [*written, requirements]


# ----------------------------------------------------------------- patchcore-export
ANY_SIZE = "any"  # --input_size any: graphs with dynamic height and width


def parse_input_size(text: str) -> tuple[int, int] | None:
    """`HEIGHTxWIDTH` (e.g. `480x640`) or one number for a square -> (height, width);
    `any` -> None (graphs for any input size)."""
    if str(text).strip().lower() == ANY_SIZE:
        return None
    parts = str(text).lower().replace(" ", "").split("x")
    if len(parts) not in (1, 2) or not all(part.isdigit() for part in parts):
        raise ConfigurationError(
            f"--input_size must be HEIGHTxWIDTH (e.g. 480x640), one number or '{ANY_SIZE}', "
            f"got '{text}'"
        )
    height, width = int(parts[0]), int(parts[-1])
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ConfigurationError(
            f"--input_size sides must be at least {MIN_IMAGE_SIDE} pixels, got '{text}'"
        )
    return height, width


@dataclass(frozen=True)
class ExportOptions:
    """What `export_models` writes; checked once when built.

    `input_size`: the (height, width) of exported graphs' inputs. `any_size`: graphs take
    inputs of any height and width (`AnySizePatchCore`). With neither, whole-image models
    (`--crop none`, tiled or not) get graphs of any size and centre-crop models graphs of
    their resize size as a square (the input whose shorter side needs no resizing).
    `threshold`: the decision threshold to build in; None keeps the model's saved one.
    """

    formats: tuple[str, ...]
    input_size: tuple[int, int] | None = None
    any_size: bool = False
    fp16: bool = False
    bank_chunk_size: int = DEFAULT_BANK_CHUNK_SIZE
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.formats:
            raise ConfigurationError(f"give at least one --format ({', '.join(EXPORT_FORMATS)})")
        unknown = [name for name in self.formats if name not in EXPORT_FORMATS]
        if unknown:
            raise ConfigurationError(
                f"unknown export format '{unknown[0]}'; choose from {', '.join(EXPORT_FORMATS)}"
            )
        if self.fp16 and "openvino" not in self.formats:
            raise ConfigurationError("--fp16 applies to OpenVINO IR; add --format openvino")
        if self.bank_chunk_size < 1:
            raise ConfigurationError(f"--bank_chunk_size must be >= 1, got {self.bank_chunk_size}")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise ConfigurationError(f"--threshold must be a finite number, got {self.threshold}")
        if self.any_size and self.input_size is not None:
            raise ConfigurationError(
                f"--input_size is either HEIGHTxWIDTH or '{ANY_SIZE}', not both"
            )

    def size_for(self, config: PatchCoreConfig) -> tuple[int, int] | None:
        """The fixed (height, width) of the graphs of a model of `config`; None: any size."""
        if self.input_size is not None:
            return self.input_size
        if self.any_size or config.preprocessing.crop == "none":
            return None
        return config.preprocessing.resize, config.preprocessing.resize


def _check_export_dependencies(formats: Sequence[str]) -> None:
    """Fails before any work when a package that a requested format needs is missing."""
    if "onnx" in formats or "openvino" in formats:
        for module, package in (("onnx", "onnx"), ("onnxscript", "onnxscript")):
            if importlib.util.find_spec(module) is None:
                extra = "export" if "onnx" in formats else "openvino"
                raise missing_dependency("exporting to ONNX or OpenVINO", package, extra)
    if "openvino" in formats and importlib.util.find_spec("openvino") is None:
        raise missing_dependency("exporting to OpenVINO", "openvino", "openvino")


EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet_exporter():
    """Keeps the exporter's progress prints, warnings and info logs off the terminal; the
    prints go to the debug log."""
    captured = io.StringIO()
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if captured.getvalue().strip():
            LOGGER.debug("torch.onnx: %s", captured.getvalue().strip())


def _innermost_line(error: BaseException) -> str:
    """The first line of the innermost cause of `error` (the exporter wraps its errors)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _export_onnx(graph: torch.nn.Module, inputs: tuple, dynamic_shapes, where: str):
    """torch's ONNX exporter on `graph`; a ModelFormatError of one line when it fails (an
    operation without an ONNX form, a size the backbone cannot take)."""
    try:
        with _quiet_exporter():
            return torch.onnx.export(
                graph,
                inputs,
                None,
                dynamo=True,
                opset_version=ONNX_OPSET,
                input_names=list(getattr(graph, "input_names", (INPUT_NAME,))),
                output_names=list(graph.output_names),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    except Exception as error:  # the exporter raises many untyped errors
        raise ModelFormatError(
            f"{where}: torch's ONNX exporter cannot export this model ({_innermost_line(error)})"
        ) from error


def _described(program, record: ExportRecord):
    program.model.metadata_props[METADATA_KEY] = record.to_json()
    program.model.producer_name = "patchcore"
    program.model.producer_version = __version__
    return program


def onnx_program(graph: FixedSizePatchCore, record: ExportRecord, where: str = "model"):
    """The ONNX program of `graph` with `record` stored as its metadata."""
    example = torch.rand(
        EXAMPLE_BATCH, 3, *graph.input_size, generator=torch.Generator().manual_seed(0)
    ).to(graph.module.memory_bank.device)
    batch = torch.export.Dim("batch", min=1)
    program = _export_onnx(graph, (example,), {"images": {0: batch}}, where)
    return _described(program, record)


# An example input size for tracing an any-size graph: the first of these multiples of a
# base size whose geometry is valid and has no length of 0 or 1 (the tracer would fix it).
_EXAMPLE_ASPECT = 1.43
_EXAMPLE_FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def example_size(config: PatchCoreConfig) -> tuple[int, int]:
    """A (height, width) to trace the any-size graph of a model of `config` with."""
    preprocessing = config.preprocessing
    base = 4 * max(MIN_IMAGE_SIDE, preprocessing.tile or 0) + 7  # deep maps of a few cells
    for factor in _EXAMPLE_FACTORS:
        size = (int(base * factor) + 1, int(base * factor * _EXAMPLE_ASPECT) + 3)
        if input_size_problem(size, preprocessing) is not None:
            continue
        inputs = any_size_inputs(size, config)
        lengths = [
            length
            for name, tensor in inputs.items()
            if not name.startswith("tile_")
            for length in tensor.shape
        ]
        if min(lengths) > 1:
            return size
    raise ConfigurationError(
        "no example input size works for this model's preprocessing (--resize, --scale, "
        "--max_size, --tile); export with a fixed --input_size"
    )


def _example_tiles(geometry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The example's tile rows and columns, each repeated until there are at least two of
    them and their counts differ (so that the tracer fixes neither count; a working side as
    long as the tile has one row or column of tiles, whatever the image)."""
    names = [name for name in ("tile_rows", "tile_columns") if name in geometry]
    tiles = dict(geometry)
    for name in names:
        while len(tiles[name]) < 2:
            tiles[name] = torch.cat([tiles[name], tiles[name][-1:]])
    if len(names) == 2 and len(tiles[names[0]]) == len(tiles[names[1]]):
        tiles[names[1]] = torch.cat([tiles[names[1]], tiles[names[1]][-1:]])
    return tiles


def any_size_program(graph: AnySizePatchCore, record: ExportRecord, where: str = "model"):
    """The ONNX program of `graph` with dynamic batch, height and width (and geometry
    inputs of dynamic lengths), with `record` stored as its metadata."""
    size = example_size(graph.config)
    device = graph.module.memory_bank.device
    images = torch.rand(EXAMPLE_BATCH, 3, *size, generator=torch.Generator().manual_seed(0))
    geometry = _example_tiles(any_size_inputs(size, graph.config))
    dynamic = torch.export.Dim.DYNAMIC
    fixed_last = ("map_", "tile_")  # [L, 2] sampling taps, [T, tile] tile positions

    def axes(name: str, tensor: torch.Tensor) -> dict:
        first = 1 if name.endswith("_weights") and tensor.ndim == 3 else 0  # [2, out, K]
        last = tensor.ndim - 1 if name.startswith(fixed_last) else tensor.ndim
        return {axis: dynamic for axis in range(first, last)}

    shapes = {
        "images": {0: dynamic, 2: dynamic, 3: dynamic},
        "geometry": tuple(axes(name, tensor) for name, tensor in geometry.items()),
    }
    inputs = (images.to(device), *(tensor.to(device) for tensor in geometry.values()))
    program = _export_onnx(graph, inputs, shapes, where)
    return _described(program, record)


def write_onnx(program, path: Path) -> Path:
    """Saves an ONNX program to `path` atomically (weights inside the file up to 2 GB)."""
    with staged_path(path) as temporary, _quiet_exporter():
        program.save(temporary)
        data = [item for item in temporary.parent.iterdir() if item != temporary]
        for item in data:  # external weights of models over 2 GB
            os.replace(item, path.parent / item.name)
    return path


def write_openvino(onnx_path: Path, path: Path, record: ExportRecord, fp16: bool) -> Path:
    """Converts the ONNX graph at `onnx_path` to OpenVINO IR `path` (+ `.bin`), atomically."""
    import openvino

    model = openvino.convert_model(str(onnx_path))
    model.set_rt_info(record.to_json(), [METADATA_KEY])
    with staged_path(path) as temporary:
        openvino.save_model(model, str(temporary), compress_to_fp16=fp16)
        os.replace(temporary.with_suffix(".bin"), path.with_suffix(".bin"))
    return path


def export_record(
    model: PatchCore,
    module: PatchCoreModule,
    graph: FixedSizePatchCore | AnySizePatchCore,
    folder: Path,
    precision: str,
) -> ExportRecord:
    """The self-description of `graph`, exported from `model` (saved in `folder`)."""
    return ExportRecord(
        config=exact_search_config(model.config),
        input_size=getattr(graph, "input_size", None),
        threshold=graph.threshold,
        normal_statistics=module.statistics(),
        bank_size=int(module.memory_bank.shape[0]),
        bank_chunk_size=module.bank_chunk_size,
        onnx_opset=ONNX_OPSET,
        precision=precision,
        source=str(folder),
    )


def _check_fixed_size(size: tuple[int, int], config: PatchCoreConfig, folder: Path) -> None:
    """A one-line ConfigurationError when the model cannot score inputs of `size`."""
    problem = input_size_problem(size, config.preprocessing)
    if problem is not None:
        raise ConfigurationError(
            f"{folder}: --input_size {size[0]}x{size[1]} cannot be scored by this model ({problem})"
        )


def export_model(
    model: PatchCore, folder: Path, output_folder: Path, name: str, options: ExportOptions
) -> list[Path]:
    """Writes `model` (loaded from `folder`) in every format of `options`; the paths."""
    graphs = "onnx" in options.formats or "openvino" in options.formats
    size = options.size_for(model.config)
    if graphs and size is not None:
        _check_fixed_size(size, model.config, folder)  # before any file is written
    module = PatchCoreModule.from_patchcore(model, options.threshold).cpu().eval()
    module.bank_chunk_size = options.bank_chunk_size
    written = []
    if "torch" in options.formats:
        path = output_folder / f"{name}{WEIGHTS_SUFFIX}"
        state = module.state_dict()
        written.append(atomic_write(path, lambda temporary: _save(state, temporary, path)))
    if not graphs:
        return written
    if size is None:
        graph = AnySizePatchCore(module).eval()
        program = any_size_program(
            graph, export_record(model, module, graph, folder, "fp32"), str(folder)
        )
    else:
        graph = FixedSizePatchCore(module, size).eval()
        program = onnx_program(
            graph, export_record(model, module, graph, folder, "fp32"), str(folder)
        )
    with tempfile.TemporaryDirectory(prefix="patchcore-export-") as scratch:
        onnx_path = Path(scratch) / f"{name}{ONNX_SUFFIX}"
        if "onnx" in options.formats:
            onnx_path = write_onnx(program, output_folder / f"{name}{ONNX_SUFFIX}")
            written.append(onnx_path)
        else:
            write_onnx(program, onnx_path)
        if "openvino" in options.formats:
            precision = "fp16" if options.fp16 else "fp32"
            record = export_record(model, module, graph, folder, precision)
            path = output_folder / f"{name}{OPENVINO_SUFFIX}"
            written.append(write_openvino(onnx_path, path, record, options.fp16))
            written.append(path.with_suffix(".bin"))
    return written


def export_models(
    sources: Sequence[Path],
    output_folder: Path,
    options: ExportOptions,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Exports every model folder of `sources` (model folders, folders of them, run folders)
    into `output_folder` as `<category>.<suffix>` in the formats of `options`; the paths.

    Models are loaded on `device` and exported from the CPU.
    """
    _check_export_dependencies(options.formats)
    output_folder = check_writable(Path(output_folder))
    folders = [folder for source in sources for folder in find_model_folders(Path(source))]
    categories = _unique_categories(folders)
    written = []
    for category, folder in categories.items():
        model = _load_exportable(folder, device, "an exported graph")
        paths = export_model(model, folder, output_folder, category, options)
        written.extend(paths)
        LOGGER.info("Exported %s as %s", folder, ", ".join(path.name for path in paths))
    return written
