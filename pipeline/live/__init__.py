"""A running scan's live page: :class:`LiveScanView` gathers what it shows (from the results
file as it is written, and the feeder's counters), :class:`LiveFigure` draws
its figure at most once per second, and :class:`LivePage` serves it on loopback (or, with a
token, to other machines: :class:`LivePageSettings`).

Example:
    >>> import tempfile, urllib.request
    >>> from pathlib import Path
    >>> from pipeline.config import IntegrationConfig
    >>> from pipeline.physics import QGrid
    >>> view = LiveScanView("doc", Path(tempfile.mkdtemp()) / "doc.h5")
    >>> figure = LiveFigure(view, IntegrationConfig(), QGrid())
    >>> with LivePage(view, figure, LivePageSettings()) as page:
    ...     html = urllib.request.urlopen(page.url, timeout=10).read().decode()
    >>> "Scan doc" in html
    True
"""

from pipeline.live.figure import LiveFigure
from pipeline.live.server import LivePage, LivePageSettings
from pipeline.live.view import (
    Alarm,
    AlarmThresholds,
    ExposureRow,
    LiveScanView,
    LiveState,
    ScanCounts,
)

__all__ = [
    "Alarm",
    "AlarmThresholds",
    "ExposureRow",
    "LiveFigure",
    "LivePage",
    "LivePageSettings",
    "LiveScanView",
    "LiveState",
    "ScanCounts",
]
