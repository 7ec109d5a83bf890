"""Errors frzcompile raises on purpose. Each message says what was wrong and what to do instead."""
import math
import numbers
import sys

# packages whose frames a warning from an optimizer step's hook passes over to reach the user's code
WRAPPER_PACKAGES = frozenset({"frzcompile", "torch", "accelerate", "lightning", "pytorch_lightning",
                              "lightning_fabric"})


class FrzError(Exception):
    """Base class of every error frzcompile raises on purpose."""


class ConfigError(FrzError, ValueError, TypeError):
    """An option of `optimize`, a config dataclass or the torch.compile backend that cannot be used.

    It is also a ValueError and a TypeError, so code written against the built-in exceptions keeps working."""


class CaptureError(FrzError):
    """No capture method (torch.fx.symbolic_trace, torch.export, a recording of one call) could capture the model
    for analysis."""

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


def check_number(where: str, name: str, value, low=None, high=None, *, integer=False, low_open=False,
                 high_open=False, none=False, error=ConfigError):
    """`value` as a float (an int with `integer`) if it is a real number within [low, high] (open ends where
    said), else `error` naming the option (a string, a bool, NaN or None where none is allowed)."""
    if value is None and none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)  # (numpy's too)
    if ok and integer and not (math.isfinite(value) and float(value) == int(value)):
        ok = False
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        span = "" if low is None and high is None else \
            f" in {opening}{'-inf' if low is None else low}, {'inf' if high is None else high}{closing}"
        raise error(f"{where}: {name} must be {kind}{span}" + (" or None" if none else "") + f", got {value!r}")
    return int(value) if integer or isinstance(value, numbers.Integral) else float(value)


def check_policy_number(where: str, name: str, value, low=None, high=None, **how):
    """`check_number` for a policy's or the safety rules' options: a PolicyError."""
    return check_number(where, name, value, low, high, error=PolicyError, **how)


def caller_stacklevel() -> int:
    """The `stacklevel` (for `warnings.warn` in the caller) that points a warning at the first frame outside
    frzcompile, torch and the training wrappers that call torch's optimizers (a warning raised from a hook torch
    calls: an optimizer step's, whose wrappers torch, accelerate or Lightning may change)."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] not in WRAPPER_PACKAGES:
            return level
        frame, level = frame.f_back, level + 1
    return 1
