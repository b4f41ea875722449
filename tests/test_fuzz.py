"""Property-based fuzzing (hypothesis) of what reads untrusted bytes: the wire format's
decoder, the DECTRIS stream v1/v2 decoders, and the configuration loader. Each must either
return a value or raise its own error type (a ``ValueError``), never anything else, whatever
the bytes. The number of inputs per run is bounded (``max_examples``), so the default suite
stays fast; ``BEAMLINE_INN_FUZZ_EXAMPLES`` (default 400, the most inputs a test is given)
scales every test's ``max_examples`` for longer runs. A crash found becomes a regression test
below. Each test records the inputs it ran, and how they ended, in the reliability report."""

from __future__ import annotations

import json
import os
import weakref
from collections import Counter

import cbor2
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.config import PipelineConfig
from pipeline.sources.dectris import FormatError, parse_message
from pipeline.transport.wire import ALLOWED_DTYPES, PROTOCOL_VERSION, ProtocolError, decode, encode

#: The inputs the most thoroughly fuzzed tests are given; the others get proportionally fewer.
FUZZ_EXAMPLES = int(os.environ.get("BEAMLINE_INN_FUZZ_EXAMPLES", "400"))


def _examples(default: int) -> int:
    """``default`` inputs (of 400) scaled to ``BEAMLINE_INN_FUZZ_EXAMPLES``."""
    return max(1, round(default * FUZZ_EXAMPLES / 400))


FUZZ = settings(
    max_examples=_examples(400),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


_FUZZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # by reliability fixture


class _Fuzzed:
    """A fuzz test's row in the reliability report: hypothesis runs the test's body once per
    input but makes its fixtures once, so the row is made on the first input and counts on."""

    def __init__(self, row) -> None:
        self.row, self.outcomes = row, Counter()

    @classmethod
    def input(cls, reliability, what: str) -> _Fuzzed:
        """The row of ``reliability``'s test, one more input tried."""
        if reliability not in _FUZZED:
            _FUZZED[reliability] = cls(reliability.record("fuzzing", what))
        fuzzed = _FUZZED[reliability]
        fuzzed.row.tried += 1
        return fuzzed

    def ended(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        told = ", ".join(f"{n:,} {outcome}" for outcome, n in sorted(self.outcomes.items()))
        self.row.detail = f"no crash: {told}"


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=30,
)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_wire_decoder_refuses_arbitrary_bytes_with_its_own_error(reliability, frames):
    fuzzed = _Fuzzed.input(reliability, "wire decoder: up to 4 frames of arbitrary bytes")
    try:
        decode(frames)
    except ProtocolError:
        fuzzed.ended("refused with ProtocolError")
    else:
        fuzzed.ended("decoded")


@FUZZ
@given(
    st.dictionaries(st.text(max_size=10), documents, max_size=6),
    st.lists(
        st.tuples(
            st.text(max_size=8),
            st.sampled_from([*sorted(ALLOWED_DTYPES), "<c16", "|O", "bogus", ""]),
            st.lists(st.integers(min_value=-2, max_value=6), max_size=3),
        ),
        max_size=3,
    ),
    st.lists(st.binary(max_size=120), max_size=3),
)
def test_wire_decoder_checks_headers_that_look_right(reliability, fields, specs, buffers):
    """Well-formed msgpack headers with the right protocol version, and array specs of
    every shape and dtype, against buffers of any size."""
    fuzzed = _Fuzzed.input(reliability, "wire decoder: right-looking headers, any arrays")
    header = {
        **fields,
        "proto": PROTOCOL_VERSION,
        "kind": "line_out",
        "arrays": [list(s) for s in specs],
    }
    try:
        message = decode([msgpack.packb(header), *buffers])
    except ProtocolError:
        fuzzed.ended("refused with ProtocolError")
        return
    for (name, dtype, shape), array in zip(specs, message.arrays.values(), strict=True):
        assert array.dtype.str == np.dtype(dtype).str and list(array.shape) == shape, name
    fuzzed.ended("decoded with the declared dtypes and shapes")


@FUZZ
@given(
    st.sampled_from(sorted(ALLOWED_DTYPES)),
    st.lists(st.integers(min_value=0, max_value=5), max_size=3),
    st.data(),
)
def test_wire_round_trip(reliability, dtype, shape, data):
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = data.draw(st.binary(min_size=size, max_size=size))  # may abort the example
    fuzzed = _Fuzzed.input(reliability, "wire format: encode, decode arrays of every dtype")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    message = decode([bytes(frame) for frame in encode("x", {"index": 3}, values=array)])
    assert message.header["index"] == 3
    assert message.arrays["values"].shape == array.shape
    np.testing.assert_array_equal(message.arrays["values"], array)
    fuzzed.ended("arrays arrived unchanged")


def _parse_counted(fuzzed: _Fuzzed, parts: list[bytes], version: str) -> None:
    try:
        parse_message(parts, version)
    except FormatError:
        fuzzed.ended("refused with FormatError")
    else:
        fuzzed.ended("parsed")


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_dectris_v1_decoder_refuses_arbitrary_parts(reliability, parts):
    fuzzed = _Fuzzed.input(reliability, "DECTRIS v1 decoder: 1-5 parts of arbitrary bytes")
    _parse_counted(fuzzed, parts, "v1")


@FUZZ
@given(
    st.lists(
        st.one_of(
            documents.map(lambda value: json.dumps(value, default=str).encode()),
            st.fixed_dictionaries(
                {"htype": st.sampled_from(["dheader-1.0", "dimage-1.0", "dseries_end-1.0"])},
                optional={
                    "series": st.integers(-3, 5),
                    "frame": st.integers(-3, 5),
                    "header_detail": st.sampled_from(["all", "basic", "none", 3]),
                    "shape": st.lists(st.integers(-2, 4), max_size=3),
                    "type": st.sampled_from(["uint16", "uint32", "int8", "float32", "x"]),
                    "encoding": st.sampled_from(["<", "bs16-lz4<", "bs32-lz4<", "lz4<", ">"]),
                    "size": st.integers(-1, 64),
                },
            ).map(lambda value: json.dumps(value).encode()),
            st.binary(max_size=64),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_dectris_v1_decoder_refuses_near_misses(reliability, parts):
    """JSON parts that look like SIMPLON v1 headers, image headers and ends, in any order."""
    fuzzed = _Fuzzed.input(reliability, "DECTRIS v1 decoder: JSON parts like v1 messages")
    _parse_counted(fuzzed, parts, "v1")


@FUZZ
@given(st.one_of(st.binary(max_size=300), documents.map(cbor2.dumps)))
def test_dectris_v2_decoder_refuses_arbitrary_cbor(reliability, payload):
    fuzzed = _Fuzzed.input(reliability, "DECTRIS v2 decoder: arbitrary bytes and CBOR")
    _parse_counted(fuzzed, [payload], "v2")


@FUZZ
@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["start", "image", "end", "other"])},
        optional={
            "series_id": st.one_of(st.integers(-3, 5), st.text(max_size=3)),
            "image_id": st.one_of(st.integers(-3, 5), st.none()),
            "series_unique_id": st.text(max_size=8),
            "data": documents,
            "channels": st.lists(st.one_of(st.text(max_size=5), scalars), max_size=3),
            "number_of_images": st.integers(-1, 5),
        },
    )
)
def test_dectris_v2_decoder_refuses_near_misses(reliability, message):
    fuzzed = _Fuzzed.input(reliability, "DECTRIS v2 decoder: CBOR maps like v2 messages")
    _parse_counted(fuzzed, [cbor2.dumps(message)], "v2")


@FUZZ
@given(documents)
def test_configuration_loader_refuses_any_document_with_a_validation_error(reliability, document):
    fuzzed = _Fuzzed.input(reliability, "configuration loader: arbitrary JSON documents")
    text = json.dumps(document, default=str)
    try:
        PipelineConfig.model_validate_json(text)
    except ValidationError:
        fuzzed.ended("refused with ValidationError")
    else:
        fuzzed.ended("accepted")


@pytest.mark.parametrize("text", ["", "{", "[]", '{"scan_id": "../../etc"}', '{"scan_id": 3}'])
def test_configuration_loader_refuses_bad_documents(text):
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate_json(text)


@pytest.mark.parametrize("shape", [(0,), (0, 0), (3, 0), ()])
def test_wire_round_trip_of_empty_and_scalar_arrays(shape):
    """Found by the fuzzer: encoding an array with a 0-length axis raised TypeError, and a
    0-d array arrived with shape (1,)."""
    array = np.zeros(shape, dtype=np.float32)
    message = decode([bytes(frame) for frame in encode("x", values=array)])
    assert message.arrays["values"].shape == shape


poni_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\r"),
        max_size=12,
    ),
    st.sampled_from(["Pilatus1M", "Eiger4M", "{}", '{"pixel1": 1e-4, "pixel2": 1e-4}', "nan"]),
)


@settings(
    max_examples=_examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.fixed_dictionaries(
        {key: poni_values for key in ("Distance", "Poni1", "Poni2", "Wavelength", "Detector")},
        optional={
            key: poni_values for key in ("Rot1", "Rot2", "Rot3", "poni_version", "Detector_config")
        },
    )
)
def test_poni_loader_refuses_bad_values_with_a_geometry_error(
    tmp_path_factory, reliability, entries
):
    from pipeline.integration import GeometryError, load_geometry

    fuzzed = _Fuzzed.input(reliability, "PONI loader: arbitrary values for its keys")
    path = tmp_path_factory.mktemp("poni") / "fuzz.poni"
    path.write_text("".join(f"{key}: {value}\n" for key, value in entries.items()))
    try:
        load_geometry(path)
    except GeometryError:
        fuzzed.ended("refused with GeometryError")
    else:
        fuzzed.ended("loaded")


@settings(
    max_examples=_examples(120),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.sampled_from([".cbf", ".edf", ".tif", ".h5", ".img"]),
    st.one_of(
        st.binary(max_size=2000),
        st.sampled_from(
            [
                b"###CBF: VERSION 1.5\n",
                b"{\nHeaderID = EH:000001:000000:000000 ;\n",
                b"II*\x00",
                b"\x89HDF\r\n\x1a\n",
            ]
        ).flatmap(lambda head: st.binary(max_size=1500).map(lambda tail, head=head: head + tail)),
    ),
)
def test_file_sources_turn_any_bytes_into_frames_or_failed_exposures(
    tmp_path_factory, reliability, suffix, content
):
    """Whatever a file holds, reading it yields exposures, each with a frame or an error."""
    from pipeline.sources import FileSource

    fuzzed = _Fuzzed.input(reliability, "file sources: CBF, EDF, TIFF, HDF5 of arbitrary bytes")
    path = tmp_path_factory.mktemp("files") / f"frame_1{suffix}"
    path.write_bytes(content)
    exposures = list(FileSource([path], "fuzz").exposures())
    assert exposures, "a file must give at least one exposure (a failed one if unreadable)"
    for exposure in exposures:
        assert (exposure.frame is None) != (exposure.error is None)
    failed = any(exposure.error is not None for exposure in exposures)
    fuzzed.ended("files gave a failed exposure" if failed else "files gave frames")


def test_a_truncated_hdf5_file_is_a_failed_exposure(tmp_path):
    """Found by the fuzzer: a file that is only an HDF5 signature made h5py raise
    RuntimeError ("Can't decode file superblock prefix"), which stopped the whole scan."""
    from pipeline.sources import FileSource

    path = tmp_path / "frame_1.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n")
    (exposure,) = FileSource([path], "fuzz").exposures()
    assert exposure.frame is None and "HDF5" in exposure.error
