"""The one error type the user sees: its message is a complete sentence saying what is wrong and what is allowed."""


class WanError(Exception):
    """A problem with the user's input, model files or environment (not a bug in the engine)."""


class Cancelled(Exception):
    """Raised inside a generation when its cancel token was set; the run frees its arrays and writes nothing."""
