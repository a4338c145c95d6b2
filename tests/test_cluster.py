"""Replicas behind a router (sim/cluster.py): conservation, scaling, routing properties, outputs."""

import json

import numpy as np
import pandas as pd
import pytest

from lorabench.cli import main as cli
from lorabench.experiments.runner import Experiment, RunConfig, run_experiment
from lorabench.sim.cluster import ROUTERS, Router


def config(**kw) -> RunConfig:
    return RunConfig(**{**dict(workload="zipf", n_loras=300, requests=1200, rate=120.0, replicas=4, seed=2), **kw})


@pytest.mark.parametrize("router", ROUTERS)
def test_every_request_is_served_once_by_one_replica(router):
    exp = Experiment.build(config(router=router))
    result = exp.serve("per-lora")
    r = exp.requests
    assert set(np.unique(result.replica)) <= set(range(4)) and (result.replica >= 0).all()
    assert np.isfinite(result.finish_s).all() and (result.first_token_s >= r.arrival_s).all()
    stats = pd.DataFrame(result.replica_stats)
    assert stats["requests"].sum() == len(r)
    for g, row in stats.iterrows():  # each replica's figures are those of the requests routed to it
        mine = result.replica == g
        assert row["requests"] == mine.sum() and row["output_tokens"] == r.output_tokens[mine].sum()
    # every token processed once (no preemption with the reserve policy): prompts plus decode tokens
    steps = result.steps
    assert steps["tokens"].sum() == r.prompt_tokens.sum() + r.output_tokens.sum() - len(r)
    assert (np.diff(steps["start_s"]) >= 0).all()
    for g in range(4):  # a replica runs one step at a time
        mine = steps["replica"] == g
        ends = steps["start_s"][mine] + steps["duration_s"][mine]
        assert (steps["start_s"][mine][1:] >= ends[:-1] - 1e-9).all()


UNIFORM = """
name = "uniform-fixed"
n_loras = 64
[arrival]
kind = "poisson"
[popularity]
kind = "uniform"
[prompt]
kind = "fixed"
value = 200
[output]
kind = "fixed"
value = 100
"""


@pytest.mark.parametrize("strategy", ["single", "per-lora"])
def test_round_robin_on_uniform_traffic_scales_throughput_with_replicas(strategy, tmp_path):
    """Saturated: G replicas at G x the rate serve G x one replica's throughput, within the noise of
    the stream (each replica sees every G-th arrival of a Poisson stream of G x the rate)."""
    workload = tmp_path / "uniform.toml"
    workload.write_text(UNIFORM)
    base = dict(workload=str(workload), router="round-robin", strategies=(strategy,))
    one = run_experiment(RunConfig(**base, rate=500.0, requests=1500), progress=False).set_index("strategy")
    four = run_experiment(RunConfig(**base, rate=2000.0, requests=6000, replicas=4),
                          progress=False).set_index("strategy")
    assert one.loc[strategy, "request_throughput"] < 0.6 * 500  # saturated: the queue grows
    ratio = four.loc[strategy, "output_throughput"] / one.loc[strategy, "output_throughput"]
    assert ratio == pytest.approx(4, rel=0.03)
    assert four.loc[strategy, "load_imbalance"] == pytest.approx(1)  # the same requests, the same tokens


def test_affinity_raises_the_per_lora_hit_rate_over_round_robin_on_zipf_traffic():
    hit = {router: Experiment.build(config(router=router)).serve("per-lora").adapter_hit_rate
           for router in ("round-robin", "affinity")}
    assert hit["affinity"] > hit["round-robin"] + 0.05


def test_least_loaded_and_power_of_two_pick_by_outstanding_tokens():
    loads = [50, 10, 30, 10]
    assert Router("least-loaded", 4).choose(0, 5, loads) == 1
    two = Router("power-of-two", 4, seed=3)
    picks = [two.choose(0, 5, loads) for _ in range(2000)]
    assert 0 not in picks  # the most loaded replica always loses its pair
    assert set(picks) == {1, 2, 3}
    rr = Router("round-robin", 3)
    assert [rr.choose(0, 1, [0, 0, 0]) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_affinity_keeps_adapters_home_and_spills_only_when_home_is_busy():
    router = Router("affinity", 4, slack=0.25)
    homes = [router.home(a) for a in range(2000)]
    assert set(homes) == {0, 1, 2, 3}
    assert max(np.bincount(homes)) / min(np.bincount(homes)) < 1.6  # 64 ring points a replica spread them
    a = homes.index(2)
    assert router.choose(a, 10, [100, 100, 100, 100]) == 2
    assert router.choose(a, 10, [100, 100, 300, 100]) == 0  # home over 1.25 x mean: the least loaded
    # consistent hashing: a fifth replica takes adapters only from the others, never moves one between them
    five = Router("affinity", 5)
    moved = [(h, five.home(a)) for a, h in enumerate(homes) if five.home(a) != h]
    assert moved and all(new == 4 for _, new in moved)


def test_cluster_run_folder_has_replica_records_chart_and_bench(tmp_path):
    out = tmp_path / "run"
    assert cli(["run", "--workload", "zipf", "--n-loras", "64", "--requests", "300", "--replicas", "3",
                "--router", "affinity", "--model", "tiny", "--no-progress", "--out", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["replicas"] == 3).all() and (summary["router"] == "affinity").all()
    for name in summary["strategy"]:
        replicas = pd.read_csv(out / "replicas" / f"{name}.csv")
        requests = pd.read_csv(out / "requests" / f"{name}.csv")
        assert list(replicas["replica"]) == [0, 1, 2]
        assert replicas["requests"].tolist() == requests["replica"].value_counts().sort_index().tolist()
        tokens = replicas["prompt_tokens"] + replicas["output_tokens"]
        row = summary.set_index("strategy").loc[name]
        assert row["load_imbalance"] == pytest.approx(tokens.max() / tokens.mean())
        bench = json.loads((out / "bench" / f"{name}.json").read_text())
        itls = bench["itls"]  # each request's inter-token latencies come from its own replica's steps
        assert [len(x) for x in itls] == (requests["output_tokens"] - 1).tolist()
        assert np.allclose([sum(x) for x in itls], requests["finish_s"] - requests["first_token_s"])
    assert cli(["plot", str(out), "--kind", "replicas"]) == 0
    assert (out / "charts" / "replicas.png").exists()


def test_one_replica_is_the_plain_single_replica_run():
    cfg = config(replicas=1, requests=300)
    summary = run_experiment(cfg, progress=False)
    assert "replicas" not in summary.columns
    routed = run_experiment(config(replicas=2, requests=300), progress=False)
    assert (routed["replicas"] == 2).all()


def test_bad_cluster_settings_name_the_flag(capsys):
    assert cli(["run", "--replicas", "0", "--no-progress"]) == 2
    assert "--replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["run", "--router", "random"])
