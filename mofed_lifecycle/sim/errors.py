"""The simulated kernel's refusal, in a module of its own: the stand-in tools catch it without
importing the kernel client (socket, subprocess, json), which `modinfo` (files only) never needs."""

from __future__ import annotations


class SimKernelError(OSError):
    """The simulated kernel refused a request; errno and message as a real kernel would give."""
