"""The in-process harness: a session class driven like libmilter would, without sockets."""

from __future__ import annotations

import dataclasses

from .._flags import Actions, ProtocolOpts, Status
from .._loop import InlineLoop, call_hook
from .._options import StageTimeout, check_stage_timeout, stage_deadlines
from .._session import MilterSession
from . import _wire as w
from ._conversation import ALL_ACTIONS, ALL_PROTOCOL
from ._driver import MtaDriver
from ._engine import Engine
from ._envelope import ClientInfo
from ._results import ConnectionResult

__all__ = ["Harness"]


class Harness(MtaDriver):
    """Drive a `MilterSession` subclass in this process, exactly as the runner would.

    Each connection gets a new session instance behind a model of libmilter's engine: stage
    order, negotiation (stages the class does not override are not sent, `@noreply` stages
    are not waited for), the session API's checks, the runner's error policy (an exception is
    logged and answered with `error_status`; with `reraise=True` it propagates instead, which
    is handy in a test). `ConnectionResult.errors` lists the exceptions stage methods raised.
    `tcp=True` models the runner on an inet socket, where the DATA stage is always answered.
    `stage_timeout` and `timeout_status` are the runner's deadlines (default: on, as in the
    runner): an `async def` stage past its deadline is cancelled and answered `timeout_status`
    (one that ignores the cancellation is waited for here; the runner abandons it).

        result = Harness(MyFilter).run(b"Subject: hi\\r\\n\\r\\nbody\\r\\n", recipients=["a@b"])
        assert result.status is Status.CONTINUE
        assert result.header("X-Checked") == "yes"
    """

    def __init__(
        self,
        session_class: type[MilterSession],
        *,
        error_status: Status = Status.TEMPFAIL,
        reraise: bool = False,
        tcp: bool = False,
        actions: Actions = ALL_ACTIONS,
        protocol: ProtocolOpts = ALL_PROTOCOL,
        version: int = w.PROTOCOL_VERSION,
        client: ClientInfo | None = None,
        stage_timeout: StageTimeout = None,
        timeout_status: Status = Status.TEMPFAIL,
    ) -> None:
        if not (isinstance(session_class, type) and issubclass(session_class, MilterSession)):
            raise TypeError(f"Harness needs a MilterSession subclass, got {session_class!r}")
        super().__init__(actions=actions, protocol=protocol, version=version, client=client)
        self.session_class = session_class
        self.error_status = error_status
        self.reraise = reraise
        self.tcp = tcp
        self.deadlines = stage_deadlines(check_stage_timeout(stage_timeout))
        self.timeout_status = timeout_status
        self._loop = InlineLoop()
        self._started = False

    def _endpoint(self) -> Engine:
        if not self._started:  # as in a serving process: before the first session
            self._started = True
            call_hook(self.session_class.on_worker_start(), self._loop.run)
        return Engine(self.session_class, self.error_status, self.reraise, self.tcp, self._loop,
                      self.deadlines, self.timeout_status)

    def close(self) -> None:
        """Run the class's `on_worker_stop` (if it started) and close the harness's loop.

        The loop is where `async def` stage methods and hooks run; a harness used as a
        context manager closes itself.
        """
        if self._started:
            self._started = False
            call_hook(self.session_class.on_worker_stop(), self._loop.run)
        self._loop.stop()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _finish(self, result: ConnectionResult, endpoint: object) -> ConnectionResult:
        assert isinstance(endpoint, Engine)
        return dataclasses.replace(result, errors=tuple(endpoint.dispatch.errors))
