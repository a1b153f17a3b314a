"""What identifies a saved or exported model in every output that it decided: a content hash
and the format it was written in.

`model_identity` is the first 16 hex digits of a SHA-256 over the model's files: for a model
folder, every file in it (by name, then content, in name order) except the descriptive files
of `DESCRIPTIVE_FILES` (the model card describes the model and names this hash, so it cannot
be part of it); for an exported file, its bytes (and an OpenVINO `.xml`'s `.bin` beside it).
Two folders with the same identity score every image the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MODEL_CARD_FILE = "MODEL_CARD.md"
DESCRIPTIVE_FILES = frozenset({MODEL_CARD_FILE})
IDENTITY_DIGITS = 16
_BLOCK = 1 << 20


def _add_file(digest, path: Path) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)


def model_files(path: Path) -> list[Path]:
    """The files whose content is the model at `path` (a folder or an exported file)."""
    path = Path(path)
    if path.is_file():
        weights = path.with_suffix(".bin")
        return [path, weights] if path.suffix.lower() == ".xml" and weights.is_file() else [path]
    return sorted(
        (file for file in path.iterdir() if file.is_file() and file.name not in DESCRIPTIVE_FILES),
        key=lambda file: file.name,
    )


def model_identity(path: Path) -> str:
    """The content hash of the model at `path` (see the module docstring)."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in model_files(path):
        if path.is_dir():
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        _add_file(digest, file)
    return digest.hexdigest()[:IDENTITY_DIGITS]


def saved_model_format(folder: Path) -> str:
    """'patchcore-model/N' for a model folder written in format version N (its first member's
    self-description), 'reference' for a folder the reference code wrote (no description)."""
    from patchcore.model.serialization import FORMAT_NAME, META_FILE, member_prefixes, read_meta

    meta_path = Path(folder) / f"{member_prefixes(folder)[0]}{META_FILE}"
    if not meta_path.is_file():
        return "reference"
    return f"{FORMAT_NAME}/{read_meta(meta_path).get('format_version')}"
