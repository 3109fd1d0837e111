"""Online valuation (--valuation online): values taken in the training step equal offline values computed with the
same weights, inputs and BatchNorm mode; the next epoch's plan follows Eq. 10 / 11 on them; resume stays exact;
and runs that cannot reuse the step's features are refused in one line."""
import copy
import os

import numpy as np
import pytest
import torch

import engine
import method
import models
import shapley_mm
import train
from conftest import MFEAT, assert_same_weights, fails, logged, run, weights

SPECS = {"vector": [("vector", 12), ("vector", 7)], "image": [("image", 1), ("image", 3)]}
SHAPES = {"vector": [(12,), (7,)], "image": [(1, 16, 16), (3, 16, 16)]}
NUM_CLASSES, NUM_SAMPLES = 3, 40


def batch_of(kind, size, generator):
    """Random inputs for SPECS[kind], labels, and distinct sample indices out of NUM_SAMPLES."""
    inputs = [torch.randn(size, *shape, generator=generator) for shape in SHAPES[kind]]
    target = torch.randint(NUM_CLASSES, (size,), generator=generator)
    index = torch.randperm(NUM_SAMPLES, generator=generator)[:size]
    return inputs, target, index


def late_model(kind, fusion="concat"):
    torch.manual_seed(0)
    return models.build_model(SPECS[kind], NUM_CLASSES, fusion, "feature")


def online_method(mode, num_samples, table, generator=None):
    """The paper's method with online valuation after a warm-up epoch, whose previous epoch filled `table`."""
    valuation = method.OnlineValuation(num_samples, 2)
    valuation.table = table
    return method.METHODS[mode](valuation, generator, num_samples, warmup=1)


def empty_table(num_samples, n=2):
    """What an epoch of online valuation starts recording into."""
    valuation = method.OnlineValuation(num_samples, n)
    valuation.start_recording(True)
    return valuation.table


def step_with_online_valuation(model, inputs, target, index, mask):
    """One training step (engine.train_one_epoch over one batch, SGD) with online valuation: the table it fills."""
    table = empty_table(NUM_SAMPLES, model.num_modalities)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = engine.TrainingStep(model, online_method("sample", NUM_SAMPLES, table))
    engine.train_one_epoch(step, [(inputs, target, index, mask)], optimizer, scaler, torch.device("cpu"), 0)
    return table


# ----------------------------------------------------------------------------------------------
# the values: equal to offline valuation with the same weights, inputs and BatchNorm mode


@pytest.mark.parametrize("kind, fusion", [("vector", f) for f in models.FUSION_HEADS] + [("image", "concat")])
def test_online_values_of_a_training_batch_equal_offline_values_with_the_same_weights(kind, fusion):
    """A batch of original samples in training mode: each coalition's offline prediction (the model's own
    coalition_predictor, a forward of the whole batch per coalition in training mode, so with the same batch
    statistics) from the weights before the step equals what the step recorded."""
    generator = torch.Generator().manual_seed(1)
    inputs, target, index = batch_of(kind, 16, generator)
    model = late_model(kind, fusion)
    before = copy.deepcopy(model)
    table = step_with_online_valuation(model, inputs, target, index, torch.ones(16, 2, dtype=torch.bool))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))  # the step ran

    before.train()
    with torch.no_grad():
        expected, _ = shapley_mm.coalition_correctness(before.coalition_predictor(inputs), target, 2)
    assert torch.equal(table["correct"][index], expected)
    assert table["seen"].sum() == 16 and table["seen"][index].all()
    assert torch.equal(shapley_mm.shapley_values(shapley_mm.benefit(table["correct"][index])),
                       shapley_mm.valuate(before.coalition_predictor(inputs), target, 2))
    assert 0 < expected[:, 1:].float().mean() < 1  # some coalitions right, some wrong: the comparison says something


@pytest.mark.parametrize("kind", ["vector", "image"])
def test_online_values_of_a_resampled_batch_equal_the_offline_pass_in_eval_mode(kind):
    """A batch of originals and uni-modal copies, both sides in eval mode: OnlineValuation.record on the features of the
    step's forward (encode with the copies' masks) gives the original rows the correctness engine.valuation_pass
    (the offline pass) gives the same samples; the copies, and samples present only as copies, are not valued."""
    generator = torch.Generator().manual_seed(2)
    inputs, target, index = batch_of(kind, 12, generator)
    mask = torch.ones(12, 2, dtype=torch.bool)
    mask[8:10, 1] = False  # rows 8-11 are uni-modal copies
    mask[10:, 0] = False
    index[9] = index[2]  # row 9 copies sample index[2]; the others copy samples absent from the batch
    model = late_model(kind).eval()
    valuation = method.OnlineValuation(NUM_SAMPLES, 2)
    valuation.start_recording(True)
    valuation.record(model, model.encode(inputs, mask), target, index, mask)
    table = valuation.table

    originals = list(range(8))
    original_set = [([x[k] for x in inputs], target[k], index[k]) for k in originals]  # a data set of them
    offline = engine.valuation_pass(model, original_set, dict(batch_size=8), torch.device("cpu"))
    assert torch.equal(table["correct"][index[originals]], offline["correct"])
    assert table["seen"].sum() == 8 and table["seen"][index[originals]].all()


# ----------------------------------------------------------------------------------------------
# the plan built from online values (Eq. 10, Eq. 11 over every sample seen)


def filled_table(num_samples, seen, seed=0):
    """A table as an epoch of online valuation leaves it: random coalition outcomes for the `seen` samples."""
    table = empty_table(num_samples)
    table["correct"] = torch.rand(num_samples, 4, generator=torch.Generator().manual_seed(seed)) < 0.6
    table["correct"][:, 0] = False  # the empty coalition is never predicted
    table["correct"][~seen] = False
    table["seen"] = seen
    return table


@pytest.mark.parametrize("mode", ["sample", "modality", "naive", "reversed"])
def test_plan_from_an_online_table_follows_eq10_and_eq11(mode):
    seen = torch.ones(30, dtype=torch.bool)
    seen[[3, 17]] = False
    table = filled_table(30, seen)
    # no model, loader or device: online, the plan reads only the table (and the size of the training set)
    plan = online_method(mode, 30, table, torch.Generator().manual_seed(0)).plan(1, None)
    valued, phi, copies = plan.valued, plan.phi, plan.copies
    assert torch.equal(valued, seen.nonzero().squeeze(1))  # every sample seen, no subset Z
    expected_phi = shapley_mm.shapley_values(shapley_mm.benefit(table["correct"][valued]))  # Eq. 1-3
    assert torch.equal(phi, expected_phi)
    eq10 = torch.zeros(30, 2, dtype=torch.long)
    eq10[valued] = shapley_mm.sample_level_copies(expected_phi)
    if mode == "sample":
        assert torch.equal(copies, eq10)
    elif mode == "modality":
        modality, probability = shapley_mm.modality_level_plan(expected_phi)
        assert copies[:, 1 - modality].sum() == 0 and copies[:, modality].sum() == int(probability * 30)
        # online, Z is every sample seen: the plan draws nothing before the copies (no subset Z drawn)
        assert torch.equal(copies, shapley_mm.modality_level_copies(30, 2, modality, probability,
                                                                    generator=torch.Generator().manual_seed(0)))
    else:  # Table 4: the same per-modality totals (naive) or per-sample totals (reversed) as Eq. 10
        assert torch.equal(copies.sum(0) if mode == "naive" else copies.sum(1), eq10.sum(0 if mode == "naive" else 1))


def contributions(out, epoch):
    return np.load(os.path.join(out, "contributions", f"epoch_{epoch:03d}.npz"))


@pytest.mark.parametrize("mode", ["sample", "modality"])
def test_online_run_plans_each_epoch_from_the_previous_epochs_values(tmp_path, mode):
    flags = MFEAT + ["--mode", mode, "--warmup", "2", "--valuation", "online"]
    run(tmp_path / "warmup", *flags, "--epochs", "2")
    run(tmp_path / "run", *flags, "--epochs", "4")
    table = torch.load(tmp_path / "warmup" / "last.pt", weights_only=False)["method"]["online"]
    assert table["seen"].all()  # the last warm-up epoch valued every sample
    log = logged(tmp_path / "run")
    assert all(record["valuation"] == "online" for record in log)
    assert not os.path.exists(tmp_path / "run" / "contributions" / "epoch_000.npz")
    first = contributions(tmp_path / "run", 2)  # the first re-sampled epoch: the last warm-up epoch's values
    assert str(first["valuation"]) == "online"
    assert np.array_equal(first["phi"], shapley_mm.shapley_values(shapley_mm.benefit(table["correct"])).numpy())
    for record in log[2:]:
        saved = contributions(tmp_path / "run", record["epoch"])
        phi = torch.from_numpy(saved["phi"])
        assert record["valued_samples"] == len(phi) == 1200  # every sample, also for the modality level
        if mode == "sample":
            assert record["copies"] == shapley_mm.sample_level_copies(phi).sum(0).tolist()  # Eq. 10
        else:
            modality, probability = shapley_mm.modality_level_plan(phi)  # Eq. 11
            assert record["copies"][modality] == int(probability * 1200) and record["copies"][1 - modality] == 0


def test_track_phi_logs_online_values_from_the_second_epoch(tmp_path):
    run(tmp_path / "run", *MFEAT, "--mode", "baseline", "--track-phi", "--valuation", "online", "--epochs", "2")
    log = logged(tmp_path / "run")
    assert log[0]["mean_phi"] is None and log[0]["valued_samples"] == 0  # nothing was trained before epoch 0
    assert len(log[1]["mean_phi"]) == 2 and log[1]["copies"] == [0, 0] and log[1]["valued_samples"] == 1200
    assert str(contributions(tmp_path / "run", 1)["valuation"]) == "online"


def test_offline_contributions_and_log_records_say_offline(tmp_path):
    run(tmp_path / "run", *MFEAT, "--mode", "sample", "--warmup", "1", "--epochs", "2")
    assert str(contributions(tmp_path / "run", 1)["valuation"]) == "offline"
    assert all(record["valuation"] == "offline" for record in logged(tmp_path / "run"))


# ----------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("stop", [2, 3], ids=["stop-at-end-of-warmup", "stop-after-resampling"])
def test_resume_with_online_valuation_continues_exactly(tmp_path, stop):
    flags = MFEAT + ["--mode", "sample", "--warmup", "2", "--seed", "3", "--valuation", "online"]
    run(tmp_path / "straight", *flags, "--epochs", "4")
    run(tmp_path / "split", *flags, "--epochs", str(stop))
    train.main(["--resume", str(tmp_path / "split" / "last.pt"), "--epochs", "4"])
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")
    assert_same_weights(weights(tmp_path / "split" / "last.pt"), weights(tmp_path / "straight" / "last.pt"))
    for epoch in (2, 3):
        assert np.array_equal(contributions(tmp_path / "split", epoch)["phi"],
                              contributions(tmp_path / "straight", epoch)["phi"])


def test_checkpoint_from_before_the_flag_resumes_as_offline(tmp_path):
    """A checkpoint as train.py wrote them before --valuation (and --sync-bn) existed: the settings it lacks take
    their defaults (train.upgrade_checkpoint)."""
    run(tmp_path / "run", *MFEAT, "--mode", "sample", "--warmup", "1", "--epochs", "1")
    path = tmp_path / "run" / "last.pt"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["args"]["valuation"], checkpoint["args"]["sync_bn"]
    torch.save(checkpoint, path)
    train.main(["--resume", str(path), "--epochs", "2"])
    assert str(contributions(tmp_path / "run", 1)["valuation"]) == "offline"


# ----------------------------------------------------------------------------------------------
# refusal


@pytest.mark.parametrize("flags, expected", [
    (["--fusion", "mmtm"], "--fusion mmtm mixes the modalities inside the network"),
    (["--fusion", "centralnet"], "--fusion centralnet mixes the modalities inside the network"),
    (["--mask", "input"], "--valuation online needs --mask feature"),
    (["--warmup", "0"], "--warmup 0 leaves epoch 0 without one"),
])
def test_online_valuation_is_refused_where_it_cannot_apply(tmp_path, capsys, flags, expected):
    message = fails(capsys, MFEAT + flags + ["--valuation", "online", "--out", str(tmp_path / "run")])
    assert expected in message and "--valuation offline" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--mode", "baseline"], "--valuation online does nothing in --mode baseline without --track-phi"),
    (["--mode", "agm", "--track-phi"], "--mode agm plans none"),
])
def test_online_valuation_where_it_would_plan_nothing_is_refused(tmp_path, capsys, flags, expected):
    assert expected in fails(capsys, MFEAT + flags + ["--valuation", "online", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
