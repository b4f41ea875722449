"""Resuming a scan into its existing results file by the identity of each frame.

A resumed scan compares the frames its source gives with the rows its results file holds,
by identity (:mod:`pipeline.sources.identity`: file, frame within it, the file's size and
modification time), never by position in a list of files:

- a frame whose row is in the file (same file version) is skipped;
- a frame the file does not hold (a file added to the folder, wherever it sorts) is
  processed, with an exposure index after the highest in the file;
- the rows of a file that changed since (another size or modification time) are dropped and
  its frames processed again, under their old indices; so are failed rows with
  ``retry_failed``;
- rows of files no longer among the scan's files are kept, and reported.

Frames without identity (simulated or streamed frames, files written before identities were
stored) are matched by exposure index, as before.

A results file written with another geometry, mask, dark, flat, integration settings,
model, samples per exposure or seed (:mod:`pipeline.provenance`) is not resumed: the rows of
two configurations would mix.

Example:
    >>> import numpy as np
    >>> from pipeline.exposure import Exposure
    >>> from pipeline.sources.identity import FileStamp
    >>> old = FileStamp("a" * 32, 10, 1)
    >>> plan = ResumePlan(
    ...     index=np.array([0, 1]), failed=np.array([False, True]),
    ...     frame_ids=[old.frame_id(0), old.frame_id(1)],
    ...     manifest={old.key: old}, retry_failed=True,
    ... )
    >>> plan.dropped, plan.n_kept_rows
    ([1], 1)
    >>> def frame(number):
    ...     return Exposure("s", 99, 0.0, None, metadata={"frame_id": old.frame_id(number)})
    >>> plan.place(frame(0)) is None, plan.place(frame(1)).index, plan.place(frame(2)).index
    (True, 1, 2)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.exposure import Exposure
from pipeline.provenance import processing_record
from pipeline.sources.identity import FileStamp, FrameId

log = logging.getLogger(__name__)


class ResumePlan:
    """What a resumed scan keeps, redoes and adds (see the module).

    Args:
        index: the exposure index of each complete row of the results file.
        failed: whether each row is a failed exposure.
        frame_ids: each row's frame identity text (empty where it has none).
        manifest: the scan's files now (:meth:`pipeline.sources.FileSource.manifest`), by
            key; ``None`` when the source cannot list them (then no row is dropped for a
            changed file, and none reported removed).
        retry_failed: process the frames of failed rows again.

    Attributes:
        dropped: indices of the rows not carried over (redone: failed, or of a changed file).
        removed: indices of rows whose file is no longer among the scan's files (kept).
        n_kept_rows: rows carried over into the resumed file.
    """

    def __init__(
        self,
        index: np.ndarray,
        failed: np.ndarray,
        frame_ids: Sequence[str],
        manifest: Mapping[str, FileStamp] | None,
        retry_failed: bool = False,
    ) -> None:
        self._done: dict[str, tuple[tuple[int, int], int]] = {}  # location -> (stamp, index)
        self._redo: dict[str, int] = {}  # location -> index of a dropped row
        self._kept_without_identity: set[int] = set()  # rows matched by index
        self._placed: set[str] = set()
        self._stored_stamps: dict[str, tuple[int, int]] = {}  # file key -> stamp of its rows
        self.dropped: list[int] = []
        self.removed: list[int] = []
        for row_index, row_failed, text in zip(
            index.tolist(), failed.tolist(), frame_ids, strict=True
        ):
            frame = FrameId.parse(text)
            redo = bool(row_failed) and retry_failed
            if frame is not None:
                self._stored_stamps[frame.key] = frame.stamp
            if frame is None:
                if redo:
                    self.dropped.append(row_index)
                else:
                    self._kept_without_identity.add(row_index)
                continue
            now = manifest.get(frame.key) if manifest is not None else None
            if manifest is not None and now is None:
                self.removed.append(row_index)
                self._done[frame.location] = (frame.stamp, row_index)
            elif redo or (now is not None and now.stamp != frame.stamp):
                self._redo[frame.location] = row_index
                self.dropped.append(row_index)
            else:
                self._done[frame.location] = (frame.stamp, row_index)
        #: whether the file's rows have identities (else frames are matched by index, as
        #: before identities were stored)
        self.by_identity = bool(self._stored_stamps)
        self.n_kept_rows = len(index) - len(self.dropped)
        self._next_index = int(index.max()) + 1 if len(index) else 0

    @property
    def n_changed(self) -> int:
        """Rows dropped because their file changed or they failed (to be processed again)."""
        return len(self.dropped)

    def up_to_date(self, manifest: Mapping[str, FileStamp]) -> bool:
        """Whether the file holds every frame of ``manifest``'s files as they are now, with
        nothing to redo: then resuming would change nothing."""
        return not self.dropped and all(
            self._stored_stamps.get(key) == stamp.stamp for key, stamp in manifest.items()
        )

    def place(self, exposure: Exposure) -> Exposure | None:
        """``exposure`` with its index in the resumed file; ``None`` when its row is kept.

        A frame with identity keeps the index of its dropped row, or gets the next free
        one; a frame without identity, or any frame when the file's rows have none (a file
        of an earlier version), keeps its own index (``None`` when its row is kept).
        """
        frame = FrameId.parse(exposure.metadata.get("frame_id", ""))
        if frame is None or not self.by_identity:
            return None if exposure.index in self._kept_without_identity else exposure
        if frame.location in self._placed:
            raise ValueError(f"frame {exposure.metadata.get('source', '')} was submitted twice")
        self._placed.add(frame.location)
        done = self._done.get(frame.location)
        if done is not None and done[0] == frame.stamp:
            return None
        if frame.location in self._redo:
            index = self._redo.pop(frame.location)
        else:
            if done is not None:  # the file changed while this scan read it
                log.warning(
                    "%s changed during the scan: its frame is stored again as a new exposure",
                    exposure.metadata.get("source", "a file"),
                )
            index = self._next_index
            self._next_index += 1
        return dataclasses.replace(exposure, index=index)


def plan_output(
    config: PipelineConfig,
    resume: bool,
    manifest: Mapping[str, FileStamp] | None = None,
    retry_failed: bool = False,
) -> ResumePlan | None:
    """How a scan writes ``config.output_path``: ``None`` for a new file, else the
    :class:`ResumePlan` of the existing one.

    ``FileExistsError`` when the file exists and ``resume`` is not set; ``ValueError`` when it
    was made with another configuration or model (:mod:`pipeline.provenance`), or is not a
    results file of this scan.
    """
    from pipeline.model import read_card
    from pipeline.physics import PARAMETER_NAMES
    from pipeline.store.results import check_resumable, stored_identities

    path = config.output_path
    if not path.exists():
        return None
    if not resume:
        raise FileExistsError(
            f"results file already exists: {path}: resume to complete it (--resume), or "
            "write a new one (another --scan-id or --out)"
        )
    card = read_card(config.inference.model)
    check_resumable(  # as the writer checks it: scan, configuration, model, samples, q grid
        path,
        config.scan_id,
        card,
        config.store.draws_stored(config.inference.n_samples),
        config.grid.grid().q_nm,
        PARAMETER_NAMES,
        processing_record(config, card["weights_sha256"]),
    )
    index, failed, frame_ids = stored_identities(path)
    return ResumePlan(index, failed, frame_ids, manifest, retry_failed)
