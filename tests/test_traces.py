"""Trace formats: the shipped samples round-trip, malformed rows name file and line, windows and time
scales in closed form, adapters by popularity or from a column, and the trace flags of `lorabench run`."""

import importlib.util
import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lorabench.cli import main
from lorabench.errors import LorabenchError
from lorabench.traces import load_trace
from lorabench.workload import load_workload, zipf_probabilities

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "workloads" / "traces"


def sample_script():
    spec = importlib.util.spec_from_file_location("make_trace_samples", ROOT / "scripts" / "make_trace_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLES = sample_script().samples()


def truth(name: str) -> dict[str, np.ndarray]:
    """What the generator meant each sample to hold: trace seconds and lengths, in file order."""
    data = SAMPLES[name]
    if name.startswith("azure"):
        return {"t": data["seconds"].to_numpy(), "prompt": data["ContextTokens"].to_numpy(),
                "output": data["GeneratedTokens"].to_numpy()}
    if name == "burstgpt.csv":
        return {"t": data["Timestamp"].to_numpy(float), "prompt": data["Request tokens"].to_numpy(),
                "output": data["Response tokens"].to_numpy()}
    return {"t": np.array([r["timestamp"] for r in data]) / 1e3,
            "prompt": np.array([r["input_length"] for r in data]),
            "output": np.array([r["output_length"] for r in data])}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_shipped_samples_are_the_generators_and_round_trip(name):
    script = sample_script()
    assert (TRACES / name).read_text() == script.render(SAMPLES[name])  # committed = what the script writes
    trace = load_trace(str(TRACES / name))
    want = truth(name)
    order = np.argsort(want["t"], kind="stable")
    assert trace.format == {"burstgpt.csv": "burstgpt", "mooncake.jsonl": "mooncake"}.get(name, "azure")
    assert len(trace) == len(order) >= 200
    np.testing.assert_allclose(trace.arrival_s, want["t"][order], rtol=0, atol=1e-9)
    assert np.array_equal(trace.prompt_tokens, want["prompt"][order])
    assert np.array_equal(trace.output_tokens, want["output"][order])
    assert trace.adapter is None
    # an independent reader agrees on the lengths (file order)
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in (TRACES / name).read_text().splitlines()]
        assert [r["input_length"] for r in rows] == want["prompt"].tolist()
        assert all(len(r["hash_ids"]) == -(-r["input_length"] // 512) for r in rows)
    else:
        frame = pd.read_csv(TRACES / name)
        assert frame.iloc[:, 1 if name.startswith("azure") else 2].tolist() == want["prompt"].tolist()


@pytest.mark.parametrize("workload", ["azure", "burstgpt", "mooncake", "trace"])
def test_shipped_trace_workloads_replay_their_sample(workload):
    w = load_workload(workload)
    r = w.generate()
    trace = w.trace.load()
    assert len(r) == len(trace) and np.array_equal(r.arrival_s, trace.arrival_s)
    assert np.array_equal(r.prompt_tokens, trace.prompt_tokens) and r.output_tokens.min() >= 1


# --- malformed input --------------------------------------------------------------------------------

CSV_BREAKS = {
    "azure_code_2023.csv": [("not-a-date,10,5", "TIMESTAMP"), ("2023-11-16 18:20:00.0000000,12.5,3", "ContextTokens"),
                            ("2023-11-16 18:20:00.0000000,10,-1", "GeneratedTokens"),
                            ("2023-11-16 18:20:00.0000000,10,5,7", "fields")],
    "burstgpt.csv": [("x,ChatGPT,10,5,15,API log", "Timestamp"), ("40,ChatGPT,ten,5,15,API log", "Request tokens"),
                     ("40,ChatGPT,10,,10,API log", "Response tokens"), ("-3,GPT-4,10,5,15,API log", "Timestamp")],
    "mooncake.jsonl": [('{"timestamp": 5, "input_length": 10', "JSON"), ('{"timestamp": 5, "output_length": 3}',
                       "input_length"), ('{"timestamp": 5, "input_length": 10, "output_length": 2.5}', "output_length"),
                       ('[1, 2]', "JSON object")],
}


@pytest.mark.parametrize("name, bad, word", [(n, b, w) for n, cases in CSV_BREAKS.items() for b, w in cases])
def test_a_malformed_row_names_file_and_line(tmp_path, name, bad, word):
    lines = (TRACES / name).read_text().splitlines()
    rng = np.random.default_rng(zlib.crc32(bad.encode()))
    at = int(rng.integers(2, len(lines)))  # 0-based index of the line replaced (never the header)
    lines[at] = bad
    lines.insert(at - 1, "")  # a blank line before it: skipped, but counted as an editor counts
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LorabenchError) as err:
        load_trace(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}, line {at + 2}:")
    assert word in message


def test_unknown_header_lists_the_formats(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("when,who,what\n1,2,3\n")
    with pytest.raises(LorabenchError) as err:
        load_trace(str(path))
    for word in ("t.csv", "unknown trace format", "TIMESTAMP", "Response tokens", "input_length", "arrival_s"):
        assert word in str(err.value)


def test_a_header_near_a_format_names_what_it_lacks(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,3\n")
    with pytest.raises(LorabenchError, match="t.csv: missing column.*GeneratedTokens.*Azure"):
        load_trace(str(path))


# --- replay times ----------------------------------------------------------------------------------


def write_burstgpt(path, t, prompt, output, model):
    frame = pd.DataFrame({"Timestamp": t, "Model": model, "Request tokens": prompt, "Response tokens": output,
                          "Total tokens": prompt + output, "Log Type": "API log"})
    frame.to_csv(path, index=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_window_and_time_scale_in_closed_form(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = 500
    t = rng.uniform(0, 1000, n).round(3)  # shuffled: the reader sorts
    prompt, output = rng.integers(1, 900, n), rng.integers(1, 300, n)
    write_burstgpt(tmp_path / "b.csv", t, prompt, output, "ChatGPT")
    start, end = sorted(rng.uniform(0, 1000, 2))
    scale = rng.uniform(0.1, 3)
    trace = load_trace(str(tmp_path / "b.csv"), time_scale=scale, window=(start, end))
    keep = (t >= start) & (t < end)
    order = np.argsort(t[keep], kind="stable")
    np.testing.assert_allclose(trace.arrival_s, (t[keep][order] - start) * scale, rtol=1e-12, atol=1e-9)
    assert np.array_equal(trace.prompt_tokens, prompt[keep][order])
    assert np.array_equal(trace.output_tokens, output[keep][order])
    # Azure: seconds since the earliest row, whatever the file order
    base = pd.Timestamp("2024-05-10 00:00:00")
    ticks = rng.integers(0, 10**10, n)  # 100 ns ticks: 7 decimals, as Azure writes them
    stamps = [(base + pd.Timedelta(int(k) * 100, "ns")) for k in ticks]
    text = [s.strftime("%Y-%m-%d %H:%M:%S.") + f"{s.microsecond * 10 + s.nanosecond // 100:07d}" for s in stamps]
    pd.DataFrame({"TIMESTAMP": text, "ContextTokens": prompt, "GeneratedTokens": output}).to_csv(
        tmp_path / "a.csv", index=False)
    trace = load_trace(str(tmp_path / "a.csv"), time_scale=scale)
    np.testing.assert_allclose(trace.arrival_s, np.sort(ticks - ticks.min()) / 1e7 * scale, rtol=1e-12, atol=1e-6)


def test_an_empty_window_is_a_clear_error():
    with pytest.raises(LorabenchError, match="burstgpt.csv: window \\[5000, 6000\\) s holds no rows"):
        load_trace(str(TRACES / "burstgpt.csv"), window=(5000, 6000))


# --- adapters ---------------------------------------------------------------------------------------


def trace_workload(tmp_path, n_rows, popularity, n_loras, seed=0, extra=""):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 100, n_rows)).round(4)
    write_burstgpt(tmp_path / "b.csv", t, rng.integers(1, 500, n_rows), rng.integers(1, 200, n_rows),
                   rng.choice(["ChatGPT", "GPT-4", "Llama"], n_rows))
    (tmp_path / "w.toml").write_text(
        f'n_loras = {n_loras}\nrequests = {n_rows}\nseed = {seed}\n[arrival]\nkind = "trace"\n'
        f'[popularity]\n{popularity}\n'
        f'[prompt]\nkind = "trace"\n[output]\nkind = "trace"\n[trace]\npath = "b.csv"\n{extra}')
    return load_workload(str(tmp_path / "w.toml"))


def test_adapters_by_popularity_on_a_trace(tmp_path):
    n = 20_000
    uniform = trace_workload(tmp_path, n, 'kind = "uniform"', 40, seed=1).generate().adapter
    counts = np.bincount(uniform, minlength=40)
    assert stats.chisquare(counts).pvalue > 1e-3
    zipf = trace_workload(tmp_path, n, 'kind = "zipf"\nalpha = 1.1\nshuffle = false', 30, seed=2).generate()
    counts = np.bincount(zipf.adapter, minlength=30)
    assert stats.chisquare(counts, zipf_probabilities(30, 1.1) * n).pvalue > 1e-3
    assert len(zipf) == n  # every row replayed, in order


def test_adapters_from_a_column(tmp_path):
    w = trace_workload(tmp_path, 300, 'kind = "trace"', 3, extra='adapter_column = "Model"\n')
    r = w.generate()
    models = pd.read_csv(tmp_path / "b.csv")["Model"].to_numpy()  # already in time order
    first_seen = list(dict.fromkeys(models))
    assert np.array_equal(r.adapter, [first_seen.index(m) for m in models])
    # whole numbers are ids as they are; too few adapters for them is an error naming the line
    frame = pd.read_csv(tmp_path / "b.csv")
    frame["Model"] = np.arange(300) % 7
    frame.to_csv(tmp_path / "b.csv", index=False)
    w = load_workload(str(tmp_path / "w.toml"))
    with pytest.raises(LorabenchError, match=r"b.csv, line 5: adapter 3 is outside 0..2"):
        w.generate()
    assert np.array_equal(load_workload(str(tmp_path / "w.toml"), n_loras=7).generate().adapter, np.arange(300) % 7)


def test_popularity_trace_without_adapters_says_what_to_do(tmp_path):
    (tmp_path / "w.toml").write_text(f'[arrival]\nkind = "trace"\n[popularity]\nkind = "trace"\n[trace]\n'
                                     f'path = "{TRACES / "azure_code_2023.csv"}"\n')
    with pytest.raises(LorabenchError, match="azure format.*names none.*adapter_column"):
        load_workload(str(tmp_path / "w.toml")).generate()


def test_zero_tokens_name_the_line_unless_skipped(tmp_path):
    text = (TRACES / "burstgpt.csv").read_text()
    zero_line = next(i for i, line in enumerate(text.splitlines(), 1) if line.split(",")[3] == "0")
    toml = f'[arrival]\nkind = "trace"\n[output]\nkind = "trace"\n[trace]\npath = "{TRACES / "burstgpt.csv"}"\n'
    (tmp_path / "w.toml").write_text(toml)
    with pytest.raises(LorabenchError, match=f"burstgpt.csv, line {zero_line}: 0 output tokens.*skip_empty"):
        load_workload(str(tmp_path / "w.toml"), requests=10**6).generate()
    (tmp_path / "w.toml").write_text(toml + "skip_empty = true\n")
    r = load_workload(str(tmp_path / "w.toml"), requests=10**6).generate()
    frame = pd.read_csv(TRACES / "burstgpt.csv")
    assert len(r) == int((frame["Response tokens"] > 0).sum()) and r.output_tokens.min() >= 1


# --- command line -----------------------------------------------------------------------------------


def test_time_scale_and_window_flags_reach_the_replay(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--workload", "burstgpt", "--strategy", "compressed", "--time-scale", "0.25",
                 "--trace-window", "100,400", "--out", str(out), "--no-progress"]) == 0
    requests = pd.read_csv(out / "requests" / "single.csv")
    trace = load_trace(str(TRACES / "burstgpt.csv"), skip_empty=True)
    t = trace.arrival_s[(trace.arrival_s >= 100) & (trace.arrival_s < 400)]
    np.testing.assert_allclose(requests["arrival_s"], (t - 100) * 0.25)
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["time_scale"] == 0.25 and config["config"]["trace_window"] == [100, 400]
    assert config["workload"]["trace"]["window"] == [100, 400]


@pytest.mark.parametrize("argv, words", [
    (["--time-scale", "2"], ["zipf.toml", "--time-scale", "no [trace]"]),
    (["--workload", "azure", "--time-scale", "0"], ["--time-scale", "> 0"]),
    (["--workload", "azure", "--trace-window", "9,3"], ["--trace-window", "START < END"]),
])
def test_bad_trace_flags_give_one_clear_error(capsys, argv, words):
    assert main(["run", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
