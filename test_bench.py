"""Smoke tests of bench.py: a --quick run writes every target to JSON with sane values, and the baselines it times
compute what they stand for. No timing is asserted: --quick sizes measure nothing."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import data
import shapley_mm

TARGET_NAMES = [
    "valuation / eval pass, feature masking (concat)",
    "valuation / eval pass, input masking (concat)",
    *[f"valuation / eval pass, input masking ({fusion})" for fusion in bench.MIXING],
    "modality-level plan (Z = 20%) / sample-level plan",
    "training step, uni-modal copies / full samples",
    "KS loader samples/s, data.py / PIL + transforms (train transforms)",
    "KS loader samples/s, data.py / PIL + transforms (eval transforms)",
    "shapley_values n = 2: per-sample loop time / shapley_values time",
    "shapley_values n = 2: loop arithmetic only (Python numbers given) / shapley_values",
    "shapley_values n = 6: seconds per 10^6 samples",
    "peak memory, valuation / eval pass, feature masking (concat)",
    "peak memory, valuation / eval pass, input masking (concat)",
    "baseline epoch, samples/s",
    "sample-level epoch, samples/s (valuation included, copies count)",
    "training epoch on D^rs, online valuation on / off",
    "offline valuation pass (sample level) / training epoch on D^rs",
    "sample-level epoch, offline valuation / baseline epoch",
    "sample-level epoch, online valuation / baseline epoch",
    "valuation pass, 2 processes / 1 process, wall time (torchrun; CPU: shared cores)",
]


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results" / "bench.json"
    returned = bench.main(["--quick", "--json", str(path)])
    with open(path) as f:
        return json.load(f), returned


@pytest.mark.slow  # a --quick run of every benchmark: about 30 s
def test_quick_run_writes_every_target(quick_rows):
    rows, returned = quick_rows
    assert rows == returned
    assert [r["name"] for r in rows] == TARGET_NAMES
    for r in rows:
        assert set(r) == {"name", "value", "spread", "target", "met"}
        assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0, r


@pytest.mark.slow  # a --quick run of every benchmark: about 30 s
def test_met_agrees_with_value_and_target(quick_rows):
    rows, _ = quick_rows
    for r in rows:
        if r["target"] == "informational":
            assert r["met"] is None
        elif r["target"] == "batched":  # a property of the code, not a timing: every coalition call is batched
            assert r["met"] is True, r
        else:
            op, bound = r["target"].split()
            assert op in ("<=", ">=")
            assert r["met"] is (r["value"] <= float(bound) if op == "<=" else r["value"] >= float(bound)), r


@pytest.mark.slow  # a --quick run of every benchmark: about 30 s
def test_values_are_sane(quick_rows):
    rows, _ = quick_rows
    value = {r["name"]: r["value"] for r in rows}
    # same computation, same memory: the valuation pass cannot need less than half or ten times the evaluation's
    for mask_mode in ("feature", "input"):
        assert 0.5 < value[f"peak memory, valuation / eval pass, {mask_mode} masking (concat)"] < 10
    # valuing 20 % of the samples cannot cost more than valuing all of them twice over
    assert value["modality-level plan (Z = 20%) / sample-level plan"] < 2
    # the full loop includes the arithmetic-only loop
    assert (value["shapley_values n = 2: per-sample loop time / shapley_values time"]
            > 0.5 * value["shapley_values n = 2: loop arithmetic only (Python numbers given) / shapley_values"])


def test_only_runs_the_benchmarks_named(capsys):
    rows = bench.main(["--quick", "--only", "shapley"])
    assert [r["name"] for r in rows] == [name for name in TARGET_NAMES if name.startswith("shapley_values")]
    with pytest.raises(SystemExit) as stop:
        bench.main(["--quick", "--only", "shapley,onlin"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --only: unknown onlin; expected some of valuation, " in err.splitlines()[-1]


def test_a_json_path_that_cannot_be_written_is_refused_before_measuring(capsys, tmp_path, monkeypatch):
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path) and access(path, mode))
    monkeypatch.setattr(bench, "bench_shapley", lambda *args: pytest.fail("measured before checking --json"))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--quick", "--only", "shapley", "--json", str(tmp_path / "bench.json")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: --json {tmp_path}: {tmp_path} is not writable\n"
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--only", "shapley", "--json", str(tmp_path)])
    assert capsys.readouterr().err == f"error: --json {tmp_path} is a folder; give a file name\n"


def test_json_rows_are_saved_after_each_benchmark(tmp_path, monkeypatch):
    measured = [bench.informational("shapley", 1.0)]
    monkeypatch.setattr(bench, "bench_shapley", lambda *args: measured)
    monkeypatch.setattr(bench, "bench_epochs", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    path = tmp_path / "results" / "bench.json"
    with pytest.raises(KeyboardInterrupt):  # stopped in the second benchmark: the first one's rows are kept
        bench.main(["--quick", "--only", "shapley,epochs", "--json", str(path)])
    with open(path) as f:
        assert json.load(f) == measured
    assert os.listdir(path.parent) == ["bench.json"]


def test_authors_loop_computes_the_shapley_values():
    correct = torch.rand(200, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    values = shapley_mm.benefit(correct)
    assert torch.equal(torch.tensor(bench.authors_loop(values.tolist())), shapley_mm.shapley_values(values))


def test_authors_reader_matches_data_py(tmp_path):
    """The baseline loader reads the same clips into the same tensors as data.py (up to resampling filters)."""
    bench.write_ks_fixture(str(tmp_path), clips=2)
    ours = data.build_dataset("ks", "train", root=str(tmp_path), augment=False)
    authors = bench.AuthorsKSClips(str(tmp_path), augment=False)
    assert len(ours) == len(authors) == 2
    for i in range(2):
        (audio, visual), label, index = ours[i]
        (audio_b, visual_b), label_b, index_b = authors[i]
        assert (label, index) == (label_b, index_b)
        assert torch.equal(audio, audio_b) and audio.shape == (1,) + bench.KS_SPECTROGRAM
        assert visual.shape == visual_b.shape == (3, 3, 224, 224)
        assert (visual - visual_b).abs().mean() < 0.05  # PIL's and torchvision's antialiased resize differ a little
    frame = os.path.join(str(tmp_path), "ks_visual", "train", "clip00000", "frame_00001.jpg")
    assert 10_000 < os.path.getsize(frame) < 100_000  # a realistic JPEG, not a flat one


def test_copies_mask_keeps_one_modality_per_row_half_each():
    mask = bench.copies_mask(10, torch.Generator().manual_seed(0))
    assert mask.shape == (10, 2) and mask.dtype == torch.bool
    assert (mask.sum(1) == 1).all() and mask[:, 0].sum() == 5
    assert not torch.equal(mask[:, 0], torch.arange(10) < 5)  # shuffled, so both kinds mix in a batch


def test_forward_batch_sizes_sees_whole_batch_calls_of_mixing_fusions():
    dataset = bench.synthetic_set(16, 4)
    loader_kwargs = bench.loader_settings(4, torch.device("cpu"))
    concat = bench.build_model(dataset, "concat", "feature", torch.device("cpu"))

    def valuate(model):
        return bench.valuate(model, dataset, loader_kwargs, torch.device("cpu"), False)

    assert bench.forward_batch_sizes(concat, lambda: valuate(concat)) == []
    for fusion in bench.MIXING:
        model = bench.build_model(dataset, fusion, None, torch.device("cpu"))
        sizes = bench.forward_batch_sizes(model, lambda: valuate(model))
        assert sizes == [4] * 3  # one call per non-empty coalition, each over the whole batch


@pytest.mark.slow
def test_peak_bytes_sees_an_allocation():
    """In a process set up as bench_memory sets up its probe, where freed memory is given back to the system."""
    size = 64 * 2 ** 20
    program = ("import torch, bench\n"
               f"print(bench.peak_bytes(lambda: torch.ones({size // 4}).sum(), torch.device('cpu')))")
    result = subprocess.run([sys.executable, "-c", program], env=dict(os.environ, **bench.PROBE_ENV),
                            cwd=os.path.dirname(os.path.abspath(bench.__file__)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert 0.9 * size < int(result.stdout) < 2 * size


def test_side_by_side_interleaves_and_warms_up():
    calls, now = [], [0.0]

    def call(name, seconds):  # each call advances a fake clock by its own time: a's 1 s, b's 2 s
        def fn():
            calls.append(name)
            now[0] += seconds
        return fn

    seconds = bench.side_by_side({"a": call("a", 1.0), "b": call("b", 2.0)}, 3, torch.device("cpu"), lambda: now[0])
    assert calls == ["a", "b"] * 4  # one warm-up round, then 3 timed rounds
    assert seconds == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}  # each call timed alone, the warm-up not
    assert bench.median_ratio(seconds, "b", "a") == (2.0, 2.0, 2.0)


def test_a_ratio_is_taken_within_each_round_and_its_median_is_compared_with_the_target():
    # round 2: a load that doubles both sides; round 3: an outside job that slows one side only
    seconds = {"off": [1.0, 2.0, 1.0, 1.0, 1.0], "on": [1.02, 2.04, 1.5, 1.02, 1.02]}
    measured = bench.median_ratio(seconds, "on", "off")
    assert measured == pytest.approx((1.02, 1.02, 1.5))
    row = bench.at_most("online / plain", measured, 1.03)
    assert row["met"] is True and row["value"] == pytest.approx(1.02) and row["spread"] == pytest.approx([1.02, 1.5])
    assert bench.at_most("online / plain", bench.median_ratio(seconds, "on", "off", scale=1.02), 1.03)["met"] is False
    assert bench.informational("memory", 3.0)["spread"] is None
