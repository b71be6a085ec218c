"""Errors that mean "the user's input is wrong": shown as one line, no traceback."""


class UserError(Exception):
    """Bad input: a config, a pool, an address. The message names what is wrong."""


class ConfigError(UserError):
    pass


class PoolError(UserError):
    pass


class MergeError(UserError):
    """Ingredients that cannot be merged (names, shapes, dtypes), or a bad merge setting."""


class Interrupted(Exception):
    """A command stopped by a signal after keeping what it finished; the message says what was
    kept and the exact command that continues. The exit code is 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + signum


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT (common/cli.run_main)."""
