"""patchcore-serve: endpoints, decisions equal to predict's, bad input, API key, limits,
batching, metrics, SIGTERM drain and a kill mid-request."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="patchcore-serve needs the serve extra (fastapi)")
pytest.importorskip("prometheus_client", reason="patchcore-serve needs the serve extra")
httpx = pytest.importorskip("httpx", reason="the tests talk to the service with httpx")

from patchcore.apps import serve as serving
from patchcore.data.datasets import list_samples
from patchcore.errors import ConfigurationError
from patchcore.model.serialization import save_models
from test_deploy import fit_small_model
from test_predict import predict, read_rows

SOURCE = Path(__file__).resolve().parents[1] / "src"
INSPECT = "/v1/categories/texture/inspect"


@pytest.fixture(scope="module")
def model_dir(synthetic_root, tmp_path_factory) -> Path:
    """A calibrated small model saved as a run would name it (category 'texture')."""
    folder = tmp_path_factory.mktemp("serve_models") / "mvtec_texture"
    save_models(folder, [fit_small_model(synthetic_root, "texture")])
    return folder


@pytest.fixture(scope="module")
def test_images(synthetic_root) -> list[Path]:
    """Test images (rejected, mostly) and three training images (accepted, mostly)."""
    samples = list_samples(synthetic_root, "texture", "test")
    samples += list_samples(synthetic_root, "texture", "train")[:3]
    return [sample.image_path for sample in samples]


@pytest.fixture(scope="module")
def predicted(model_dir, test_images, tmp_path_factory) -> dict[str, dict]:
    """patchcore-predict's rows for the test images, by path, with its heat maps."""
    folder = tmp_path_factory.mktemp("serve_predict")
    code, output = predict(model_dir, test_images, folder / "rows.csv", "--heatmaps",
                           folder / "heat")  # fmt: skip
    assert code in (0, 3), output
    return {row["path"]: row for row in read_rows(folder / "rows.csv")}


@pytest.fixture(scope="module")
def loaded(model_dir) -> dict[str, serving.Category]:
    """The category loaded once, shared by the in-process services of this file."""
    model = serving.served_models([str(model_dir)])[0]
    return {model.category: serving.load_category(model)}


def options_for(model_dir: Path, **changes) -> serving.ServeOptions:
    return serving.ServeOptions(models=serving.served_models([str(model_dir)]), **changes)


@contextlib.asynccontextmanager
async def client_of(service: serving.InspectionService):
    """An HTTP client on the app with `service` started (stopped, draining, at the end)."""
    app = serving.create_app()
    app.state.service = service
    service.start()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            yield client
    finally:
        await asyncio.get_running_loop().run_in_executor(None, service.stop)


def run(coroutine):
    return asyncio.run(coroutine)


def service_of(loaded, model_dir, categories=None, **changes) -> serving.InspectionService:
    return serving.InspectionService(categories or loaded, options_for(model_dir, **changes))


def encoded(array: np.ndarray, kind: str = "PNG") -> bytes:
    """An image file's bytes (Pillow's mode from the array: uint16 -> I;16, int32 -> I,
    float32 -> F, uint8 -> L or RGB)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=kind)
    return buffer.getvalue()


def metric(text: str, name: str, **labels) -> float:
    """A sample's value in Prometheus text (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def assert_refused(answer, status: int, reason: str) -> dict:
    body = answer.json()
    assert answer.status_code == status, body
    assert body["reason"] == reason and body["decision"] == "error"
    assert body["error"] and "\n" not in body["error"]
    return body


# ------------------------------------------------------------------ decisions
def test_decisions_equal_predict_raw_and_multipart(loaded, model_dir, test_images, predicted):
    async def scenario():
        async with client_of(service_of(loaded, model_dir)) as client:
            answers = []
            for index, path in enumerate(test_images):
                data = path.read_bytes()
                if index % 2:
                    answer = await client.post(INSPECT, files={"image": (path.name, data)})
                else:
                    answer = await client.post(INSPECT, content=data)
                answers.append(answer)
            return answers

    answers = run(scenario())
    decisions = set()
    for path, answer in zip(test_images, answers, strict=True):
        assert answer.status_code == 200, answer.text
        body, row = answer.json(), predicted[str(path)]
        assert body["decision"] == row["decision"]
        assert math.isclose(body["score"], float(row["score"]), rel_tol=1e-5)
        assert body["threshold"] == float(row["threshold"])
        assert (body["model_id"], body["model_format"]) == (row["model_id"], row["model_format"])
        assert body["category"] == "texture" and body["elapsed_ms"] > 0
        assert "heatmap_png" not in body
        decisions.add(body["decision"])
    assert decisions == {"accept", "reject"}  # both outcomes are exercised


def test_heat_map_equals_predicts_png(loaded, model_dir, test_images, predicted):
    path = test_images[0]

    async def scenario():
        async with client_of(service_of(loaded, model_dir)) as client:
            return await client.post(INSPECT + "?heatmap=true", content=path.read_bytes())

    body = run(scenario()).json()
    served = np.array(Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))))
    written = np.array(Image.open(predicted[str(path)]["heatmap"]))
    # predict's drawing of the same map; predict scored this image in a batch of 8, which
    # moves map values by float rounding, so a few pixels' colours differ by a level or two
    assert served.shape == written.shape
    difference = np.abs(served.astype(int) - written.astype(int))
    assert difference.max() <= 3 and (difference > 0).mean() < 1e-3


def test_batched_answers_equal_single_answers(loaded, model_dir, test_images):
    async def answers(max_batch: int, wait_ms: float) -> list[dict]:
        service = service_of(loaded, model_dir, max_batch=max_batch, batch_wait_ms=wait_ms)
        async with client_of(service) as client:
            if max_batch == 1:
                return [(await client.post(INSPECT, content=path.read_bytes())).json()
                        for path in test_images]  # fmt: skip
            sent = [client.post(INSPECT, content=path.read_bytes()) for path in test_images]
            return [answer.json() for answer in await asyncio.gather(*sent)]

    single, batched = run(answers(1, 0.0)), run(answers(8, 300.0))
    assert {body["batch_size"] for body in single} == {1}
    assert max(body["batch_size"] for body in batched) > 1
    for alone, together in zip(single, batched, strict=True):
        assert alone["decision"] == together["decision"]
        assert math.isclose(alone["score"], together["score"], rel_tol=1e-5)


# ------------------------------------------------------------------ endpoints, metrics
def test_health_ready_categories_and_metrics_count_what_was_answered(
    loaded, model_dir, test_images
):  # fmt: skip
    async def scenario():
        service = service_of(loaded, model_dir)
        app = serving.create_app()
        app.state.service = service
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serve") as client:  # fmt: skip
            not_ready = await client.get("/ready")
            service.start()
            ready = await client.get("/ready")
            health = await client.get("/health")
            listed = await client.get("/v1/categories")
            bodies = [(await client.post(INSPECT, content=path.read_bytes())).json()
                      for path in test_images[:5]]  # fmt: skip
            await client.post(INSPECT, content=b"not an image")
            await client.post("/v1/categories/nowhere/inspect", content=b"x")
            metrics = await client.get("/metrics")
            await asyncio.get_running_loop().run_in_executor(None, service.stop)
            draining = await client.get("/ready")
            return not_ready, ready, health, listed, bodies, metrics, draining

    not_ready, ready, health, listed, bodies, metrics, draining = run(scenario())
    assert not_ready.status_code == 503 and draining.status_code == 503
    assert draining.json()["status"] == "draining"
    assert ready.json() == {"status": "ready", "categories": ["texture"]}
    assert health.status_code == 200
    (described,) = listed.json()["categories"]
    assert described["model_id"] == bodies[0]["model_id"] and described["runtime"] == "torch"
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    for decision in ("accept", "reject"):
        counted = sum(body["decision"] == decision for body in bodies)
        assert metric(text, "patchcore_serve_requests_total", category="texture",
                      decision=decision) == counted  # fmt: skip
    assert metric(text, "patchcore_serve_requests_total", category="texture", decision="error") == 1
    assert metric(text, "patchcore_serve_errors_total", reason="bad_image") == 1
    assert metric(text, "patchcore_serve_errors_total", reason="unknown_category") == 1
    assert metric(text, "patchcore_serve_request_seconds_count", category="texture") == 5
    assert metric(text, "patchcore_serve_batch_images_count") == 5
    assert "patchcore_serve_queue_depth 0.0" in text


# ------------------------------------------------------------------ bad input
def test_bad_inputs_are_refused_counted_and_never_accepted(
    loaded, model_dir, test_images, predicted, monkeypatch
):  # fmt: skip
    picture = np.array(Image.open(test_images[0]).convert("L"))
    wide = picture[:64, :64].astype(np.int32) * 1000  # 32-bit integers beyond 16 bits
    sixteen = picture.astype(np.uint16) * 257  # 16-bit: scaled back to these 8 bits
    floats = picture[:64, :64].astype(np.float32)  # float values outside [0, 1]
    form = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--b--\r\n'
    cases = {
        "not an image": (b"GIF89a but not really", 422, "bad_image"),
        "empty body": (b"", 400, "bad_request"),
        "32-bit values": (encoded(wide, "TIFF"), 422, "bad_image"),
        "float values": (encoded(floats, "TIFF"), 422, "bad_image"),
        "sides 200 times apart": (encoded(np.zeros((1, 200, 3), np.uint8)), 422, "bad_image"),
        "truncated": (test_images[0].read_bytes()[:300], 422, "bad_image"),
    }

    async def scenario():
        service = service_of(loaded, model_dir, max_request_bytes=256 * 1024)
        async with client_of(service) as client:
            answers = {name: await client.post(INSPECT, content=data)
                       for name, (data, _, _) in cases.items()}  # fmt: skip
            answers["too large"] = await client.post(INSPECT, content=b"\0" * (256 * 1024 + 1))
            answers["unknown category"] = await client.post(
                "/v1/categories/ghost/inspect", content=test_images[0].read_bytes()
            )
            answers["form without image"] = await client.post(
                INSPECT, content=form, headers={"content-type": "multipart/form-data; boundary=b"}
            )
            monkeypatch.setenv("PATCHCORE_MAX_IMAGE_PIXELS", "1000")
            answers["too many pixels"] = await client.post(INSPECT, content=encoded(picture))
            monkeypatch.delenv("PATCHCORE_MAX_IMAGE_PIXELS")
            sixteen_bit = await client.post(INSPECT, content=encoded(sixteen))
            eight_bit = await client.post(INSPECT, content=encoded(picture))
            return answers, sixteen_bit, eight_bit, (await client.get("/metrics")).text

    answers, sixteen_bit, eight_bit, text = run(scenario())
    expected = {name: (status, reason) for name, (_, status, reason) in cases.items()}
    expected.update({"too large": (413, "too_large"), "unknown category": (404, "unknown_category"),
                     "form without image": (400, "bad_request"),
                     "too many pixels": (422, "bad_image")})  # fmt: skip
    for name, (status, reason) in expected.items():
        body = assert_refused(answers[name], status, reason)
        assert "score" not in body, name
    assert "PATCHCORE_MAX_IMAGE_PIXELS" in answers["too many pixels"].json()["error"]
    assert "ghost" in answers["unknown category"].json()["error"]
    reasons = [reason for _, reason in expected.values()]
    for reason in set(reasons):
        assert metric(text, "patchcore_serve_errors_total", reason=reason) == reasons.count(reason)
    # 16-bit images are scored as predict scores them: scaled to 8 bits, never clipped
    assert sixteen_bit.status_code == 200 and eight_bit.status_code == 200
    assert sixteen_bit.json()["score"] == eight_bit.json()["score"]


def test_non_finite_score_and_model_failure_are_errors_never_accepts(loaded, model_dir, test_images):
    (category,) = loaded.values()

    def nan_scores(images):
        scores, maps = category.scorer.score(images)
        return np.full_like(scores, np.nan), maps

    def failing(images):
        raise RuntimeError("out of memory")

    broken = {
        "nan": dataclasses.replace(category, name="nan",
                                   scorer=dataclasses.replace(category.scorer, score=nan_scores)),
        "fails": dataclasses.replace(category, name="fails",
                                     scorer=dataclasses.replace(category.scorer, score=failing)),
    }  # fmt: skip

    async def scenario():
        async with client_of(service_of(loaded, model_dir, categories=broken)) as client:
            data = test_images[0].read_bytes()
            nan = await client.post("/v1/categories/nan/inspect", content=data)
            fails = await client.post("/v1/categories/fails/inspect", content=data)
            return nan, fails, (await client.get("/metrics")).text

    nan, fails, text = run(scenario())
    assert nan.status_code == 500 and nan.json()["decision"] == "reject"
    assert nan.json()["reason"] == "non_finite_score" and nan.json()["score"] is None
    assert_refused(fails, 500, "model_failed")
    assert "out of memory" in fails.json()["error"]
    assert metric(text, "patchcore_serve_requests_total", category="nan", decision="reject") == 1
    assert metric(text, "patchcore_serve_errors_total", reason="non_finite_score") == 1
    assert metric(text, "patchcore_serve_requests_total", category="fails", decision="error") == 1


# ------------------------------------------------------------------ security, limits
def test_api_key_is_required_when_configured(loaded, model_dir, test_images):
    async def scenario():
        service = service_of(loaded, model_dir, api_key="s3cret")
        async with client_of(service) as client:
            data = test_images[0].read_bytes()
            return {
                "none": await client.post(INSPECT, content=data),
                "wrong": await client.post(INSPECT, content=data, headers={"X-API-Key": "nope"}),
                "bearer": await client.post(INSPECT, content=data,
                                            headers={"Authorization": "Bearer s3cret"}),
                "header": await client.post(INSPECT, content=data,
                                            headers={"X-API-Key": "s3cret"}),
                "metrics": await client.get("/metrics"),
                "categories": await client.get("/v1/categories"),
                "health": await client.get("/health"),
                "ready": await client.get("/ready"),
                "metrics with key": await client.get("/metrics", headers={"X-API-Key": "s3cret"}),
            }

    answers = run(scenario())
    for name in ("none", "wrong", "metrics", "categories"):
        assert_refused(answers[name], 401, "unauthorized")
    assert answers["none"].headers["www-authenticate"] == "Bearer"
    for name in ("bearer", "header", "health", "ready", "metrics with key"):
        assert answers[name].status_code == 200, name
    assert metric(answers["metrics with key"].text, "patchcore_serve_errors_total",
                  reason="unauthorized") == 4  # fmt: skip
    assert "s3cret" not in repr(options_for(model_dir, api_key="s3cret"))


def test_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(serving.API_KEY_VARIABLE, raising=False)
    assert serving.read_api_key(None) is None
    monkeypatch.setenv(serving.API_KEY_VARIABLE, " from-env ")
    assert serving.read_api_key(None) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\nsecond line\n")
    assert serving.read_api_key(key_file) == "from-file"
    key_file.write_text("\n")
    with pytest.raises(ConfigurationError, match="empty"):
        serving.read_api_key(key_file)


def test_a_full_queue_is_refused_with_503_and_the_rest_answered(loaded, model_dir, test_images):
    (category,) = loaded.values()
    entered, release = threading.Event(), threading.Event()

    def held(images):
        entered.set()
        release.wait(30)
        return category.scorer.score(images)

    gated = {"texture": dataclasses.replace(
        category, scorer=dataclasses.replace(category.scorer, score=held))}  # fmt: skip

    async def scenario():
        service = service_of(loaded, model_dir, categories=gated, max_batch=1, queue_size=1)
        async with client_of(service) as client:
            data = test_images[0].read_bytes()
            first = asyncio.ensure_future(client.post(INSPECT, content=data))
            while not entered.is_set():  # the model thread holds the first image
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(client.post(INSPECT, content=data))
            while len(service.queue) < 1:  # the second waits in the queue
                await asyncio.sleep(0.01)
            third = await client.post(INSPECT, content=data)
            release.set()
            return await first, await second, third, (await client.get("/metrics")).text

    first, second, third, text = run(scenario())
    assert first.status_code == 200 and second.status_code == 200
    assert_refused(third, 503, "queue_full")
    assert third.headers["retry-after"] == "1"
    assert metric(text, "patchcore_serve_errors_total", reason="queue_full") == 1


def test_options_name_categories_and_check_limits(model_dir, tmp_path, caplog):
    (model,) = serving.served_models([str(model_dir)])
    assert model.category == "texture" and model.runtime_name == "torch"
    named = serving.served_models([f"line-3={model_dir}", str(model_dir)])
    assert [model.category for model in named] == ["line-3", "texture"]
    for arguments, message in (
        ([str(model_dir), str(model_dir)], "also"),
        ([f"bad/name={model_dir}"], "letters, digits"),
        ([str(tmp_path / "missing")], "no such file"),
    ):
        with pytest.raises(ConfigurationError, match=message):
            serving.served_models(arguments)
    with pytest.raises(ConfigurationError, match="--queue_size"):
        options_for(model_dir, max_batch=16, queue_size=8)
    with pytest.raises(ConfigurationError, match="--batch_wait_ms"):
        options_for(model_dir, batch_wait_ms=float("nan"))
    assert serving.default_max_batch(torch.device("cpu")) == 1
    assert serving.default_max_batch(torch.device("cuda")) == serving.GPU_MAX_BATCH
    options = options_for(model_dir)
    with caplog.at_level(logging.WARNING, logger="patchcore.apps.serve"):
        serving.warn_about_host("127.0.0.1", options)
        assert not caplog.records
        serving.warn_about_host("0.0.0.0", options)
    assert "no API key" in caplog.text


# ------------------------------------------------------------------ the process
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(arguments: list[str], port: int) -> subprocess.Popen:
    """`patchcore-serve ARGUMENTS --port PORT` in a child process, once /ready answers."""
    command = [sys.executable, "-c", "from patchcore.cli.serve import serve_main; serve_main()",
               *arguments, "--port", str(port), "--no_progress", "--device", "cpu"]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=environment)  # fmt: skip
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"patchcore-serve did not become ready:\n{process.communicate()[0][-3000:]}")


def post_in_thread(url: str, data: bytes, answers: list) -> threading.Thread:
    def send():
        try:
            answers.append(httpx.post(url, content=data, timeout=60))
        except httpx.HTTPError as error:
            answers.append(error)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


@pytest.mark.slow
def test_sigterm_answers_requests_in_flight_then_stops(model_dir, test_images, predicted):
    port = free_port()
    # a long batching window keeps the requests in flight when the signal arrives
    server = start_server([str(model_dir), "--max_batch", "8", "--batch_wait_ms", "1000"], port)
    answers: list = []
    threads = [post_in_thread(f"http://127.0.0.1:{port}{INSPECT}", path.read_bytes(), answers)
               for path in test_images[:3]]  # fmt: skip
    time.sleep(0.4)
    server.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    output = server.communicate(timeout=60)[0]
    assert server.returncode == 0, output
    assert len(answers) == 3 and all(isinstance(answer, httpx.Response) for answer in answers)
    scores = sorted(answer.json()["score"] for answer in answers)
    expected = sorted(float(predicted[str(path)]["score"]) for path in test_images[:3])
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert "requests drained" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.slow
def test_a_server_killed_mid_request_gives_the_client_an_error_not_an_accept(
    model_dir, test_images
):  # fmt: skip
    port = free_port()
    server = start_server([str(model_dir), "--max_batch", "8", "--batch_wait_ms", "1000"], port)
    answers: list = []
    thread = post_in_thread(f"http://127.0.0.1:{port}{INSPECT}", test_images[0].read_bytes(),
                            answers)  # fmt: skip
    time.sleep(0.4)
    server.kill()
    thread.join(60)
    server.communicate(timeout=30)
    (answer,) = answers
    assert isinstance(answer, httpx.HTTPError), answer


@pytest.mark.slow
def test_ray_serve_runs_the_same_app_on_two_replicas(model_dir, test_images, predicted):
    pytest.importorskip("ray.serve", reason="Ray Serve (ray[serve], the serve extra) is missing")
    port = free_port()
    command = [sys.executable, "-c", "from patchcore.cli.serve import serve_main; serve_main()",
               str(model_dir), "--ray", "--replicas", "2", "--replica_cpus", "0.5",
               "--port", str(port), "--no_progress", "--device", "cpu"]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=environment, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 75
        ready = False
        while not ready and time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
            time.sleep(0.5)
        if not ready:
            server.kill()
            output = server.communicate(timeout=30)[0]
            pytest.skip(f"Ray Serve did not start here within 75 s: {output.strip()[-300:]}")
        answers: list = []
        threads = [post_in_thread(f"http://127.0.0.1:{port}{INSPECT}", path.read_bytes(),
                                  answers) for path in test_images[:6]]  # fmt: skip
        for thread in threads:
            thread.join(60)
        assert all(isinstance(answer, httpx.Response) for answer in answers), answers
        scores = sorted(answer.json()["score"] for answer in answers)
        expected = sorted(float(predicted[str(path)]["score"]) for path in test_images[:6])
        np.testing.assert_allclose(scores, expected, rtol=1e-5)
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
        assert server.returncode == 0, output[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=30)


def test_an_exported_model_is_served_as_predict_runs_it(model_dir, test_images, tmp_path):
    """A `patchcore-export` file (the torch module, whole images in) through the exported
    runtime's path: the same answers as predict with that file."""
    from patchcore.apps.export import ExportOptions, export_model
    from patchcore.config import SearchConfig
    from patchcore.model.serialization import load_models

    (model,) = load_models(model_dir, "cpu", SearchConfig(backend="torch"))
    (exported,) = export_model(model, model_dir, tmp_path, "line", ExportOptions(("torch",)))
    code, output = predict(exported, test_images[:4], tmp_path / "rows.csv")
    assert code in (0, 3), output
    rows = {row["path"]: row for row in read_rows(tmp_path / "rows.csv")}
    models = serving.served_models([str(exported)])
    assert models[0].category == "line" and models[0].runtime_name == "torch"

    async def scenario():
        service = serving.InspectionService.load(serving.ServeOptions(models=models))
        async with client_of(service) as client:
            return [(await client.post("/v1/categories/line/inspect",
                                       content=path.read_bytes())).json()
                    for path in test_images[:4]]  # fmt: skip

    for path, body in zip(test_images[:4], run(scenario()), strict=True):
        row = rows[str(path)]
        assert body["decision"] == row["decision"] and body["model_id"] == row["model_id"]
        assert body["model_format"] == row["model_format"]
        assert math.isclose(body["score"], float(row["score"]), rel_tol=1e-5)
