"""Exceptions raised by pretext tasks. Messages are one line naming the task (and epoch / iteration)."""


class PretextError(Exception):
    """Base class for pretext-task problems."""


class UnknownTaskError(PretextError):
    """A task name that is not registered."""


class PretextConfigError(PretextError):
    """A task or backbone configuration that cannot work (bad value, mismatched weights, too few images)."""


class NonFiniteLossError(PretextError):
    """A NaN or infinite loss: names the task, epoch and iteration."""
