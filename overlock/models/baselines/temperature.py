"""Temperature annealing of ODConv (30 -> 1) and KernelWarehouse (1 -> 0) attention, as the official recipes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..kernelwarehouse import KWConv2d
from ..odconv import ODConv2d

__all__ = ["TemperatureSchedule", "temperature_schedule", "set_temperature", "anneal_temperature", "ODCONV_SCHEDULE",
           "ODCONV_MOBILENET_SCHEDULE", "KW_SCHEDULE", "KW_MOBILENET_SCHEDULE"]


@dataclass(frozen=True)
class TemperatureSchedule:
    """Linear annealing from ``start`` to ``end`` over the first ``epochs`` of a ``recipe_epochs`` recipe.

    With ``total_epochs`` shorter than the recipe, the span shrinks to the same share of training
    (``epochs * total_epochs / recipe_epochs``), so a short demo run still ends at the final temperature.
    """

    start: float
    end: float
    epochs: float
    recipe_epochs: int

    def span(self, total_epochs: float | None = None) -> float:
        if total_epochs is None:
            return float(self.epochs)
        return min(float(self.epochs), self.epochs * float(total_epochs) / self.recipe_epochs)

    def at(self, epoch: float, span: float) -> float:
        """Temperature after ``epoch`` (fractional) epochs of an anneal lasting ``span`` epochs."""
        if span <= 0:
            return self.end
        return self.end + (self.start - self.end) * max(0.0, 1.0 - float(epoch) / span)

    def value(self, epoch: float, total_epochs: float | None = None) -> float:
        return self.at(epoch, self.span(total_epochs))


ODCONV_SCHEDULE = TemperatureSchedule(start=30.0, end=1.0, epochs=10, recipe_epochs=100)
ODCONV_MOBILENET_SCHEDULE = TemperatureSchedule(start=30.0, end=1.0, epochs=10, recipe_epochs=150)
KW_SCHEDULE = TemperatureSchedule(start=1.0, end=0.0, epochs=20, recipe_epochs=300)
KW_MOBILENET_SCHEDULE = TemperatureSchedule(start=1.0, end=0.0, epochs=15, recipe_epochs=150)


def temperature_schedule(model: nn.Module) -> TemperatureSchedule | None:
    """The schedule of the first dynamic-convolution network inside ``model`` (wrappers, detectors, EMA)."""
    for m in model.modules():
        schedule = getattr(m, "temperature_schedule", None)
        if isinstance(schedule, TemperatureSchedule):
            return schedule
    return None


def set_temperature(model: nn.Module, value: float) -> int:
    """Set the temperature of every dynamic convolution in ``model``; returns how many were set."""
    count = 0
    for m in model.modules():
        if isinstance(m, (ODConv2d, KWConv2d)):
            m.set_temperature(value)
            count += 1
    return count


def anneal_temperature(model: nn.Module, epoch: float, total_epochs: float | None = None) -> float | None:
    """Set the published temperature for ``epoch``; returns it, or None if ``model`` has no dynamic convs."""
    schedule = temperature_schedule(model)
    if schedule is None:
        return None
    value = schedule.value(epoch, total_epochs)
    set_temperature(model, value)
    return value
