"""The messages between pipeline processes: one frozen dataclass per kind.

Each message becomes the frames of :func:`pipeline.transport.wire.encode` with
:meth:`to_frames`, and :func:`read` turns frames back into the message of their ``kind``,
checking every field's type and every array's dtype and length on the way: a message that
does not fit raises :class:`~pipeline.transport.wire.ProtocolError`, so the processes never
look fields up by name themselves. To add a kind, add its class here and to
:data:`MESSAGE_TYPES`; :func:`message_table` documents it in docs/architecture.md.

Example:
    >>> import numpy as np
    >>> sent = LineOutMessage(index=3, scan_id="s1", counts=np.ones(4), counts_sd=np.ones(4))
    >>> received = read(sent.to_frames())
    >>> type(received).__name__, received.index, received.counts.dtype, received.timestamp
    ('LineOutMessage', 3, dtype('float32'), nan)
    >>> read(Credit(id=1, credits=16).to_frames())
    Credit(id=1, credits=16, inferred=0, batch_s=0.0, batch_size=0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from pipeline.transport.wire import Message, ProtocolError, decode, encode

if TYPE_CHECKING:  # (not imported to run: it would bring every source's reader)
    from pipeline.sources.compression import EncodedFrame

_Kind = TypeVar("_Kind", bound="WireMessage")


class WireMessage:
    """What every message kind has: its ``kind`` on the wire, who sends it to whom
    (``route``, for the documentation), and the conversion to and from frames.

    A kind is a frozen dataclass whose fields are its header fields and arrays, named as
    on the wire; their annotations say how each is read and checked (``int``, ``float``:
    NaN for ``None``, ``str``, ``dict[str, float] | None``, ``tuple[str, ...]``, and
    ``np.ndarray`` for arrays), and :meth:`check` what ties them together. A field with a
    default may be left out of the message.
    """

    kind: ClassVar[str]
    route: ClassVar[str]
    #: what the arrays hold, for the documentation (the arrays' names when empty)
    arrays_note: ClassVar[str] = ""

    def check(self) -> None:
        """Raise ``ProtocolError`` when the fields do not fit together (array lengths)."""

    def header(self) -> dict[str, Any]:
        """The header fields on the wire (encode adds the kind and the array specs); NaN
        goes as ``None``."""
        header = {}
        for name, reader in _readers(type(self)).items():
            value = getattr(self, name)
            if reader.array:
                continue
            if isinstance(value, float) and math.isnan(value):
                value = None
            header[name] = list(value) if isinstance(value, tuple) else value
        return header

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays on the wire, by name (those that are ``None`` left out)."""
        arrays = {}
        for name, reader in _readers(type(self)).items():
            if reader.array and getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        return arrays

    def to_frames(self) -> list[Any]:
        """The frames of this message (:func:`pipeline.transport.wire.encode`)."""
        return encode(self.kind, self.header(), **self.arrays())

    @classmethod
    def from_message(cls: type[_Kind], message: Message) -> _Kind:
        """This kind's message from a decoded one; ``ProtocolError`` if a field is missing,
        of the wrong type, or an array of the wrong length."""
        values = {}
        for name, reader in _readers(cls).items():
            value = (message.arrays if reader.array else message.header).get(name)
            if value is None:
                if reader.required:
                    raise ProtocolError(f"a {cls.kind!r} message without {name!r}")
                continue
            values[name] = reader.read(name, value)
        made = cls(**values)
        made.check()
        return made


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"field {name!r} must be a number, not {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"field {name!r} must be an integer, not {value!r}")
    return value


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"field {name!r} must be text, not {value!r}")
    return value


def _texts(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(text, str) for text in value):
        raise ProtocolError(f"field {name!r} must be a list of texts")
    return tuple(value)


def _numbers_by_name(name: str, value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ProtocolError(f"field {name!r} must map names to numbers")
    return {_text(name, key): _number(name, number) for key, number in value.items()}


def _array(name: str, value: object) -> np.ndarray:
    assert isinstance(value, np.ndarray)  # decode makes every array one
    return value


@dataclass(frozen=True)
class _Reader:
    """How one field is read from a decoded message."""

    read: Callable[[str, object], Any]
    array: bool
    required: bool


#: The readers of the annotations a message field may have.
_READ_BY_ANNOTATION: dict[str, Callable[[str, object], Any]] = {
    "int": _integer,
    "int | None": _integer,
    "float": _number,
    "str": _text,
    "tuple[str, ...]": _texts,
    "dict[str, float] | None": _numbers_by_name,
    "np.ndarray": _array,
    "np.ndarray | None": _array,
}
_READERS: dict[type, dict[str, _Reader]] = {}


def _readers(cls: type) -> dict[str, _Reader]:
    """The readers of a message class's fields, by name (made once per class)."""
    readers = _READERS.get(cls)
    if readers is None:
        readers = _READERS[cls] = {
            f.name: _Reader(
                read=_READ_BY_ANNOTATION[str(f.type)],
                array=str(f.type).startswith("np.ndarray"),
                required=f.default is MISSING and f.default_factory is MISSING,
            )
            for f in fields(cls)
        }
    return readers


def _rows(name: str, array: np.ndarray, n: int) -> None:
    """``ProtocolError`` unless ``array`` holds one row for each of ``n`` exposures."""
    if array.ndim == 0 or len(array) != n:
        raise ProtocolError(f"array {name!r} has not one row for each of {n} exposures")


@dataclass(frozen=True, kw_only=True)
class ExposureMessage(WireMessage):
    """What a message about one exposure says of it: its ``index`` in scan ``scan_id``,
    times in Unix seconds (NaN: not known; ``received_time``: when a live source handed it
    over), ``truth`` (the parameters of a simulated exposure), the ``source`` and
    ``frame_id`` it came from, and the ``normalization`` its counts were divided by."""

    index: int
    scan_id: str = ""
    timestamp: float = math.nan
    received_time: float = math.nan
    truth: dict[str, float] | None = None
    source: str = ""
    frame_id: str = ""
    normalization: float = math.nan

    def exposure_fields(self) -> dict[str, Any]:
        """These fields by name, to make another message about the same exposure."""
        return {f.name: getattr(self, f.name) for f in fields(ExposureMessage)}


@dataclass(frozen=True, kw_only=True)
class LineOutMessage(ExposureMessage):
    """One exposure's line-out, for a worker to infer: ``counts`` and ``counts_sd``
    (n_points,) photons per bin, float32 on the wire."""

    kind: ClassVar[str] = "line_out"
    route: ClassVar[str] = "feeder → worker"
    arrays_note: ClassVar[str] = "counts, counts_sd (n_points, f4)"

    counts: np.ndarray = field(repr=False)
    counts_sd: np.ndarray = field(repr=False)

    def check(self) -> None:
        if self.counts.ndim != 1 or self.counts.shape != self.counts_sd.shape:
            raise ProtocolError(
                f"counts {self.counts.shape} and counts_sd {self.counts_sd.shape} are not "
                "one line-out"
            )

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "counts": np.asarray(self.counts, np.float32),
            "counts_sd": np.asarray(self.counts_sd, np.float32),
        }

    def truth_row(self, names: Sequence[str]) -> list[float]:
        """The true parameters in the order of ``names``, NaN where not known.

        >>> line_out = LineOutMessage(
        ...     index=0, counts=np.ones(2), counts_sd=np.ones(2), truth={"pitch_nm": 50.0})
        >>> line_out.truth_row(["pitch_nm", "width_nm"])
        [50.0, nan]
        """
        truth = self.truth or {}
        return [truth.get(name, math.nan) for name in names]

    def failure(self, stage: str, error: str, with_line_out: bool) -> Failure:
        """The failure record of this exposure, with its counts when ``with_line_out``."""
        return Failure(
            **self.exposure_fields(),
            stage=stage,
            error=error,
            counts=self.counts if with_line_out else None,
            counts_sd=self.counts_sd if with_line_out else None,
        )


@dataclass(frozen=True, kw_only=True)
class FrameMessage(ExposureMessage):
    """One exposure's frame, for a worker that integrates it on its own device
    (``integrate_on_workers``): ``image``, the frame as the source read it (rows,
    columns), or where the source left it compressed, its bytes (1-D, u1) and how to decode
    them (``compression``, not empty, with ``image_dtype``, ``rows``, ``columns``,
    ``element_bytes``, ``framing`` and ``order``: the fields of
    :class:`~pipeline.sources.compression.EncodedFrame`, checked where it is decoded).
    ``normalization``: the exposure's monitor times transmission, which its line-out keeps.

    Example:
        >>> frame = np.arange(6, dtype=np.uint32).reshape(2, 3)
        >>> sent = FrameMessage.of({"index": 4, "normalization": 1.0}, frame)
        >>> received = read(sent.to_frames())
        >>> received.index, received.image.tolist()
        (4, [[0, 1, 2], [3, 4, 5]])
    """

    kind: ClassVar[str] = "frame"
    route: ClassVar[str] = "feeder → worker that integrates (integrate_on_workers)"
    arrays_note: ClassVar[str] = "image (rows, columns; its pixel type), or its compressed bytes"

    image: np.ndarray = field(repr=False)
    compression: str = ""
    image_dtype: str = ""
    rows: int = 0
    columns: int = 0
    element_bytes: int = 1
    framing: str = "none"
    order: str = "C"

    @classmethod
    def of(cls, about: dict[str, Any], frame: np.ndarray | EncodedFrame) -> FrameMessage:
        """The message of the exposure that ``about`` describes (the fields of
        :class:`ExposureMessage`), with its decoded ``frame`` or its compressed bytes."""
        if isinstance(frame, np.ndarray):
            return cls(**about, image=frame)
        rows, columns = frame.shape
        return cls(
            **about,
            image=np.frombuffer(frame.data, np.uint8),
            compression=frame.compression,
            image_dtype=frame.dtype,
            rows=rows,
            columns=columns,
            element_bytes=frame.element_bytes,
            framing=frame.framing,
            order=frame.order,
        )

    def check(self) -> None:
        if self.image.ndim != (1 if self.compression else 2):
            raise ProtocolError(
                f"a frame of shape {self.image.shape} with compression {self.compression!r} "
                "is neither an image nor its compressed bytes"
            )

    def failure(self, stage: str, error: str) -> Failure:
        """The failure record of this exposure."""
        return Failure(**self.exposure_fields(), stage=stage, error=error)


@dataclass(frozen=True, kw_only=True)
class Failure(ExposureMessage):
    """One exposure that could not be inferred (``stage``: read, integration or inference;
    ``error``: why), with its counts where they fit the results file."""

    kind: ClassVar[str] = "failed"
    route: ClassVar[str] = "feeder or worker → writer"
    arrays_note: ClassVar[str] = "counts, counts_sd (n_points, f4), when they fit the file"

    stage: str
    error: str
    counts: np.ndarray | None = field(default=None, repr=False)
    counts_sd: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Results(WireMessage):
    """The posterior results of a block of exposures from one worker's batch: ``columns``
    named as in the results file, the first axis of each one row per exposure (``index``:
    the exposures' numbers); ``source`` and ``frame_id``: one text per exposure. Which
    columns and row shapes the file takes is the writer's check."""

    kind: ClassVar[str] = "results"
    route: ClassVar[str] = (
        "worker → writer: one per batch (split so that each stays under half of "
        "`max_message_bytes`)"
    )
    arrays_note: ClassVar[str] = (
        "per exposure (first axis n): index, timestamp, received_time, normalization, truth "
        "(n, 5), counts, counts_sd (n, n_points), samples (n, n_samples, 5), mean, sd (n, 5), "
        "quantiles (n, 3, 5), width_mode_weights (n, 2; stored as `width_mode_fractions`), "
        "predictive_z"
    )

    columns: dict[str, np.ndarray] = field(repr=False)
    source: tuple[str, ...] = ()
    frame_id: tuple[str, ...] = ()

    @property
    def n_exposures(self) -> int:
        return len(self.columns["index"])

    def header(self) -> dict[str, Any]:
        return {"source": list(self.source), "frame_id": list(self.frame_id)}

    def arrays(self) -> dict[str, np.ndarray]:
        return self.columns

    @classmethod
    def from_message(cls, message: Message) -> Results:
        index = message.arrays.get("index")
        if index is None or index.ndim != 1 or index.dtype.kind not in "iu":
            raise ProtocolError("a 'results' message without an integer 'index' array")
        n = len(index)
        for name, column in message.arrays.items():
            _rows(name, column, n)
        texts = {}
        for name in ("source", "frame_id"):
            value = message.header.get(name)
            texts[name] = ("",) * n if value is None else _texts(name, value)
            if len(texts[name]) != n:
                raise ProtocolError(f"field {name!r} has not one text for each of {n} exposures")
        return cls(columns=dict(message.arrays), **texts)


@dataclass(frozen=True)
class Acks(WireMessage):
    """The writer's acknowledgement of a block it wrote and flushed: per exposure its
    ``index``, whether it was a ``duplicate`` (u1: already in the file, not written
    again), its ``status`` and ``error``, and its posterior summaries (NaN for failed
    exposures): ``mean``, ``sd`` (n, n_parameters), ``quantiles`` (n, 3, n_parameters:
    5/50/95%) and ``predictive_z`` (n,)."""

    kind: ClassVar[str] = "acks"
    route: ClassVar[str] = "writer → feeder: one per block written"
    arrays_note: ClassVar[str] = (
        "index, duplicate (u1), mean, sd, quantiles (5/50/95%), predictive_z (NaN for failed "
        "exposures)"
    )

    status: tuple[str, ...]
    error: tuple[str, ...]
    index: np.ndarray
    duplicate: np.ndarray
    mean: np.ndarray = field(repr=False)
    sd: np.ndarray = field(repr=False)
    quantiles: np.ndarray = field(repr=False)
    predictive_z: np.ndarray = field(repr=False)

    def check(self) -> None:
        n = len(self.index)
        if len(self.status) != n or len(self.error) != n:
            raise ProtocolError("the columns of an acks message differ in length")
        for name, array in self.arrays().items():
            _rows(name, array, n)


@dataclass(frozen=True)
class Ready(WireMessage):
    """A process is ready: a worker after loading its model (with its ``credits``: the
    line-outs it takes at first, and its ``device``), the writer after creating the file
    (its ``path``). ``host`` and ``threads``: a remote worker's machine and torch threads."""

    kind: ClassVar[str] = "ready"
    route: ClassVar[str] = "every child → feeder (workers: over `work`, with their credits)"

    role: str
    id: int
    pid: int
    credits: int | None = None
    device: str = ""
    path: str = ""
    host: str = ""
    threads: int | None = None

    @property
    def name(self) -> str:
        """``role-id``, e.g. ``worker-0`` or ``writer-0``."""
        return f"{self.role}-{self.id}"


@dataclass(frozen=True)
class Credit(WireMessage):
    """Worker ``id`` takes ``credits`` more line-outs: after a batch of ``inferred``
    exposures that took ``batch_s`` seconds (its batch size now ``batch_size``), or after
    dropping malformed messages (``inferred`` 0)."""

    kind: ClassVar[str] = "credit"
    route: ClassVar[str] = "worker → feeder (over `work`)"

    id: int
    credits: int
    inferred: int = 0
    batch_s: float = 0.0
    batch_size: int = 0


@dataclass(frozen=True)
class Heartbeat(WireMessage):
    """Worker ``id`` is alive and idle (every ``transport.heartbeat_interval_s``); a
    remote one also names its process and machine."""

    kind: ClassVar[str] = "heartbeat"
    route: ClassVar[str] = "worker → feeder (over `work`), every `heartbeat_interval_s` while idle"

    id: int
    pid: int | None = None
    host: str = ""


@dataclass(frozen=True)
class Hello(WireMessage):
    """A remote worker looking for a scan (every second until a feeder answers)."""

    kind: ClassVar[str] = "hello"
    route: ClassVar[str] = "remote worker → feeder, every second until a feeder answers"

    pid: int
    host: str


@dataclass(frozen=True)
class RemoteConfig(WireMessage):
    """The scan for a remote worker: its ``config`` (the ``PipelineConfig`` JSON), the
    worker's number, and the model files (``weights``, ``card``: their bytes as u1 arrays)
    with the weights' SHA-256."""

    kind: ClassVar[str] = "config"
    route: ClassVar[str] = "feeder → remote worker"
    arrays_note: ClassVar[str] = "weights, card (the model files, u1)"

    config: str
    worker_id: int
    model_sha256: str
    weights: np.ndarray = field(repr=False)
    card: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Stop(WireMessage):
    """Finish what was sent and exit (local processes), or end the scan (a remote worker).

    ``n_exposures``: the scan ended (its source gave all it had) with this many exposures,
    so the writer marks its file complete once the file holds them all; ``None``: stopped
    before its end (Ctrl-C, an error).

    >>> read(Stop(n_exposures=12).to_frames())
    Stop(n_exposures=12)
    """

    kind: ClassVar[str] = "stop"
    route: ClassVar[str] = (
        "feeder → all local processes (PUB); feeder → each remote worker (over `work`)"
    )

    n_exposures: int | None = None


@dataclass(frozen=True)
class Reset(WireMessage):
    """Start over with a hello: the feeder does not know this remote worker (dropped, or
    from an earlier scan)."""

    kind: ClassVar[str] = "reset"
    route: ClassVar[str] = "feeder → a remote worker it does not know (dropped, or earlier scan)"


#: Every message kind, by its name on the wire.
MESSAGE_TYPES: dict[str, type[WireMessage]] = {
    cls.kind: cls
    for cls in (
        LineOutMessage,
        FrameMessage,
        Results,
        Failure,
        Acks,
        Ready,
        Credit,
        Heartbeat,
        Stop,
        Hello,
        RemoteConfig,
        Reset,
    )
}


def read(frames: Sequence[Any]) -> WireMessage:
    """The message in ``frames``, as the class of its kind; ``ProtocolError`` if the frames
    are malformed, the kind unknown, or a field missing or of the wrong type."""
    message = decode(list(frames))
    kind = MESSAGE_TYPES.get(message.kind)
    if kind is None:
        raise ProtocolError(f"unknown message kind {message.kind!r}")
    return kind.from_message(message)


def read_as(kind: type[_Kind], frames: Sequence[Any]) -> _Kind:
    """The message in ``frames``, which must be of ``kind``; ``ProtocolError`` otherwise.

    >>> read_as(Stop, Reset().to_frames())
    Traceback (most recent call last):
    ...
    pipeline.transport.wire.ProtocolError: a 'reset' message where a 'stop' was expected
    """
    message = read(frames)
    if not isinstance(message, kind):
        raise ProtocolError(f"a {message.kind!r} message where a {kind.kind!r} was expected")
    return message


def message_table() -> str:
    """The Markdown table of the message kinds in docs/architecture.md (a test keeps the
    two the same): kind, route, header fields and arrays, as on the wire."""
    lines = ["| kind | from → to | fields | arrays |", "|---|---|---|---|"]
    for kind, cls in MESSAGE_TYPES.items():
        if cls is Results:  # (its columns are the file's)
            header, arrays = ["source", "frame_id"], []
        else:
            readers = _readers(cls)
            header = [name for name, reader in readers.items() if not reader.array]
            arrays = [name for name, reader in readers.items() if reader.array]
        documented = cls.arrays_note or ", ".join(arrays) or "—"
        row = (f"`{kind}`", cls.route, ", ".join(header) or "—", documented)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
