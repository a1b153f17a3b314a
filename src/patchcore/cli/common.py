"""What every command shares: device, seed, logging and progress options, one-line errors.

Every entry point declares `common_options(...)` and receives a `CommonOptions`. Nothing
here imports torch at import time, so `--help` is immediate.

Device, on every command: `--gpu N` (the reference's flag; -1 means the CPU; repeatable
for compatibility, the first id is used) or `--device auto|cpu|cuda|cuda:N`. Neither given
means `auto`: the first CUDA device when there is one, else the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from patchcore.config import BACKBONE_RUNTIMES, IMAGE_SCORES, MAX_SEED, PatchCoreConfig
from patchcore.errors import ConfigurationError, PatchCoreError
from patchcore.progress import disable_bars

if TYPE_CHECKING:
    import torch

LOGGER = logging.getLogger("patchcore.cli")

DEBUG_ENVIRONMENT_VARIABLE = "PATCHCORE_DEBUG"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ORDER_HINT = (
    " (a command's options come before its positional arguments, e.g. "
    "'sampler -p 0.1 approx_greedy_coreset', 'dataset -d bottle mvtec PATH')"
)

GLIBC_M_TRIM_THRESHOLD = -1
GLIBC_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


# ------------------------------------------------------------------------ options
class _Quantile(click.FloatRange):
    """A number in [0, 1]; unlike click's FloatRange, NaN is refused."""

    name = "quantile"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number in [0, 1].", param, ctx)
        return number


QUANTILE = _Quantile(0, 1)


def image_score_options(function: Callable) -> Callable:
    """`--image_score` and its parameters: how a model scores an image from its patch scores
    (`PatchCoreConfig.image_score`); a command receives them as `image_score_config`."""
    decorators = [
        click.option("--image_score", type=click.Choice(IMAGE_SCORES), default="max",
                     show_default=True,
                     help="Image score from the patch scores: the largest (max, the "
                          "reference), a high quantile (quantile) or the mean of the k largest "
                          "(top_k_mean); the last two grow less with the image's area "
                          "(docs/how-to/wide-parts.md)."),
        click.option("--image_score_quantile", type=float, default=None,
                     help="With --image_score quantile: the quantile in (0, 1] [0.99]."),
        click.option("--image_score_top_k", type=int, default=None,
                     help="With --image_score top_k_mean: how many of the largest patch "
                          "scores are averaged [10]."),
    ]  # fmt: skip

    @functools.wraps(function)
    def wrapper(*args, image_score, image_score_quantile, image_score_top_k, **kwargs):
        kwargs["image_score_config"] = image_score_config(
            image_score, image_score_quantile, image_score_top_k
        )
        return function(*args, **kwargs)

    for decorator in reversed(decorators):
        wrapper = decorator(wrapper)
    return wrapper


def image_score_config(mode: str, quantile: float | None, top_k: int | None) -> dict:
    """The `PatchCoreConfig` fields of the image-score options, checked by that dataclass;
    a parameter given with another mode is refused (it would be silently ignored)."""
    if quantile is not None and mode != "quantile":
        raise click.UsageError(f"--image_score_quantile needs --image_score quantile, got {mode}")
    if top_k is not None and mode != "top_k_mean":
        raise click.UsageError(f"--image_score_top_k needs --image_score top_k_mean, got {mode}")
    defaults = PatchCoreConfig()
    fields = {
        "image_score": mode,
        "image_score_quantile": defaults.image_score_quantile if quantile is None else quantile,
        "image_score_top_k": defaults.image_score_top_k if top_k is None else top_k,
    }
    with usage_errors():
        PatchCoreConfig(**fields)  # the one validation of the values
    return fields


@dataclass(frozen=True)
class CommonOptions:
    """The shared options of one command invocation."""

    gpu: tuple[int, ...] = ()
    device: str | None = None
    seed: int | None = None
    log_level: str = "info"
    no_progress: bool = False
    debug: bool = False

    def torch_device(self) -> torch.device:
        """The device `--gpu`/`--device` select (see `resolve_device`)."""
        return resolve_device(self.gpu, self.device)

    @classmethod
    def take(cls, params: dict) -> CommonOptions:
        """Removes the shared options from a command's parameters and returns them."""
        values = {name: params.pop(name) for name in COMMON_NAMES if name in params}
        values["gpu"] = tuple(values.get("gpu", ()))
        return cls(**values)


COMMON_NAMES = ("gpu", "device", "seed", "log_level", "no_progress", "debug")


@dataclass(frozen=True)
class SeedOption:
    """How a command documents and defaults its `--seed`."""

    default: int
    help: str


def common_options(seed: SeedOption | None = None):
    """Adds the shared options to a click command; the function receives `common=`."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            return function(*args, common=CommonOptions.take(kwargs), **kwargs)

        options = [
            click.option("--log_level", type=click.Choice(LOG_LEVELS), default="info",
                         show_default=True, help="Least important log messages shown."),
            click.option("--no_progress", is_flag=True,
                         help="No progress bars, a few log lines instead (the default when "
                              "output is not a terminal)."),
            click.option("--debug", is_flag=True,
                         help=f"Show the full traceback of an error (or set "
                              f"{DEBUG_ENVIRONMENT_VARIABLE}=1)."),
        ]  # fmt: skip
        if seed is not None:
            options.append(
                click.option("--seed", type=click.IntRange(0, MAX_SEED), default=seed.default,
                             show_default=True,
                             help=seed.help)
            )  # fmt: skip
        options += [
            click.option("--gpu", type=int, multiple=True,
                         help="CUDA device id (the reference's flag); -1 runs on the CPU. "
                              "Default: the first GPU when there is one, else the CPU."),
            click.option("--device", type=str, default=None,
                         help="auto, cpu, cuda or cuda:N; instead of --gpu."),
        ]  # fmt: skip
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def backbone_runtime_option(function: Callable) -> Callable:
    """`--backbone_runtime`, for the commands that run a model's backbone
    (`patchcore.config.SearchConfig.backbone_runtime`)."""
    return click.option(
        "--backbone_runtime", type=click.Choice(BACKBONE_RUNTIMES), default="torch",
        show_default=True,
        help="What runs the backbone: eager torch with BatchNorm folded into the "
             "convolutions (torch), eager torch over the network's layers as they are "
             "(torch-unfolded), or TorchScript with oneDNN fusion, CPU only (torchscript); "
             "the same scores up to float rounding.",
    )(function)  # fmt: skip


def resolve_device(gpu: tuple[int, ...], device: str | None) -> torch.device:
    """The torch device `--gpu`/`--device` select; a clear error for one that is absent."""
    import torch

    if gpu and device is not None:
        raise ConfigurationError("give --gpu or --device, not both")
    if device is not None:
        return _named_device(device.strip().lower(), torch)
    if not gpu:
        return _named_device("auto", torch)
    if len(gpu) > 1:
        LOGGER.info("Several --gpu ids given; using the first, %d", gpu[0])
    if gpu[0] < 0:
        LOGGER.info("Running on the CPU (--gpu %d)", gpu[0])
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigurationError(
            f"--gpu {gpu[0]}: CUDA is not available on this machine; use --gpu -1 or "
            "--device cpu to run on the CPU"
        )
    return _cuda_device(gpu[0], f"--gpu {gpu[0]}", torch)


def _named_device(text: str, torch) -> torch.device:
    if text == "cpu":
        LOGGER.info("Running on the CPU (--device cpu)")
        return torch.device("cpu")
    if text == "auto":
        if torch.cuda.is_available():
            return _cuda_device(0, "--device auto", torch)
        LOGGER.info("Running on the CPU (no CUDA device found)")
        return torch.device("cpu")
    kind, separator, number = text.partition(":")
    if kind != "cuda" or (separator and not number.isdigit()):
        raise ConfigurationError(f"--device {text}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigurationError(f"--device {text}: CUDA is not available on this machine")
    return _cuda_device(int(number) if separator else 0, f"--device {text}", torch)


def _cuda_device(index: int, option: str, torch) -> torch.device:
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigurationError(
            f"{option}: this machine has {count} CUDA device(s), ids 0 to {count - 1}"
        )
    LOGGER.info("Running on cuda:%d (%s)", index, torch.cuda.get_device_name(index))
    return torch.device(f"cuda:{index}")


# ------------------------------------------------------------------------ process
def configure_process(common: CommonOptions) -> None:
    """Process set-up of a command: logging, progress, and glibc's heap behaviour.

    glibc raises its mmap threshold after large blocks are freed, so the big temporaries
    of feature extraction end up on the heap and stay resident (hundreds of MB, varying
    run to run). A fixed 4 MiB threshold returns such blocks to the system on free, and a
    high trim threshold keeps the heap of smaller blocks from being trimmed and re-faulted.
    """
    configure_logging("debug" if common.debug else common.log_level)
    if common.no_progress:
        disable_bars()
    library = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None) if library else None
    if mallopt is not None:
        mallopt(GLIBC_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        mallopt(GLIBC_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def configure_logging(level: str = "info") -> None:
    """Log lines to stderr (a handler is added once per process) at `level` and above."""
    logging.basicConfig(format=LOG_FORMAT)
    logging.getLogger().setLevel(getattr(logging, level.upper()))
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def run_guarded(job: Callable[[], int | None], common: CommonOptions) -> None:
    """Sets the process up, runs `job`, and turns a PatchCoreError into one line on stderr
    and exit code 1; with `--debug` (or PATCHCORE_DEBUG=1) the traceback is shown instead.
    This is the only place where errors are printed. A job that returns a non-zero number
    (patchcore-predict's decisions) makes it the process's exit code."""
    configure_process(common)
    LOGGER.debug("Command line: %s", " ".join(sys.argv))
    try:
        with _termination_ends_like_an_error():
            code = job()
    except PatchCoreError as error:
        if _show_traceback(common):
            raise
        # Errors raised in DataLoader workers arrive wrapped; their last line is ours.
        lines = str(error).strip().splitlines()
        raise click.ClickException(lines[-1] if lines else repr(error)) from error
    except OSError as error:
        # A file-system fault that no boundary turned into a PatchCoreError: one line still.
        if _show_traceback(common):
            raise
        where = f"{error.filename}: " if error.filename else ""
        raise click.ClickException(
            f"{where}{error.strerror or error} (--debug shows where it happened)"
        ) from error
    if code:
        click.get_current_context().exit(code)


@contextlib.contextmanager
def _termination_ends_like_an_error() -> Iterator[None]:
    """For the block, SIGTERM (`kill`, a scheduler stopping the job) raises SystemExit with
    exit code 143 instead of ending the process on the spot, so the cleanup of a failure runs:
    an empty run folder and unfinished staging copies are removed. The previous handler is
    restored afterwards. Only the main thread can handle signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_terminated(signum: int, frame) -> None:
    raise SystemExit(TERMINATED_EXIT_CODE)


def _show_traceback(common: CommonOptions) -> bool:
    return common.debug or os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "0") not in ("", "0")


@contextlib.contextmanager
def usage_errors():
    """A ConfigurationError raised while options become configurations is a click usage
    error (exit code 2, with the command's usage line). Usable as `with` or as a decorator."""
    try:
        yield
    except ConfigurationError as error:
        raise click.UsageError(str(error)) from error


# ------------------------------------------------------------------ click classes
class _OrderHint:
    """Mixin: 'no such option' errors explain that options come before positional arguments."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as error:
            error.message += ORDER_HINT
            raise
        except click.MissingParameter as error:
            # A required option given after a positional argument is read as missing.
            names = (*error.param.opts, *error.param.secondary_opts) if error.param else ()
            if any(arg.split("=", 1)[0] in names for arg in args):
                error.message = f"{error.message or ''}{ORDER_HINT}".strip()
            raise


class OrderHintCommand(_OrderHint, click.Command):
    """A command whose option-order mistakes get a hint."""


class OrderHintGroup(_OrderHint, click.Group):
    """A (chained) group whose option-order mistakes get the same hint, also when a stray
    option is read where the next sub-command's name should be."""

    command_class = OrderHintCommand

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0].startswith("-") and self.get_command(ctx, args[0]) is None:
            raise click.UsageError(f"No such option: {args[0]}{ORDER_HINT}", ctx)
        return super().resolve_command(ctx, args)
