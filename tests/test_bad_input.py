"""A corpus of malformed requests sent mixed with good ones: each bad one gets a specific error,
each good one its correct image, and the server (and its Python stub) stays up throughout."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from client import DiffusionClient
from triton_diffusion.launcher import StubWatchdog

from .conftest import TINY, assert_same_image


def tensor(name, array, datatype=None):
    array = np.asarray(array)
    if datatype is None:
        datatype = "BYTES" if array.dtype == object else {
            np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32",
            np.dtype(np.float64): "FP64", np.dtype(np.uint8): "UINT8", np.dtype(np.int16): "INT16",
        }[array.dtype]
    return name, array, datatype


def text(value):
    return np.array([[value if isinstance(value, bytes) else value.encode()]], dtype=object)


def one(value, dtype):
    return np.array([[value]], dtype=dtype)


PROMPT = tensor("PROMPT", text("a valid prompt"))
SMALL = [tensor("HEIGHT", one(64, np.int32)), tensor("WIDTH", one(64, np.int32)),
         tensor("NUM_INFERENCE_STEPS", one(4, np.int32))]
SOURCE = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)

# (label, inputs, expected words in the error)
BAD = [
    # rejected by Triton itself, before the model: dtype, shape, unknown and missing inputs
    ("prompt as int", [tensor("PROMPT", one(1, np.int32))], "PROMPT"),
    ("seed as float", [PROMPT, tensor("SEED", one(1.5, np.float32))], "SEED"),
    ("seed as int32", [PROMPT, tensor("SEED", one(1, np.int32))], "SEED"),
    ("steps as int64", [PROMPT, tensor("NUM_INFERENCE_STEPS", one(4, np.int64))], "NUM_INFERENCE_STEPS"),
    ("steps as float", [PROMPT, tensor("NUM_INFERENCE_STEPS", one(4.0, np.float32))], "NUM_INFERENCE_STEPS"),
    ("height as fp64", [PROMPT, tensor("HEIGHT", one(64.0, np.float64))], "HEIGHT"),
    ("guidance as int", [PROMPT, tensor("GUIDANCE_SCALE", one(7, np.int32))], "GUIDANCE_SCALE"),
    ("strength as fp64", [PROMPT, tensor("STRENGTH", one(0.5, np.float64))], "STRENGTH"),
    ("image as float", [PROMPT, tensor("IMAGE", SOURCE.astype(np.float32))], "IMAGE"),
    ("image as int16", [PROMPT, tensor("IMAGE", SOURCE.astype(np.int16))], "IMAGE"),
    ("prompt two columns", [tensor("PROMPT", np.array([[b"a", b"b"]], dtype=object))], "PROMPT"),
    ("seed three columns", [PROMPT, tensor("SEED", np.array([[1, 2, 3]], dtype=np.int64))], "SEED"),
    ("image with 4 channels", [PROMPT, tensor("IMAGE", np.zeros((1, 64, 64, 4), np.uint8))], "IMAGE"),
    ("image without channels", [PROMPT, tensor("IMAGE", np.zeros((1, 64, 64), np.uint8))], "IMAGE"),
    ("unknown input", [PROMPT, tensor("FOO", one(1, np.int32))], "FOO"),
    ("missing prompt", [tensor("SEED", one(1, np.int64))], "PROMPT"),
    ("batch mismatch", [tensor("PROMPT", np.array([[b"a"], [b"b"]], dtype=object)), tensor("SEED", one(1, np.int64))], "batch"),
    ("batch over max", [tensor("PROMPT", np.array([[b"a"]] * 17, dtype=object))], "batch"),
    # rejected by the model's validation, one request at a time
    ("empty prompt", [tensor("PROMPT", text(""))], "PROMPT is empty"),
    ("blank prompt", [tensor("PROMPT", text("   \t\n"))], "PROMPT is empty"),
    ("100 KB prompt", [tensor("PROMPT", text("x" * 100_000))], "100000 bytes; the limit is 4096"),
    ("invalid utf-8", [tensor("PROMPT", text(b"\xff\xfe\xfd"))], "not valid UTF-8"),
    ("truncated utf-8", [tensor("PROMPT", text("caf\u00e9".encode()[:-1]))], "not valid UTF-8"),
    ("overlong utf-8", [tensor("PROMPT", text(b"\xc0\xaf"))], "not valid UTF-8"),
    ("surrogate utf-8", [tensor("PROMPT", text(b"\xed\xa0\x80"))], "not valid UTF-8"),
    ("nul in prompt", [tensor("PROMPT", text("a\x00b"))], "NUL"),
    ("invalid utf-8 negative", [PROMPT, tensor("NEGATIVE_PROMPT", text(b"\x80"))], "NEGATIVE_PROMPT is not valid UTF-8"),
    ("steps -1", [PROMPT, tensor("NUM_INFERENCE_STEPS", one(-1, np.int32))], "NUM_INFERENCE_STEPS=-1 is outside"),
    ("steps 0", [PROMPT, tensor("NUM_INFERENCE_STEPS", one(0, np.int32))], "NUM_INFERENCE_STEPS=0 is outside"),
    ("steps 51", [PROMPT, tensor("NUM_INFERENCE_STEPS", one(51, np.int32))], "NUM_INFERENCE_STEPS=51 is outside"),
    ("steps huge", [PROMPT, tensor("NUM_INFERENCE_STEPS", one(2**31 - 1, np.int32))], "is outside"),
    ("height 100", [PROMPT, tensor("HEIGHT", one(100, np.int32))], "HEIGHT=100 must be a multiple of 8"),
    ("width 63", [PROMPT, tensor("WIDTH", one(63, np.int32))], "WIDTH=63 is outside"),
    ("width 129", [PROMPT, tensor("WIDTH", one(129, np.int32))], "WIDTH=129 must be a multiple of 8"),
    ("height -64", [PROMPT, tensor("HEIGHT", one(-64, np.int32))], "HEIGHT=-64 is outside"),
    ("width 100000", [PROMPT, tensor("WIDTH", one(100000, np.int32))], "WIDTH=100000 is outside"),
    ("too many pixels", [PROMPT, tensor("HEIGHT", one(512, np.int32)), tensor("WIDTH", one(520, np.int32))],
     "512x520 is 266240 pixels; the limit is 262144"),
    ("side over max", [PROMPT, tensor("HEIGHT", one(776, np.int32)), tensor("WIDTH", one(64, np.int32))], "HEIGHT=776 is outside"),
    ("guidance nan", [PROMPT, tensor("GUIDANCE_SCALE", one(np.nan, np.float32))], "GUIDANCE_SCALE must be finite"),
    ("guidance inf", [PROMPT, tensor("GUIDANCE_SCALE", one(np.inf, np.float32))], "GUIDANCE_SCALE must be finite"),
    ("guidance -inf", [PROMPT, tensor("GUIDANCE_SCALE", one(-np.inf, np.float32))], "GUIDANCE_SCALE must be finite"),
    ("guidance negative", [PROMPT, tensor("GUIDANCE_SCALE", one(-2, np.float32))], "GUIDANCE_SCALE=-2.0 is outside"),
    ("guidance huge", [PROMPT, tensor("GUIDANCE_SCALE", one(1e9, np.float32))], "GUIDANCE_SCALE=1000000000.0 is outside"),
    ("strength negative", [PROMPT, tensor("IMAGE", SOURCE), tensor("STRENGTH", one(-0.1, np.float32))], "STRENGTH=-0.1"),
    ("strength 1.5", [PROMPT, tensor("IMAGE", SOURCE), tensor("STRENGTH", one(1.5, np.float32))], "STRENGTH=1.5 is outside"),
    ("strength nan", [PROMPT, tensor("IMAGE", SOURCE), tensor("STRENGTH", one(np.nan, np.float32))], "STRENGTH must be finite"),
    ("strength too small", [PROMPT, tensor("IMAGE", SOURCE), tensor("STRENGTH", one(0.01, np.float32))], "runs no denoising step"),
    ("text-to-image strength 2", [PROMPT, tensor("STRENGTH", one(2.0, np.float32))], "STRENGTH=2.0 is outside"),
    ("image 4x4", [PROMPT, tensor("IMAGE", np.zeros((1, 4, 4, 3), np.uint8))], "at least 8x8"),
    ("image 7x64", [PROMPT, tensor("IMAGE", np.zeros((1, 7, 64, 3), np.uint8))], "at least 8x8"),
    ("image size not multiple of 8", [PROMPT, tensor("IMAGE", np.zeros((1, 68, 64, 3), np.uint8))], "HEIGHT=68 (the size of the 68x64 source IMAGE) must be a multiple of 8"),
    ("two rows, two sizes", [tensor("PROMPT", np.array([[b"a"], [b"b"]], dtype=object)),
                             tensor("HEIGHT", np.array([[64], [128]], np.int32))], "must share HEIGHT and WIDTH"),
    ("two rows, one empty", [tensor("PROMPT", np.array([[b"a"], [b""]], dtype=object))], "PROMPT is empty"),
]
GOOD = [
    ("good t2i", [tensor("PROMPT", text("a good one")), tensor("SEED", one(1, np.int64)), *SMALL]),
    ("good t2i unicode", [tensor("PROMPT", text("un caf\u00e9 \u2615 \u6771\u4eac")), tensor("SEED", one(2, np.int64)), *SMALL]),
    ("good i2i", [tensor("PROMPT", text("an edit")), tensor("SEED", one(3, np.int64)), tensor("IMAGE", SOURCE),
                  tensor("STRENGTH", one(0.5, np.float32)), tensor("NUM_INFERENCE_STEPS", one(4, np.int32))]),
    ("good negative", [tensor("PROMPT", text("with negative")), tensor("NEGATIVE_PROMPT", text("blurry")),
                       tensor("SEED", one(4, np.int64)), *SMALL]),
    ("good wide", [tensor("PROMPT", text("wide")), tensor("SEED", one(5, np.int64)), tensor("HEIGHT", one(64, np.int32)),
                   tensor("WIDTH", one(768, np.int32)), tensor("NUM_INFERENCE_STEPS", one(2, np.int32))]),
]


def send(url, inputs, model=TINY):
    client = grpcclient.InferenceServerClient(url)
    infer_inputs = []
    for name, array, datatype in inputs:
        infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        infer_inputs.append(infer_input)
    try:
        return client.infer(model, infer_inputs)
    except InferenceServerException as exc:
        return exc
    finally:
        client.close()


def stub_pids(server):
    return StubWatchdog(server, [TINY]).stubs()[TINY]


def test_bad_input_corpus_mixed_with_good_requests(server):
    assert len(BAD) >= 50
    stubs = stub_pids(server)
    mixed = []
    for index, bad in enumerate(BAD):
        mixed.append(("bad", bad))
        if index % 5 == 0:
            mixed.append(("good", GOOD[(index // 5) % len(GOOD)]))
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda case: send(server.grpc_url, case[1][1]), mixed))

    problems = []
    goods = []
    for (kind, case), outcome in zip(mixed, outcomes):
        label = case[0]
        if kind == "bad":
            if not isinstance(outcome, InferenceServerException):
                problems.append(f"{label}: expected an error, got a response")
            elif case[2].lower() not in outcome.message().lower():
                problems.append(f"{label}: error {outcome.message()!r} does not mention {case[2]!r}")
        elif isinstance(outcome, InferenceServerException):
            problems.append(f"{label}: good request failed: {outcome.message()}")
        else:
            goods.append((case, outcome))
    assert not problems, "\n".join(problems)

    # Every good request got its correct image: the same as when served alone.
    for case, outcome in goods:
        alone = send(server.grpc_url, case[1])
        assert_same_image(outcome.as_numpy("IMAGE")[0], alone.as_numpy("IMAGE")[0])

    assert httpclient.InferenceServerClient(server.http_url).is_model_ready(TINY)
    assert stub_pids(server) == stubs, "the Python-backend stub must not have restarted"
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY) as client:
        assert client.generate("after the corpus", seed=9, height=64, width=64).array.shape == (64, 64, 3)
