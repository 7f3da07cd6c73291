"""Fleet simulation: the frontend's router and the mocker's engine core on a virtual clock."""
from __future__ import annotations

from turbine.sim.simulator import SimConfig, SimResult, SimStats, Simulator, make_router, simulate

__all__ = ["SimConfig", "SimResult", "SimStats", "Simulator", "make_router", "simulate"]
