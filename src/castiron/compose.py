"""The composition root: the one place that builds an :class:`~castiron.engine.deploy.Engine`
from settings, for the CLI, the API and the Terraform provider alike.

Owns wiring: the state store (SQLite or PostgreSQL), the image store, the host agent's client
(started on first use, and only when a command needs the runtime or the router), the drivers by
runtime (``local`` is the local process runtime; the others come from
:mod:`castiron.engine.runtimes`) and the traffic controller. Read commands get an engine that
never starts the agent.

It knows nothing of click or of rendering; it does not read the process environment (the
settings carry what was captured at the edge). It sits above the engine: the engine never
imports it (an import-linter contract says so).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from castiron.agent.client import AgentClient
from castiron.agent.lifecycle import agent_pid, ensure_agent, socket_path
from castiron.drivers.base import Driver, LogSource
from castiron.engine.deploy import Engine
from castiron.engine.journal import StepObserver
from castiron.engine.runtimes import (
    AVAILABLE_RUNTIMES,
    RuntimeTraffic,
    runtime_driver,
    runtime_prober,
)
from castiron.engine.strategies import LOG_LINES
from castiron.errors import CastironError
from castiron.model import ImageRef, Instance
from castiron.settings import Settings
from castiron.state.base import StateStore
from castiron.state.store import open_state
from castiron.traffic.controller import AgentTraffic, TrafficController

if TYPE_CHECKING:
    from castiron.engine.driftwatch import DriftWatches
    from castiron.engine.resolve import DriftRules, ResolvedSpec
    from castiron.images.store import ImageStore


class _Agent:
    """The agent client, made (and the agent started) on first use."""

    def __init__(self, settings: Settings, start: bool) -> None:
        self._settings = settings
        self._start = start
        self._client: AgentClient | None = None

    def __call__(self) -> AgentClient:
        if self._client is None:
            if not self._start:
                self._client = AgentClient(socket_path(self._settings), timeout=5.0)
            elif agent_pid(self._settings):
                # A running agent holds its lock and has written its pid: no need to ping it
                # first (one round trip less); a call to an agent that is just stopping fails
                # with AgentError like any call to a vanished agent would.
                self._client = AgentClient(socket_path(self._settings))
            else:
                self._client = ensure_agent(self._settings)
        return self._client


def local_driver(
    settings: Settings,
    agent: Callable[[], AgentClient],
    notice: Callable[[str], None] | None = None,
) -> Driver:
    """The local process runtime for ``settings.home``, reaching the agent through ``agent``;
    ``notice`` hears what the host cannot do (limits it does not enforce)."""
    from castiron.drivers.local import LocalDriver, SandboxPolicy, find_bwrap

    def unpack(image: ImageRef, target: Path) -> None:
        # Imported on use: only the first deployment of an image unpacks it (tarfile, gzip).
        from castiron.engine.baselines import certify_tree
        from castiron.images.rootfs import unpack_release

        unpack_release(image.store, image.digest, target)
        # Every later reuse of the tree is checked against this baseline first.
        with contextlib.suppress(CastironError):  # without one, the next check is in full
            certify_tree(target)

    path = settings.environ.get("PATH", os.defpath)
    return LocalDriver(
        agent=agent(),
        releases_dir=settings.releases_path,
        unpack=unpack,
        sandbox=SandboxPolicy(bwrap=find_bwrap(path)),
        notice=notice,
    )


def drift_dir(settings: Settings) -> Path:
    """Where filesystem baselines of instances are kept (``CASTIRON_HOME/drift``)."""
    return settings.home / "drift"


def driver_factory(
    settings: Settings,
    agent: Callable[[], AgentClient],
    store: StateStore,
    *,
    verify_trees: bool = False,
    notice: Callable[[str], None] | None = None,
) -> Callable[[str], Driver]:
    """Drivers by runtime name, each built once. A local release tree is checked before it is
    reused (fast; every file re-hashed with ``verify_trees``); ``notice`` hears when a tree
    had to be unpacked again.

    Raises (from the returned callable):
        UsageError: when the runtime is not available.
    """
    built: dict[str, Driver] = {}

    def driver_for(runtime: str) -> Driver:
        if runtime not in built:
            if runtime == "local":
                from castiron.engine.baselines import BaselineDriver

                inner = local_driver(settings, agent, notice)
                built[runtime] = BaselineDriver(
                    inner, drift_dir(settings), verify=verify_trees, notice=notice
                )
            else:
                built[runtime] = runtime_driver(runtime, settings, store)
        return built[runtime]

    return driver_for


@contextlib.contextmanager
def open_engine(
    settings: Settings,
    *,
    observer: StepObserver | None = None,
    start_agent: bool = True,
    verify_trees: bool = False,
) -> Iterator[Engine]:
    """An engine for ``settings`` (its state store is closed on exit).

    With ``start_agent=False`` the agent is only talked to if it already runs (read commands).
    With ``verify_trees`` a local release tree is re-hashed in full before it is reused.

    Raises:
        StateError: when the state store cannot be opened.
    """
    store = open_state(settings)
    agent = _Agent(settings, start_agent)

    driver_for = driver_factory(
        settings,
        agent,
        store,
        verify_trees=verify_trees,
        notice=observer.progress if observer is not None else None,
    )

    def traffic() -> TrafficController:
        # Each environment's runtime decides: the host agent's router, or (Kubernetes) the
        # environment's Service selector.
        return RuntimeTraffic(store, lambda: AgentTraffic(agent()), driver_for)

    def instance_logs(instance: Instance) -> str:
        if instance.runtime != "local":
            driver = driver_for(instance.runtime)
            if isinstance(driver, LogSource):  # Docker: the engine keeps the output
                return driver.logs(instance, LOG_LINES)
        return agent().instance_logs(instance.id, LOG_LINES)

    try:
        yield Engine(
            store=store,
            images=lambda: _image_store(settings),
            driver_for=driver_for,
            traffic=traffic,
            environ=settings.environ,
            observer=observer,
            instance_logs=instance_logs,
            prober=runtime_prober(driver_for),
            os_user=settings.os_user,
            drift_watches=lambda: drift_watches(settings),
        )
    finally:
        store.close()


def _image_store(settings: Settings) -> ImageStore:
    from castiron.images.store import ImageStore

    return ImageStore(settings.images_path)


def agent_running(settings: Settings) -> AgentClient | None:
    """A client of the agent when it runs (never starts one)."""
    if agent_pid(settings) is None:  # no agent holds the lock: nothing to ask
        return None
    client = AgentClient(socket_path(settings), timeout=5.0)
    return client if client.health() else None


def revive_agent(settings: Settings, engine: Engine, environment: str | None = None) -> bool:
    """Start the host agent when it is not running although an environment (``environment``,
    or any) is deployed: its routers and the supervision of local instances live in it, so after
    it died (kill -9, out of memory) nothing serves until it is back. It adopts the instances
    still running and restores the routes it recorded. Returns True when it started it.

    Raises:
        AgentError: when the agent cannot be started.
    """
    if agent_running(settings) is not None:
        return False
    names = (
        [environment]
        if environment is not None
        else [e.name for e in engine.store.list_environments()]
    )
    rows = [engine.store.get_environment(name) for name in names]
    if not any(row is not None and row.current_release is not None for row in rows):
        return False
    ensure_agent(settings)
    return True


def resolved_spec(settings: Settings) -> ResolvedSpec:
    """The settings' spec file, resolved, with the result cached under
    ``CASTIRON_HOME/cache`` (see :func:`~castiron.engine.resolve.cached_resolve_spec`).

    Raises:
        SpecError: when the spec cannot be read or does not validate.
    """
    from castiron.engine.resolve import cached_resolve_spec

    return cached_resolve_spec(settings.spec_path, settings.environ, settings.home / "cache")


def drift_watches(settings: Settings) -> DriftWatches:
    """What keeps the host agent's drift watches for ``settings`` (imported on use: a read
    command never needs it). It talks to a running agent only and never starts one: an agent
    that is not running has no watch to keep."""
    from castiron.engine.driftwatch import DriftWatches, watch_command

    return DriftWatches(
        agent=lambda: AgentClient(socket_path(settings), timeout=5.0),
        command=watch_command(settings),
    )


def drift_rules(settings: Settings, environment: str) -> DriftRules:
    """The ``drift`` section of ``environment`` in the settings' resolved spec (defaults
    without a spec file or without that environment in it).

    Raises:
        SpecError: when the spec file exists but does not validate.
    """
    from castiron.engine.resolve import DriftRules

    if not settings.spec_path.is_file():
        return DriftRules()
    env = resolved_spec(settings).environments.get(environment)
    return DriftRules() if env is None else env.drift


__all__ = [
    "AVAILABLE_RUNTIMES",
    "agent_running",
    "drift_dir",
    "drift_rules",
    "drift_watches",
    "driver_factory",
    "local_driver",
    "open_engine",
    "resolved_spec",
    "revive_agent",
]
