"""Options choosing how the memory bank is searched and stored: `--search` with its FAISS
parameters (saved with a trained model; on evaluation they replace the saved index for that
run) and `--bank_storage`. Shared by `patch_core` and `patch_core_loader`."""

from __future__ import annotations

import click

from patchcore.config import BANK_STORAGES, INDEX_KINDS, IndexConfig

# option name -> (IndexConfig field, the --search kinds it applies to)
INDEX_PARAMETERS = {
    "nlist": ("nlist", ("ivf", "ivfpq")),
    "nprobe": ("nprobe", ("ivf", "ivfpq")),
    "pq_m": ("pq_m", ("ivfpq",)),
    "pq_bits": ("pq_bits", ("ivfpq",)),
    "hnsw_m": ("hnsw_m", ("hnsw",)),
    "ef_construction": ("ef_construction", ("hnsw",)),
    "ef_search": ("ef_search", ("hnsw",)),
}
INDEX_OPTION_NAMES = ("search", "bank_storage", *INDEX_PARAMETERS)


def index_options(training: bool):
    """Adds --search, its FAISS parameters and --bank_storage to a command."""
    saved = "" if training else " Default: the index saved with the model."

    def decorate(function):
        options = [
            click.option("--search", "search", type=click.Choice(INDEX_KINDS),
                         default="exact" if training else None, show_default=training,
                         help="Memory-bank search: exact (reference), or FAISS approximate "
                              "ivf, ivfpq or hnsw." + saved),
            click.option("--nlist", type=int, default=None,
                         help="ivf/ivfpq: k-means cells [about 4 sqrt(bank size)]."),
            click.option("--nprobe", type=int, default=None,
                         help="ivf/ivfpq: cells searched per query [8]."),
            click.option("--pq_m", type=int, default=None,
                         help="ivfpq: sub-vectors per code, must divide the dimension "
                              "[largest divisor <= dimension/16]."),
            click.option("--pq_bits", type=int, default=None,
                         help="ivfpq: bits per sub-vector code [8]."),
            click.option("--hnsw_m", type=int, default=None,
                         help="hnsw: graph links per vector [32]."),
            click.option("--ef_construction", type=int, default=None,
                         help="hnsw: candidates kept while building [80]."),
            click.option("--ef_search", type=int, default=None,
                         help="hnsw: candidates kept while searching [64]."),
            click.option("--bank_storage", type=click.Choice(BANK_STORAGES), default="memory",
                         show_default=True,
                         help="memory, or mmap: the bank stays in a memory-mapped file (the "
                              "model's, or a temporary one under TMPDIR while fitting) and is "
                              "searched by FAISS in blocks, for banks larger than RAM."),
        ]  # fmt: skip
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def index_config(values: dict, backend: str) -> IndexConfig | None:
    """The IndexConfig the index options ask for (None: `--search` not given, keep the saved
    one); pops the options from `values`. Contradictory combinations are refused with the
    option names in the message."""
    options = {name: values.pop(name) for name in INDEX_OPTION_NAMES}
    kind, storage = options["search"], options["bank_storage"]
    if backend == "torch" and kind not in (None, "exact"):
        raise click.UsageError(
            f"--search {kind} is a FAISS index; --nn_backend torch applies to exact search only"
        )
    if backend == "torch" and storage == "mmap":
        raise click.UsageError(
            "--bank_storage mmap is searched by FAISS; leave out --nn_backend torch"
        )
    given = {name: options[name] for name in INDEX_PARAMETERS if options[name] is not None}
    for name in given:
        kinds = INDEX_PARAMETERS[name][1]
        if kind not in kinds:
            raise click.UsageError(
                f"--{name} applies to --search {' or '.join(kinds)}, not to "
                f"{'the saved index (give --search too)' if kind is None else '--search ' + kind}"
            )
    if kind is None:
        return None
    return IndexConfig(kind=kind, **{INDEX_PARAMETERS[name][0]: value for name, value in given.items()})
