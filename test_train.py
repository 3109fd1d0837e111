"""End-to-end tests of train.py: every mode on synthetic and mfeat data, the log, --eval-only, --help."""
import csv
import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

import engine
import shapley_mm
import train

from conftest import MFEAT, SYNTHETIC, run_train

MFEAT = MFEAT + ["--epochs", "3", "--warmup", "1"]
RESAMPLING_AND_BASELINE = ("baseline",) + train.RESAMPLING_MODES  # the comparators: test_comparators.py


def run(tmp_path, *flags, name="run"):
    out = str(tmp_path / name)
    return (out,) + run_train(out, *flags)


def contributions(out, epoch):
    return np.load(os.path.join(out, "contributions", f"epoch_{epoch:03d}.npz"))


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """One short synthetic run per mode, shared by the tests below (runs are the slow part)."""
    root = tmp_path_factory.mktemp("synthetic")
    return {mode: run(root, *SYNTHETIC, "--mode", mode, name=mode) for mode in RESAMPLING_AND_BASELINE}


@pytest.mark.parametrize("mode", RESAMPLING_AND_BASELINE)
def test_every_mode_runs_on_synthetic(synthetic_runs, mode):
    out, results, log = synthetic_runs[mode]
    assert [r["epoch"] for r in log] == [0, 1]
    expected_keys = {"epoch", "phase", "train_loss", "train_samples", "copies", "mean_phi", "val_acc", "val_map",
                     "val_acc_per_modality", "lr"}
    assert expected_keys <= set(log[0])
    assert {"seconds", "valuation_seconds"} <= set(train.load_log(os.path.join(out, "log.jsonl"))[0])
    # copies appear only after warm-up
    assert log[0]["phase"] == ("baseline" if mode == "baseline" else "warmup")
    assert log[0]["copies"] == [0, 0] and log[0]["train_samples"] == 48 and log[0]["mean_phi"] is None
    record = log[1]
    assert record["phase"] == mode
    assert record["train_samples"] == 48 + sum(record["copies"])
    assert len(record["val_acc_per_modality"]) == 2
    if mode == "baseline":
        assert record["copies"] == [0, 0] and record["mean_phi"] is None
    else:
        assert len(record["mean_phi"]) == 2 and sum(record["copies"]) > 0
    for key in ("test_acc", "test_map", "test_acc_per_modality"):
        assert key in results and key in json.load(open(os.path.join(out, "results.json")))
    assert os.path.exists(os.path.join(out, "best.pt")) and os.path.exists(os.path.join(out, "last.pt"))
    assert json.load(open(os.path.join(out, "args.json")))["mode"] == mode


def test_sample_mode_copies_follow_eq10_on_the_logged_valuation(synthetic_runs):
    out, _, log = synthetic_runs["sample"]
    for record in log[1:]:
        saved = contributions(out, record["epoch"])
        phi = torch.from_numpy(saved["phi"])
        assert len(phi) == 48 and record["valued_samples"] == 48
        assert record["copies"] == shapley_mm.sample_level_copies(phi).sum(0).tolist()
        assert np.allclose(record["mean_phi"], phi.mean(0).numpy(), atol=1e-6)
        # Eq. 1-3 with two modalities: phi_a + phi_v = v(N), each in {-0.5, 0, 0.5, 1, 1.5}
        assert set(phi.flatten().tolist()) <= {-0.5, 0.0, 0.5, 1.0, 1.5}
        assert set(phi.sum(1).tolist()) <= {0.0, 2.0}


def test_modality_mode_values_only_the_subset(synthetic_runs):
    out, _, log = synthetic_runs["modality"]
    for record in log[1:]:
        saved = contributions(out, record["epoch"])
        assert record["valued_samples"] == len(saved["phi"]) == 10  # |Z| = 20 % of 48, rounded
        assert len(set(saved["index"].tolist())) == 10
        modality, probability = shapley_mm.modality_level_plan(torch.from_numpy(saved["phi"]))
        # Eq. 11: only the overall low-contributing modality is re-sampled, int(p * N) copies
        assert record["copies"][1 - modality] == 0
        assert record["copies"][modality] == int(probability * 48)


def test_naive_keeps_the_per_modality_totals_of_the_sample_rule(synthetic_runs):
    out, _, log = synthetic_runs["naive"]
    for record in log[1:]:
        phi = torch.from_numpy(contributions(out, record["epoch"])["phi"])
        assert record["copies"] == shapley_mm.sample_level_copies(phi).sum(0).tolist()
    plan = torch.load(os.path.join(out, "last.pt"), weights_only=False)["plan"]  # the last epoch's, row by row
    assert not torch.equal(plan["copies"], shapley_mm.sample_level_copies(plan["phi"]))  # other samples than Eq. 10's


def test_reversed_gives_all_copies_to_the_higher_contributing_modality(synthetic_runs):
    out, _, log = synthetic_runs["reversed"]
    checkpoint = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    phi, copies = checkpoint["plan"]["phi"], checkpoint["plan"]["copies"]
    assert torch.equal(copies.sum(1), shapley_mm.sample_level_copies(phi).sum(1))  # each sample keeps its count
    highest = phi == phi.max(1, keepdim=True).values  # [N, n], ties broken at random among these
    assert (highest | (copies == 0)).all() and ((copies > 0).sum(1) <= 1).all()
    assert log[-1]["copies"] == copies.sum(0).tolist()


def test_three_views_log_the_copies_of_exact_contributions(tmp_path):
    out, _, log = run(tmp_path, *MFEAT, "--views", "fac,pix,kar", "--mode", "sample")
    for record in log[1:]:
        saved = contributions(out, record["epoch"])
        assert list(saved["modalities"]) == ["fac", "pix", "kar"]
        exact = [[Fraction(float(p)).limit_denominator(6) for p in row] for row in saved["phi"]]  # n! = 6
        copies = [sum(sum((p < 1, p < Fraction(2, 5), p < Fraction(-1, 10))) for p in column)
                  for column in zip(*exact)]
        assert record["copies"] == copies


@pytest.mark.parametrize("mode", ["baseline", "sample", "modality"])
def test_mfeat_runs(tmp_path, mode):
    out, results, log = run(tmp_path, *MFEAT, "--mode", mode)
    assert log[0]["train_samples"] == 1200
    assert results["modalities"] == ["pix", "mor"]
    if mode != "baseline":
        assert sum(log[-1]["copies"]) > 0


def test_track_phi_values_warmup_and_baseline_epochs(tmp_path):
    out, _, log = run(tmp_path, *SYNTHETIC, "--mode", "baseline", "--track-phi")
    assert all(record["copies"] == [0, 0] for record in log)
    assert all(len(record["mean_phi"]) == 2 for record in log)
    assert len(contributions(out, 0)["phi"]) == 48


def test_track_phi_leaves_training_bit_identical(tmp_path, mode="ogm-ge"):
    """Valuing only to log (--track-phi) must not move the global generator that training draws from (OGM-GE's
    noise; augmentation): every logged field but the contributions is the same, and so are the weights."""
    flags = (*MFEAT, "--mode", mode, "--seed", "1")
    plain_dir, plain, plain_log = run(tmp_path, *flags, name="plain")
    tracked_dir, tracked, tracked_log = run(tmp_path, *flags, "--track-phi", name="tracked")
    logging_only = ("mean_phi", "valued_samples")
    strip = lambda log: [{k: v for k, v in r.items() if k not in logging_only} for r in log]
    assert strip(plain_log) == strip(tracked_log)
    assert plain["test_acc"] == tracked["test_acc"]
    for a, b in zip(torch.load(os.path.join(plain_dir, "last.pt"), weights_only=False)["model"].values(),
                    torch.load(os.path.join(tracked_dir, "last.pt"), weights_only=False)["model"].values()):
        assert torch.equal(a, b)


def test_eval_only_reproduces_the_logged_validation_accuracy(synthetic_runs):
    out, results, log = synthetic_runs["sample"]
    best = max(log, key=lambda r: r["val_acc"])
    evaluated = train.main(["--eval-only", "--resume", os.path.join(out, "best.pt"), "--eval-split", "val"])
    assert evaluated["acc"] == pytest.approx(best["val_acc"])
    assert evaluated["acc_per_modality"] == pytest.approx(best["val_acc_per_modality"])
    with open(os.path.join(out, "valuation_val_best.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    assert set(rows[0]) == {"id", "label", "prediction", "phi_spectrogram0", "phi_image1", "ogm_score_spectrogram0",
                            "ogm_score_image1"}
    accuracy = np.mean([row["label"] == row["prediction"] for row in rows])
    assert accuracy == pytest.approx(best["val_acc"])
    tested = train.main(["--eval-only", "--resume", os.path.join(out, "best.pt")])
    assert tested["acc"] == pytest.approx(results["test_acc"])
    # the last checkpoint's valuation goes beside the best one's, each file named after its checkpoint
    with open(os.path.join(out, "valuation_val_best.csv")) as f:
        best_csv = f.read()
    last = train.main(["--eval-only", "--resume", os.path.join(out, "last.pt"), "--eval-split", "val"])
    with open(os.path.join(out, "valuation_val_best.csv")) as f:
        assert f.read() == best_csv
    with open(os.path.join(out, "valuation_val_last.csv")) as f:
        assert len(list(csv.DictReader(f))) == 16
    with open(os.path.join(out, "eval_val_last.json")) as f:
        assert json.load(f)["checkpoint"] == os.path.abspath(os.path.join(out, "last.pt")) == last["checkpoint"]
    assert not os.path.exists(os.path.join(out, "valuation_val.csv"))


def test_ogm_confidence_is_read_only_where_it_is_written(synthetic_runs, monkeypatch):
    """--eval-only writes OGM-GE's confidence; other evaluations of a checkpoint (reproduce.py, sweep.py) do not read
    it, and the pass that does reads the split once, phi and confidence together."""
    out, _, _ = synthetic_runs["sample"]
    reads = []
    original = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda *args, **kwargs: reads.append(1) or original(*args, **kwargs))
    result, _ = train.evaluate_checkpoint(os.path.join(out, "best.pt"), "val")
    assert "ogm_score" not in result and len(reads) == 1
    result, _ = train.evaluate_checkpoint(os.path.join(out, "best.pt"), "val", confidence=True)
    assert result["ogm_score"].shape == result["phi"].shape and len(reads) == 2


@pytest.mark.parametrize("dataset, epochs, optimizer", [("mfeat", 40, "sgd"), ("ks", 60, "sgd"), ("synthetic", 6, "adam")])
def test_help_shows_the_defaults_of_the_data_set_given(capsys, dataset, epochs, optimizer):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset", dataset, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"total epochs, warm-up included (default: {epochs})" in text
    assert f"--optimizer {{sgd,adam}} (default: {optimizer})" in text
    assert "(default: None)" not in text.split("--mask")[0] + text.split("--mask")[1].split("--warmup")[1]


def test_preset_defaults_and_given_flags(tmp_path):
    args, given = train.parse_args(["--dataset", "ucf101", "--no-pretrained", "--lr", "0.5"])
    assert args.pretrained is False and args.lr == 0.5 and args.epochs == 60
    assert sorted(given) == ["dataset", "lr", "pretrained"]
    assert train.parse_args(["--dataset", "ucf101"])[0].pretrained is True


def test_mean_average_precision_matches_a_hand_computed_example():
    # class 0 ranks the samples 0, 1, 2, 3; its positives 0 and 2 come 1st and 3rd -> AP = (1/1 + 2/3) / 2
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.05]])
    labels = torch.tensor([0, 1, 0, 1])
    # class 1 ranks them 2, 1, 0, 3; its positives 1 and 3 come 2nd and 4th -> AP = (1/2 + 2/4) / 2
    expected = ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 4) / 2) / 2
    assert engine.mean_average_precision(scores, labels) == pytest.approx(expected)


def reference_average_precision(scores, positives):
    """Average precision by its definition: over the distinct score thresholds t, from the highest,
    (recall(t) - recall(previous t)) * precision(t), where a threshold takes every row scoring >= t."""
    total = sum(positives)
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        taken = [p for s, p in zip(scores, positives) if s >= threshold]
        recall, precision = sum(taken) / total, sum(taken) / len(taken)
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(4))
def test_mean_average_precision_treats_tied_scores_as_one_threshold(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.rand(40, 4, generator=generator) * 4).round() / 4  # few distinct values: many ties
    if seed == 0:
        scores = torch.rand(40, 4, generator=generator)  # and once without ties
    labels = torch.randint(4, (40,), generator=generator)
    expected = sum(reference_average_precision(scores[:, k].tolist(), (labels == k).tolist())
                   for k in range(4)) / 4
    for order in (torch.arange(40), torch.arange(40).flip(0), torch.randperm(40, generator=generator)):
        assert engine.mean_average_precision(scores[order], labels[order]) == pytest.approx(expected, abs=1e-6)


def test_mean_average_precision_on_the_tied_example_of_the_standard_definition():
    scores = torch.tensor([[.5, .5], [.5, .5], [.2, .8], [.1, .9]])
    labels = torch.tensor([1, 0, 1, 1])
    assert engine.mean_average_precision(scores, labels) == pytest.approx(0.708333333333, abs=1e-6)
    assert engine.mean_average_precision(scores[[1, 0, 2, 3]], labels[[1, 0, 2, 3]]) == pytest.approx(0.708333333333)
    metrics = pytest.importorskip("sklearn.metrics")
    one_hot = torch.nn.functional.one_hot(labels, 2).numpy()
    assert engine.mean_average_precision(scores, labels) == pytest.approx(
        metrics.average_precision_score(one_hot, scores.numpy(), average="macro"))


@pytest.mark.parametrize("flags", [["--views", "pix"], ["--dataset", "synthetic", "--synthetic-modalities", "1"]])
def test_resampling_modes_refuse_a_single_modality_before_writing(tmp_path, capsys, flags):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(flags + ["--mode", "modality", "--out", str(out)])
    assert stop.value.code == 2
    assert "needs at least two modalities" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--mfeat-strong-signal", "0.5"], "acts with --mfeat-weak-signal only"),
    (["--views", "fac,pix", "--mfeat-weak-signal", "0.3", "--mfeat-strong-signal", "0.2"], "below --mfeat-weak-signal"),
    (["--views", "fac,pix", "--mfeat-weak-signal", "0.3", "--mfeat-strong-signal", "1.5"], "<= 1.0, got 1.5"),
    (["--mfeat-test-fraction", "0.8"], "<= 0.7, got 0.8"),
])
def test_strong_signal_and_test_fraction_refuse_bad_values_in_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(flags + ["--out", str(out)])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and message in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


def test_strong_signal_and_test_fraction_reach_the_data_sets():
    args = train.make_args(views=["fac", "pix"], mfeat_weak_signal=0.25, mfeat_strong_signal=0.35,
                           mfeat_test_fraction=0.4, gpu=-1)
    splits = train.build_datasets(args)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [800, 400, 800]
    assert all(splits[s].strong_signal == 0.35 and splits[s].weak_signal == 0.25 for s in ("train", "val", "test"))
