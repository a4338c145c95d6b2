"""How close modeled time is to measured time: device profiles measured on a GPU (profile.py) and
the cost-model fit to them (calibration.py), measured-vs-modeled runs (validate.py); and a serving
engine against measured serving runs: the runs read (real_runs.py), replayed (replay.py, batch.py),
the vllm-v1 engine fitted to them (calibrate.py with surrogate.py and traits.py) and checked
(validate_real.py, report.py).
"""
