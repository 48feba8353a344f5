"""What every driver of sessions shares: the real runner's trampolines and the test harness.

Creating a session, calling a stage method, the error policy (an exception is logged and
answered with the error status; a result that is not a `Status` likewise; only KeyboardInterrupt
and SystemExit are fatal, any other BaseException is an error like an Exception), negotiation,
and abort/close semantics live here once, so the harness in `pymilterkit.testing` cannot drift
from what runs in production. The runner's hot path inlines `call` for speed but uses the same
`fail` and `bad_result`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

from ._flags import Actions, ProtocolOpts, Status
from ._logsafe import install as _install_log_escaping
from ._session import MilterSession, SessionBackend

__all__ = ["ENDS_MESSAGE", "SessionDriver"]

logger = logging.getLogger("pymilterkit")
# Log lines carry untrusted input (exception texts, recipients): escape control characters.
_install_log_escaping(logger)

ENDS_MESSAGE = frozenset((Status.REJECT, Status.DISCARD, Status.ACCEPT, Status.TEMPFAIL))
CONNECTION_STAGES = frozenset(("on_connect", "on_helo", "on_unknown"))
_FATAL = (KeyboardInterrupt, SystemExit)  # the only exceptions that stop the milter


class SessionDriver:
    """Drives sessions of one class with the runner's rules; subclasses supply the transport."""

    def __init__(
        self,
        session_class: type[MilterSession],
        error_status: Status,
        *,
        tcp: bool = False,
    ) -> None:
        self.session_class = session_class
        self.spec = session_class.negotiation()
        self.error_status = error_status
        self.noreply = frozenset(self.spec.noreply)  # @noreply stages: nothing is sent back
        # On TCP, Postfix sends the DATA stage's macros even when DATA is negotiated away, as a
        # packet of its own that the milter never answers; its next packet (end of message) then
        # waits for the ACK of that one (Nagle on the MTA's side), which the milter's kernel
        # delays by ~40 ms: every message. So on TCP the DATA stage is kept and answered
        # (CONTINUE): the macros travel with the command and the reply carries the ACK. Asking
        # for no DATA macros does not help: Postfix still sends an empty macro packet.
        # No-reply stages are kept on TCP: measured through Postfix, none of them stalls once
        # DATA is answered, and they save the MTA a round trip each (docs/performance.md).
        self.answer_data = tcp and "on_data" not in self.spec.stages
        self.created = 0

    # -- hooks -----------------------------------------------------------------------------

    def report_error(self, exc: Exception, stage: str) -> None:
        """An exception escaped a stage method: log it with its traceback."""
        logger.error(
            "%s.%s raised %s; answering %s",
            self.session_class.__qualname__,
            stage,
            type(exc).__name__,
            self.error_status.name,
            exc_info=exc,
        )

    def fatal(self, exc: BaseException, stage: str) -> None:
        """KeyboardInterrupt/SystemExit in a stage method; the runner stops the milter."""
        logger.warning("%s in %s: stopping the milter", type(exc).__name__, stage)

    # -- the policy ------------------------------------------------------------------------

    def create(self, backend: SessionBackend) -> MilterSession:
        """A new session for a connection, attached to `backend`."""
        session = self.session_class()
        session._pmk_backend = backend
        session._pmk_actions = self.spec.actions
        session._pmk_in_message = False
        self.created += 1
        return session

    def fail(self, exc: BaseException, stage: str) -> int:
        """The answer after `exc` escaped `stage`.

        Only KeyboardInterrupt and SystemExit stop the milter. Any other BaseException
        (asyncio.CancelledError from a cancelled task, GeneratorExit, a custom subclass) is
        an error of this stage like an Exception: logged and answered with the error status.
        """
        if isinstance(exc, _FATAL):
            self.fatal(exc, stage)
        else:
            # report_error's subclasses still annotate Exception; they accept any instance.
            self.report_error(cast(Exception, exc), stage)
        if stage in self.noreply:
            return Status.NOREPLY
        return self.error_status

    def bad_result(self, result: object, stage: str) -> int:
        """The answer when `stage` returned something that is not a sendable Status."""
        if result is Status.NOREPLY:
            logger.warning(
                "%s.%s returned NOREPLY but the stage is not @noreply; sending CONTINUE",
                self.session_class.__qualname__,
                stage,
            )
            return Status.CONTINUE
        logger.error(
            "%s.%s returned %r, not a Status; answering %s",
            self.session_class.__qualname__,
            stage,
            result,
            self.error_status.name,
        )
        return self.error_status

    def call(self, session: MilterSession, stage: str, args: Sequence[Any]) -> int:
        """Run one reply-giving stage method and turn its result into the answer to send."""
        try:
            session._pmk_stage = stage
            try:
                result = getattr(session, stage)(*args)
            finally:
                session._pmk_stage = None
            if stage not in CONNECTION_STAGES:
                session._pmk_in_message = not (
                    stage == "on_eom" or (result in ENDS_MESSAGE and stage != "on_rcpt")
                )
            if stage in self.noreply:
                return Status.NOREPLY
            if result.__class__ is Status and result is not Status.NOREPLY:
                return int(result)
            return self.bad_result(result, stage)
        except BaseException as exc:  # noqa: BLE001 - nothing may reach C
            return self.fail(exc, stage)

    def negotiate(
        self,
        session: MilterSession,
        offered_actions: int,
        offered_opts: int,
        setsymlist: Callable[[int, bytes], object],
    ) -> tuple[int, int, int]:
        """Run on_negotiate; returns (status, actions, protocol options) for libmilter."""
        try:
            session._pmk_stage = "on_negotiate"
            try:
                status, actions, opts = session.on_negotiate(
                    Actions(offered_actions), ProtocolOpts(offered_opts)
                )
            finally:
                session._pmk_stage = None
            if status is not Status.CONTINUE:
                logger.info("on_negotiate answered %s: refusing the connection", status.name)
                return int(status), 0, 0
            if self.answer_data:
                opts = ProtocolOpts(int(opts) & ~int(ProtocolOpts.NO_DATA))
            missing = Actions(int(actions) & ~offered_actions)
            if missing:
                logger.error(
                    "the MTA does not offer actions %r that %s needs; it will drop the "
                    "connection",
                    missing,
                    self.session_class.__qualname__,
                )
            session._pmk_actions = Actions(actions)
            for where, names in self.spec.macros.items():
                setsymlist(int(where), " ".join(names).encode("ascii"))
            return Status.CONTINUE, int(actions), int(opts)
        except BaseException as exc:  # noqa: BLE001
            self.fail(exc, "on_negotiate")
            # Anything but CONTINUE: libmilter drops the connection.
            return Status.TEMPFAIL, 0, 0

    def abort(self, session: MilterSession) -> None:
        """on_abort, only while a message this filter saw is in progress (and only once).

        Postfix sends abort after every message, and libmilter may pass it on after eom.
        """
        if session._pmk_in_message:
            session._pmk_in_message = False
            self.cleanup(session, "on_abort")

    def close(self, session: MilterSession) -> None:
        """on_close, then detach the session from its connection for good."""
        self.cleanup(session, "on_close")
        session._pmk_backend = None

    def cleanup(self, session: MilterSession, stage: str) -> None:
        """Run on_abort or on_close; errors are logged, nothing is answered."""
        try:
            session._pmk_stage = stage
            getattr(session, stage)()
        except BaseException as exc:  # noqa: BLE001
            self.fail(exc, stage)
        finally:
            session._pmk_stage = None
