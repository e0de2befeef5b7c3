"""Foundation: the real tritonserver serves the embedded default; one broken model harms no other."""

import numpy as np
import tritonclient.http as httpclient

from client import DiffusionClient, ServerError
from triton_diffusion import model_config
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY
from triton_diffusion.schema import declaration

from .conftest import BAD_HEIGHT, BAD_HEIGHT_ERROR, TINY


def test_server_and_default_model_are_ready(server):
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(TINY)
    metadata = client.get_model_metadata(TINY)
    assert {i["name"] for i in metadata["inputs"]} >= {"PROMPT", "SEED", "HEIGHT", "WIDTH", "IMAGE", "STRENGTH"}
    assert {o["name"] for o in metadata["outputs"]} == {"IMAGE", "SEED"}


def test_the_served_config_shows_the_whole_schema_the_file_leaves_out(server):
    """The shipped config.pbtxt declares no inputs or outputs; the backend's auto_complete_config
    does, so the served config (what clients read) has them all, IMAGE ragged."""
    file = model_config.parse((DEFAULT_MODEL_REPOSITORY / TINY / "config.pbtxt").read_text())
    assert not file.input and not file.output
    served = httpclient.InferenceServerClient(server.http_url).get_model_config(TINY)
    inputs, outputs, decoupled = declaration(model_config.parameters(file))
    assert [entry["name"] for entry in served["input"]] == [entry["name"] for entry in inputs]
    assert [entry["name"] for entry in served["output"]] == ["IMAGE", "SEED"] and not decoupled
    image = next(entry for entry in served["input"] if entry["name"] == "IMAGE")
    assert image["allow_ragged_batch"] and image["optional"] and image["data_type"] == "TYPE_UINT8"


def test_request_returns_an_image_of_the_requested_size(grpc_client):
    result = grpc_client.generate("a lighthouse at dusk", seed=1, height=64, width=96)
    assert result.array.dtype == np.uint8 and result.array.shape == (64, 96, 3)
    assert result.seed == 1
    assert result.array.std() > 0  # a real decoded image, not a constant fill
    assert result.image.size == (96, 64)  # PIL: (width, height)


def test_same_seed_same_image_different_seed_different_image(grpc_client):
    first = grpc_client.generate("a red fox", seed=11).array
    again = grpc_client.generate("a red fox", seed=11).array
    other = grpc_client.generate("a red fox", seed=12).array
    assert np.array_equal(first, again)
    assert (first != other).mean() > 0.5


def test_missing_seed_is_drawn_by_the_server_and_returned(server):
    # Raw tritonclient with only PROMPT: the server picks the seed and says which.
    client = httpclient.InferenceServerClient(server.http_url)
    prompt = httpclient.InferInput("PROMPT", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a boat"]], dtype=object))
    result = client.infer(TINY, [prompt])
    seed = int(result.as_numpy("SEED")[0][0])
    image = result.as_numpy("IMAGE")[0]
    assert image.shape == (128, 128, 3)  # the model's configured default size
    with DiffusionClient(f"http://{server.http_url}", TINY) as typed:
        replay = typed.generate("a boat", seed=seed)
    assert np.array_equal(replay.array, image)


def test_http_and_grpc_give_the_same_image(server, grpc_client):
    with DiffusionClient(f"http://{server.http_url}", TINY) as http:
        assert np.array_equal(http.generate("a tree", seed=5).array, grpc_client.generate("a tree", seed=5).array)


def test_broken_model_fails_to_load_clearly_and_others_keep_serving(server, grpc_client):
    states = server.model_states()
    assert states["sd_turbo"]["state"] == "UNAVAILABLE"
    reason = states["sd_turbo"]["reason"]
    assert "stabilityai/sd-turbo" in reason and "HF_HUB_OFFLINE" in reason
    assert states[TINY]["state"] == "READY"
    assert grpc_client.generate("still serving", seed=3).array.shape == (128, 128, 3)
    try:
        DiffusionClient(f"grpc://{server.grpc_url}", "sd_turbo").generate("x", seed=1)
    except ServerError as exc:
        assert "sd_turbo" in str(exc)
    else:
        raise AssertionError("a request to an unloaded model must fail")


def test_invalid_request_gets_a_specific_error_and_the_server_stays_ready(server, grpc_client):
    try:
        grpc_client.generate("x", height=BAD_HEIGHT)
    except ServerError as exc:
        assert BAD_HEIGHT_ERROR in str(exc)
        assert exc.status == "StatusCode.INVALID_ARGUMENT"
    else:
        raise AssertionError("expected an INVALID_ARG error")
    assert httpclient.InferenceServerClient(server.http_url).is_model_ready(TINY)
