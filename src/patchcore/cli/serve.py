"""`patchcore-serve`: saved models behind an HTTP service (`patchcore.apps.serve`)."""

from __future__ import annotations

from pathlib import Path

import click

from patchcore.cli.common import common_options, run_guarded, usage_errors
from patchcore.config import RUNTIMES, SEARCH_BACKENDS


@click.command()
@click.argument("models", metavar="MODEL...", nargs=-1, required=True)
@click.option("--runtime", type=click.Choice(RUNTIMES), default=None,
              help="What runs each MODEL, as in patchcore-predict: torch (model folders, "
                   ".pth), onnxruntime (.onnx) or openvino (.xml, .onnx); default: by kind.")
@click.option("--nn_backend", type=click.Choice(SEARCH_BACKENDS), default="rerank",
              show_default=True, help="Nearest-neighbour search of model folders (see predict).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but this machine logs a warning.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api_key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File whose first line is the API key every /v1 and /metrics request must "
                   "carry; default: the PATCHCORE_SERVE_API_KEY variable, else no key.")
@click.option("--max_batch", type=int, default=None,
              help="Most images the model thread scores at once; default 1 on the CPU (batches "
                   "did not pay there, see docs/how-to/serve.md), 8 on a GPU.")
@click.option("--batch_wait_ms", type=float, default=5.0, show_default=True,
              help="How long the model thread waits for more images to fill a batch.")
@click.option("--queue_size", type=int, default=64, show_default=True,
              help="Most images waiting for the model; more are refused with 503.")
@click.option("--max_request_mb", type=float, default=32.0, show_default=True,
              help="Largest request body (MiB); larger ones are refused with 413.")
@click.option("--decode_threads", type=int, default=2, show_default=True,
              help="Threads that decode uploads and draw heat maps.")
@click.option("--drain_seconds", type=float, default=30.0, show_default=True,
              help="On SIGTERM, how long requests in flight may take to finish.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run as a Ray Serve deployment (the cluster extra) instead of one process.")
@click.option("--address", default=None,
              help="With --ray: a Ray cluster (HOST:PORT or auto); default: a local instance.")
@click.option("--replicas", type=int, default=1, show_default=True,
              help="With --ray: replicas, each loading the models.")
@click.option("--replica_cpus", type=float, default=1.0, show_default=True,
              help="With --ray: CPUs each replica reserves (its torch threads).")
@click.option("--replica_gpus", type=float, default=0.0, show_default=True,
              help="With --ray: GPUs each replica reserves (> 0 runs the models on CUDA).")
@common_options()
def serve_cli(models, runtime, nn_backend, host, port, api_key_file, max_batch, batch_wait_ms,
              queue_size, max_request_mb, decode_threads, drain_seconds, use_ray, address,
              replicas, replica_cpus, replica_gpus, common):  # fmt: skip
    """Serve MODELs (saved model folders, exported files or export folders; NAME=MODEL names
    the category, default the folder's category or the file's stem) over HTTP:
    POST an image to /v1/categories/CATEGORY/inspect for predict's decision; GET /health,
    /ready, /metrics. Stops on SIGTERM after answering the requests in flight."""
    from patchcore.apps import serve as serving
    from patchcore.config import SearchConfig

    def job() -> None:
        import torch

        serving.require_serving_packages()
        with usage_errors():
            on_gpu = use_ray and replica_gpus > 0
            device = torch.device("cuda") if on_gpu else common.torch_device()
            search = SearchConfig(backend=nn_backend)
            options = serving.ServeOptions(
                models=serving.served_models(models, runtime, device, search),
                max_batch=serving.default_max_batch(device) if max_batch is None else max_batch,
                batch_wait_ms=batch_wait_ms,
                queue_size=queue_size,
                max_request_bytes=int(max_request_mb * 1024 * 1024),
                decode_threads=decode_threads,
                api_key=serving.read_api_key(api_key_file),
            )
            settings = serving.ServerSettings(host, port, drain_seconds, common.log_level)
            replica_settings = serving.ReplicaSettings(replicas, replica_cpus, replica_gpus)
        if use_ray:
            serving.serve_on_ray(options, settings, replica_settings, address)
        else:
            serving.serve_forever(options, settings)

    run_guarded(job, common)


def serve_main() -> None:
    """Entry point of `patchcore-serve`."""
    serve_cli()
