"""Exceptions raised for bad input; the CLI turns them into one-line messages."""


class PatchCoreError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigurationError(PatchCoreError, ValueError):
    """An option has a value outside what it accepts."""


class DataError(PatchCoreError, ValueError):
    """A dataset folder, image or mask is missing, unreadable or inconsistent."""


class BackboneError(PatchCoreError):
    """A backbone or layer name is unknown, or its weights cannot be found."""


class ModelFormatError(PatchCoreError):
    """A saved model folder is incomplete, unsafe, or of an unknown format version."""
