"""Notices that the rules on disk may have changed and says so.

Owns: `watch_rules`, which watches the rules *directories* (a single rules file is watched
through its parent directory) and calls `on_change()` after each debounced burst of changes.
Watching directories rather than files is what makes a Kubernetes ConfigMap work: there
`x.yaml -> ..data/x.yaml`, `..data -> ..2026_11_25_13_00_00.123`, and an update renames a new
`..data` symlink over the old one, so no rules file is ever "modified".
Must not: read, parse or compare rules. A change here is only a hint; the store re-reads
everything and skips content whose hash did not change, so a spurious call is harmless and
a missed one is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence

import watchfiles

from proxy.config.load import RULE_SUFFIXES

logger = logging.getLogger(__name__)

OnChange = Callable[[], Awaitable[object]]

#: Entries of a ConfigMap volume's own machinery (`..data`, `..2026_...`): they change
#: when any file of the map changes, so they count for a single watched file too.
_CONFIGMAP_PREFIX = ".."


def watch_targets(paths: Sequence[str | os.PathLike[str]]) -> dict[str, frozenset[str] | None]:
    """Directory to watch -> names in it that matter (None: every entry does)."""
    out: dict[str, frozenset[str] | None] = {}
    for raw in paths:
        path = os.path.abspath(os.fspath(raw))
        # A path that does not exist yet is taken for a directory unless it is named like
        # a rules file: it is watched once it appears.
        is_dir = os.path.isdir(path) or (
            not os.path.exists(path) and not path.endswith(RULE_SUFFIXES)
        )
        if is_dir:
            out[path] = None
            continue
        parent, name = os.path.split(path)
        known = out.get(parent, frozenset())
        if known is not None:
            out[parent] = known | {name}
    return out


def change_filter(
    targets: Mapping[str, frozenset[str] | None],
) -> Callable[[watchfiles.Change, str], bool]:
    def wanted(change: watchfiles.Change, path: str) -> bool:
        parent, name = os.path.split(path)
        names = targets.get(parent, frozenset())
        return names is None or name in names or name.startswith(_CONFIGMAP_PREFIX)

    return wanted


def _identity(path: str) -> tuple[int, int] | None:
    """Which directory `path` is now; changes when it is replaced, None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _notify(on_change: OnChange) -> None:
    try:
        await on_change()
    except Exception:
        # The watcher outlives any one reload; the store reports its own failures.
        logger.exception("rules change handler failed")


async def watch_rules(
    paths: Sequence[str | os.PathLike[str]],
    on_change: OnChange,
    *,
    stop: asyncio.Event,
    debounce_ms: int = 50,
    recheck_ms: int = 1000,
) -> None:
    """Call `on_change()` after changes under `paths` until `stop` is set.

    Every `recheck_ms` the watched directories are checked: one that appeared, vanished or
    was replaced by another directory restarts the watch, followed by one `on_change()`
    because changes may have been missed meanwhile.
    """
    targets = watch_targets(paths)
    wanted = change_filter(targets)
    restarted = False
    waiting = False
    while not stop.is_set():
        seen = {d: _identity(d) for d in targets}
        roots = [d for d, ident in seen.items() if ident is not None]
        if not roots:
            if not waiting:
                logger.warning("no rules directory to watch yet: %s", ", ".join(targets))
                waiting = True
            restarted = True
            await _pause(stop, recheck_ms / 1000)
            continue
        waiting = False
        if restarted:
            await _notify(on_change)
        restarted = True
        try:
            async for changes in watchfiles.awatch(
                *roots,
                watch_filter=wanted,
                debounce=debounce_ms,
                step=min(50, debounce_ms),
                stop_event=stop,
                rust_timeout=recheck_ms,
                yield_on_timeout=True,
                recursive=False,
            ):
                if changes:
                    logger.debug("rules changed: %s", sorted(p for _, p in changes))
                    await _notify(on_change)
                if any(_identity(d) != ident for d, ident in seen.items()):
                    logger.info("a rules directory appeared, vanished or was replaced")
                    break
        except (OSError, RuntimeError) as exc:
            # A directory removed or made unreadable mid-watch; it may come back.
            logger.warning("watching rules failed (%s); retrying", exc)
            await _pause(stop, recheck_ms / 1000)
