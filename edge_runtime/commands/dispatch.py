"""Fleet commands: the dispatcher (parse, authenticate, run once, reply).

:class:`Dispatcher` turns one ``(verb, payload)`` into one :class:`Reply` and
never raises. Per command: parse and bound the payload
(:mod:`edge_runtime.commands.parse`); verify a signed envelope, or refuse an
unsigned one for a verb in ``signed_verbs`` (:mod:`edge_runtime.commands.auth`);
claim the id in the :class:`~edge_runtime.commands.ledger.CommandLedger` so it
runs once (a redelivery gets the stored reply with ``"duplicate": true``; one
arriving while the first still runs gets ``"in_progress": true`` and is not
run); run the handler; store its reply. A failure anywhere is
``Reply(ok=False, message=<one line>)``, with the id when it can be recovered.
Replies of commands that ran, failures included, are stored: an id is used up
once its handler has run. The ledger keeps a digest of each id's verb and args:
an id sent again with a *different* command is not run and gets an error reply
with ``"duplicate": true, "conflict": "id reused with different args"`` (a
silent replay of the first reply would tell the operator their new command ran).

Unsigned commands have an age limit too (``max_age_seconds``: ``ts`` more than
that behind or ahead of the device clock is refused, "expired timestamp"),
unless the id already ran, which gets its stored reply. A device clock before
:data:`CLOCK_FLOOR` (no RTC, not yet synchronised: a Pi boots in 1970) cannot
judge age at all: then only ``ping`` and ``status`` are answered (the ping
reply shows the device clock) and every other verb is refused until the clock
is set.

The verbs' handlers are :class:`~edge_runtime.commands.handlers.DeviceCommands`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping

from edge_runtime._util.wall_clock import CLOCK_FLOOR
from edge_runtime.commands.auth import SIGNED_VERBS, CommandAuth, is_signed_envelope
from edge_runtime.commands.ledger import CommandLedger
from edge_runtime.commands.parse import Command, Reply, best_effort_id, check_verb, command_from_object, load_object
from edge_runtime.errors import CommandError, EdgeRuntimeError

__all__ = ["CLOCK_FLOOR", "SIGNED_VERBS", "Command", "Dispatcher", "Handler", "Reply"]

UNTIMED_VERBS = frozenset({"ping", "status"})
"""Read-only verbs still answered while the device clock is not set."""
CONFLICT = "id reused with different args"
Handler = Callable[[Command], Reply]
"""Runs one command; raises EdgeRuntimeError (its one-line message becomes the reply) to fail."""
_log = logging.getLogger(__name__)


class Dispatcher:
    """Parses, authenticates and runs each command once; :meth:`handle` never raises.

    ``signed_verbs``: verbs refused unless signed (needs ``auth``). A signed
    envelope for any verb is verified when ``auth`` is set and refused when not.
    ``device`` and ``groups`` are what signed commands may be addressed to.
    ``max_age_seconds`` (None: no limit) bounds how far an unsigned command's
    ``ts`` may lie from ``clock`` (wall-clock Unix seconds); see the module doc.
    """

    def __init__(self, handlers: Mapping[str, Handler], *, ledger: CommandLedger, auth: CommandAuth | None,
                 signed_verbs: Collection[str] = SIGNED_VERBS, max_bytes: int, max_depth: int, device: str,
                 groups: Collection[str] = (), max_age_seconds: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if signed_verbs and auth is None:
            raise ValueError("signed_verbs need a CommandAuth to verify them")
        self._handlers = dict(handlers)
        self._ledger = ledger
        self._auth = auth
        self._signed_verbs = frozenset(signed_verbs)
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.device = device
        self.groups = tuple(groups)
        self.max_age_seconds = max_age_seconds
        self._clock = clock

    def handle(self, verb: str, payload: bytes) -> Reply:
        """Handle the ``payload`` received on the ``.../cmd/<verb>`` topic; return the reply to send."""
        try:
            return self._handle(verb, payload)
        except Exception:  # the command worker must survive any bug and keep answering
            _log.exception("command %r crashed the dispatcher", verb[:32])
            return Reply(False, "internal error while handling the command (see the device log)",
                         best_effort_id(payload))

    def parse(self, verb: str, payload: bytes) -> Command:
        """Parse and authenticate without running anything.

        Raises:
            CommandError: refused (malformed, unsigned when required, bad signature, ...).
        """
        check_verb(verb)
        doc = load_object(payload, max_bytes=self.max_bytes, max_depth=self.max_depth)
        if is_signed_envelope(doc):
            if self._auth is None:
                raise CommandError("signed commands are not enabled on this device (no operator keys configured)")
            return self._auth.verify_envelope(doc, verb, device=self.device, groups=self.groups)
        if verb in self._signed_verbs:
            raise CommandError(f"command {verb!r} must be signed by an operator key")
        return command_from_object(doc, verb)

    def _handle(self, verb: str, payload: bytes) -> Reply:
        try:
            command = self.parse(verb, payload)
        except CommandError as e:
            return Reply(False, e.one_line(), best_effort_id(payload))
        handler = self._handlers.get(verb)
        if handler is None:
            return Reply(False, f"command verb {verb!r} is not supported by this device", command.id)
        refused = self._check_time(command)
        if refused is not None:
            return refused
        try:
            claim = self._ledger.claim(command.id, _digest(command))
        except CommandError as e:  # without the ledger "run once" cannot be kept: do not run
            return Reply(False, f"{verb} not run: {e.one_line()}", command.id)
        if claim.conflict:
            return Reply(False, f"command id {command.id!r} was already used for a different command "
                                "(verb or args differ); nothing was run: send it with a new id", command.id,
                         {"duplicate": True, "conflict": CONFLICT})
        if claim.running:
            return Reply(False, f"command {command.id!r} is already running; its reply follows", command.id,
                         {"duplicate": True, "in_progress": True})
        if claim.reply is not None:
            return dataclasses.replace(claim.reply, id=command.id, data={**claim.reply.data, "duplicate": True})
        reply = self._run(handler, command)
        try:
            self._ledger.record(command.id, reply)
        except CommandError as e:
            _log.error("command %s ran but its reply was not stored: %s", command.id, e.one_line())
        return reply

    def _check_time(self, command: Command) -> Reply | None:
        """The refusal of a command the device clock cannot vouch for, or None to go on."""
        now = self._clock()
        if now < CLOCK_FLOOR:
            if command.verb in UNTIMED_VERBS:
                return None  # read-only, so safe whatever their age; the ping reply shows the clock
            return Reply(False, f"{command.verb} refused: the device clock is not set ({now:.0f} is before "
                                f"{CLOCK_FLOOR:.0f}), so the command's age cannot be checked; only "
                                f"{' and '.join(sorted(UNTIMED_VERBS))} are answered until it is", command.id)
        if command.signed_by is not None or self.max_age_seconds is None:
            return None  # signed commands: CommandAuth checked ts already
        age = now - command.ts
        if abs(age) <= self.max_age_seconds:
            return None
        try:
            stored = self._ledger.lookup(command.id)
        except CommandError:
            stored = None
        if stored is not None:
            return dataclasses.replace(stored, data={**stored.data, "duplicate": True})  # a late redelivery
        where = f"{age:.0f} s old" if age > 0 else f"{-age:.0f} s ahead of the device clock"
        return Reply(False, f"expired timestamp: command ts is {where} (limit {self.max_age_seconds:g} s); "
                            "send it again with the current time", command.id)

    def _run(self, handler: Handler, command: Command) -> Reply:
        signer = f" (signed by {', '.join(k[:16] for k in command.signed_by)})" if command.signed_by else ""
        _log.info("running command %s %s%s", command.verb, command.id, signer)
        try:
            reply = handler(command)
        except EdgeRuntimeError as e:
            reply = Reply(False, f"{command.verb} failed: {e.one_line()}")
        except Exception as e:  # a handler bug is one failed command, not a dead command worker
            _log.exception("command %s %s crashed", command.verb, command.id)
            reply = Reply(False, f"{command.verb} failed: internal error ({type(e).__name__}; see the device log)")
        return dataclasses.replace(reply, id=command.id)


def _digest(command: Command) -> str:
    """SHA-256 of the verb and args: what must match for a repeated id to be the same command."""
    text = json.dumps({"verb": command.verb, "args": dict(command.args)}, sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()
