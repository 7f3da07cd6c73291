"""A simulated engine: the real scheduler and KV block manager, a timing model for the forward.

``MockerCore`` is the synchronous step logic (for simulators on a virtual clock);
``MockEngine`` runs it in real time behind ``turbine.engine.base.Engine``.
"""
from __future__ import annotations

from turbine.engine.step import StepOutput, StepResult
from turbine.mocker.core import MockerConfig, MockerCore
from turbine.mocker.engine import MockEngine
from turbine.mocker.timing import PolynomialTiming, ProfileTiming, TimingModel

__all__ = [
    "MockEngine",
    "MockerConfig",
    "MockerCore",
    "PolynomialTiming",
    "ProfileTiming",
    "StepOutput",
    "StepResult",
    "TimingModel",
]
