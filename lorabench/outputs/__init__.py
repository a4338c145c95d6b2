"""What runs leave behind and how it is read back: atomic writes (results.py), sweep and capacity
tables (tables.py), results in `vllm bench serve` form (bench_json.py) and the comparison with one
(compare.py), charts (plots.py) and the Markdown report (report.py). Nothing here imports an
experiment.
"""
