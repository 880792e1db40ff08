"""The exceptions the engine raises for things a user can fix.

Every message says what was wrong, where (the file, when there is one) and what to do about it, so
that a front end can show it as is, without a traceback.
"""


class NextStepError(ValueError):
    """Bad input: a wrong file, a wrong size, a wrong setting."""


class CheckpointError(NextStepError):
    """A model or VAE file/folder that is missing, truncated, of the wrong kind or inconsistent."""


class GenerationCancelled(RuntimeError):
    """Raised inside the token loop when the caller's cancellation check says stop.

    The model holds no state between calls, so it is ready for the next generation right away.
    """
