"""The lifecycle's step failure, shared by the steps and the runner."""

from __future__ import annotations


class StepFailed(RuntimeError):
    """A step that could not do its job; the message says what happened and what to do next."""
