"""The one way a user error reaches the user: a short paragraph and exit code 2.

Raise ``RsvcError(problem, fix)`` anywhere below ``stages``; the CLI catches it, prints
``problem`` and ``fix`` as one paragraph and exits with ``EXIT_USER_ERROR``. Set
``RSVC_DEBUG=1`` (or pass ``--debug``) to see the traceback instead.
"""

from __future__ import annotations

import re

EXIT_USER_ERROR = 2


class RsvcError(Exception):
    """A problem the user can fix: what went wrong, and what to do about it."""

    def __init__(self, problem: str = "", fix: str = "", message: str | None = None):
        # `message=` is how torch's DataLoader rebuilds an exception raised in a worker process.
        self.problem = (problem or message or "").strip()
        self.fix = fix.strip()
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem} {self.fix}".strip()


def clip(text: str, limit: int = 240) -> str:
    """The start of another library's message, cut at a sentence end (or failing that a word) so a
    paragraph never ends mid-sentence: whole sentences up to `limit` characters."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())  # without terminal colour codes
    if len(text) <= limit:
        return text.rstrip(".")
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind("; "))
    if end > limit // 3:
        return head[:end]
    return head.rsplit(" ", 1)[0].rstrip(",;:(") + " ..."
