"""The front model: plain clients that send different subsets of the optional inputs still batch.

Triton batches only requests with the same set of inputs; ``<model>_any`` (``front.py``) fills the
missing ones and forwards through BLS, so the batched model sees one input set.
"""

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from client import DiffusionClient, GenerationRequest
from triton_diffusion.front import FRONT_SUFFIX, write_front
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY

from .conftest import BAD_HEIGHT, BAD_HEIGHT_ERROR, TINY, assert_same_image, batch_histogram, start_server

FRONT = TINY + FRONT_SUFFIX


def tensor(name, array):
    value = grpcclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype))
    value.set_data_from_numpy(array)
    return value


def prompt_only(text):
    return [tensor("PROMPT", np.array([[text.encode()]], dtype=object))]


def every_input(text, seed):
    one = lambda value, dtype: np.array([[value]], dtype=dtype)  # noqa: E731
    return [tensor("PROMPT", np.array([[text.encode()]], dtype=object)), tensor("NEGATIVE_PROMPT", np.array([[b""]], dtype=object)),
            tensor("SEED", one(seed, np.int64)), tensor("NUM_INFERENCE_STEPS", one(10, np.int32)),
            tensor("GUIDANCE_SCALE", one(7.5, np.float32)), tensor("HEIGHT", one(0, np.int32)), tensor("WIDTH", one(0, np.int32)),
            tensor("IMAGE", np.zeros((1, 0, 0, 3), np.uint8)), tensor("STRENGTH", one(0.8, np.float32))]


def test_the_front_config_mirrors_the_model_and_fills_with_its_defaults():
    from triton_diffusion import model_config
    from triton_diffusion.front import filler_values, front_config

    core = model_config.shipped(TINY)
    front = front_config(core)
    assert front.name == FRONT and front.max_batch_size == core.max_batch_size
    assert [i.name for i in front.input] == [i.name for i in core.input] and front.output == core.output
    assert front.instance_group[0].count == 16  # one per request of a full batch of the model
    assert front.dynamic_batching.default_queue_policy.max_queue_size == core.dynamic_batching.default_queue_policy.max_queue_size
    parameters = model_config.parameters(front)
    assert parameters.pop("core_model") == TINY and parameters == model_config.parameters(core)
    fillers = filler_values(parameters)
    assert (fillers["NUM_INFERENCE_STEPS"], fillers["GUIDANCE_SCALE"], fillers["SEED"], fillers["HEIGHT"]) == (10, 7.5, -1, 0)


@pytest.fixture(scope="module")
def front_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("front")
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / TINY, root / "repo" / TINY, ignore=shutil.ignore_patterns("__pycache__"))
    assert write_front(root / "repo", TINY) == FRONT
    # The batched model's first batch waits for 8 requests: all 8 must reach it together.
    server = start_server(root, [TINY, FRONT], {"TRITONSERVER_DELAY_SCHEDULER": "8"}, repository=root / "repo",
                          extra_args=("--exit-timeout-secs=5",), require_ready=True)
    yield server
    server.stop()


def test_alternating_full_and_prompt_only_requests_from_plain_tritonclient_form_one_execution(front_server):
    sets = [every_input(f"full {i}", 50 + i) if i % 2 == 0 else prompt_only(f"prompt only {i}") for i in range(8)]

    def send(inputs):
        with grpcclient.InferenceServerClient(front_server.grpc_url) as client:
            result = client.infer(FRONT, inputs, client_timeout=300)
            return result.as_numpy("IMAGE"), int(result.as_numpy("SEED")[0][0])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, sets))
    assert batch_histogram(front_server, TINY) == {8: 1}, "all eight must share one execution of the batched model"
    assert all(image.shape == (1, 128, 128, 3) for image, _ in results)
    assert [seed for _, seed in results[::2]] == [50, 52, 54, 56]
    # A PROMPT-only request got the model's defaults: the same image as asking the model directly.
    image, seed = results[1]
    with DiffusionClient(f"grpc://{front_server.grpc_url}", TINY) as client:
        assert_same_image(image[0], client.generate(GenerationRequest("prompt only 1", seed=seed)).array)


def test_errors_come_back_from_the_batched_model_unchanged(front_server):
    # Seven good requests ride along: the server's first batches wait for eight (TRITONSERVER_DELAY_SCHEDULER).
    bad = prompt_only("bad size") + [tensor("HEIGHT", np.array([[BAD_HEIGHT]], np.int32))]

    def send(inputs):
        with grpcclient.InferenceServerClient(front_server.grpc_url) as client:
            try:
                return client.infer(FRONT, inputs, client_timeout=300).as_numpy("IMAGE")
            except InferenceServerException as exc:
                return exc

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(send, [bad] + [prompt_only(f"good {i}") for i in range(7)]))
    error = outcomes[0]
    assert isinstance(error, InferenceServerException) and error.status() == "StatusCode.INVALID_ARGUMENT", error
    assert BAD_HEIGHT_ERROR in error.message()
    assert all(isinstance(image, np.ndarray) for image in outcomes[1:])
