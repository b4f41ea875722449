"""The Prefect API that a command's flows talk to, settled before anything starts.

:func:`use_prefect_api` is the first thing each command that runs flows does:

- with ``PREFECT_API_URL`` set (in the environment or the active Prefect profile), it asks
  the API for ``/health`` and raises :class:`PrefectAPIUnreachable` when nothing answers
  within a few seconds, instead of a long traceback once the scan has started;
- without, it sets up a local API server of this process's own (:class:`LocalAPIServer`)
  and points ``PREFECT_API_URL`` at it, for this process and the children it starts.

Why a server of our own: without ``PREFECT_API_URL``, Prefect 3 starts its ephemeral API
server as a subprocess on first use, in the terminal's process group. Ctrl-C reaches that
server too; it dies first, and the flow, unwinding, then retries its API calls for minutes
and prints a screenful of connection errors. Prefect has no switch to start it elsewhere
(its ``SubprocessASGIServer`` is private and makes its ``Popen`` itself), so this module
runs the server Prefect runs for it and for ``prefect server start --background`` (uvicorn
with the app factory ``prefect.server.api.server:create_app``, the same in 3.4 and 3.9) in
a session of its own (``start_new_session``): Ctrl-C then reaches only the command, which
stops the scan's processes and reports to a server that still answers; the server is
stopped when the process exits, after Prefect has sent its last logs and events, and stops
by itself should the process vanish without a word (:func:`serve_local_api`). Running
``prefect server start`` instead would use only public commands, but it starts the UI and
every background service (heavy on a small machine) and binds its own port, so the command
would have to wait for it before the first API call. Two private pieces are used, both
present from 3.4 to 3.9: ``PREFECT__SERVER_EPHEMERAL`` turns the UI and those services off
(were it dropped, the server would merely do more), and Prefect's root settings are read
again once ``PREFECT_API_URL`` is set (:func:`_read_prefect_settings_again`).

The server takes 15-60 s to start on a small machine, and a command must still refuse a bad
input at once. So this process binds the listening socket itself, and starts the server
when the first connection arrives, handing it the socket (``uvicorn --fd``; systemd's socket
activation): the kernel queues that connection until the server accepts it, so Prefect's
first API call simply waits for the server (``PREFECT_API_REQUEST_TIMEOUT`` is raised to the
start-up timeout unless set), a command that stops before running a flow never starts it,
and no other process can take the port meanwhile.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

#: Seconds :func:`check_api` waits for an answer.
HEALTH_TIMEOUT_S = 5.0
#: Seconds the local server gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 3.0
#: The environment variables :func:`use_prefect_api` sets for a command's child processes.
_VARIABLES = ("PREFECT_API_URL", "PREFECT_API_REQUEST_TIMEOUT")


class PrefectAPIUnreachable(ConnectionError):
    """``PREFECT_API_URL`` names an API that does not answer."""


def check_api(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Ask the Prefect API at ``url`` for ``/health``; :class:`PrefectAPIUnreachable` when no
    answer comes within ``timeout_s`` or the address serves no Prefect API (HTTP 404). Any
    other answer will do: an error status (say, a key the API refuses) is Prefect's to
    explain, once there is an API to explain it."""
    import httpx

    verify: bool | str = True
    if url.startswith("https:"):  # Prefect's TLS settings (its import takes seconds)
        from prefect.settings import get_current_settings

        api = get_current_settings().api
        verify = False if api.tls_insecure_skip_verify else api.ssl_cert_file or True
    advice = "start it (prefect server start) or unset PREFECT_API_URL"
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s, verify=verify)
    except httpx.HTTPError as error:
        reason = str(error) or type(error).__name__
        raise PrefectAPIUnreachable(
            f"the Prefect API at {url} does not answer ({reason}): {advice}"
        ) from None
    if response.status_code == 404:
        raise PrefectAPIUnreachable(
            f"no Prefect API at {url} (GET /health: HTTP 404; the URL ends in /api, e.g. "
            f"http://127.0.0.1:4200/api): {advice}"
        )


class LocalAPIServer:
    """A Prefect API server for this process (see the module docstring): a loopback port
    bound now, the server started in a session of its own when the first connection
    arrives; :meth:`stop` ends it."""

    def __init__(self) -> None:
        from prefect.settings import get_current_settings

        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/api"
        self._env = {  # as Prefect starts its ephemeral server: no UI, few services
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        self._lock = threading.RLock()  # stop() may run in a signal handler
        self._stopped = False
        self._wake, self._woken = socket.socketpair()  # stop() wakes the waiting thread
        self.process: subprocess.Popen | None = None
        threading.Thread(
            target=self._start_on_first_connection, name="prefect-api-activation", daemon=True
        ).start()

    def _start_on_first_connection(self) -> None:
        # the listener is readable when a connection waits in its queue; the other end of
        # the wake-up pair when stop() closed it
        select.select([self._listener, self._woken], [], [])
        self._woken.close()
        with self._lock:
            if self._stopped:
                return
            fd = self._listener.fileno()
            serve = f"from flows.api import serve_local_api; serve_local_api({os.getpid()})"
            command = [sys.executable, "-c", serve, "--factory"]
            command += ["prefect.server.api.server:create_app", "--fd", str(fd)]
            self.process = subprocess.Popen(
                [*command, "--log-level", "error", "--lifespan", "on"],
                env=self._env,
                stdin=subprocess.DEVNULL,
                pass_fds=(fd,),
                start_new_session=True,
            )
            self._listener.close()  # the server has its copy

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the server (SIGTERM; SIGKILL after ``timeout_s``, at once if 0), or close the
        port if it never started."""
        with self._lock:
            self._stopped = True
            self._wake.close()
            process = self.process
            if process is None:
                self._listener.close()
                return
        if process.poll() is not None:
            return
        if timeout_s > 0:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout_s)
                return
        process.kill()
        process.wait()


def serve_local_api(parent_pid: int) -> None:
    """The local server's process: uvicorn with this process's arguments, stopped as by
    SIGTERM (gracefully) once the process ``parent_pid`` is gone, even when that one could
    not stop it (SIGKILL, or SIGHUP as a terminal closes: it shares neither's process group).
    """
    import uvicorn.main

    def stop_when_orphaned() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_orphaned, name="parent-watch", daemon=True).start()
    uvicorn.main.main()


#: The server :func:`use_prefect_api` set up in this process, if it did.
_local_server: LocalAPIServer | None = None


def _configured_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect sees it: the environment's (it comes first in Prefect's
    settings, so Prefect, whose import takes seconds, need not be imported to know it), else
    the active profile's or a caller's (``temporary_settings``)."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def use_prefect_api(start_local: bool = True) -> None:
    """Settle the API this process's flows will use (see the module docstring): check the
    configured one; or, with ``start_local``, set up a local one and point
    ``PREFECT_API_URL`` at it until the process exits (``serve`` passes ``False``: it needs
    a server that outlives it). The environment variables are for the command's children,
    :func:`command_environment` restores them."""
    global _local_server
    url = _configured_url()
    if url and (_local_server is None or url != _local_server.url):
        check_api(url)
        return
    if not start_local:
        return
    from prefect.settings import get_current_settings

    timeout_s = get_current_settings().server.ephemeral.startup_timeout_seconds
    if _local_server is None:
        _local_server = LocalAPIServer()
        atexit.register(_local_server.stop)  # after Prefect's last sends (threading's exit)
    os.environ["PREFECT_API_URL"] = _local_server.url
    os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", str(timeout_s))
    _read_prefect_settings_again()


def _read_prefect_settings_again() -> None:
    """Prefect read the environment when it was imported: its root settings, used by every
    thread that has no settings of its own (its log and event senders too), are read again
    (what newer releases call ``refresh_global_settings_context``)."""
    import prefect.context

    prefect.context.GLOBAL_SETTINGS_CONTEXT = prefect.context.root_settings_context()


@contextlib.contextmanager
def command_environment() -> Iterator[None]:
    """Around a command: what :func:`use_prefect_api` changed is put back when it ends, so
    that a caller running commands in its own process (a test) is left as it was: the
    environment variables (they were for the command's children), and, when no flow used
    the local server, the server and Prefect's settings. A local server that flows used
    stays this process's API until it exits, for Prefect's last logs and events."""
    global _local_server
    before = {name: os.environ.get(name) for name in _VARIABLES}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if _local_server is not None and _local_server.process is None:
            _local_server.stop()
            _local_server = None
            _read_prefect_settings_again()


def kill_local_server() -> None:
    """Kill the local server at once, if this process set one up (for an exit that cannot
    wait: a second Ctrl-C)."""
    if _local_server is not None:
        _local_server.stop(timeout_s=0)
