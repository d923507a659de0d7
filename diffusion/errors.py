"""The errors that are the user's input, not our bug, in one torch-free module.

Each module raises its own subclass of :class:`UserError` with a one-line message
naming the bad key or file and what is allowed; the ``diffusion`` command prints that
line, without a traceback, and exits non-zero. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input: a params key, a file, a machine that lacks what was asked for."""
