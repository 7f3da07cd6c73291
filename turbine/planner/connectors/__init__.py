"""Where the planner's decisions take effect: worker processes on this machine (`local`), workers
inside `turbine serve` (`inproc`), the fleet simulator (`virtual`), a Kubernetes Deployment per
pool (`kubernetes`), worker actors on a Ray cluster (`ray`). Every connector removes a worker only
by draining it."""
from turbine.planner.connectors.base import Connector

__all__ = ["Connector"]
