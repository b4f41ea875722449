import msgpack
import numpy as np
import pytest

from pipeline.transport import ProtocolError, decode, encode


def test_round_trip_keeps_arrays_and_header():
    counts = np.random.default_rng(0).poisson(5.0, 512).astype(np.float32)
    samples = np.random.default_rng(1).normal(size=(1000, 5)).astype(np.float32)
    frames = encode(
        "result", {"index": 7, "truth": {"pitch_nm": 200.0}}, counts=counts, samples=samples
    )
    message = decode(frames)
    assert message.kind == "result"
    assert message.header == {"index": 7, "truth": {"pitch_nm": 200.0}}
    np.testing.assert_array_equal(message.arrays["counts"], counts)
    np.testing.assert_array_equal(message.arrays["samples"], samples)


def test_object_arrays_are_refused(reliability):
    with pytest.raises(ProtocolError) as error:
        encode("x", values=np.array([object()]))
    reliability.record(
        "hostile message",
        "an object (pickle-needing) array to encode",
        tried=1,
        detail=f"refused with ProtocolError: {error.value}",
    )


@pytest.mark.parametrize(
    ("what", "frames"),
    [
        ("no frame", []),
        ("not msgpack", [b"\xc1not msgpack"]),
        ("a header that is no map", [msgpack.packb([1, 2])]),
        ("an unknown protocol version", [msgpack.packb({"proto": 99, "kind": "x", "arrays": []})]),
        (
            "an array without its buffer",
            [msgpack.packb({"proto": 1, "kind": "x", "arrays": [["a", "<f4", [4]]]})],
        ),
        (
            "a buffer too short for its array",
            [msgpack.packb({"proto": 1, "kind": "x", "arrays": [["a", "<f4", [4]]]}), b"123"],
        ),
        (
            "an object array",
            [msgpack.packb({"proto": 1, "kind": "x", "arrays": [["a", "|O", [1]]]}), b"12345678"],
        ),
        (
            "a negative shape",
            [msgpack.packb({"proto": 1, "kind": "x", "arrays": [["a", "<f4", [-1]]]}), b""],
        ),
        (  # found by the fuzzer at 10,000 inputs: the second array silently replaced the first
            "two arrays of one name",
            [
                msgpack.packb(
                    {"proto": 1, "kind": "x", "arrays": [["", "<f4", [0]], ["", "<f8", [0]]]}
                ),
                b"",
                b"",
            ],
        ),
        (
            "an array name that is no string",
            [msgpack.packb({"proto": 1, "kind": "x", "arrays": [[[1], "<f4", [0]]]}), b""],
        ),
    ],
)
def test_malformed_messages_raise_protocol_error(what, frames, reliability):
    with pytest.raises(ProtocolError) as error:
        decode(frames)
    reliability.record(
        "hostile message",
        f"wire message to decode: {what}",
        tried=1,
        detail=f"refused with ProtocolError: {error.value}",
    )
