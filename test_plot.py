"""The pictures of a run (plot.py): the numbers drawn are the log's, the contributions files' and the CSV's, read
back from the figures' artists and compared with the files read here; the run without matplotlib; the command."""
import csv
import json
import os
import shutil
import sys
from collections import Counter

import numpy as np
import pytest

import plot
import train
from conftest import MFEAT, run_train

pytest.importorskip("matplotlib")

RUN = MFEAT + ["--epochs", "3", "--warmup", "1"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def panel(fig, title):
    """The axes of `fig` whose title starts with `title`."""
    (ax,) = [ax for ax in fig.axes if ax.get_title().startswith(title)]
    return ax


def lines(ax):
    """{label: y values} of the lines drawn in `ax`."""
    return {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def bars(ax):
    """{label: bar heights} of the bar groups drawn in `ax`."""
    return {bar.get_label(): np.array([patch.get_height() for patch in bar]) for bar in ax.containers}


def without_matplotlib(monkeypatch):
    """As if matplotlib were not installed: importing it, or any of its modules already loaded, raises ImportError."""
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("plot") / "sample")
    run_train(out, *RUN, "--mode", "sample")
    return out


def test_the_run_picture_draws_the_log_and_the_spread_of_the_contributions_files(sample_run):
    assert os.path.getsize(os.path.join(sample_run, "training.png")) > 0
    log = read_log(sample_run)
    curves = plot.run_curves(sample_run)
    fig = plot.run_figure(curves)
    assert curves["modalities"] == ["pix", "mor"]
    assert list(curves["epoch"]) == [0, 1, 2] and curves["phase"] == ["warmup", "sample", "sample"]

    contributions = lines(panel(fig, "mean contribution"))
    assert list(contributions) == ["pix", "mor"]
    assert np.isnan(contributions["pix"][0]) and np.isnan(contributions["mor"][0])  # no valuation in the warm-up
    band_edges = [np.concatenate([path.vertices[:, 1] for path in band.get_paths()])  # mean - std, mean + std
                  for band in panel(fig, "mean contribution").collections]
    for m, name in enumerate(["pix", "mor"]):
        for row, record in enumerate(log[1:], 1):
            phi = np.load(os.path.join(sample_run, "contributions", f"epoch_{record['epoch']:03d}.npz"))["phi"][:, m]
            spread = np.sqrt(np.mean((phi - record["mean_phi"][m]) ** 2))  # about the logged mean
            assert contributions[name][row] == pytest.approx(record["mean_phi"][m])
            assert curves["std_phi"][row, m] == pytest.approx(spread, abs=1e-6)
            assert np.isclose(band_edges[m], record["mean_phi"][m] + spread, atol=1e-6).any()
            assert np.isclose(band_edges[m], record["mean_phi"][m] - spread, atol=1e-6).any()
        assert lines(panel(fig, "uni-modal copies"))[name].tolist() == [r["copies"][m] for r in log]
        assert lines(panel(fig, "validation accuracy"))[f"{name} alone"] == pytest.approx(
            [100 * r["val_acc_per_modality"][m] for r in log])
    assert sum(log[-1]["copies"]) > 0
    assert lines(panel(fig, "training loss"))["training loss"] == pytest.approx([r["train_loss"] for r in log])
    assert lines(panel(fig, "validation accuracy"))["all modalities"] == pytest.approx(
        [100 * r["val_acc"] for r in log])
    # the warm-up is shaded in every panel: epoch 0, from -0.5 to 0.5
    for ax in fig.axes:
        (shade,) = ax.patches
        assert shade.get_x() == -0.5 and shade.get_width() == 1
    assert "warm-up 0 (shaded), sample 1-2" in fig.get_suptitle()


def test_a_compared_method_marks_the_panels_it_has_nothing_for_and_its_joint_epochs(tmp_path):
    out = str(tmp_path / "run")
    run_train(out, *RUN, "--mode", "ogm-ge", "--modulation-ends", "1")
    curves = plot.run_curves(out)
    assert curves["spans"] == [("warmup", 0, 0), ("ogm-ge", 1, 1), ("joint", 2, 2)]
    assert np.isnan(curves["mean_phi"]).all() and np.isnan(curves["std_phi"]).all()
    fig = plot.run_figure(curves)
    contributions = panel(fig, "mean contribution")
    assert lines(contributions) == {} and "no valuation in this run" in contributions.texts[0].get_text()
    assert "no uni-modal copies" in panel(fig, "uni-modal copies").texts[0].get_text()
    shaded = sorted((patch.get_x(), patch.get_width()) for patch in panel(fig, "training loss").patches)
    assert shaded == [(-0.5, 1), (1.5, 1)]  # the warm-up and the epoch after --modulation-ends
    assert lines(panel(fig, "training loss"))["training loss"] == pytest.approx(
        [r["train_loss"] for r in read_log(out)])


def test_eval_only_draws_beside_its_csv_the_numbers_of_the_csv(sample_run):
    train.main(["--eval-only", "--resume", os.path.join(sample_run, "best.pt"), "--eval-split", "val"])
    csv_path = os.path.join(sample_run, "valuation_val_best.csv")
    assert os.path.getsize(os.path.join(sample_run, "valuation_val_best.png")) > 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    summary = plot.valuation_summary(csv_path)
    fig = plot.valuation_figure(summary)
    assert summary["modalities"] == ["pix", "mor"] and summary["samples"] == len(rows) == 400
    drawn = bars(panel(fig, "contribution of each modality"))
    low = bars(panel(fig, "samples whose modality"))
    correct = [row for row in rows if row["label"] == row["prediction"]]
    wrong = [row for row in rows if row["label"] != row["prediction"]]
    assert summary["correct"] == len(correct)
    for m, name in enumerate(["pix", "mor"]):
        counted = Counter(float(row[f"phi_{name}"]) for row in rows)
        assert dict(zip(summary["values"].tolist(), drawn[name].tolist())) == {
            value: counted.get(value, 0) for value in summary["values"].tolist()}
        assert sum(drawn[name]) == len(rows)
        for group, label in ((correct, "correctly"), (wrong, "wrongly")):
            below = sum(float(row[f"phi_{name}"]) < 1 for row in group)
            height = low[f"{label} predicted ({len(group)})"][m]
            assert height == pytest.approx(100 * below / len(group) if group else 0)


def test_the_valuation_summary_of_a_small_csv_by_hand(tmp_path):
    path = tmp_path / "valuation_test_best.csv"
    path.write_text("id,label,prediction,phi_a,phi_v,ogm_score_a,ogm_score_v\n"
                    "s1,0,0,1.5000,0.5000,0.9,0.1\n"   # correct, v low
                    "s2,1,1,1.0000,1.0000,0.5,0.5\n"   # correct, none low (phi = 1 is not below 1)
                    "s3,2,0,0.5000,-0.5000,0.2,0.1\n"  # wrong: phi sums to v(N) = 0, both low
                    "s4,1,1,0.5000,1.5000,0.3,0.8\n")  # correct, a low
    summary = plot.valuation_summary(str(path))
    assert summary["values"].tolist() == [-0.5, 0.5, 1.0, 1.5]
    assert summary["counts"].tolist() == [[0, 2, 1, 1], [1, 1, 1, 1]]
    assert summary["correct"] == 3
    assert summary["low_correct"].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert summary["low_wrong"].tolist() == [1.0, 1.0]


def test_without_matplotlib_a_run_says_once_how_to_get_the_picture_and_nothing_else_changes(sample_run, tmp_path,
                                                                                             monkeypatch, capsys):
    without_matplotlib(monkeypatch)
    out = str(tmp_path / "run")
    capsys.readouterr()
    results, log = run_train(out, *RUN, "--mode", "sample")
    printed = capsys.readouterr().out.splitlines()
    said = [line for line in printed if "matplotlib is" in line or "picture" in line]
    assert said == [f"training.png not drawn: matplotlib is not installed (pip install matplotlib, then python plot.py "
                    f"{out})"]
    assert not os.path.exists(os.path.join(out, "training.png"))
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("seconds", "valuation_seconds")} for r in records]
    assert log == strip(read_log(sample_run))  # the same run as with matplotlib
    with open(os.path.join(sample_run, "results.json")) as f:
        assert results["test_acc"] == json.load(f)["test_acc"]
    train.main(["--eval-only", "--resume", os.path.join(out, "best.pt")])
    said = [line for line in capsys.readouterr().out.splitlines() if "matplotlib is" in line or "picture" in line]
    assert len(said) == 1 and said[0].startswith("valuation_test_best.png not drawn")
    assert os.path.exists(os.path.join(out, "valuation_test_best.csv"))
    assert not os.path.exists(os.path.join(out, "valuation_test_best.png"))


def test_a_resumed_run_redraws_the_picture_from_the_whole_log(tmp_path):
    out = str(tmp_path / "run")
    run_train(out, *MFEAT, "--epochs", "2", "--warmup", "1")
    os.remove(os.path.join(out, "training.png"))
    train.main(["--resume", os.path.join(out, "last.pt"), "--epochs", "3"])
    assert os.path.exists(os.path.join(out, "training.png"))
    fig = plot.run_figure(plot.run_curves(out))
    assert lines(panel(fig, "training loss"))["training loss"] == pytest.approx(
        [r["train_loss"] for r in read_log(out)])
    assert len(read_log(out)) == 3


def test_the_command_redraws_a_copied_run_folder(sample_run, tmp_path, capsys):
    copy = tmp_path / "copied"
    copy.mkdir()
    for name in ("log.jsonl", "results.json", "valuation_val_best.csv"):
        if os.path.exists(os.path.join(sample_run, name)):
            shutil.copy(os.path.join(sample_run, name), copy)
    paths = plot.main([str(copy)])
    assert paths[0] == os.path.join(str(copy), "training.png") and os.path.getsize(paths[0]) > 0
    assert all(os.path.getsize(path) > 0 for path in paths)
    assert capsys.readouterr().out.splitlines() == [f"picture: {path}" for path in paths]
    curves, original = plot.run_curves(str(copy)), plot.run_curves(sample_run)
    assert curves["modalities"] == ["pix", "mor"]
    np.testing.assert_array_equal(curves["mean_phi"], original["mean_phi"])
    assert np.isnan(curves["std_phi"]).all()  # contributions/ not copied: no spread to draw
    shutil.copytree(os.path.join(sample_run, "contributions"), copy / "contributions")
    np.testing.assert_array_equal(plot.run_curves(str(copy))["std_phi"], original["std_phi"])


def refused(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        plot.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_the_command_refuses_what_is_not_a_run_folder_in_one_line(tmp_path, capsys, monkeypatch):
    assert "RUN_DIR" in refused(capsys, [])
    missing = str(tmp_path / "nowhere")
    assert refused(capsys, [missing]) == (f"error: {missing}: expected a run folder of train.py, holding log.jsonl "
                                          f"(no such folder)")
    assert refused(capsys, [str(tmp_path)]) == (f"error: {tmp_path}: expected a run folder of train.py, holding "
                                                f"log.jsonl")
    (tmp_path / "log.jsonl").write_text('{"epoch": 0}\nnot json\n')
    assert "log.jsonl: line 1 lacks phase" in refused(capsys, [str(tmp_path)])
    (tmp_path / "log.jsonl").write_text("")
    assert "holds no epoch yet" in refused(capsys, [str(tmp_path)])
    (tmp_path / "log.jsonl").write_text("not json\n")
    assert refused(capsys, [str(tmp_path)]) == f"error: {tmp_path / 'log.jsonl'}: line 1 is not JSON"
    without_matplotlib(monkeypatch)
    assert "pip install matplotlib" in refused(capsys, [str(tmp_path)])
    assert not os.path.exists(tmp_path / "training.png")


@pytest.mark.slow
def test_a_two_process_run_draws_its_picture_once_from_its_log(tmp_path):
    from test_distributed import torchrun
    out = tmp_path / "run"
    done = torchrun("train.py", *RUN, "--mode", "sample", "--out", out)
    assert done.stdout.count("picture: ") == 1
    fig = plot.run_figure(plot.run_curves(str(out)))
    assert lines(panel(fig, "training loss"))["training loss"] == pytest.approx(
        [r["train_loss"] for r in read_log(out)])
    assert os.path.getsize(out / "training.png") > 0
