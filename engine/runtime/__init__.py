"""The runtime: binds plans to a backend and runs them.

executor     a step plan bound to arrays, run by one loop (eager, or captured and replayed)
streaming    the ring of slots streamed weights are fetched into
calibration  the device's measured costs, for the offload pass
"""
