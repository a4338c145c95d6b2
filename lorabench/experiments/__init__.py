"""One experiment (a workload served by every strategy: runner.py, run.py) and the grids of them:
sweeps over adapter counts (sweep.py), capacity searches (capacity.py, rate_search.py), run in this
process, in local worker processes or as Ray tasks (points.py, ray_backend.py).
"""
