"""The one error type of the data layer."""


class DataError(ValueError):
    """Data cannot be read, prepared or loaded.

    The message is one line: the path involved, what is wrong and what to do.
    Command-line entry points turn it into exit status BAD_INPUT.
    """
