"""Every error meant for the user, in one place.

Each message is one line naming the file, field or value at fault and what was expected. The CLI
catches `MixtralError` once (cli/dispatch.py) and prints that line; any other exception is a bug and
keeps its traceback. They are `ValueError`s, so callers that only care about bad input can catch
that. Warnings (`MixtralWarning`) are one line too; the CLI prints them as `... warning: ...`.
"""

from __future__ import annotations


class MixtralError(ValueError):
    """A problem with what the user gave (a file, a model, an option, a conversation)."""

    exit_status = 1  # what a command exits with when this ends it


class OptionError(MixtralError):
    """An option or input value outside what it may be (temperature, max_tokens, token ids, ...).
    `option` names the keyword at fault, so a CLI can name its own flag instead."""

    exit_status = 2  # a usage error, like argparse's

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class ConfigError(MixtralError):
    """A config file names an unsupported model or lacks a required field."""


class WeightsError(MixtralError):
    """A weight file or index is missing, truncated or corrupt."""


class LoadError(MixtralError):
    """A model cannot be loaded (not found, wrong tensors, does not fit)."""


class TokenizerError(MixtralError):
    """A tokenizer cannot be loaded from its files."""


class ChatTemplateError(MixtralError):
    """The chat format refuses a conversation, or a chat template is unknown or broken."""


class ContextLimitError(MixtralError):
    """The prompt (or conversation) does not fit in the model's context."""


class CacheFileError(MixtralError):
    """A saved prompt cache or chat session cannot be read or written."""


class ConvertError(MixtralError):
    """A conversion cannot proceed (bad source, bad option, unsafe destination, I/O failure)."""


class ShardError(MixtralError):
    """The model cannot be split over this many ranks."""


class DistributedError(MixtralError):
    """The ranks of a distributed group cannot go on together; the message names this rank."""


class SchemaError(OptionError):
    """A JSON schema or tool definition is invalid, or uses a feature constrained decoding cannot enforce."""


class MixtralWarning(UserWarning):
    """Something the user should know that does not stop the work (a one-line message)."""


class KernelFallbackWarning(MixtralWarning):
    """A fused Metal kernel was rejected on this machine; the message says why and what runs instead."""
