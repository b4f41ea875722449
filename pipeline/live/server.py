"""The live scan page: served by the scan's own process while it runs (:class:`LivePage`).

One page per scan, at ``http://HOST:PORT/``: counts, the alarm state, the newest exposures
(with the error and source file of failed ones) and the figure
(:class:`~pipeline.live.figure.LiveFigure`). Its script asks for ``api/state`` every second
and fetches a new figure when the state says it changed; the page carries the state of the
moment it was asked for, so it shows the scan at once.

Who may look follows the rules of the pipeline's endpoints (docs/security.md): the page
listens on loopback unless told otherwise (:class:`LivePageSettings`), and a page that
other machines can reach needs a token, given as ``?token=...`` (or an
``Authorization: Bearer`` header) with every request.

The page costs the scan nothing while nobody looks: the results file is read, and the figure
drawn, only when asked, at most every ``LiveScanView.poll_s`` and once per second.
"""

from __future__ import annotations

import hmac
import html
import json
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from pipeline.live.figure import LiveFigure
from pipeline.live.view import LiveScanView, LiveState
from pipeline.transport.addresses import is_loopback

#: ``HOST:PORT`` of the page (port 0: any free port), or ``off``.
ENV_ADDRESS = "BEAMLINE_INN_LIVE_PAGE"
#: The token a page reachable from other machines asks for.
ENV_TOKEN = "BEAMLINE_INN_LIVE_PAGE_TOKEN"


@dataclass(frozen=True)
class LivePageSettings:
    """Where the live page listens, and the token it asks for.

    ``host`` is loopback by default; any other address (``0.0.0.0``, a host name) makes
    the page reachable from other machines and needs a ``token``: ``ValueError`` otherwise.

    >>> LivePageSettings().url
    'http://127.0.0.1:0/'
    >>> LivePageSettings(host="0.0.0.0")
    Traceback (most recent call last):
    ...
    ValueError: a live page on 0.0.0.0 can be reached from other machines: give it a token (BEAMLINE_INN_LIVE_PAGE_TOKEN)
    """

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None

    def __post_init__(self) -> None:
        if not is_loopback(f"tcp://{self.host}:{self.port}") and not self.token:
            raise ValueError(
                f"a live page on {self.host} can be reached from other machines: give it a "
                f"token ({ENV_TOKEN})"
            )

    @property
    def url(self) -> str:
        """The page's address (before it starts: with the port asked for)."""
        return _url(self.host, self.port, self.token)

    @classmethod
    def from_environment(
        cls, environment: Mapping[str, str] = os.environ
    ) -> LivePageSettings | None:
        """The settings :data:`ENV_ADDRESS` and :data:`ENV_TOKEN` give (default: loopback,
        any free port); ``None`` when the address is ``off``.

        >>> LivePageSettings.from_environment({ENV_ADDRESS: "127.0.0.1:8765"}).port
        8765
        >>> LivePageSettings.from_environment({ENV_ADDRESS: "off"}) is None
        True
        """
        address = environment.get(ENV_ADDRESS, "").strip()
        if address.lower() == "off":
            return None
        token = environment.get(ENV_TOKEN) or None
        if not address:
            return cls(token=token)
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{ENV_ADDRESS}={address!r}: expected HOST:PORT, or off")
        return cls(host.strip("[]"), int(port), token)


class LivePage:
    """Serves the live page of ``view`` from a thread of this process while inside
    ``with``; :attr:`url` is where to look (the port chosen, the token included).

    Args:
        view: the scan.
        figure: draws its figure.
        settings: where to listen (:class:`LivePageSettings`).
    """

    def __init__(self, view: LiveScanView, figure: LiveFigure, settings: LivePageSettings) -> None:
        self.view = view
        self.figure = figure
        self.settings = settings
        self._socket = _listening(settings.host, settings.port)
        port = self._socket.getsockname()[1]
        self.url = _url(  # on every address: the machine's name, for the others
            settings.host if settings.host not in ("", "0.0.0.0", "::") else socket.getfqdn(),
            port,
            settings.token,
        )
        config = uvicorn.Config(  # log_config None: the process's logging left as it is
            _app(view, figure, settings.token),
            log_config=None,
            log_level="warning",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            daemon=True,
            name="live-page",
        )

    def __enter__(self) -> LivePage:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(5.0)
        self._socket.close()


def _listening(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, as uvicorn would bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as error:
        listening.close()
        raise OSError(f"the live page cannot listen on {host}:{port}: {error}") from error
    listening.listen(16)
    return listening


def _url(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def _app(view: LiveScanView, figure: LiveFigure, token: str | None) -> FastAPI:
    app = FastAPI(title=f"Scan {view.scan_id}", docs_url=None, redoc_url=None, openapi_url=None)

    def allowed(request: Request) -> None:
        if token is None:
            return
        given = request.query_params.get("token", "")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:]
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(status_code=403, detail="this page needs its token")

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> HTMLResponse:
        allowed(request)
        return HTMLResponse(render_page(view.state()), headers={"Cache-Control": "no-store"})

    @app.get("/api/state")
    def state(request: Request) -> JSONResponse:
        allowed(request)
        return JSONResponse(view.state().to_json(), headers={"Cache-Control": "no-store"})

    @app.get("/figure.png")
    def png(request: Request) -> Response:
        allowed(request)
        return Response(figure.png(), media_type="image/png", headers={"Cache-Control": "no-store"})

    return app


def render_page(state: LiveState) -> str:
    """The page's HTML with ``state`` drawn in (its script keeps it current)."""
    data = json.dumps(state.to_json()).replace("</", "<\\/")
    return _PAGE.replace("{{title}}", html.escape(f"Scan {state.scan_id}")).replace(
        "{{state}}", data
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{title}}</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 12px 18px; color: #222; }
 h1 { font-size: 20px; margin: 0 0 8px 0; }
 #alarm { padding: 8px 12px; border-radius: 4px; font-weight: 600; margin-bottom: 8px; }
 .green { background: #d8f3dc; } .amber { background: #ffe8a3; } .red { background: #ffc9c9; }
 .grey { background: #e9ecef; }
 #counts span { display: inline-block; margin-right: 18px; }
 #counts b { font-size: 18px; }
 table { border-collapse: collapse; margin-top: 8px; width: 100%; }
 td, th { border-bottom: 1px solid #ddd; padding: 2px 6px; text-align: left;
          font-variant-numeric: tabular-nums; vertical-align: top; }
 td.text { max-width: 420px; overflow-wrap: anywhere; }
 tr.failed { background: #fff0f0; } tr.flagged { background: #fff8e1; }
 img { max-width: 100%; margin-top: 8px; }
</style></head>
<body>
<h1 id="title">{{title}}</h1>
<div id="alarm" class="grey">loading</div>
<div id="counts"></div>
<div id="newest"></div>
<img id="figure" alt="the scan's figure">
<table><thead><tr><th>exposure</th><th>status</th><th>pitch_nm</th><th>width_nm</th>
<th>sigma_nm</th><th>predictive z</th><th>error</th><th>source</th></tr></thead>
<tbody id="rows"></tbody></table>
<script>
const token = new URLSearchParams(location.search).get("token");
const query = token ? "?token=" + encodeURIComponent(token) : "";
let figureVersion = null;
function text(value, digits) {
  if (value === null || value === undefined) return "";
  return typeof value === "number" ? value.toFixed(digits) : String(value);
}
function cell(row, text_, cls) {
  const td = document.createElement("td");
  td.textContent = text_;
  if (cls) td.className = cls;
  row.appendChild(td);
}
function show(state) {
  const alarm = document.getElementById("alarm");
  const worst = state.alarms.some(a => a.level === "red") ? "red"
    : state.alarms.length ? "amber" : (state.running ? "green" : "grey");
  alarm.className = worst;
  alarm.textContent = state.alarms.length
    ? state.alarms.map(a => a.name + ": " + a.detail).join(" | ")
    : (state.running ? "all well" : "scan ended");
  document.getElementById("counts").innerHTML = "";
  for (const [label, value] of [["taken", state.taken], ["written", state.written],
      ["failed", state.failed], ["flagged", state.flagged],
      ["written per s", text(state.rate_hz, 1)]]) {
    const span = document.createElement("span");
    span.innerHTML = label + " <b></b>";
    span.querySelector("b").textContent = value;
    document.getElementById("counts").appendChild(span);
  }
  const newest = state.rows.length ? state.rows[0] : null;
  document.getElementById("newest").textContent = newest
    ? "newest exposure: " + newest.index + " (" + newest.status + "), written "
      + new Date(newest.written_time * 1000).toLocaleTimeString()
    : "no exposure written yet";
  const body = document.getElementById("rows");
  body.innerHTML = "";
  for (const r of state.rows) {
    const tr = document.createElement("tr");
    tr.className = r.status !== "ok" ? "failed" : (r.flagged ? "flagged" : "");
    cell(tr, r.index);
    cell(tr, r.status + (r.flagged ? " (flagged)" : ""));
    state.parameters.forEach((_, i) => cell(tr, r.status === "ok"
      ? text(r.medians[i], 2) + " [" + text(r.intervals[i][0], 2) + ", "
        + text(r.intervals[i][1], 2) + "]" : ""));
    cell(tr, text(r.predictive_z, 1));
    cell(tr, r.error, "text");
    cell(tr, r.source, "text");
    body.appendChild(tr);
  }
  if (state.figure_version !== figureVersion) {
    figureVersion = state.figure_version;
    document.getElementById("figure").src = "figure.png" + query
      + (query ? "&" : "?") + "v=" + figureVersion;
  }
}
async function refresh() {
  try {
    const response = await fetch("api/state" + query, {cache: "no-store"});
    if (response.ok) show(await response.json());
    else document.getElementById("alarm").textContent = "page: " + response.status;
  } catch (error) {
    const alarm = document.getElementById("alarm");
    alarm.className = "grey";
    alarm.textContent = "the scan's process does not answer (it ended, or is gone)";
  }
}
show({{state}});
setInterval(refresh, 1000);
</script>
</body></html>
"""
