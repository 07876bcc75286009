"""Mutations of ``castiron serve`` run as jobs: one thread each, through the engine.

Owns a job's life (running, then succeeded or failed with the error's message and exit code),
its progress lines (the engine's observer), and finding the deployment a job started, so the
dashboard can follow it live. The work itself is a function the routes pass in; it opens its
own engine whose state store records the caller's identity as the actor.

It knows nothing of HTTP (starlette) or rendering.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from castiron.engine.access import Identity
from castiron.errors import CastironError
from castiron.state.base import JsonObject, StateStore

JobState = Literal["running", "succeeded", "failed"]

MAX_JOBS = 200
"""Finished jobs kept in memory (the state store keeps the deployments themselves)."""


@dataclass
class Job:
    """One mutation asked for through the API."""

    id: str
    action: str
    environment: str
    identity: Identity
    state: JobState = "running"
    result: dict[str, Any] | None = None
    error: str | None = None
    exit_code: int | None = None
    error_kind: str | None = None
    deployment: str | None = None
    progress: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "environment": self.environment,
            "identity": self.identity.to_json(),
            "state": self.state,
            "result": self.result,
            "error": None
            if self.error is None
            else {"message": self.error, "exit_code": self.exit_code, "kind": self.error_kind},
            "deployment": self.deployment,
            "progress": list(self.progress),
        }


class JobObserver:
    """The engine's observer for one job: keeps progress lines and spots its deployment."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.store: StateStore | None = None
        self.started = time.monotonic()

    def follow(self, store: StateStore) -> None:
        """The store the job's engine journals in (where its deployment will appear)."""
        self.store = store

    def step(self, step: str, data: JsonObject) -> None:
        if step == "start" and self.store is not None and self.job.deployment is None:
            for row in self.store.list_deployments(self.job.environment, limit=5):
                if row.outcome == "running" and row.actor == self.job.identity.actor:
                    self.job.deployment = row.id
                    break

    def progress(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        self.job.progress.append(f"[{elapsed:6.2f}s] {message}")


class Jobs:
    """Running and recent jobs."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def start(
        self,
        action: str,
        environment: str,
        identity: Identity,
        work: Callable[[JobObserver], dict[str, Any]],
    ) -> Job:
        """Run ``work`` in a new thread as a job and return the job at once."""
        job = Job("j-" + secrets.token_hex(6), action, environment, identity)
        with self._lock:
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.done.is_set()]
            for old in finished[: max(0, len(self._jobs) - MAX_JOBS)]:
                del self._jobs[old.id]
        observer = JobObserver(job)

        def run() -> None:
            try:
                job.result = work(observer)
                job.state = "succeeded"
                found = job.result.get("deployment") if job.result else None
                if job.deployment is None and isinstance(found, str):
                    job.deployment = found
            except CastironError as exc:
                job.state = "failed"
                job.error = str(exc)
                job.exit_code = int(exc.exit_code)
                job.error_kind = type(exc).__name__
            except Exception as exc:  # a bug: keep serving, say so in the job
                job.state = "failed"
                job.error = f"unexpected error (a bug): {type(exc).__name__}: {exc}"
                job.exit_code = 70
                job.error_kind = "InternalError"
            finally:
                job.done.set()

        threading.Thread(target=run, name=f"job-{job.id}", daemon=True).start()
        return job


__all__ = ["MAX_JOBS", "Job", "JobObserver", "JobState", "Jobs"]
