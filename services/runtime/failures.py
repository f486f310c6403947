"""How a failure reaches the user: one line naming the role (no Ray import: local mode uses it too)."""

from __future__ import annotations


class RoleFailure(RuntimeError):
    """The job cannot go on: one line naming the role, the member and the cause."""


def first_line(e: BaseException) -> str:
    """`Type: last line` of an exception, unwrapping Ray's task errors to their cause."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
