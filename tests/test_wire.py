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


def test_object_arrays_are_refused():
    with pytest.raises(ProtocolError):
        encode("x", values=np.array([object()]))


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\xc1not msgpack"],
        [msgpack.packb([1, 2])],
        [msgpack.packb({"proto": 99, "kind": "x", "arrays": []})],
        [msgpack.packb({"proto": 1, "kind": "x", "arrays": [["a", "<f4", [4]]]})],
        [msgpack.packb({"proto": 1, "kind": "x", "arrays": [["a", "<f4", [4]]]}), b"123"],
        [msgpack.packb({"proto": 1, "kind": "x", "arrays": [["a", "|O", [1]]]}), b"12345678"],
        [msgpack.packb({"proto": 1, "kind": "x", "arrays": [["a", "<f4", [-1]]]}), b""],
    ],
)
def test_malformed_messages_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        decode(frames)
