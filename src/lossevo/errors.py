"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class LossevoError(Exception):
    """A user-facing problem (bad parameter, missing file, bad spec): message names the culprit."""
