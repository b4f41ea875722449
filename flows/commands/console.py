"""The Prefect API and console of the commands that run flows."""

from __future__ import annotations


def use_prefect_api_for(command: str) -> None:
    """The first call of each ``command`` that runs flows (:func:`flows.api.use_prefect_api`):
    a ``PREFECT_API_URL`` that does not answer stops the command here (exit code 2, one
    line); without one, the flows get a local Prefect API server of this process's own, in
    a session of its own, so that Ctrl-C reaches only the command. ``serve`` needs a server
    that outlives it, so it gets no local one. A scan that stops (:class:`ScanError`) is
    said once, by :func:`flows.cli.main`: Prefect's console reports of it are left out
    (:class:`_ScanErrorsOffTheConsole`)."""
    import logging

    from flows.api import use_prefect_api

    use_prefect_api(start_local=command != "serve")
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect's console handler, which its first flow would make
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ScanErrorsOffTheConsole) for f in handler.filters):
            handler.addFilter(_ScanErrorsOffTheConsole())


class _ScanErrorsOffTheConsole:
    """A filter for the console's log handler: Prefect's reports of a task or flow run that
    failed with a :class:`~workers.feeder.ScanError` (two with a traceback, and the error
    repeated in each run's final state) are dropped; the command prints the error once, with
    how to resume, and Prefect's API (the UI) still gets the reports."""

    def filter(self, record: object) -> bool:
        import logging

        from workers.feeder import ScanError

        if not isinstance(record, logging.LogRecord):
            return True
        if not record.name.startswith(("prefect.task_runs", "prefect.flow_runs")):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, ScanError) or "ScanError" in record.getMessage())
