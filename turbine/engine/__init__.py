"""Engine core shared by every Turbine engine: sequences, the KV block manager and the scheduler.

The built-in PyTorch engine (an extra) and the mocker both execute the steps this scheduler
plans; nothing in this package imports torch except ``turbine.engine.models`` and the runner.
"""
