"""Errors frzcompile raises on bad input. Each message says what was wrong and what to do instead."""


class FrzError(Exception):
    """Base class of every error frzcompile raises on purpose."""


class CaptureError(FrzError):
    """Neither torch.fx.symbolic_trace nor torch.export could capture the model."""

    def __init__(self, message, attempts=()):
        super().__init__(message)
        self.attempts = list(attempts)  # [(method, "ExcType: message"), ...]


class InputMismatchError(FrzError, ValueError):
    """The example inputs (or a later call's inputs) do not fit the model or the captured graph."""


class UnitError(FrzError, KeyError):
    """A unit name that does not exist, or a unit selection that cannot be used."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PlanError(FrzError, ValueError):
    """A freeze plan that cannot run, such as one freezing every unit."""


class PolicyError(FrzError, ValueError):
    """An unknown policy or invalid policy options."""
