"""End-to-end runs of train.py for every fusion design (Tables 1 and 3) in every mode, with two and three modalities.

The full grid (8 fusions x 5 modes x 2 modality counts) is `slow`; the default run keeps one run per fusion, in
which every mode and both modality counts appear, the cross-modal designs (centralnet, mmtm) with re-sampling.
"""
import json
import os

import numpy as np
import pytest

import models
import train

# tiny settings: 2 epochs of which 1 is warm-up, one batch per epoch before re-sampling
SYNTHETIC = ["--dataset", "synthetic", "--synthetic-samples", "32", "--synthetic-size", "8", "--batch-size", "32",
             "--epochs", "2", "--warmup", "1", "--gpu", "-1"]
DEFAULT_RUNS = {
    ("concat", "baseline", 2), ("sum", "modality", 3), ("decision", "naive", 2), ("film", "reversed", 2),
    ("gated", "sample", 2), ("centralnet", "sample", 2), ("mmtm", "modality", 3),
}
GRID = [pytest.param(fusion, mode, n, marks=() if (fusion, mode, n) in DEFAULT_RUNS else pytest.mark.slow)
        for fusion in models.FUSIONS for mode in ("baseline",) + train.RESAMPLING_MODES for n in (2, 3)]


@pytest.mark.parametrize("fusion, mode, n", GRID)
def test_fusion_trains_and_values_in_every_mode(tmp_path, fusion, mode, n):
    out = str(tmp_path / "run")
    # baseline values the training set only when asked to (--track-phi), so that its contributions are logged too
    track = ["--track-phi"] if mode == "baseline" else []
    results = train.main(SYNTHETIC + track + ["--synthetic-modalities", str(n), "--fusion", fusion, "--mode", mode,
                                              "--out", out])
    log = train.load_log(os.path.join(out, "log.jsonl"))
    assert [record["epoch"] for record in log] == [0, 1]
    assert all(len(record["val_acc_per_modality"]) == n for record in log)
    record = log[1]
    assert record["phase"] == mode and len(record["mean_phi"]) == n
    contributions = np.load(os.path.join(out, "contributions", "epoch_001.npz"))
    assert contributions["phi"].shape == (record["valued_samples"], n)
    assert np.allclose(contributions["phi"].mean(0), record["mean_phi"], atol=1e-6)
    assert record["train_samples"] == 32 + sum(record["copies"])
    if mode in ("sample", "naive", "reversed"):  # uni-modal copies went through this fusion (Eq. 10: phi < 1)
        assert sum(record["copies"]) > 0
    saved = json.load(open(os.path.join(out, "results.json")))
    assert len(saved["test_acc_per_modality"]) == len(saved["test_mean_phi"]) == n
    assert saved["test_acc"] == results["test_acc"]
    config = json.load(open(os.path.join(out, "args.json")))
    assert (config["fusion"], config["mask"]) == (fusion, models.allowed_masks(fusion)[0])
