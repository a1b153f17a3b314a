"""The errors this library raises on purpose; the command line prints each as one line.

Every user-facing failure is a `PatchCoreError`. Faults from below (the file system, FAISS,
decoders) are turned into one of these where they occur, with the file and the fix named.
"""


class PatchCoreError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigurationError(PatchCoreError, ValueError):
    """An option has a value outside what it accepts."""


class DataError(PatchCoreError, ValueError):
    """A dataset folder, image, mask or score array is missing, unreadable or inconsistent."""


class BackboneError(PatchCoreError):
    """A backbone or layer name is unknown, or its weights cannot be found."""


class ModelFormatError(PatchCoreError):
    """A saved model folder is incomplete, unsafe, or of an unknown format version."""


class OutputError(PatchCoreError):
    """A result, model or image file cannot be written (read-only folder, disk full, ...)."""


class MissingDependencyError(PatchCoreError):
    """An optional feature needs a package that is not installed; the message names the extra."""


def missing_dependency(feature: str, package: str, extra: str) -> MissingDependencyError:
    """The error for `feature` needing `package`, installed with the project's `extra`."""
    return MissingDependencyError(
        f"{feature} needs the package {package}: pip install \"patchcore[{extra}]\""
    )
