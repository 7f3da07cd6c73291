"""Profiler: measure an engine's step times into the mocker's timing profile, and check that the
mocker loaded with it behaves like the engine (fidelity). torch is imported only by the functions
that drive the built-in engine.
"""
from __future__ import annotations

from turbine.profiler.profile import (
    DEFAULT_GRID,
    QUICK_GRID,
    CoreLimits,
    ProfileGrid,
    Profiler,
    profile_core,
)

__all__ = ["DEFAULT_GRID", "QUICK_GRID", "CoreLimits", "ProfileGrid", "Profiler", "profile_core"]
