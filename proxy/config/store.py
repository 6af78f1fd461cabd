"""The current rules snapshot, and the only place a new one is published.

Owns: `Snapshot` (rules + what was compiled from them + generation), `ConfigStore`, which
loads, reloads and swaps snapshots, and the reload bookkeeping (last error, metrics, events).
Must not: validate rules itself (`proxy.config.load` does), know what the compiled value is,
or touch runtime state: binders attach it before a swap, listeners reconcile the rest after.
A reload runs the whole pipeline off to the side, binds, and then publishes by one
assignment, or changes nothing: a binder failing is a refused reload, never a published
snapshot that cannot serve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.load import ConfigError, ConfigIssue, build_rules, content_hash, read_sources
from proxy.config.model import Rules
from proxy.config.watch import watch_rules
from proxy.events import Emitter, NullEmitter, Severity

logger = logging.getLogger(__name__)

T = TypeVar("T")

Outcome = Literal["success", "failure", "unchanged"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot(Generic[T]):
    """One published set of rules; requests keep the one they started with."""

    rules: Rules
    compiled: T
    generation: int  # 1 for the first load, +1 per published change
    hash: str  # content hash of the files it was built from
    loaded_at: float  # wall-clock seconds
    trigger: str  # what asked for it: initial, watch, admin, signal


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadError:
    """The last refused reload; `superseded` once the files serve fine again."""

    issues: tuple[ConfigIssue, ...]
    hash: str  # of the refused content ("" when it could not be read)
    at: float  # wall-clock seconds
    trigger: str
    superseded: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "issues": [i.as_dict() for i in self.issues],
            "hash": self.hash,
            "at": self.at,
            "trigger": self.trigger,
            "superseded": self.superseded,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadResult:
    outcome: Outcome
    generation: int  # the generation serving after this reload
    hash: str  # the content hash read ("" when the files could not be read)
    trigger: str
    issues: tuple[ConfigIssue, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "generation": self.generation,
            "hash": self.hash,
            "trigger": self.trigger,
            "issues": [i.as_dict() for i in self.issues],
        }


SwapListener = Callable[[Snapshot[T], Snapshot[T] | None], None]
#: Attaches runtime state to a compiled value before it is published; raises to refuse it.
Binder = Callable[[Rules, T], None]


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "payswitch_config_reloads",
            "Rules reloads by result: success, failure (old rules kept) or unchanged.",
            ["result"],
            registry=registry,
        )
        for result in ("success", "failure", "unchanged"):
            self.reloads.labels(result)
        self.generation = Gauge(
            "payswitch_config_generation",
            "Generation of the rules being served; grows by one per published change.",
            registry=registry,
        )
        self.last_ok = Gauge(
            "payswitch_config_last_reload_successful",
            "1 when the last reload published or found nothing to change, 0 when it was refused.",
            registry=registry,
        )


class ConfigStore(Generic[T]):
    """Holds the current `Snapshot[T]`; `T` is whatever `compile` makes of the rules."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        compile: Callable[[Rules], T],
        *,
        listeners: Iterable[SwapListener[T]] = (),
        binders: Iterable[Binder[T]] = (),
        events: Emitter | None = None,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
    ) -> None:
        # A lone "rules" would otherwise be read as the paths "r", "u", "l", ...
        self.paths = (paths,) if isinstance(paths, str | os.PathLike) else tuple(paths)
        self._compile = compile
        self._listeners: list[SwapListener[T]] = list(listeners)
        self._binders: tuple[Binder[T], ...] = tuple(binders)
        self._events: Emitter = events or NullEmitter()
        self._clock = clock
        self._metrics = _Metrics(registry) if registry is not None else None
        self._current: Snapshot[T] | None = None
        self._lock = asyncio.Lock()
        self.last_error: ReloadError | None = None

    # -- reading ---------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> Snapshot[T]:
        snap = self._current
        if snap is None:
            raise RuntimeError("rules are not loaded yet; call load_initial() first")
        return snap

    def add_listener(self, listener: SwapListener[T]) -> None:
        """Call `listener(new, old)` after every future swap."""
        self._listeners.append(listener)

    def add_binder(self, binder: Binder[T]) -> None:
        """Run `binder(rules, compiled)` before every future swap; raising refuses it."""
        self._binders = (*self._binders, binder)

    # -- loading ---------------------------------------------------------------------------

    def load_initial(self) -> Snapshot[T]:
        """Load the first snapshot; a ConfigError here is fatal to the caller."""
        if self._current is not None:
            raise RuntimeError("load_initial() runs once; use reload() afterwards")
        digest = ""
        try:
            sources = read_sources(self.paths)
            digest = content_hash(sources)
            rules, compiled = self._prepare(build_rules(sources), digest)
            self._bind(rules, compiled)
        except ConfigError as exc:
            self._refused(exc, digest, "initial")
            raise
        return self._publish(rules, compiled, digest, "initial")

    async def reload(self, trigger: str) -> ReloadResult:
        """Re-read the rules and publish them if they changed and are valid.

        Reloads run one at a time: a reload that waited for another sees its result, and
        skips as unchanged when the files are what the other one published.
        """
        async with self._lock:
            return await self._reload(trigger)

    async def _reload(self, trigger: str) -> ReloadResult:
        old = self.current
        try:
            sources = await asyncio.to_thread(read_sources, self.paths)
        except ConfigError as exc:
            return self._refused(exc, "", trigger)
        digest = content_hash(sources)
        if digest == old.hash and not old.rules.reads_secrets:
            return self._unchanged(old, digest, trigger)
        try:
            built = await asyncio.to_thread(build_rules, sources)
            if digest == old.hash and built.secrets() == old.rules.secrets():
                return self._unchanged(old, digest, trigger)  # files and secrets as served
            rules, compiled = self._prepare(built, digest)
            self._bind(rules, compiled)
        except ConfigError as exc:
            return self._refused(exc, digest, trigger)
        except Exception as exc:
            # A loader bug must not leave a reload uncounted, nor answer the admin with 500.
            logger.exception("loading rules %s failed", digest[:12])
            failed = ConfigIssue("-", 0, "", f"cannot load rules: {type(exc).__name__}")
            return self._refused(ConfigError([failed]), digest, trigger)
        new = self._publish(rules, compiled, digest, trigger)
        return ReloadResult(
            outcome="success", generation=new.generation, hash=digest, trigger=trigger
        )

    def _unchanged(self, old: Snapshot[T], digest: str, trigger: str) -> ReloadResult:
        self._count("unchanged")
        # The files are back to what is served, so an earlier refusal no longer applies.
        self._supersede()
        return ReloadResult(
            outcome="unchanged", generation=old.generation, hash=digest, trigger=trigger
        )

    async def run_watcher(self, stop: asyncio.Event) -> None:
        """Reload whenever the rules files change, until `stop` is set."""

        async def changed() -> None:
            await self.reload("watch")

        await watch_rules(self.paths, changed, stop=stop)

    # -- internals -------------------------------------------------------------------------

    def _prepare(self, rules: Rules, digest: str) -> tuple[Rules, T]:
        rules = dataclasses.replace(rules, content_hash=digest)
        try:
            return rules, self._compile(rules)
        except ConfigError:
            raise
        except Exception as exc:
            # A compiler bug must not take the proxy down on reload: refuse the rules the
            # same way as invalid ones, so the old snapshot keeps serving and it is counted.
            logger.exception("compiling rules %s failed", digest[:12])
            files = ", ".join(rules.files) or "-"
            raise ConfigError(
                [ConfigIssue(files, 0, "", f"cannot compile rules: {type(exc).__name__}: {exc}")]
            ) from exc

    def _bind(self, rules: Rules, compiled: T) -> None:
        """Attach runtime state right before publishing (no await in between); any
        failure refuses the rules like invalid ones, and the old snapshot keeps serving."""
        for binder in self._binders:
            try:
                binder(rules, compiled)
            except ConfigError:
                raise
            except Exception as exc:
                logger.exception("binding rules %s failed", rules.content_hash[:12])
                files = ", ".join(rules.files) or "-"
                raise ConfigError(
                    [
                        ConfigIssue(
                            files, 0, "", f"cannot bind runtime state: {type(exc).__name__}: {exc}"
                        )
                    ]
                ) from exc

    def _publish(self, rules: Rules, compiled: T, digest: str, trigger: str) -> Snapshot[T]:
        old = self._current
        new = Snapshot(
            rules=rules,
            compiled=compiled,
            generation=1 if old is None else old.generation + 1,
            hash=digest,
            loaded_at=self._clock.wall(),
            trigger=trigger,
        )
        self._current = new  # the swap: everything above ran before anyone could see it
        self._supersede()
        self._count("success")
        if self._metrics is not None:
            self._metrics.generation.set(new.generation)
        logger.info(
            "rules generation %d loaded (%s, %s): %d gateway(s), %d route(s)",
            new.generation,
            trigger,
            digest[:12],
            len(rules.gateways),
            len(rules.routes),
        )
        self._events.emit(
            "config.loaded",
            Severity.INFO,
            generation=new.generation,
            hash=digest,
            files=list(rules.files),
            gateways=sorted(rules.gateways),
            routes=[r.name for r in rules.routes],
            trigger=trigger,
        )
        for listener in self._listeners:
            try:
                listener(new, old)
            except Exception:
                # The snapshot is already serving and can route (binders ran before the
                # swap); a listener failing must not stop the others.
                logger.exception("rules swap listener %r failed", listener)
        return new

    def _refused(self, exc: ConfigError, digest: str, trigger: str) -> ReloadResult:
        previous = self.last_error
        repeated = (
            previous is not None
            and not previous.superseded
            and previous.hash == digest
            and previous.issues == exc.issues
        )
        self._count("failure")
        serving = self._current.generation if self._current is not None else 0
        if repeated:
            # Same refused content again (a touch, a second watch event): the first
            # refusal was already reported; paging on-call again says nothing new.
            logger.info("rules still invalid (%s); generation %d keeps serving", trigger, serving)
        else:
            self.last_error = ReloadError(
                issues=exc.issues, hash=digest, at=self._clock.wall(), trigger=trigger
            )
            logger.error(
                "rules refused (%s); generation %d keeps serving:\n%s", trigger, serving, exc
            )
            self._events.emit(
                "config.rejected",
                Severity.ERROR,
                issues=[i.as_dict() for i in exc.issues],
                trigger=trigger,
                generation=serving,
            )
        return ReloadResult(
            outcome="failure", generation=serving, hash=digest, trigger=trigger, issues=exc.issues
        )

    def _supersede(self) -> None:
        if self.last_error is not None and not self.last_error.superseded:
            self.last_error = dataclasses.replace(self.last_error, superseded=True)

    def _count(self, outcome: Outcome) -> None:
        if self._metrics is not None:
            self._metrics.reloads.labels(outcome).inc()
            self._metrics.last_ok.set(0 if outcome == "failure" else 1)
