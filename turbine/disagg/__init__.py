"""Disaggregated serving, frontend side: when to prefill on a prefill worker, and the prefill leg.

The decode leg is the frontend's ordinary generation (turbine/frontend/generation.py) with the
prefill's KvTransferParams attached; the workers' side is the scheduler's HELD/PULLING states
(turbine/engine/scheduler.py) and the transfer library (turbine/transfer/).
"""
from turbine.disagg.decision import DisaggConfig, Decision, decide
from turbine.disagg.prefill import PrefillLeg, PrefillResult

__all__ = ["Decision", "DisaggConfig", "PrefillLeg", "PrefillResult", "decide"]
