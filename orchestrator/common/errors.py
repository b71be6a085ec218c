"""Errors that mean "the user's input is wrong": shown as one line, no traceback."""


class UserError(Exception):
    """Bad input: a config, a pool, an address. The message names what is wrong."""


class ConfigError(UserError):
    pass


class PoolError(UserError):
    pass


class MergeError(UserError):
    """Ingredients that cannot be merged (names, shapes, dtypes), or a bad merge setting."""
