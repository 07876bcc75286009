"""The one exception tree of castiron.

Every expected failure raises a subclass of :class:`CastironError` that carries what the user
needs to act (a file and line, a digest, an environment). The CLI prints ``error: <message>``
on one line and exits with the class's :attr:`exit_code`; anything that is *not* a
``CastironError`` is a bug and is reported with a traceback.

This module knows nothing else of castiron and imports nothing from it.

::

    CastironError                     exit 1  operation failed
    ├── UsageError                    exit 2  bad flags, arguments or references
    ├── SpecError                     exit 2  castiron.yaml is invalid (carries every issue)
    ├── StateError                    exit 1  the state store cannot be used
    │   ├── StateCorruptError                 not a castiron database, or damaged
    │   ├── SchemaTooNewError                 written by a newer castiron
    │   └── NotFoundError                     a named thing does not exist
    ├── AuditError                    exit 1  the audit chain does not verify
    ├── LockedError                   exit 4  another mutator holds the environment's lock
    ├── PolicyRefusedError            exit 5  a gate or signature policy refused the change
    ├── ImageError                    exit 1  building, storing or reading an image failed
    │   ├── UnsafeArchiveError        exit 2  an archive or layer entry is refused
    │   ├── DigestMismatchError               content does not match its digest
    │   ├── RegistryError                     a registry failed, refused or was unreachable
    │   │   └── RegistryAuthError             the registry wants credentials it did not accept
    │   └── TagConflictError          exit 2  a tag is already bound to another digest
    ├── RuntimeDriverError            exit 1  a runtime (local, docker, ...) failed
    ├── RouterError                   exit 1  the traffic router failed
    ├── AgentError                    exit 1  the host agent is unreachable or refused
    │   └── AgentRefusedError                 the agent answered and refused the request
    └── DeployFailedError             exit 1  a deployment failed and was undone
        └── CanaryAbortedError                a canary failed its analysis or was aborted

Drift is a result, not an exception.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ExitCode(enum.IntEnum):
    """Exit codes of the ``castiron`` command (documented in docs/cli.md)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    DRIFT = 3
    LOCKED = 4
    REFUSED = 5


class CastironError(Exception):
    """Base of every expected failure. ``str(err)`` is the one-line message for users."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(CastironError):
    """Bad flags, arguments or references given on the command line or API."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class SpecIssue:
    """One problem found in a spec file, with where it is."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(CastironError):
    """The spec is invalid. Carries *all* issues found, not only the first."""

    exit_code = ExitCode.USAGE

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues: tuple[SpecIssue, ...] = tuple(issues)
        if not self.issues:
            raise ValueError("SpecError needs at least one issue")
        super().__init__("\n".join(str(i) for i in self.issues))


class StateError(CastironError):
    """The state store cannot be opened, read or written."""


class StateCorruptError(StateError):
    """The state file is not a castiron database or is damaged; it is never re-created."""


class SchemaTooNewError(StateError):
    """The state file was written by a newer castiron than this one."""


class NotFoundError(StateError):
    """A named object (release, image, environment, deployment) does not exist."""

    exit_code = ExitCode.USAGE


class AuditError(CastironError):
    """The audit chain does not verify. ``seq`` names the first bad entry when known."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class LockedError(CastironError):
    """Another mutator holds the environment's lock."""

    exit_code = ExitCode.LOCKED

    def __init__(self, message: str, environment: str) -> None:
        super().__init__(message)
        self.environment = environment


class PolicyRefusedError(CastironError):
    """A policy rule (gate, signature, approval) refused the change. ``rule`` names it."""

    exit_code = ExitCode.REFUSED

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class ImageError(CastironError):
    """Building, storing, reading or exporting an image failed."""


class UnsafeArchiveError(ImageError):
    """An archive or layer entry was refused by the safe unpacker. ``entry`` names it."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, entry: str) -> None:
        super().__init__(message)
        self.entry = entry


class DigestMismatchError(ImageError):
    """Content does not hash to the digest it was stored or referenced under."""


class RegistryError(ImageError):
    """A registry could not be reached, failed, or answered outside the distribution spec."""


class RegistryAuthError(RegistryError):
    """The registry asked for credentials and refused the ones given (or none were found)."""


class TagConflictError(ImageError):
    """A tag is already bound to another digest; tags never move."""

    exit_code = ExitCode.USAGE


class RuntimeDriverError(CastironError):
    """A runtime driver (local processes, Docker, ...) failed."""

    status: int | None = None
    """The HTTP status a runtime's API answered with (a cluster's 404, 409), when it did."""


class RouterError(CastironError):
    """The traffic router failed or refused a configuration."""


class AgentError(CastironError):
    """The host agent is unreachable, failed to start, or refused a request."""


class AgentRefusedError(AgentError):
    """The agent answered and refused the request (its reason is in the message): the
    request was wrong or impossible, not the agent unreachable."""


class DeployFailedError(CastironError):
    """A deployment failed; the environment still serves the previous release."""


class CanaryAbortedError(DeployFailedError):
    """A canary failed its analysis (or was asked to abort); it was undone.

    ``details`` holds the analysis figures, stored with the deployment (outcome ``aborted``).
    """

    outcome = "aborted"

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, Any] = dict(details or {})


__all__ = [
    "AgentError",
    "AgentRefusedError",
    "AuditError",
    "CanaryAbortedError",
    "CastironError",
    "DeployFailedError",
    "DigestMismatchError",
    "ExitCode",
    "ImageError",
    "LockedError",
    "NotFoundError",
    "PolicyRefusedError",
    "RegistryAuthError",
    "RegistryError",
    "RouterError",
    "RuntimeDriverError",
    "SchemaTooNewError",
    "SpecError",
    "SpecIssue",
    "StateCorruptError",
    "StateError",
    "TagConflictError",
    "UnsafeArchiveError",
    "UsageError",
]
