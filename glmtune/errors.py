"""Exception types for errors a user can cause, so the CLI can print one clear line instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class GlmtuneError(Exception):
    """A failure glmtune understands and can explain; the CLI exits 1 with the message."""

    exit_code = 1


class InvalidInputError(GlmtuneError):
    """Bad user input (data file, spec field, checkpoint, URI); the CLI exits 2.

    `where` names the place: ``file.jsonl:12``, a spec field path such as ``spec.method.lora.r``, or a URI.
    """

    exit_code = 2

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def check_fields(owner: Any, checks: Iterable[tuple[str, bool, str]], prefix: str = "") -> None:
    """Raise InvalidInputError for the first failed (field, ok, message) check, naming `prefix + field` and
    the value it had, so validating a settings object reads as one table of rules."""
    for field, ok, message in checks:
        if not ok:
            raise InvalidInputError(f"{message}, got {getattr(owner, field)!r}", where=f"{prefix}{field}")
