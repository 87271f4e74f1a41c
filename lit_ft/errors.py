"""The one exception type lit-ft raises for mistakes a user can fix.

The CLI catches :class:`UserError` and prints its message (problem + hint) without a
traceback, exiting with status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's config, data or files.

    Args:
        problem: what is wrong, naming the offending value.
        hint: how to fix it.
    """

    def __init__(self, problem: str, hint: str | None = None) -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(problem if not hint else f"{problem}\nHINT: {hint}")
