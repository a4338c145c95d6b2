"""How close modeled time is to measured time: device profiles measured on a GPU (profile.py) and
the cost-model fit to them (calibration.py), measured-vs-modeled runs (validate.py).
"""
