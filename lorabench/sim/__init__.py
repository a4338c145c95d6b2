"""The serving simulator: SimPy replica, scheduler, memory, executors and metrics."""
