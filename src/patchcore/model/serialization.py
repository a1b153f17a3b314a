"""Saving and loading model folders.

A folder holds one model, or the members of an ensemble with `Ensemble-i-n_` prefixes.
Per member, with the reference implementation's file names:
- `patchcore_params.pkl`: exactly the reference's keys (so the reference code can load it);
- `nnscorer_search_index.faiss`: the memory bank as a flat FAISS index;
- `patchcore_meta.json`: our self-description: format version, library version, the full
  model configuration (backbone, weights, layers, dimensions, patch size, k, distance,
  preprocessing, sampler, search index) and the normal-data statistics and threshold; in
  an ensemble, also the statistics and threshold of the ensemble's combined scale
  (`"ensemble"`, the same in every member's file);
- `search_index_<kind>.faiss` (approximate search only): the trained FAISS IVF-Flat, IVF-PQ
  or HNSW index, read back as it was saved.
A model is written in the oldest format version that describes it (`format_version_of`):
3 for exact search (no `index` entry, so libraries that know version 3 still read it), 4
when it carries an approximate index, which those libraries refuse with a message to
upgrade. Every older version loads.
Folders written by the reference (no meta file) load with the preprocessing the caller gives.
With `SearchConfig(bank_storage="mmap")` the bank file is memory-mapped instead of read.
Pickles are read with an unpickler that only accepts plain data: no code runs on load.
Saving is atomic: the folder appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from patchcore import __version__
from patchcore.config import (
    IndexConfig,
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    SearchConfig,
)
from patchcore.errors import ConfigurationError, DataError, ModelFormatError, PatchCoreError
from patchcore.files import is_staging, recover_folder, staged_path
from patchcore.model.bank_file import MappedBank, write_bank_file
from patchcore.model.calibration import NormalStatistics
from patchcore.model.indexes import bank_storage_of
from patchcore.model.patchcore import PatchCore
from patchcore.model.search import read_memory_bank, write_memory_bank

LOGGER = logging.getLogger(__name__)

PRETRAINED_STATISTICS = "pretrained"  # what every description written before version 6 used
FORMAT_NAME = "patchcore-model"
# 2: preprocessing gained crop, max_size and tiles; 3: ensembles carry their combined scale's
# statistics and threshold; 4: an approximate search index (the configuration's `index` and
# its `search_index_<kind>.faiss`); 5: preprocessing.scale (one resize factor for every
# image); 6: backbone_statistics (the reference's statistics pass; every description
# without the field predates the pass and loads as "pretrained"). Older versions still
# load; a newer one is refused with a clear error; 7: image_score (and its quantile and k),
# written only when not "max" (descriptions without it load as "max"). A model is written
# in the oldest version that describes it.
FORMAT_VERSION = 7
BACKBONE_STATISTICS_FORMAT_VERSION = 6
SCALE_FORMAT_VERSION = 5  # a model with preprocessing.scale and pretrained statistics
APPROXIMATE_INDEX_FORMAT_VERSION = 4  # a model with an approximate index, without scale
EXACT_SEARCH_FORMAT_VERSION = 3  # what a model without either is written as
PARAMS_FILE = "patchcore_params.pkl"
INDEX_FILE = "nnscorer_search_index.faiss"
META_FILE = "patchcore_meta.json"
ENSEMBLE_KEY = "ensemble"
ENSEMBLE_NORMALISATION = "normal_stats"
_ENSEMBLE_PREFIX = re.compile(r"^Ensemble-(\d+)-(\d+)_$")
# Configuration fields every self-description holds since format version 1; fields added
# later are optional and take their defaults (e.g. preprocessing.crop, added in version 2).
REQUIRED_FIELDS = {
    PatchCoreConfig: (
        "backbone_name",
        "layers",
        "pretrained",
        "pretrain_embed_dimension",
        "target_embed_dimension",
        "patchsize",
        "patchstride",
        "num_nn",
        "distance",
        "score_reweighting",
        "reweighting_neighbours",
        "preprocessing",
        "sampler",
        "seed",
    ),
    PreprocessingConfig: ("resize", "imagesize"),
    SamplerConfig: ("name", "percentage", "projection_dimension", "num_starting_points", "seed"),
    IndexConfig: ("kind",),  # the `index` entry itself is optional (format version 4)
}


def member_prefix(position: int, count: int) -> str:
    """File-name prefix of ensemble member `position` (0-based) of `count`."""
    return "" if count == 1 else f"Ensemble-{position + 1}-{count}_"


class _PlainDataUnpickler(pickle.Unpickler):
    """Accepts dicts, lists, tuples, numbers, strings, booleans and None; nothing callable."""

    def find_class(self, module: str, name: str):
        raise ModelFormatError(
            f"refusing to load '{module}.{name}' from a model parameter file: only plain "
            "data (dicts, lists, tuples, numbers, strings) is accepted"
        )


def read_plain_pickle(path: Path):
    """Unpickles `path` without ever importing or calling anything."""
    try:
        return _PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    except PatchCoreError as error:
        raise ModelFormatError(f"{path}: {error}") from error
    except OSError as error:
        raise ModelFormatError(f"{path}: cannot read ({error.strerror})") from error
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError) as error:
        raise ModelFormatError(f"{path}: not a readable parameter file ({error})") from error


def read_weights_file(path: Path) -> dict:
    """The state dict of a torch weights file (an exported `.pth`), read with
    `weights_only=True`, so no code in it runs whatever torch's defaults are; a
    ModelFormatError names the file, in one line, for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            AttributeError, ImportError) as error:  # fmt: skip
        raise ModelFormatError(f"{path}: cannot read weights ({first_line(error)})") from error
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def first_line(error: BaseException) -> str:
    """The gist of an error from below in one line: its first two non-empty lines, joined."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def reference_parameters(config: PatchCoreConfig) -> dict:
    """The reference implementation's `patchcore_params.pkl` content for `config`."""
    size = config.preprocessing.imagesize
    return {
        "backbone.name": config.backbone_name,
        "layers_to_extract_from": list(config.layers),
        "input_shape": (3, size, size),
        "pretrain_embed_dimension": config.pretrain_embed_dimension,
        "target_embed_dimension": config.target_embed_dimension,
        "patchsize": config.patchsize,
        "patchstride": config.patchstride,
        "anomaly_scorer_num_nn": config.num_nn,
    }


def approximate_index_file(kind: str) -> str:
    """File name of a member's saved approximate index, e.g. `search_index_ivfpq.faiss`."""
    return f"search_index_{kind}.faiss"


def config_fields(config: PatchCoreConfig) -> dict:
    """`config` as plain data for a self-description; exact search (the default) leaves the
    `index` entry out, no `scale` leaves `preprocessing.scale` out and pretrained backbone
    statistics leave `backbone_statistics` out, so the description reads like one of the
    oldest version that describes it."""
    fields = dataclasses.asdict(config)
    if not config.index.approximate:
        del fields["index"]
    if not records_scale(config):
        del fields["preprocessing"]["scale"]
    if not records_backbone_statistics(config):
        del fields["backbone_statistics"]
    if not records_image_score(config):
        for name in IMAGE_SCORE_FIELDS:
            del fields[name]
    return fields


def exact_search_config(config: PatchCoreConfig) -> PatchCoreConfig:
    """`config` with exact search: what an exported model records, whose graph searches its
    bank exactly, in chunks, whatever index the saved model used."""
    return dataclasses.replace(config, index=IndexConfig())


def records_scale(config: PatchCoreConfig) -> bool:
    """Whether a description of `config` holds `preprocessing.scale` (newer formats only)."""
    return config.preprocessing.scale is not None


def records_backbone_statistics(config: PatchCoreConfig) -> bool:
    """Whether a description of `config` holds `backbone_statistics` (newer formats only):
    descriptions without it predate the reference's statistics pass, whose models kept the
    pretrained statistics."""
    return config.backbone_statistics != PRETRAINED_STATISTICS


IMAGE_SCORE_FIELDS = ("image_score", "image_score_quantile", "image_score_top_k")


def records_image_score(config: PatchCoreConfig) -> bool:
    """Whether a description of `config` holds `image_score` and its parameters (newer
    formats only): descriptions without them score images by their largest patch score."""
    return config.image_score != "max"


def oldest_version(
    config: PatchCoreConfig, base: int, introduced: Sequence[tuple[Callable[[PatchCoreConfig], bool], int]]
) -> int:
    """The oldest version of a format that describes `config`: `base`, or the newest of the
    versions that `introduced` (recorded-field test, version that added it) says its
    recorded fields need. Model folders, exported modules and export records each number
    their own versions."""
    return max([base] + [version for records, version in introduced if records(config)])


def format_version_of(config: PatchCoreConfig) -> int:
    """The oldest format version that describes a model of `config`."""
    return oldest_version(
        config,
        EXACT_SEARCH_FORMAT_VERSION,
        [
            (lambda described: described.index.approximate, APPROXIMATE_INDEX_FORMAT_VERSION),
            (records_scale, SCALE_FORMAT_VERSION),
            (records_backbone_statistics, BACKBONE_STATISTICS_FORMAT_VERSION),
            (records_image_score, FORMAT_VERSION),
        ],
    )


def _meta(model: PatchCore, prefix: str, ensemble: dict | None) -> dict:
    statistics = model.normal_statistics
    meta = {
        "format": FORMAT_NAME,
        "format_version": format_version_of(model.config),
        "library_version": __version__,
        "config": config_fields(model.config),
        "normalisation": {
            "mean": list(model.embedder.extractor.mean.flatten().tolist()),
            "std": list(model.embedder.extractor.std.flatten().tolist()),
        },
        "memory_bank_shape": list(model.memory_bank.shape),
        "normal_statistics": dataclasses.asdict(statistics) if statistics else None,
        ENSEMBLE_KEY: ensemble,
    }
    if model.config.index.approximate:
        file = f"{prefix}{approximate_index_file(model.config.index.kind)}"
        meta["search_index"] = {"file": file, **model.index.describe()}
    return meta


def _ensemble_meta(count: int, statistics: NormalStatistics | None) -> dict | None:
    """What every member of an ensemble of `count` records about the ensemble as a whole."""
    if count == 1:
        return None
    return {
        "members": count,
        "normalisation": ENSEMBLE_NORMALISATION,
        "normal_statistics": dataclasses.asdict(statistics) if statistics else None,
    }


def _write_member(folder: Path, model: PatchCore, prefix: str, ensemble: dict | None) -> None:
    if model.memory_bank is None:
        raise ModelFormatError("cannot save a model that has not been fitted")
    with open(folder / f"{prefix}{PARAMS_FILE}", "wb") as handle:
        pickle.dump(reference_parameters(model.config), handle, protocol=pickle.HIGHEST_PROTOCOL)
    if bank_storage_of(model.index) == "mmap":
        write_bank_file(model.memory_bank, folder / f"{prefix}{INDEX_FILE}")
    else:
        write_memory_bank(model.memory_bank, folder / f"{prefix}{INDEX_FILE}")
    if model.config.index.approximate:
        model.index.write(folder / f"{prefix}{approximate_index_file(model.config.index.kind)}")
    meta = _meta(model, prefix, ensemble)
    (folder / f"{prefix}{META_FILE}").write_text(json.dumps(meta, indent=2))


def save_models(
    folder: Path,
    models: list[PatchCore],
    ensemble_statistics: NormalStatistics | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Writes one model or an ensemble's members into `folder`, replacing it atomically.

    `ensemble_statistics`: an ensemble's combined-scale statistics and threshold
    (`patchcore.evaluation.ensemble.calibrate_ensemble`), saved with every member.
    `extra_files` (name -> text, e.g. an update history) are written into the folder too.
    """
    if ensemble_statistics is not None and len(models) == 1:
        raise ModelFormatError("ensemble statistics belong to an ensemble of several models")
    ensemble = _ensemble_meta(len(models), ensemble_statistics)
    with staged_path(Path(folder), folder=True) as staging:
        for position, model in enumerate(models):
            _write_member(staging, model, member_prefix(position, len(models)), ensemble)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
    LOGGER.info("Saved %d model(s) to %s", len(models), folder)


def member_prefixes(folder: Path) -> list[str]:
    """Prefixes of the models in `folder`, in ensemble order ('' for a single model)."""
    folder = Path(folder)
    if is_staging(folder):
        raise ModelFormatError(
            f"{folder}: an unfinished copy left by an interrupted save, not a model; use the "
            "model folder beside it, or delete it"
        )
    recover_folder(folder)  # a replacement killed half-way (see patchcore.files)
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: model folder does not exist")
    prefixes = [path.name[: -len(PARAMS_FILE)] for path in folder.glob(f"*{PARAMS_FILE}")]
    if not prefixes:
        raise ModelFormatError(f"{folder}: no {PARAMS_FILE} found; is this a model folder?")
    if prefixes == [""]:
        return prefixes
    matches = [_ENSEMBLE_PREFIX.match(prefix) for prefix in prefixes]
    if not all(matches) or {int(match.group(2)) for match in matches} != {len(prefixes)}:
        raise ModelFormatError(
            f"{folder}: inconsistent ensemble files {sorted(prefixes)}; expected "
            f"Ensemble-i-{len(prefixes)}_ prefixes for i = 1..{len(prefixes)}"
        )
    return sorted(prefixes, key=lambda prefix: int(_ENSEMBLE_PREFIX.match(prefix).group(1)))


def read_json(path: Path):
    """The JSON value in a file of a model folder; ModelFormatError when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as error:
        raise ModelFormatError(f"{path}: cannot read ({error.strerror})") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFormatError(f"{path}: not valid JSON ({error})") from error


def read_meta(path: Path) -> dict:
    """The JSON object of a meta file; ModelFormatError when it is not one."""
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ModelFormatError(f"{path}: not a {FORMAT_NAME} description")
    return meta


def config_from_meta(
    meta: dict, where: str, format_name: str = FORMAT_NAME, format_version: int = FORMAT_VERSION
) -> PatchCoreConfig:
    """The configuration in a self-description (`patchcore_meta.json`, or an exported
    module's state dict with its own format name), after checking the format name and
    version; `where` names the description in errors."""
    if meta.get("format") != format_name:
        raise ModelFormatError(f"{where}: not a {format_name} description")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > format_version:
        raise ModelFormatError(
            f"{where}: model format version {version} is newer than this library understands "
            f"(up to {format_version}, patchcore {__version__}); upgrade patchcore"
        )
    if not isinstance(meta.get("config"), dict):
        raise ModelFormatError(f"{where}: holds no configuration")
    values = {"backbone_statistics": PRETRAINED_STATISTICS, **meta["config"]}
    return _typed_config(PatchCoreConfig, values, where, "")


def _typed_config(cls: type, values, where: str, prefix: str):
    """The configuration dataclass `cls` built from the JSON object `values`, every field
    checked against its declared type; a ModelFormatError names the first bad field."""
    if not isinstance(values, dict):
        raise ModelFormatError(f"{where}: configuration '{prefix.rstrip('.')}' is not an object")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ModelFormatError(f"{where}: unknown configuration fields {unknown}")
    missing = [name for name in REQUIRED_FIELDS.get(cls, ()) if name not in values]
    if missing:
        raise ModelFormatError(
            f"{where}: configuration field '{prefix}{missing[0]}' is missing; the file is "
            "damaged or was edited: restore it, or save the model again"
        )
    typed = {
        name: _typed_value(value, str(fields[name].type), where, prefix + name)
        for name, value in values.items()
    }
    try:
        return cls(**typed)
    except ConfigurationError as error:
        raise ModelFormatError(f"{where}: {error}") from error


_NESTED = {
    "PreprocessingConfig": PreprocessingConfig,
    "SamplerConfig": SamplerConfig,
    "IndexConfig": IndexConfig,
}
_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "tuple[str, ...]": "a list of strings",
}


def _typed_value(value, annotation: str, where: str, name: str):
    """`value` as the field type `annotation` (as written in the dataclass) says."""
    kinds = [kind.strip() for kind in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    kind = next(kind for kind in kinds if kind != "None")
    if kind in _NESTED:
        return _typed_config(_NESTED[kind], value, where, name + ".")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    valid = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": number and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "tuple[str, ...]": isinstance(value, list | tuple)
        and all(isinstance(item, str) for item in value),
    }.get(kind)
    if valid is None:  # a type this check does not know: the dataclass validates it
        return value
    if not valid:
        raise ModelFormatError(
            f"{where}: configuration field '{name}' must be {_TYPE_NAMES[kind]}, got "
            f"{json.dumps(value)}; the file is damaged or was edited: restore it, or save "
            "the model again"
        )
    if kind == "float":
        return float(value)
    return tuple(value) if kind == "tuple[str, ...]" else value


def _config_from_reference(params: dict, path: Path, resize: int) -> PatchCoreConfig:
    required = ["backbone.name", "layers_to_extract_from", "input_shape", "patchsize"]
    missing = [key for key in required if key not in params]
    if missing:
        raise ModelFormatError(f"{path}: missing parameters {missing}")
    try:
        imagesize = int(params["input_shape"][-1])
        return PatchCoreConfig(
            backbone_name=str(params["backbone.name"]),
            layers=tuple(str(layer) for layer in params["layers_to_extract_from"]),
            pretrain_embed_dimension=int(params.get("pretrain_embed_dimension", 1024)),
            target_embed_dimension=int(params.get("target_embed_dimension", 1024)),
            patchsize=int(params["patchsize"]),
            patchstride=int(params.get("patchstride", 1)),
            num_nn=int(params.get("anomaly_scorer_num_nn", 1)),
            preprocessing=PreprocessingConfig(resize=max(resize, imagesize), imagesize=imagesize),
        )
    except (TypeError, ValueError, IndexError) as error:  # ConfigurationError is a ValueError
        raise ModelFormatError(f"{path}: malformed parameters ({error})") from error


def _statistics_from_meta(values, where: str) -> NormalStatistics:
    """The normal statistics of a meta file: every field a finite number."""
    names = [field.name for field in dataclasses.fields(NormalStatistics)]
    if not isinstance(values, dict) or sorted(values) != sorted(names):
        raise ModelFormatError(
            f"{where}: 'normal_statistics' must hold exactly the fields {names}; the file is "
            "damaged or was edited: restore it, or save the model again"
        )
    for name in names:
        value = values[name]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ModelFormatError(
                f"{where}: 'normal_statistics.{name}' must be a finite number, got "
                f"{json.dumps(value)}; the file is damaged or was edited: restore it, or save "
                "the model again"
            )
    return NormalStatistics(**{**values, "num_images": int(values["num_images"])})


def load_model(
    folder: Path,
    prefix: str = "",
    device: torch.device | str = "cpu",
    search: SearchConfig | None = None,
    reference_resize: int = 256,
) -> PatchCore:
    """Loads one model (ensemble member `prefix`) from `folder`.

    `reference_resize` is only used for folders written by the reference code, which do
    not record the resize step of their preprocessing.
    """
    folder = Path(folder)
    params_path = folder / f"{prefix}{PARAMS_FILE}"
    meta_path = folder / f"{prefix}{META_FILE}"
    params = read_plain_pickle(params_path)
    if not isinstance(params, dict):
        raise ModelFormatError(f"{params_path}: expected a dict of parameters")
    if meta_path.is_file():
        meta = read_meta(meta_path)
        config = config_from_meta(meta, str(meta_path))
    else:
        meta = {}
        config = _config_from_reference(params, params_path, reference_resize)
        LOGGER.info(
            "%s has no %s: reading it as a reference-format model, which does not record its "
            "resize step; images are resized to %d (--resize) and centre-cropped to %d",
            folder, META_FILE, config.preprocessing.resize, config.preprocessing.imagesize,
        )  # fmt: skip
    search = search or SearchConfig()
    model = PatchCore(config, device, search)
    if search.index is None and config.index.approximate:
        model.index.read(folder / f"{prefix}{approximate_index_file(config.index.kind)}")
    bank_path = folder / f"{prefix}{INDEX_FILE}"
    bank = MappedBank(bank_path) if search.bank_storage == "mmap" else read_memory_bank(bank_path)
    try:
        model.set_memory_bank(bank)
    except DataError as error:  # the bank's rows, width or values: name the file
        raise ModelFormatError(f"{bank_path}: {error}; save or train the model again") from error
    if meta.get("normal_statistics") is not None:
        model.normal_statistics = _statistics_from_meta(meta["normal_statistics"], str(meta_path))
    return model


def load_models(
    folder: Path,
    device: torch.device | str = "cpu",
    search: SearchConfig | None = None,
    reference_resize: int = 256,
) -> list[PatchCore]:
    """Every model in `folder`: one, or all ensemble members in order.

    A folder replaced while it is read (`patchcore-update` exchanges it with the new version
    in one step) is read again, so the models are all of one version, never a mix."""
    for _ in range(_READ_ATTEMPTS):
        version = _folder_version(folder)
        models = [
            load_model(folder, prefix, device, search, reference_resize)
            for prefix in member_prefixes(folder)
        ]
        if _folder_version(folder) == version:
            return models
    raise ModelFormatError(
        f"{folder}: replaced by another version {_READ_ATTEMPTS} times while it was being "
        "read; load it again when the updates are over"
    )


_READ_ATTEMPTS = 3


def _folder_version(folder: Path) -> tuple[int, int] | None:
    """What tells one version of a model folder from the next: every replacement puts a new
    folder (a new inode) in place."""
    try:
        status = Path(folder).stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def load_ensemble_statistics(folder: Path) -> NormalStatistics | None:
    """The combined-scale statistics and threshold saved with an ensemble's members, or None
    (a single model, an ensemble saved without held-out normal images or by an older version,
    or a reference-format folder). Members that disagree are a ModelFormatError."""
    folder = Path(folder)
    prefixes = member_prefixes(folder)
    if len(prefixes) == 1:
        return None
    recorded = []
    for prefix in prefixes:
        meta_path = folder / f"{prefix}{META_FILE}"
        if not meta_path.is_file():
            return None
        meta = read_meta(meta_path)
        config_from_meta(meta, str(meta_path))  # checks the format version
        recorded.append(meta.get(ENSEMBLE_KEY))
    if any(entry != recorded[0] for entry in recorded):
        raise ModelFormatError(
            f"{folder}: the ensemble members record different ensemble statistics; the folder "
            "mixes members of different saves"
        )
    entry = recorded[0]
    where = f"{folder / (prefixes[0] + META_FILE)}: '{ENSEMBLE_KEY}'"
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ModelFormatError(f"{where} is not an object; restore the file, or save again")
    if entry.get("normal_statistics") is None:
        return None
    members, normalisation = entry.get("members"), entry.get("normalisation")
    if members != len(prefixes) or normalisation != ENSEMBLE_NORMALISATION:
        raise ModelFormatError(
            f"{where} holds statistics for {members} members combined with "
            f"'{normalisation}', but the folder holds {len(prefixes)} members"
        )
    return _statistics_from_meta(entry["normal_statistics"], where)
