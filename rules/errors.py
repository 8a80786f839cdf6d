"""Errors raised by orchestration, sorted by what the worker does with them."""

from __future__ import annotations


class OrchestrationError(Exception):
    """A rule asked for something the transition cannot do (a permanent error)."""


class ObjectNotFoundError(OrchestrationError):
    """A run that a rule needs does not exist."""


class StoreError(Exception):
    """A store operation failed. ``retryable`` tells the worker to retry, then requeue.

    Stores translate their library's exceptions into this once, at the edge, so
    the rules and the validation step never need to know about a database.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
