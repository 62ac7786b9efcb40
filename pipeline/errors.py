"""The one exception type for bad input that a user must fix (a file, a field, a setting)."""


class InputError(ValueError):
    """Bad input. The message names the file (or config section), the field, what is wrong and the fix."""
