"""The one exception type qframe raises for bad input.

Every message is a single line that names the bad value and says what would be valid, so the
command line can print it as it is.
"""


class QFrameError(ValueError):
    """Bad input to qframe: a config value, a name, a path, a data set or a checkpoint."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def one_of(what: str, value, valid) -> QFrameError:
    """Error for ``value`` not in ``valid``: "unknown model 'x'; valid: a, b, c"."""
    return QFrameError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")
