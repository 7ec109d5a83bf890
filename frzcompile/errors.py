"""Errors frzcompile raises on purpose. Each message says what was wrong and what to do instead."""


class FrzError(Exception):
    """Base class of every error frzcompile raises on purpose."""


class ConfigError(FrzError, ValueError, TypeError):
    """An option of `optimize`, a config dataclass or the torch.compile backend that cannot be used.

    It is also a ValueError and a TypeError, so code written against the built-in exceptions keeps working."""


class CaptureError(FrzError):
    """Neither torch.fx.symbolic_trace nor torch.export could capture the model for analysis."""

    def __init__(self, message, attempts=()):
        super().__init__(message)
        self.attempts = list(attempts)  # [(method, "ExcType: message"), ...]


class InputMismatchError(FrzError, ValueError):
    """The example inputs do not fit the model."""


class UnitError(ConfigError, KeyError):
    """A unit name that does not exist, or a unit selection that cannot be used."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PlanError(FrzError, ValueError):
    """A freeze plan that cannot run, such as one freezing every unit."""


class PolicyError(ConfigError):
    """An unknown policy or invalid policy options."""


class CacheError(FrzError, RuntimeError):
    """The activation cache met a call it cannot serve faithfully and can no longer step aside for."""
