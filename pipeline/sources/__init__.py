"""Where exposures come from. Every source is a :class:`Source` (:mod:`pipeline.sources.base`):
an ``exposures()`` iterator of :class:`pipeline.exposure.Exposure` (a frame it cannot read is
an exposure with ``error`` set), ``stop()``, ``ended_cleanly`` and ``statistics``.

- :class:`SimulatedDetector`: grating frames with known truth (the demo), a
  :class:`SimulatedScan` per scan;
- :class:`FileSource` / :func:`open_source`: EDF, CBF, TIFF (fabio) and Eiger/NeXus HDF5 files,
  lists and globs in natural order; :class:`EigerSource` for HDF5 alone; :func:`find_scans`:
  the archived scans (folders, Eiger master files) that paths and globs name;
- :class:`DirectoryWatcher`: frames of a scan being written, each once its file is complete;
- :class:`DectrisStream`: a DECTRIS detector's live SIMPLON stream (v1 JSON, v2 CBOR) over
  ZeroMQ;
- :class:`ReadAhead`: any picklable file source read by a process of its own, frames decoded
  ahead of the consumer.
"""

from pipeline.sources.base import FrameCounts, Source, SourceStatistics
from pipeline.sources.dectris import DectrisStream
from pipeline.sources.eiger import EigerSource
from pipeline.sources.files import ArchivedScan, FileSource, find_scans, open_source
from pipeline.sources.readahead import ReadAhead
from pipeline.sources.simulated import SimulatedDetector, SimulatedScan
from pipeline.sources.watch import DirectoryWatcher

__all__ = [
    "ArchivedScan",
    "DectrisStream",
    "DirectoryWatcher",
    "EigerSource",
    "FileSource",
    "FrameCounts",
    "ReadAhead",
    "SimulatedDetector",
    "SimulatedScan",
    "Source",
    "SourceStatistics",
    "find_scans",
    "open_source",
]
