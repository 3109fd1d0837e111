"""Smoke tests of reproduce.py: one setting, baseline and sample, one seed, two epochs; the JSON records, the
Markdown table, exact reproduction, re-running one cell, the Figure 4 pick and the optional figures."""
import errno
import importlib.util
import itertools
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import data
import models
import reproduce
import sweep
import train

QUICK = ["--settings", "sample-level", "--modes", "baseline,sample", "--fusions", "concat", "--seeds", "0",
         "--epochs", "2", "--warmup", "1", "--valuations", "offline"]


def run(out, runs_dir, *flags):
    reproduce.main(list(flags) + ["--out", str(out), "--runs-dir", str(runs_dir)])
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def without_time(records):
    return [{k: v for k, v in r.items() if k not in reproduce.TIME_FIELDS + ("run_dir",)} for r in records]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    return root, run(root / "results", root / "runs", *QUICK)


def test_records_hold_every_reported_number(quick):
    root, results = quick
    records = results["records"]
    assert [(r["setting"], r["fusion"], r["mode"], r["seed"]) for r in records] == [
        ("sample-level", "concat", "baseline", 0), ("sample-level", "concat", "sample", 0)]
    for r in records:
        assert r["views"] == "fou,zer" and r["degrade"] == reproduce.SETTINGS["sample-level"]["degrade"]
        assert r["modalities"] == ["fou", "zer"]
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["test_map"] <= 1.0
        assert len(r["test_acc_per_modality"]) == 2 and len(r["test_mean_phi"]) == 2
        assert np.array(r["train_mean_phi"]).shape == (2, 2) == np.array(r["train_std_phi"]).shape  # [epochs, n]
        assert r["wall_seconds"] > 0 and r["method_seconds"] > 0
        # the record agrees with the run's own files
        with open(os.path.join(r["run_dir"], "results.json")) as f:
            assert json.load(f)["test_acc"] == r["test_acc"]
        log = train.load_log(os.path.join(r["run_dir"], "log.jsonl"))
        assert r["train_samples"] == sum(e["train_samples"] for e in log)
        _, _, _, phi, _ = reproduce.valuation_of(r["run_dir"])
        assert np.allclose(r["test_mean_phi"], phi.mean(0)) and len(phi) == 400
    baseline, sample = records
    assert baseline["train_samples"] == 2 * 1200 and baseline["valued_samples"] == 0 and baseline["copies"] == [0, 0]
    # the warm-up epoch is identical; the sample-level epoch adds uni-modal copies of valued samples (Eq. 10)
    assert sample["train_mean_phi"][0] == baseline["train_mean_phi"][0]
    assert sample["valued_samples"] == 1200 and sample["train_samples"] == 2400 + sum(sample["copies"]) > 2400


def markdown_rows(text, header_start):
    """The rows of the first Markdown table in `text` whose header starts with `header_start`, as lists of cells."""
    lines = text.splitlines()
    first = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_markdown_table(quick):
    """results.md reports the records' numbers: each run's accuracies, the copies ratio and the paired difference,
    read back from the table (not matched as text), and only the settings that ran."""
    root, results = quick
    with open(root / "results" / "results.md") as f:
        text = f.read()
    baseline, sample = results["records"]
    rows = {row[1]: row for row in markdown_rows(text, "| fusion | method |") if row[0] == "concat"}
    for record in (baseline, sample):
        row = rows[record["mode"]]
        assert int(row[2]) == 1  # seeds
        acc, spread = row[3].split(" ± ")
        assert float(acc) == pytest.approx(100 * record["test_acc"], abs=0.005) and float(spread) == 0
        assert float(row[4].split(" ± ")[0]) == pytest.approx(100 * record["test_map"], abs=0.005)
        alone = [float(cell.split(" ± ")[0]) for cell in row[5:7]]
        assert alone == pytest.approx([100 * a for a in record["test_acc_per_modality"]], abs=0.005)
    ratio = sample["train_samples"] / baseline["train_samples"]
    assert any(cell == f"{ratio:.2f}x" for cell in rows["sample"])
    difference = re.search(r"sample-level > baseline \(Tables 1, 2\): test acc ([+-][0-9.]+)", text)
    assert float(difference.group(1)) == pytest.approx(100 * (sample["test_acc"] - baseline["test_acc"]), abs=0.005)
    assert "## dataset-level" not in text  # not run


def test_same_seeds_reproduce_the_table_exactly(quick, tmp_path):
    root, results = quick
    again = run(tmp_path / "results", tmp_path / "runs", *QUICK)
    assert without_time(again["records"]) == without_time(results["records"])
    assert again["examples"]["sample-level"]["samples"] == results["examples"]["sample-level"]["samples"]
    tables = [open(path / "results.md").read().split("## Cost")[0] for path in (root / "results", tmp_path / "results")]
    assert tables[0] == tables[1]


def test_rerunning_one_cell_replaces_only_its_record(quick, tmp_path):
    root, results = quick
    shutil.copytree(root / "results", tmp_path / "results")
    flags = [f if f != "baseline,sample" else "sample" for f in QUICK]
    merged = run(tmp_path / "results", tmp_path / "runs", *flags)
    assert [r["mode"] for r in merged["records"]] == ["baseline", "sample"]
    assert merged["records"][0] == results["records"][0]  # kept as it was
    assert merged["records"][1]["run_dir"] != results["records"][1]["run_dir"]  # re-run
    assert without_time(merged["records"][1:]) == without_time(results["records"][1:])
    # a run with other training settings replaces them only when told to, instead of mixing incomparable records
    fresh = run(tmp_path / "results", tmp_path / "runs", *[f if f != "2" else "3" for f in flags], "--overwrite")
    assert [(r["mode"], len(r["train_mean_phi"])) for r in fresh["records"]] == [("sample", 3)]


def refused(capsys, argv, code=2, main=reproduce.main):
    """Run `main` (reproduce.py's) expecting a one-line error exit with status `code`; return the line."""
    with pytest.raises((SystemExit, KeyboardInterrupt)) as exit_info:
        main(argv)
    assert exit_info.type is SystemExit and exit_info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_runs(monkeypatch):
    """reproduce.run_cell replaced by one that fails the test: the runs it was asked for."""
    asked = []
    monkeypatch.setattr(reproduce, "run_cell", lambda *cell, **kwargs: asked.append(cell))
    return asked


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "error: argument --epochs: expected a value >= 1, got 0"),
    (["--valuations", "offline,online", "--warmup", "0"],
     "error: the run sample-level concat sample online seed 0: --valuation online plans each epoch"),
    (["--modes", "sampel"], "error: argument --modes: unknown sampel; expected some of baseline, sample,"),
    (["--seeds", "0,x"], "error: argument --seeds: expected integers separated by commas, got '0,x'")])
def test_the_whole_grid_is_checked_before_the_first_run(capsys, tmp_path, no_runs, flags, message):
    assert refused(capsys, QUICK + flags + ["--out", str(tmp_path / "results"), "--runs-dir", str(tmp_path)]).startswith(
        message)
    assert no_runs == [] and not os.path.exists(tmp_path / "results")


def test_results_of_other_settings_are_kept_unless_overwrite(quick, capsys, tmp_path, no_runs):
    root, _ = quick
    shutil.copytree(root / "results", tmp_path / "results")
    before = (tmp_path / "results" / "results.json").read_bytes()
    flags = [f if f != "2" else "3" for f in QUICK] + ["--out", str(tmp_path / "results"), "--runs-dir", str(tmp_path)]
    line = refused(capsys, flags)
    assert line.startswith(f"error: {tmp_path / 'results' / 'results.json'} holds 2 runs made with other settings")
    assert line.endswith("pass --overwrite to replace them, or choose another --out")
    assert (tmp_path / "results" / "results.json").read_bytes() == before and no_runs == []


@pytest.mark.parametrize("text", ['{"training": {"epochs": 2}, "records": [', '[1, 2]', "\udcff"])
def test_a_results_file_that_is_not_one_is_refused_in_one_line(capsys, tmp_path, no_runs, text):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "results.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    line = refused(capsys, QUICK + ["--out", str(tmp_path / "results"), "--runs-dir", str(tmp_path)])
    assert line.startswith(f"error: {tmp_path / 'results' / 'results.json'} is not a results.json of reproduce.py")
    assert line.endswith("move it away, or pass --overwrite to replace it") and no_runs == []


@pytest.mark.parametrize("name", ["results.json", "tuning.json"])
def test_table2_refuses_a_cut_json_file_before_the_first_run(capsys, tmp_path, monkeypatch, name):
    asked = []
    monkeypatch.setattr(reproduce, "run_tasks", lambda tasks, jobs: asked.append(tasks))
    (tmp_path / name).write_text('{"records": [')
    line = refused(capsys, ["--table2", "--out", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    assert line.startswith(f"error: {tmp_path / name} could not be read (JSONDecodeError") and asked == []
    assert (tmp_path / name).read_text() == '{"records": ['


@pytest.mark.parametrize("flag", ["--out", "--runs-dir"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_runs(capsys, tmp_path, monkeypatch, no_runs,
                                                                              flag):
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and access(path, mode))
    folders = {"--out": str(tmp_path / "results"), "--runs-dir": str(tmp_path / "runs"), flag: str(locked / "sub")}
    line = refused(capsys, QUICK + [x for pair in folders.items() for x in pair])
    assert line == f"error: {flag} {locked / 'sub'}: {locked} is not writable"
    assert no_runs == [] and os.listdir(tmp_path) == ["locked"]


class FullDisk(dict):
    """A record field whose JSON encoding fails as a write to a full disk does."""

    def items(self):
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), "full disk", train.TrainingError("interrupted", code=130)])
def test_results_are_saved_after_each_run_and_kept_when_stopped(quick, capsys, tmp_path, monkeypatch, stop):
    root, results = quick
    shutil.copytree(root / "results", tmp_path / "results")
    baseline, _ = results["records"]
    made = iter([dict(baseline, test_acc=0.5), dict(baseline, mode="sample", failed=FullDisk(x=1))])

    def run_cell(*cell, **kwargs):  # the baseline run finishes; the sample run is stopped or cannot be saved
        record = next(made)
        if record["mode"] == "sample" and stop != "full disk":
            raise stop
        return record

    monkeypatch.setattr(reproduce, "run_cell", run_cell)
    line = refused(capsys, QUICK + ["--out", str(tmp_path / "results"), "--runs-dir", str(tmp_path)],
                   2 if stop == "full disk" else 130)
    path = tmp_path / "results" / "results.json"
    if stop == "full disk":
        assert line == f"error: {path}: cannot write it (No space left on device); the previous file is kept"
    else:
        assert line == (f"error: interrupted in run 2 of 2 (sample-level concat sample seed 0): {path} keeps the runs "
                        f"finished before it")
    with open(path) as f:  # the first run saved, the record of the second as before
        saved = json.load(f)
    assert [(r["mode"], r["test_acc"]) for r in saved["records"]] == [("baseline", 0.5),
                                                                     ("sample", results["records"][1]["test_acc"])]
    assert sorted(os.listdir(tmp_path / "results")) == sorted(os.listdir(root / "results"))  # no temporary file


def test_online_valuation_runs_join_the_offline_ones(quick, tmp_path):
    root, results = quick
    shutil.copytree(root / "results", tmp_path / "results")
    flags = [f if f != "offline" else "online" for f in QUICK]  # of the modes, sample runs online
    merged = run(tmp_path / "results", tmp_path / "runs", *flags)
    assert [(r["mode"], r["valuation"]) for r in merged["records"]] == [
        ("baseline", "offline"), ("sample", "offline"), ("sample", "online")]
    assert without_time(merged["records"][:2]) == without_time(results["records"])  # kept as they were
    offline, online = merged["records"][1:]
    assert online["train_mean_phi"][0] is None  # nothing was trained before epoch 0 to value
    assert len(online["train_mean_phi"][1]) == 2
    assert all(r["valuation"] == "online" for r in train.load_log(os.path.join(online["run_dir"], "log.jsonl")))
    with open(tmp_path / "results" / "results.md") as f:
        text = f.read()
    assert "## Online valuation" in text and "| sample | online | 1 |" in text and "| sample | offline | 1 |" in text
    weak = ("fou", "zer")[int(np.argmin(merged["records"][0]["test_acc_per_modality"]))]
    assert f"{weak} alone (weak)" in text  # the view the baseline predicts worse alone
    difference = 100 * (online["test_acc"] - offline["test_acc"])
    assert f"- sample online - sample offline: test acc {difference:+.2f} ± 0.00 points" in text
    assert text.split("## Online valuation")[0] == open(root / "results" / "results.md").read().split("## Cost")[0]


def test_figure4_samples_lean_most_on_each_modality(quick):
    _, results = quick
    example = results["examples"]["sample-level"]
    baseline = results["records"][0]
    ids, labels, _, phi, _ = reproduce.valuation_of(baseline["run_dir"])
    row = {sample_id: k for k, sample_id in enumerate(ids)}
    a, b = example["samples"]
    in_class = labels == example["label"]
    assert labels[row[a["id"]]] == labels[row[b["id"]]] == example["label"]
    assert phi[row[a["id"]], 0] - phi[row[a["id"]], 1] == (phi[in_class, 0] - phi[in_class, 1]).max()
    assert phi[row[b["id"]], 1] - phi[row[b["id"]], 0] == (phi[in_class, 1] - phi[in_class, 0]).max()
    assert a["baseline"]["phi"] == phi[row[a["id"]]].tolist()
    # among the samples that lean as much, A's other view (zer) is the most degraded one, B's (fou) likewise
    test_set = data.MfeatDataset("test", views=("fou", "zer"), degrade=reproduce.SETTINGS["sample-level"]["degrade"])
    test_row = {sample_id: k for k, sample_id in enumerate(test_set.sample_ids)}
    for sample, lean, other in ((a, 0, 1), (b, 1, 0)):
        gap = phi[row[sample["id"]], lean] - phi[row[sample["id"]], other]
        ties = [ids[k] for k in np.flatnonzero(in_class & (phi[:, lean] - phi[:, other] == gap))]
        strength = [test_set.degrade_strength[test_row[i]].item() if test_set.degraded_view[test_row[i]] == other
                    else 0.0 for i in ties]
        assert sample["degraded_view"] == ("fou", "zer")[test_set.degraded_view[test_row[sample["id"]]].item()]
        assert sample["degrade_strength"] * (sample["degraded_view"] == ("fou", "zer")[other]) == pytest.approx(
            max(strength))


def test_grid_takes_every_fusion_at_run_time():
    cells = reproduce.grid(["dataset-level", "sample-level"], train.MODES, models.FUSIONS)
    for setting in ("dataset-level", "sample-level"):
        assert [c for c in cells if c[:2] == (setting, "concat")] == [(setting, "concat", m) for m in train.MODES
                                                                      if m != "greedy"]
        others = [f for f in models.FUSIONS if f != "concat"]
        # greedy runs on the fusion it needs; Figure 5 adds MMTM-Modality on its setting
        extra = {("mmtm", "greedy")} | ({("mmtm", "modality")} if setting == reproduce.FEATURE_SETTING else set())
        assert [c for c in cells if c[0] == setting and c[1] != "concat"] == [
            (setting, f, m) for f in others for m in train.MODES if m in reproduce.FUSION_MODES or (f, m) in extra]
    assert "mbt" in models.FUSIONS


def test_figures_are_optional(quick, tmp_path, monkeypatch):
    _, results = quick
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert reproduce.write_figures(str(tmp_path), results["records"], results["examples"], results["training"]) == []
    assert os.listdir(tmp_path) == []


def test_figures_when_matplotlib_is_installed(quick, tmp_path):
    pytest.importorskip("matplotlib")
    _, results = quick
    names = reproduce.write_figures(str(tmp_path), results["records"], results["examples"], results["training"])
    assert names == ["contributions_sample-level.png", "valuation_examples_sample-level.png"]
    for name in names:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_summarises_validation_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "SEEDS", (100, 101))
    summary = sweep.validation_summary("fou,zer", dict(views=["fou", "zer"], mode="baseline", epochs=1), str(tmp_path))
    runs = [json.load(open(tmp_path / "sweep" / f"fou,zer-s{seed}" / "results.json")) for seed in (100, 101)]
    assert summary["val_acc"] == pytest.approx(np.mean([r["val_acc"] for r in runs]))
    assert len(summary["alone"]) == len(summary["phi"]) == len(summary["phi_std"]) == 2
    assert all(0.0 <= a <= 1.0 for a in summary["alone"]) and all(s >= 0 for s in summary["phi_std"])


def test_sweep_refuses_an_output_folder_that_cannot_be_written_before_training(capsys, tmp_path, monkeypatch):
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path) and access(path, mode))
    monkeypatch.setattr(sweep, "validation_summary", lambda *args: pytest.fail("trained before checking --out"))
    line = refused(capsys, ["--out", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")], main=sweep.main)
    assert line == f"error: --out {tmp_path / 'results'}: {tmp_path} is not writable"


def test_sweep_saves_each_stage_as_it_ends(capsys, tmp_path, monkeypatch):
    def summary(name, settings, runs_dir):  # stage 1 ends, stage 2 is interrupted
        if not name.startswith("alone-"):
            raise KeyboardInterrupt
        return dict(name=name, settings=settings, val_acc=0.5, alone=[0.5], phi=[0.5], phi_std=[0.1])

    monkeypatch.setattr(sweep, "validation_summary", summary)
    line = refused(capsys, ["--out", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")], 130, sweep.main)
    assert line == f"error: interrupted; {tmp_path / 'results' / 'sweep.json'} keeps the stages finished before"
    with open(tmp_path / "results" / "sweep.json") as f:
        assert list(json.load(f)["alone"]) == list(data.MFEAT_VIEWS)
    assert "## 1. Each view alone" in (tmp_path / "results" / "sweep.md").read_text()


# ----------------------------------------------------------------------------------------------
# Figure 5


def test_nearest_centroid_accuracy_on_features_with_known_structure():
    # 1-D: centroids 1 (class 0) and 5 (class 1); 2.9 lies nearer 1, 3.1 nearer 5
    train_x, train_y = np.array([[0.0], [2.0], [4.0], [6.0]]), np.array([0, 0, 1, 1])
    test_x, test_y = np.array([[2.9], [3.1], [0.0], [6.0]]), np.array([0, 0, 0, 1])
    assert reproduce.nearest_centroid_accuracy(train_x, train_y, test_x, test_y) == 0.75
    # labels need not be 0..K-1; well separated clusters in 5-D are all assigned right, overlapping ones at chance
    rng = np.random.default_rng(0)
    centres = 10 * rng.standard_normal((3, 5))
    labels = rng.integers(0, 3, 600)
    separated = centres[labels] + rng.standard_normal((600, 5))
    assert reproduce.nearest_centroid_accuracy(separated[:300], labels[:300] + 7, separated[300:], labels[300:] + 7) == 1.0
    mixed = rng.standard_normal((600, 5))
    assert 0.2 < reproduce.nearest_centroid_accuracy(mixed[:300], labels[:300], mixed[300:], labels[300:]) < 0.47


def test_head_features_are_the_encoder_features_of_concatenation(quick):
    _, results = quick
    run_dir = results["records"][0]["run_dir"]
    features = reproduce.head_features(run_dir, 1)
    result, dataset = train.evaluate_checkpoint(os.path.join(run_dir, "best.pt"), "test")
    checkpoint = train.load_checkpoint(os.path.join(run_dir, "best.pt"))
    model = train.build_model(train.argparse.Namespace(**checkpoint["args"]), dataset)
    model.load_state_dict(checkpoint["model"])
    inputs = [torch.stack([dataset[i][0][m] for i in range(len(dataset))]) for m in range(2)]
    with torch.no_grad():
        encoded = model.eval().encode(inputs)[1].numpy()
    test_features, test_labels = features["test"]
    assert np.allclose(test_features, encoded, atol=1e-5) and test_features.shape == (400, 128)
    assert (test_labels == result["labels"].numpy()).all() and len(features["train"][1]) == 1200


FIGURE5 = ["--settings", "dataset-level", "--modes", "baseline,sample,modality", "--fusions", "concat,mmtm",
           "--seeds", "0", "--epochs", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def figure5(tmp_path_factory):
    """The models of Figure 5 and the concat cells at dataset level: one seed, two epochs."""
    out = tmp_path_factory.mktemp("figure5")
    results = run(out / "results", out / "runs", *FIGURE5)
    return results, (out / "results" / "results.md").read_text()


@pytest.mark.slow
def test_figure5_numbers(figure5):
    results, text = figure5
    study = results["features"]
    cells = reproduce.group(results["records"])
    baseline = cells[("dataset-level", "concat", "baseline")][0]
    assert study["index"] == int(np.argmin(baseline["test_mean_phi"])) and study["seeds"] == [0]
    assert study["modality"] == baseline["modalities"][study["index"]]
    assert [(row["fusion"], row["mode"]) for row in study["models"]] == list(reproduce.FEATURE_MODELS)
    for row, run_dir in zip(study["models"], study["run_dirs"]):
        features = reproduce.head_features(run_dir, study["index"])
        assert row["nearest_centroid"] == [reproduce.nearest_centroid_accuracy(*features["train"], *features["test"])]
        assert f"| {row['fusion']} {row['mode']} | {100 * row['nearest_centroid'][0]:.2f} ± 0.00 |" in text
    assert f"Figure 5: how separable the classes are in the features of `{study['modality']}`" in text
    assert "features more separable with mmtm sample than with mmtm baseline (Figure 5)" in text


@pytest.mark.slow
def test_figure5_picture(figure5, tmp_path, monkeypatch):
    results, _ = figure5
    if importlib.util.find_spec("matplotlib") is None:
        assert reproduce.write_feature_figure(str(tmp_path), results["features"]) == []
        return
    monkeypatch.setitem(sys.modules, "sklearn", None)  # without scikit-learn: principal components
    assert reproduce.write_feature_figure(str(tmp_path), results["features"]) == ["features_dataset-level.png"]
    with open(tmp_path / "features_dataset-level.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_principal_components():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((200, 2)) * [5.0, 1.0] @ np.array([[0.6, 0.8], [-0.8, 0.6]])  # a rotated ellipse
    features = np.concatenate([points, 0.01 * rng.standard_normal((200, 3))], axis=1) + 3.0
    projected = reproduce.principal_components(features)
    assert projected.shape == (200, 2) and np.allclose(projected.mean(0), 0, atol=1e-9)
    assert np.allclose(np.abs(projected[:, 0]), np.abs((features[:, :2] - features[:, :2].mean(0)) @ [0.6, 0.8]),
                       atol=0.05)


# ----------------------------------------------------------------------------------------------
# Table 2 with power: the measurements of the weak-view benchmark, the paired tests and the rule


def test_share_below_one_and_copies_on_the_weak_view_by_hand():
    phi = np.array([[0.5, 1.5], [1.5, 0.5], [0.0, 2.0], [1.0, 1.0]])
    assert reproduce.share_below_one(phi) == 0.75
    # Eq. 10: one copy of view 0 (sample 0, weak 0), one of view 1 (sample 1, weak 0), two of view 0 (sample 2,
    # weak 1): one copy of four on the weak view
    assert reproduce.share_of_copies_on_weak_view(phi, np.array([0, 0, 1, 0])) == 0.25
    assert reproduce.share_of_copies_on_weak_view(phi[3:], np.array([0])) is None


def test_alone_accuracy_by_weak_view_by_hand():
    # coalitions (shapley_mm.coalitions): 0 empty, 1 view 0 alone, 2 view 1 alone, 3 both
    correct = np.array([[0, 1, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]], dtype=bool)
    weak = np.array([1, 0, 0, 1])
    found = reproduce.alone_accuracy_by_weak_view(correct, weak)
    assert found[0].tolist() == [0.5, 0.5]  # view 0 where weak (samples 1, 2): 0, 1; where strong (0, 3): 1, 0
    assert found[1].tolist() == [0.0, 1.0]  # view 1 where weak (samples 0, 3): 0, 0; where strong (1, 2): 1, 1


@pytest.mark.parametrize("seed", range(4))
def test_sign_flip_p_value_matches_brute_force_enumeration(seed):
    generator = np.random.default_rng(seed)
    diffs = generator.integers(-4, 5, size=9) / 400
    observed = abs(diffs.sum())
    signs = np.array(list(itertools.product((-1, 1), repeat=len(diffs))))
    expected = np.mean(np.abs(signs @ diffs) >= observed - 1e-12)
    assert reproduce.sign_flip_p_value(diffs, 1 / 400) == pytest.approx(expected, abs=1e-12)


def test_sign_flip_p_value_extremes_and_refuses_off_grid_differences():
    assert reproduce.sign_flip_p_value(np.full(20, 0.0025), 0.0025) == pytest.approx(2 / 2 ** 20)
    assert reproduce.sign_flip_p_value(np.zeros(5), 0.0025) == 1.0
    stored = np.array([0.9825, 0.97, 0.9575], dtype=np.float32).astype(float)  # as results.json holds them
    assert reproduce.sign_flip_p_value(stored - np.array([0.98, 0.97, 0.96], dtype=np.float32), 0.0025) == 1.0
    with pytest.raises(ValueError, match="multiples"):
        reproduce.sign_flip_p_value([0.001], 0.0025)


def test_holm_on_a_hand_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> non-decreasing: 0.02, 0.03, 0.06, 0.06
    assert reproduce.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert reproduce.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_t_quantile_matches_the_tables():
    assert reproduce.t_quantile(0.975, 19) == pytest.approx(2.093, abs=1e-3)
    assert reproduce.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert reproduce.t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-3)


def test_the_rule_and_the_verdict():
    summary = lambda mean, p: dict(mean=mean, p_holm=p)
    assert [reproduce.decide(summary(0.01, 0.01)), reproduce.decide(summary(-0.01, 0.01)),
            reproduce.decide(summary(0.01, 0.05))] == ["held", "against", "undecided"]
    held = {name: dict(decision="held") for name in reproduce.CLAIM_COMPARISONS}
    assert reproduce.claim_verdict(held) == "held"
    assert reproduce.claim_verdict(dict(held, **{"sample - pmr (gains)": dict(decision="undecided")})) == "undecided"
    assert reproduce.claim_verdict(dict(held, **{"sample - baseline": dict(decision="against")})) == "against"


def test_choose_knobs_takes_the_best_mean_validation_accuracy_first_of_ties():
    records = [dict(setting="s", mode=method, knobs={knob: value}, val_acc=acc)
               for method, (knob, candidates) in reproduce.KNOBS.items()
               for value, acc in zip(candidates, (0.9, 0.9, 0.8) if method == "pmr" else (0.7, 0.8, 0.9))]
    chosen = reproduce.choose_knobs(records, "s")
    assert chosen["pmr"] == {"pmr_alpha": reproduce.KNOBS["pmr"][1][0]}
    assert chosen["sample"] == {"warmup": reproduce.KNOBS["sample"][1][2]}


@pytest.mark.slow
def test_table2_on_a_tiny_grid_is_reproduced_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "KNOBS", {"sample": ("warmup", (1, 2))})
    monkeypatch.setattr(reproduce, "TABLE2_MODES", ("baseline", "sample"))
    tiny = dict(pairs=((0, 1000), (1, 1001)), tuning_pairs=((100, 1100),), settings=("sample-level-weak-view",),
                training=dict(reproduce.TABLE2_TRAINING, epochs=2, warmup=1))
    first = reproduce.table2(str(tmp_path / "a"), str(tmp_path / "runs_a"), jobs=2, **tiny)
    second = reproduce.table2(str(tmp_path / "b"), str(tmp_path / "runs_b"), **tiny)
    assert without_time(first) == without_time(second)
    with open(tmp_path / "a" / "tuning.json") as f:
        chosen = json.load(f)["chosen"]["sample-level-weak-view"]["sample"]
    assert [r["knobs"] for r in first if r["mode"] == "sample"] == [chosen] * 2
    assert all(len(r["below_one"]) == 2 and len(r["alone_weak"]) == 2 for r in first)
    with open(tmp_path / "a" / "results.md") as f:
        text = f.read()
    assert "The paper's claim on this setting: undecided" in text and "### Tuning" in text
    with open(tmp_path / "b" / "results.md") as f:
        assert tables_after_the_grid(f.read()) == tables_after_the_grid(text)


def tables_after_the_grid(text):
    """results.md after the sentence that times the Table 2 grid, without the lines of wall times."""
    after = text.split("The grid took")[1].split("\n", 1)[1]
    return [line for line in after.splitlines() if not line.startswith("Total wall time")]


# ----------------------------------------------------------------------------------------------
# Table 2's second edition: ties to the default, one family without duplicates, exact counts, resume, regime map


def tuning_records(method, knob, accuracies, setting="s"):
    """Tuning records of one method: {value: [val acc of pair 0, pair 1]}."""
    return [dict(setting=setting, mode=method, fusion="concat", knobs={knob: value}, seed=k, split_seed=1000 + k,
                 val_acc=acc) for value, pair_accs in accuracies.items() for k, acc in enumerate(pair_accs)]


@pytest.mark.parametrize("order", [(0.1, 0.5, 1.0), (1.0, 0.5, 0.1)])
def test_a_tie_goes_to_the_default_whatever_the_order_and_margins_are_in_samples(order):
    assert reproduce.knob_default("agm_alpha") == 1.0  # comparators' default, the official code's
    unit = reproduce.VAL_UNIT
    # 0.1 and 1.0 tie on 390 + 392 correct samples; 0.5 is one sample short in one pair
    records = tuning_records("agm", "agm_alpha", {0.1: [390 * unit, 392 * unit], 1.0: [391 * unit, 391 * unit],
                                                  0.5: [390 * unit, 391 * unit]})
    knobs = {"agm": ("agm_alpha", order)}
    assert reproduce.choose_knobs(records, "s", knobs, ties_to_default=True) == {"agm": {"agm_alpha": 1.0}}
    assert reproduce.choose_knobs(records, "s", knobs) == {"agm": {"agm_alpha": order[0]}}  # the first edition's
    choice = reproduce.tuning_choices(records, "s", knobs)["agm"]
    assert (choice["chosen"], choice["default"], choice["margin"]) == (1.0, 1.0, 0.0)
    # a clear winner: two samples more over the two pairs, a margin of one validation sample (a mean)
    records += tuning_records("agm", "agm_alpha", {2.0: [392 * unit, 392 * unit]})
    choice = reproduce.tuning_choices(records, "s", {"agm": ("agm_alpha", order + (2.0,))})["agm"]
    assert (choice["chosen"], choice["margin"]) == (2.0, 1.0)


def test_a_tie_without_the_default_goes_to_the_candidate_nearest_it():
    records = tuning_records("sample", "warmup", {1: [0.9], 4: [0.9], 5: [0.8]})
    for order in ((1, 4, 5), (5, 4, 1)):
        assert reproduce.choose_knobs(records, "s", {"sample": ("warmup", order)}, ties_to_default=True) == {
            "sample": {"warmup": 4}}  # default 5: 4 is nearer than 1


def test_a_method_that_changes_nothing_is_found_and_reported_as_never_acting():
    outcome = dict(best_epoch=3, val_acc=0.9, test_acc=0.8, test_map=0.85, test_acc_per_modality=[0.6, 0.7],
                   test_mean_phi=[1.1, 0.9], test_std_phi=[0.2, 0.3])
    base = [dict(outcome, setting="s", study="tuning", fusion="mmtm", mode="baseline", knobs={}, seed=k,
                 split_seed=1000 + k) for k in range(2)]
    idle = [dict(b, mode="greedy", knobs={"greedy_epsilon": 0.05}) for b in base]
    acting = [dict(b, mode="greedy", knobs={"greedy_epsilon": 0.01}) for b in base]
    acting[1] = dict(acting[1], test_mean_phi=[1.1, 0.9000001])  # the same accuracies, another checkpoint
    assert reproduce.never_acted(idle, base) and not reproduce.never_acted(acting, base)
    assert not reproduce.never_acted(idle, [])  # no baseline to compare with: not claimed
    choice = reproduce.tuning_choices(base + idle + acting, "s", {"greedy": ("greedy_epsilon", (0.01, 0.05))})
    assert choice["greedy"]["never_acts"] == [0.05]
    tuning = dict(spec=dict(pairs=[[0, 1000], [1, 1001]], knobs={"greedy": ["greedy_epsilon", [0.01, 0.05]]}),
                  chosen={"s": {"greedy": {"greedy_epsilon": 0.05}}}, choices={"s": choice})
    row = [line for line in reproduce.tuning_lines(tuning) if line.startswith("| s | greedy")][0]
    assert "0.05 (never acts)" in row


def table2_cells_of(gains_of, base_acc=0.9, unit=reproduce.TEST_UNIT):
    """Table 2 cells of one setting "s" with the given per-pair gains (in test samples) per method."""
    cells = {}
    for fusion in ("concat", "mmtm"):
        cells[("s", fusion, "baseline")] = [dict(seed=k, test_acc=base_acc) for k in range(len(gains_of["sample"]))]
    for method, steps in gains_of.items():
        fusion = "mmtm" if method == "greedy" else "concat"
        # float32, as results.json holds accuracies
        cells[("s", fusion, method)] = [dict(seed=k, test_acc=float(np.float32(base_acc + step * unit)))
                                        for k, step in enumerate(steps)]
    return cells


def test_an_identical_comparison_is_left_out_of_the_holm_family():
    gains = dict(sample=[3, 2, 4, -1, 2, 3], ogm_ge=[1, 0, -1, 2, 0, 1], greedy=[0] * 6)
    cells = table2_cells_of({m.replace("_", "-"): g for m, g in gains.items()})
    summaries = reproduce.table2_comparisons(cells, "s", unit=reproduce.TEST_UNIT)
    duplicate = summaries["sample - greedy (gains)"]
    assert duplicate["duplicate_of"] == "sample - baseline"
    family = [name for name, s in summaries.items() if "duplicate_of" not in s]
    assert len(family) == len(summaries) - 1 and all(summaries[n]["family"] == len(family) for n in summaries)
    expected = reproduce.holm([summaries[name]["p"] for name in family])  # Holm over the family alone
    assert [summaries[name]["p_holm"] for name in family] == pytest.approx(expected)
    assert (duplicate["p_holm"], duplicate["decision"]) == (summaries["sample - baseline"]["p_holm"],
                                                             summaries["sample - baseline"]["decision"])


def test_counts_are_exact_in_test_samples():
    unit = reproduce.TEST_UNIT
    diffs = [float(np.float32(0.9575) - np.float32(0.957506)), 2 * unit, -unit]  # the first: -6e-6, no sample
    assert diffs[0] < 0
    summary = reproduce.paired_summary(diffs, unit)
    assert (summary["higher"], summary["lower"], summary["tied"]) == (1, 1, 1)


def test_comma_list_is_an_argparse_type_naming_the_flag(capsys, tmp_path):
    parse = reproduce.comma_list(("a", "b"))
    assert parse("b,a,") == ["b", "a"]
    assert refused(capsys, QUICK + ["--fusions", "concat,fusionx", "--out", str(tmp_path)]).startswith(
        "error: argument --fusions: unknown fusionx; expected some of")


def tiny_tasks(runs_dir, epochs=2):
    training = dict(reproduce.TABLE2_TRAINING, epochs=epochs, warmup=1)
    return reproduce.pair_tasks(["sample-level-weak-view"], reproduce.regime_cells, ((0, 1000), (1, 1001)),
                                training, str(runs_dir), "regime", {})[:3]


def test_an_interrupted_study_resumes_from_its_finished_runs(tmp_path, monkeypatch, capsys):
    whole, _ = reproduce.run_tasks(tiny_tasks(tmp_path / "a"), jobs=1)
    run_cell, calls = reproduce.run_cell, []

    def stopped_after_one(*task):
        calls.append(task)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return run_cell(*task)
    monkeypatch.setattr(reproduce, "run_cell", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        reproduce.run_tasks(tiny_tasks(tmp_path / "b"), jobs=1)
    monkeypatch.setattr(reproduce, "run_cell", run_cell)
    capsys.readouterr()
    resumed, _ = reproduce.run_tasks(tiny_tasks(tmp_path / "b"), jobs=1)
    assert "1 of 3 runs finished before with these settings and code: reused" in capsys.readouterr().out
    assert without_time(resumed) == without_time(whole)
    assert [r["run_dir"] for r in resumed] == [r["run_dir"].replace(str(tmp_path / "a"), str(tmp_path / "b"))
                                               for r in whole]
    # a changed setting, other code or a cut record is not reused
    code = reproduce.code_fingerprint()
    tasks = tiny_tasks(tmp_path / "b")
    assert all(reproduce.finished_record(task, code) is not None for task in tasks)
    assert all(reproduce.finished_record(task, code) is None for task in tiny_tasks(tmp_path / "b", epochs=3))
    assert reproduce.finished_record(tasks[0], "other code") is None
    monkeypatch.setitem(reproduce.SETTINGS, "sample-level-weak-view",
                        dict(reproduce.SETTINGS["sample-level-weak-view"], weak_signal=0.3))
    assert reproduce.finished_record(tasks[0], code) is None


def test_cooperation_margin_by_hand():
    # coalitions: 1 view 0 alone, 2 view 1 alone, 3 both; weak view 1, 0, 1, 0: the strong views 0, 1, 0, 1
    correct = np.array([[0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 1, 1]], dtype=bool)
    weak = np.array([1, 0, 1, 0])
    # joint 3 of 4; the strong view alone: sample 0 yes, 1 no, 2 no, 3 yes: 2 of 4
    assert reproduce.cooperation_margin(correct, weak) == 0.25


@pytest.mark.slow
def test_table2_second_edition_on_a_tiny_grid_and_its_resume(tmp_path, monkeypatch, capsys):
    weak_view = reproduce.SETTINGS["sample-level-weak-view"]
    monkeypatch.setitem(reproduce.SETTINGS, "weak-0.6", dict(weak_view, weak_signal=0.6))
    monkeypatch.setattr(reproduce, "TABLE2_MODES", ("baseline", "sample"))
    tiny = dict(settings=("sample-level-weak-view",), pairs=((0, 1000), (1, 1001)), tuning_pairs=((100, 1100),),
                training=dict(reproduce.TABLE2_TRAINING, epochs=2, warmup=1), knobs={"sample": ("warmup", (1, 5))},
                regime=((0.8, "sample-level-weak-view"), (0.4, "weak-0.6")), regime_pairs=((0, 1000), (1, 1001)),
                regime_knobs_from="sample-level-weak-view")
    first = reproduce.table2_second(str(tmp_path / "out"), str(tmp_path / "runs"), jobs=2, **tiny)
    with open(tmp_path / "out" / "tuning.json") as f:
        tuning = json.load(f)
    choice = tuning["choices"]["sample-level-weak-view"]["sample"]
    assert choice["default"] == 5 and choice["never_acts"] == [5]  # warm-up 5 of 2 epochs: the baseline exactly
    rows = first["regime"]["rows"]
    assert [(row["strength"], row["setting"], row["pairs"]) for row in rows] == [
        (0.8, "sample-level-weak-view", 2), (0.4, "weak-0.6", 2)]
    regime = [r for r in first["records"] if r.get("study") == "regime"]
    assert len(regime) == 2 * 2 * len(reproduce.REGIME_MODES)
    for row in rows:
        runs = {(r["mode"], r["seed"]): r for r in regime if r["setting"] == row["setting"]}
        gains = [runs[("sample", k)]["test_acc"] - runs[("baseline", k)]["test_acc"] for k in (0, 1)]
        assert row["gains"]["sample"]["mean"] == pytest.approx(np.mean(gains))
        margin = np.mean([runs[("naive", k)]["cooperation_margin"] for k in (0, 1)])
        assert row["cooperation_margin"]["naive"] == pytest.approx(margin)
    with open(tmp_path / "out" / "regime.md") as f:
        table = [line for line in f.read().splitlines() if line.startswith("| 0.")]
    assert [line.split(" | ")[0] for line in table] == ["| 0.8 (sample-level-weak-view)", "| 0.4 (weak-0.6)"]
    assert os.path.exists(tmp_path / "out" / "regime.png")
    with open(tmp_path / "out" / "results.md") as f:
        text = f.read()
    assert "Wall time of the whole edition" in text and "## Regime map" in text
    assert first["seconds"] > 0
    capsys.readouterr()
    again = reproduce.table2_second(str(tmp_path / "out"), str(tmp_path / "runs"), **tiny)
    out = capsys.readouterr().out
    reused = re.findall(r"(\d+) of (\d+) runs finished before with these settings and code: reused", out)
    assert len(reused) == 3 and all(done == total for done, total in reused)
    assert without_time(again["records"]) == without_time(first["records"])


def test_pilot_runs_the_baseline_only_and_its_measures_match_the_checkpoints(tmp_path):
    candidates = {"both weakened": dict(views="fac,pix", weak_signal=0.25, strong_signal=0.4, test_fraction=0.4,
                                        pairs=[[200, 1200], [201, 1201]], seeds=[220])}
    training = dict(reproduce.TABLE2_TRAINING, epochs=1, warmup=0)
    rows = reproduce.pilot(tmp_path / "out", tmp_path / "runs", candidates=candidates, training=training)
    with open(tmp_path / "out" / "pilot.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(rows)) and len(saved["runs"]) == 3
    for run in saved["runs"]:
        run_dir = tmp_path / "runs" / "pilot" / f"both weakened-s{run['seed']}-split{run['split_seed']}"
        with open(run_dir / "args.json") as f:
            args = json.load(f)
        assert (args["mode"], args["fusion"], args["mfeat_strong_signal"], args["mfeat_test_fraction"]) == \
            ("baseline", "concat", 0.4, 0.4)
        result, test_set = train.evaluate_checkpoint(str(run_dir / "best.pt"))
        correct = result["correct"].tolist()
        weak = test_set.degraded_view[result["index"]].tolist()
        assert len(correct) == 800
        stronger = sum(row[2 if w == 0 else 1] for row, w in zip(correct, weak)) / len(correct)  # brute force
        assert run["stronger_alone"] == pytest.approx(stronger)
        assert run["joint"] == pytest.approx(sum(row[3] for row in correct) / len(correct))
    row, = rows
    paired = [r for r in saved["runs"] if r["seed"] - 200 == r["split_seed"] - 1200]
    assert row["pairs"] == 2 and row["seeds_on_one_split"] == 2
    assert row["joint"] == pytest.approx(100 * np.mean([r["joint"] for r in paired]))
    assert row["margin"] == pytest.approx(row["joint"] - 100 * np.mean([r["stronger_alone"] for r in paired]))
