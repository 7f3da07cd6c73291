"""The live fleet page a frontend serves at /dashboard/ (see README.md)."""
from turbine.dashboard.service import Dashboard, DashboardConfig

__all__ = ["Dashboard", "DashboardConfig"]
