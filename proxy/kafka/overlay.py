"""The control overlay: back-office commands in force on top of the rules, until they expire.

Owns: `Overlay`, the current command per target and its effects: a gateway drain through
the health façade's drain (the admin API's mechanism), a weight override on the gateway's
state (the balancer's effective weight reads it), a disabled route in `disabled_routes`
(the handler answers 503). Emits `control.applied`, `control.rejected`, `control.expired`.
Re-applies its commands after a reload replaced a gateway's state.
Must not: change the rules or read Kafka (proxy.kafka.control feeds it); it runs on the
event loop and its timing reads the injected clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import orjson

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.events import Emitter, Severity
from proxy.kafka.commands import Command, CommandError, CommandExpired, parse_command
from proxy.upstream.health import Health
from proxy.upstream.state import GatewayState, StateRegistry

logger = logging.getLogger(__name__)


class Overlay:
    def __init__(
        self,
        states: StateRegistry,
        health: Health,
        events: Emitter,
        *,
        routes: Callable[[], frozenset[str]],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.states = states
        self.health = health
        self.events = events
        self.clock = clock
        self._routes = routes
        self.current: dict[str, Command] = {}
        #: route name -> the command disabling it; the handler reads this on every request.
        self.disabled_routes: dict[str, Command] = {}
        self.on_change: Callable[[], None] | None = None  # wakes the expiry timer

    # -- records in ----------------------------------------------------------------------

    def apply_record(self, key: bytes | None, value: bytes | None, *, replay: bool = False) -> bool:
        """Apply one control record; False when it was rejected (and changed nothing).

        `replay`: read on start; a command that expired since is history, not news, and is
        passed over without a `control.rejected` event.
        """
        if value is None:  # a tombstone: the target's command is withdrawn
            target = key.decode(errors="replace") if key else ""
            old = self.current.pop(target, None)
            if old is not None:
                self._lift(old)
                self._emit_applied(target, "clear", None)
            return True
        try:
            cmd = parse_command(key, value, self.clock.wall())
            self._check_target(cmd)
        except CommandExpired as exc:
            if replay:
                logger.debug("control: %r expired before this start", key)
                return False
            return self._reject(key, value, exc)
        except CommandError as exc:
            return self._reject(key, value, exc)
        self._apply(cmd)
        return True

    def _reject(self, key: bytes | None, value: bytes, exc: CommandError) -> bool:
        logger.warning("control: rejected %r: %s", key, exc)
        self.events.emit(
            "control.rejected",
            Severity.WARNING,
            key=key.decode(errors="replace") if key else None,
            error=str(exc),
            issuer=_issuer_of(value),
        )
        return False

    def load(self, latest: Mapping[bytes | None, bytes | None]) -> None:
        """Apply the current record of every key, as read from the topic on start."""
        for key, value in latest.items():
            self.apply_record(key, value, replay=True)

    def _check_target(self, cmd: Command) -> None:
        if cmd.kind == "gateway" and self.states.get(cmd.name) is None:
            raise CommandError(f"no gateway named {cmd.name!r} in the rules")
        if cmd.kind == "route" and cmd.name not in self._routes():
            raise CommandError(f"no route named {cmd.name!r} in the rules")

    def _apply(self, cmd: Command) -> None:
        old = self.current.get(cmd.target)
        if old == cmd:
            return  # the same record read again (a reconnect re-reads the topic)
        if old is not None:
            self._lift(old)
        if cmd.lifts:
            self.current.pop(cmd.target, None)
        else:
            self.current[cmd.target] = cmd
            self._effect(cmd)
        logger.info("control: %s %s by %s: %s", cmd.action, cmd.target, cmd.issuer, cmd.reason)
        self._emit_applied(cmd.target, cmd.action, cmd)
        if self.on_change is not None:
            self.on_change()

    def _emit_applied(self, target: str, action: str, cmd: Command | None) -> None:
        fields: dict[str, object] = {
            "target": target,
            "action": action,
            "issuer": cmd.issuer if cmd else None,
            "reason": cmd.reason if cmd else None,
            "expires_at": cmd.expires_text if cmd else None,
        }
        if cmd is not None and cmd.weight is not None:
            fields["weight"] = cmd.weight
        self.events.emit("control.applied", Severity.INFO, **fields)

    # -- effects -------------------------------------------------------------------------

    def _effect(self, cmd: Command) -> None:
        if cmd.kind == "route":
            self.disabled_routes[cmd.name] = cmd
            return
        st = self.states.get(cmd.name)
        if st is None:
            return
        st.overlay = cmd.describe()
        if cmd.action == "drain":
            self.health.drain(st, reason=f"control: {cmd.issuer}: {cmd.reason}")
        elif cmd.action == "weight":
            st.weight_override = cmd.weight

    def _lift(self, cmd: Command) -> None:
        if cmd.kind == "route":
            self.disabled_routes.pop(cmd.name, None)
            return
        st = self.states.get(cmd.name)
        if st is None:
            return
        _clear(st, self.health, cmd)

    # -- time and reloads ----------------------------------------------------------------

    def expire(self) -> float | None:
        """Lift every command whose expiry has passed; returns the next expiry (wall clock
        seconds) or None when nothing is in force."""
        now = self.clock.wall()
        for target, cmd in list(self.current.items()):
            if cmd.expires_at <= now:
                del self.current[target]
                self._lift(cmd)
                logger.info("control: %s %s expired", cmd.action, target)
                self.events.emit(
                    "control.expired",
                    Severity.INFO,
                    target=target,
                    action=cmd.action,
                    issuer=cmd.issuer,
                )
        return min((c.expires_at for c in self.current.values()), default=None)

    def reapply(self) -> None:
        """After a reload: states created anew (a changed gateway address) carry no overlay
        yet, and a command whose target left the rules stays, to apply if it comes back."""
        for cmd in self.current.values():
            if cmd.kind == "gateway":
                st = self.states.get(cmd.name)
                if st is not None and st.overlay != cmd.describe():
                    self._effect(cmd)
            elif cmd.name in self._routes():
                self.disabled_routes[cmd.name] = cmd
            else:
                self.disabled_routes.pop(cmd.name, None)

    def describe(self) -> list[dict[str, object]]:
        return [c.describe() for c in self.current.values()]


def _clear(st: GatewayState, health: Health, cmd: Command) -> None:
    st.overlay = None
    if cmd.action == "drain":
        health.undrain(st, reason=f"control: {cmd.action} lifted")
    elif cmd.action == "weight":
        st.weight_override = None


def _issuer_of(value: bytes) -> str | None:
    try:
        doc = orjson.loads(value)
    except Exception:
        return None
    issuer = doc.get("issuer") if isinstance(doc, dict) else None
    return issuer if isinstance(issuer, str) else None
