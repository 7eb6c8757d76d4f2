"""The converter's one error type: its message is one line naming the file, tensor or value."""


class ConvertError(ValueError):
    """A conversion cannot proceed (bad source, bad option, existing destination, I/O failure)."""
