"""Workload generation against theory: arrival processes, popularity laws, lengths, and bad input."""

import numpy as np
import pytest
from scipy import stats

from lorabench.errors import LorabenchError
from lorabench.workload import builtin_workloads, load_workload, workload_from_dict


def make(arrival=None, popularity=None, n_loras=64, requests=20_000, seed=0, **tables):
    data = {"n_loras": n_loras, "requests": requests, "seed": seed}
    if arrival:
        data["arrival"] = arrival
    if popularity:
        data["popularity"] = popularity
    data.update(tables)
    return workload_from_dict(data, source="test.toml")


def test_every_shipped_workload_loads_and_generates():
    assert {"zipf", "uniform", "bursty", "slora", "paper", "offline"} <= set(builtin_workloads())
    for name in builtin_workloads():
        w = load_workload(name, requests=50)
        r = w.generate()
        assert 0 < len(r) <= 50
        assert np.all(np.diff(r.arrival_s) >= 0)
        assert r.adapter.min() >= 0 and r.adapter.max() < w.n_loras
        assert r.prompt_tokens.min() >= 1 and r.output_tokens.min() >= 1


def test_same_seed_same_stream_and_different_seeds_differ():
    a, b = load_workload("zipf", seed=3).generate(), load_workload("zipf", seed=3).generate()
    c = load_workload("zipf", seed=4).generate()
    for field in ("arrival_s", "adapter", "prompt_tokens", "output_tokens"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
        assert not np.array_equal(getattr(a, field), getattr(c, field))


def test_poisson_counts_and_gaps():
    rate, n = 50.0, 100_000
    t = make({"kind": "poisson", "rate": rate}, requests=n, seed=1).generate().arrival_s
    gaps = np.diff(np.concatenate([[0.0], t]))
    # mean and variance of exponential gaps, within 4 standard errors
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / np.sqrt(n)
    assert abs(gaps.var() - 1 / rate**2) < 4 * np.sqrt(8 / n) / rate**2
    # counts per 1 s window: Poisson(rate), so the dispersion statistic is chi-square(m - 1)
    counts = np.bincount(t[t < np.floor(t[-1])].astype(int))
    m = len(counts)
    dispersion = ((counts - counts.mean()) ** 2).sum() / counts.mean()
    assert stats.chi2.sf(dispersion, m - 1) > 1e-3 and stats.chi2.cdf(dispersion, m - 1) > 1e-3
    assert abs(counts.mean() - rate) < 4 * np.sqrt(rate / m)


@pytest.mark.parametrize("shape", [0.25, 1.0, 4.0])
def test_gamma_gaps_have_the_right_mean_and_burstiness(shape):
    rate, n = 20.0, 100_000
    t = make({"kind": "gamma", "rate": rate, "burstiness": shape}, requests=n, seed=2).generate().arrival_s
    gaps = np.diff(np.concatenate([[0.0], t]))
    mean, var = 1 / rate, 1 / (shape * rate**2)
    fourth = 3 * (shape + 2) * var**2 / shape  # E(x - mu)^4 of a gamma: 3k(k + 2) theta^4
    assert abs(gaps.mean() - mean) < 4 * np.sqrt(var / n)
    assert abs(gaps.var() - var) < 4 * np.sqrt((fourth - var**2) / n)
    # and the gaps follow that gamma law
    assert stats.kstest(gaps, stats.gamma(shape, scale=mean / shape).cdf).pvalue > 1e-3
    # counts in windows of W seconds: a renewal process has mean rate W and variance ~ rate W CV^2
    window = 10.0
    counts = np.bincount((t[t < window * np.floor(t[-1] / window)] / window).astype(int))
    m, cv2 = len(counts), 1 / shape
    assert abs(counts.mean() - rate * window) < 4 * np.sqrt(rate * window * cv2 / m)
    assert abs(counts.var() / (rate * window * cv2) - 1) < 4 * np.sqrt(2 / (m - 1)) + 0.05


def test_constant_and_offline_arrivals():
    t = make({"kind": "constant", "rate": 4.0}, requests=9).generate().arrival_s
    assert np.allclose(t, np.arange(1, 10) * 0.25)
    assert not make({"kind": "offline"}, requests=9).generate().arrival_s.any()


def test_duration_cuts_the_stream():
    r = make({"kind": "poisson", "rate": 10.0}, requests=10_000, duration=30.0).generate()
    assert r.arrival_s.max() <= 30.0 and abs(len(r) - 300) < 4 * np.sqrt(300)


def chi_square_ok(counts, probs):
    expected = probs * counts.sum()
    return stats.chisquare(counts, expected).pvalue > 1e-3


def test_zipf_frequencies_match_theory():
    n_loras, alpha = 40, 1.2
    w = make(popularity={"kind": "zipf", "alpha": alpha, "shuffle": False}, n_loras=n_loras, requests=200_000)
    counts = np.bincount(w.generate().adapter, minlength=n_loras)
    k = np.arange(1, n_loras + 1, dtype=float)
    assert chi_square_ok(counts, k**-alpha / (k**-alpha).sum())


def test_zipf_hot_ids_are_shuffled_by_seed():
    runs = [make(popularity={"kind": "zipf", "alpha": 1.0}, n_loras=500, requests=20_000, seed=s).generate()
            for s in (0, 1)]
    hot = [np.bincount(r.adapter, minlength=500).argmax() for r in runs]
    assert hot[0] != hot[1]
    p1 = 1 / (1 / np.arange(1, 501)).sum()  # probability of the hottest adapter
    top = np.bincount(runs[0].adapter).max() / 20_000
    assert abs(top - p1) < 4 * np.sqrt(p1 * (1 - p1) / 20_000)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_slora_power_frequencies_match_theory(alpha):
    n_loras = 30
    w = make(popularity={"kind": "slora-power", "alpha": alpha}, n_loras=n_loras, requests=200_000)
    counts = np.bincount(w.generate().adapter, minlength=n_loras)
    edges = (np.arange(n_loras + 1) / n_loras) ** alpha  # P(x < k / N) for x ~ power(alpha)
    assert chi_square_ok(counts, np.diff(edges))


def test_uniform_popularity_and_lengths():
    w = make(popularity={"kind": "uniform"}, n_loras=25, requests=100_000,
             prompt={"kind": "uniform", "lo": 8, "hi": 512}, output={"kind": "fixed", "value": 7})
    r = w.generate()
    assert chi_square_ok(np.bincount(r.adapter, minlength=25), np.full(25, 1 / 25))
    assert r.prompt_tokens.min() == 8 and r.prompt_tokens.max() == 511
    assert chi_square_ok(np.bincount(r.prompt_tokens - 8, minlength=504), np.full(504, 1 / 504))
    assert np.all(r.output_tokens == 7)


def test_lognormal_lengths_median_and_clipping():
    spec = {"kind": "lognormal", "median": 200, "sigma": 0.7, "min": 20, "max": 900}
    r = make(prompt=spec, requests=100_000).generate()
    assert r.prompt_tokens.min() >= 20 and r.prompt_tokens.max() <= 900
    # P(len <= 200) = 1/2 up to rounding at the median itself
    assert abs((r.prompt_tokens < 200).mean() - 0.5) < 0.01
    # the clipped mass at the top matches the lognormal tail
    tail = stats.lognorm(0.7, scale=200).sf(899.5)
    assert abs((r.prompt_tokens == 900).mean() - tail) < 4 * np.sqrt(tail / 100_000) + 1e-4


def test_adapter_rank_mix_and_clusters():
    w = make(n_loras=4000, adapters={"ranks": [8, 16, 32, 64]})
    ranks = w.adapter_ranks()
    assert set(np.unique(ranks)) == {8, 16, 32, 64}
    assert chi_square_ok(np.unique(ranks, return_counts=True)[1], np.full(4, 0.25))
    assert w.adapters.clusters == 32  # one per 128 adapters by default
    sizes = np.bincount(w.adapter_clusters())
    assert len(sizes) == 32 and sizes.max() - sizes.min() <= 1


def test_trace_replay(tmp_path):
    rows = [(0.5, 2, 10, 3), (0.1, 0, 20, 4), (0.9, 1, 30, 5)]
    (tmp_path / "t.csv").write_text("arrival_s,adapter,prompt_tokens,output_tokens\n"
                                    + "".join(f"{a},{b},{c},{d}\n" for a, b, c, d in rows))
    (tmp_path / "w.toml").write_text(
        'n_loras = 3\n[arrival]\nkind = "trace"\n[popularity]\nkind = "trace"\n[prompt]\nkind = "trace"\n'
        '[output]\nkind = "trace"\n[trace]\npath = "t.csv"\n')
    r = load_workload(str(tmp_path / "w.toml")).generate()
    # replayed in arrival order, each row's columns kept together
    got = list(zip(r.arrival_s.tolist(), r.adapter.tolist(), r.prompt_tokens.tolist(), r.output_tokens.tolist()))
    assert got == sorted(rows)


@pytest.mark.parametrize("text, words", [
    ("n_loras = 0", ["bad.toml", "n_loras"]),
    ("[arrival]\nkind = \"weird\"", ["bad.toml", "[arrival] kind", "weird"]),
    ("[arrival]\nrate = -3.0", ["bad.toml", "[arrival] rate"]),
    ("[popularity]\nkind = \"zipf\"\nalpha = \"high\"", ["bad.toml", "[popularity] alpha"]),
    ("[prompt]\nkind = \"uniform\"\nlo = 50\nhi = 10", ["bad.toml", "[prompt] lo, hi"]),
    ("[adapters]\ntarget_modules = [\"qq_proj\"]", ["bad.toml", "target_modules", "qq_proj"]),
    ("speed = 3", ["bad.toml", "unknown field", "speed"]),
    ("[arrival\nkind=1", ["bad.toml", "malformed TOML"]),
    ("[arrival]\nkind = \"trace\"", ["bad.toml", "[trace] path"]),
])
def test_bad_workloads_name_file_and_field(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(LorabenchError) as err:
        load_workload(str(path))
    for word in words:
        assert word in str(err.value)


def test_trace_with_missing_column_names_it(tmp_path):
    (tmp_path / "t.csv").write_text("arrival_s,adapter,prompt_tokens\n0.1,0,3\n")
    (tmp_path / "w.toml").write_text('[arrival]\nkind = "trace"\n[trace]\npath = "t.csv"\n')
    with pytest.raises(LorabenchError, match="t.csv: missing column.*output_tokens"):
        load_workload(str(tmp_path / "w.toml")).generate()


def test_unknown_workload_name():
    with pytest.raises(LorabenchError, match="unknown workload 'nope'.*zipf"):
        load_workload("nope")
