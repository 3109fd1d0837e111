"""Tests of comparators.py: each method's update against a step computed by hand on a toy model, the uni-modal
responses against the official weight-slice and masked-forward forms, every mode end to end with two and three
modalities, exact resume, the refusals, and the OGM-GE columns of --eval-only."""
import csv
import math
import os

import pytest
import torch
import torch.nn.functional as F

import comparators
import models
import train

from conftest import MFEAT, SYNTHETIC, run_train


def toy_model(fusion="concat", n=2, mask_mode=None, seed=0):
    torch.manual_seed(seed)
    return models.build_model([("vector", 5 + i) for i in range(n)], num_classes=4, fusion=fusion,
                              mask_mode=mask_mode)


def toy_batch(n=2, batch=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, 5 + i, generator=generator) for i in range(n)]
    return inputs, torch.randint(0, 4, (batch,), generator=generator)


# ----------------------------------------------------------------------------------------------
# uni-modal responses through the mask


@pytest.mark.parametrize("training", [True, False])
def test_ogm_confidence_through_the_mask_equals_the_official_weight_slices(training):
    model = toy_model().train(training)
    inputs, target = toy_batch()
    with torch.no_grad():
        logits, features = comparators.joint_forward(model, inputs)
        responses = comparators.unimodal_responses(model, inputs, features)  # [2, B, K]
        a, v = features
        weight, bias = model.head.fc.weight, model.head.fc.bias
        d = a.shape[1]
        out_a = a @ weight[:, :d].T + bias / 2  # OGM-GE main.py: the weight slice plus half the bias
        out_v = v @ weight[:, d:].T + bias / 2
    assert torch.allclose(responses[0], out_a, atol=1e-5) and torch.allclose(responses[1], out_v, atol=1e-5)
    softmax_a, softmax_v = out_a.softmax(1), out_v.softmax(1)
    score_a = sum(softmax_a[i][target[i]] for i in range(len(target)))  # the official per-sample loop
    score_v = sum(softmax_v[i][target[i]] for i in range(len(target)))
    scores = comparators.true_class_probability(responses, target).sum(1)
    assert torch.allclose(scores, torch.stack([score_a, score_v]), atol=1e-5)


def test_responses_are_agm_masked_forward_forms_for_two_and_three_modalities():
    model = toy_model("gated", n=2).eval()
    inputs, _ = toy_batch(n=2)
    with torch.no_grad():
        f = lambda *keep: model(inputs, torch.tensor([keep], dtype=torch.bool).expand(6, -1))
        responses = comparators.unimodal_responses(model, inputs)
        assert torch.allclose(responses[0], (f(1, 1) - f(0, 1) + f(1, 0)) / 2, atol=1e-5)  # AGM, two modalities
        model3 = toy_model("concat", n=3, mask_mode="input").eval()
        inputs3, _ = toy_batch(n=3)
        g = lambda *keep: model3(inputs3, torch.tensor([keep], dtype=torch.bool).expand(6, -1))
        responses3 = comparators.unimodal_responses(model3, inputs3)
        first = ((g(1, 1, 1) - g(0, 1, 1)) / 3 + (g(1, 1, 0) - g(0, 1, 0) + g(1, 0, 1) - g(0, 0, 1)) / 6
                 + g(1, 0, 0) / 3)  # BalanceBenchmark's three-modality form
    assert torch.allclose(responses3[0], first, atol=1e-5)
    assert torch.allclose(responses3.sum(0), g(1, 1, 1), atol=1e-5)  # efficiency: the responses sum to f(N)


def test_responses_without_shared_features_leave_batchnorm_statistics_alone():
    model = toy_model("concat", mask_mode="input").train()
    inputs, _ = toy_batch()
    before = [b.clone() for b in model.buffers()]
    comparators.unimodal_responses(model, inputs)
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


# ----------------------------------------------------------------------------------------------
# each method's update, by hand


def test_ogm_coefficients_by_hand():
    k = comparators.ogm_coefficients(torch.tensor([30.0, 10.0]), alpha=0.1)  # rho_0 = 3 > 1
    assert torch.allclose(k, torch.tensor([1 - math.tanh(0.3), 1.0]))
    k = comparators.ogm_coefficients(torch.tensor([6.0, 2.0, 4.0]), alpha=0.5)  # rho = 6/3, 2/5, 4/4
    assert torch.allclose(k, torch.tensor([1 - math.tanh(1.0), 1.0, 1.0]))


def test_ogm_ge_step_scales_and_adds_noise_with_the_gradient_std():
    model = toy_model()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.manual_seed(7)
    comparators.ogm_ge_step(model, torch.tensor([0.25, 1.0]))
    torch.manual_seed(7)
    for name, p in model.named_parameters():
        g = grads[name]
        if name.startswith("encoders.") and p.dim() >= 2:
            coefficient = 0.25 if name.startswith("encoders.0.") else 1.0
            expected = coefficient * g + torch.randn_like(g) * (g.std() + 1e-8)  # drawn in the same order
            assert torch.allclose(p.grad, expected), name
        else:  # biases, BatchNorm, the fusion head: untouched
            assert torch.equal(p.grad, g), name


def test_pmr_prototypes_and_added_loss_by_hand():
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1])
    first = comparators.class_prototypes(features, labels, 3)
    assert torch.equal(first, torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    previous = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    second = comparators.class_prototypes(features, labels, 3, previous, momentum=0.2)
    assert torch.allclose(second, torch.tensor([[1.6, 0.0], [0.2, 1.8], [5.0, 5.0]]))  # class 2 unseen: kept
    assert torch.equal(comparators.pmr_weights(torch.tensor([3.0, 5.0]), 2.0), torch.tensor([2.0, 0.0]))
    assert torch.equal(comparators.pmr_weights(torch.tensor([4.0, 4.0]), 2.0), torch.zeros(2))

    model = toy_model().train()
    inputs, target = toy_batch()
    pmr = comparators.PMR(model, None, {}, torch.device("cpu"), None, alpha=2.0, momentum=0.2, fraction=0.1)
    pmr.active = True
    pmr.prototypes = [torch.randn(4, 128, generator=torch.Generator().manual_seed(m)) for m in range(2)]
    loss = pmr.loss(model, inputs, target)
    with torch.no_grad():
        a, v = model.encode(inputs)
        sims = [-torch.cdist(f, p) for f, p in zip((a, v), pmr.prototypes)]  # Eq. 4: minus the distance
        scores = [s.softmax(1)[torch.arange(6), target].sum() for s in sims]
        weak = 0 if scores[0] < scores[1] else 1
        expected = F.cross_entropy(model.fuse([a, v]), target) + 2.0 * F.cross_entropy(sims[weak], target)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_agm_coefficients_by_hand():
    k = comparators.agm_coefficients(torch.tensor([1.0, 2.0], dtype=torch.float64),
                                     torch.tensor([0.5, 0.5], dtype=torch.float64), alpha=0.1)
    r = [math.exp(2 * (1.0 - 1.5)), math.exp(2 * (2.0 - 1.5))]  # n / (n - 1) = 2; eta = exp(0) = 1
    assert torch.allclose(k, torch.tensor([math.exp(0.1 * (1 - r[0])), math.exp(0.1 * (1 - r[1]))],
                                          dtype=torch.float64))
    k = comparators.agm_coefficients(torch.tensor([0.0, 0.0], dtype=torch.float64),
                                     torch.tensor([10.0, 0.0], dtype=torch.float64), alpha=0.1)
    assert math.isclose(k[0].item(), math.exp(0.1 * 7))  # eta_0 = e^10: the exponent is capped at alpha * 7


def test_agm_step_scales_encoder_weights_and_keeps_a_running_mean():
    model = toy_model().train()
    inputs, target = toy_batch()
    agm = comparators.AGM(2, alpha=0.1)
    agm.start_epoch(0, active=True)
    agm.loss(model, inputs, target)
    with torch.no_grad():
        _, features = comparators.joint_forward(model, inputs)
        p = comparators.true_class_probability(comparators.unimodal_responses(model, inputs, features), target)
        losses = (-p.clamp(min=1e-8).log()).mean(1).double()
    assert torch.allclose(agm.running_losses, losses)  # the first step's mean is its own loss
    assert torch.allclose(agm.coefficients, comparators.agm_coefficients(losses, torch.zeros(2, dtype=torch.float64), 0.1))
    for q in model.parameters():
        q.grad = torch.full_like(q, 0.01)
    agm.modulate(model)
    weight = model.encoders[1].stages.layer1[0].weight
    assert torch.allclose(weight.grad, torch.full_like(weight, 0.01) * agm.coefficients[1].float())
    assert torch.equal(model.encoders[1].stages.layer1[0].bias.grad, torch.full((256,), 0.01))


def test_gblending_weights_from_given_losses():
    train_first, val_first = torch.tensor([1.0, 1.2, 1.4]), torch.tensor([1.1, 1.3, 1.5])
    train_last, val_last = torch.tensor([0.4, 0.8, 1.0]), torch.tensor([0.8, 1.0, 1.3])
    w = comparators.blending_weights(train_first, val_first, train_last, val_last)
    g = [0.3, 0.3, 0.2]  # generalisation: val_first - val_last
    o = [0.4 - 0.1, 0.2 - 0.1, 0.3 - 0.1]  # overfitting: (val - train) at the end minus at the start
    raw = [gk / ok ** 2 for gk, ok in zip(g, o)]
    assert torch.allclose(w, torch.tensor([x / sum(raw) for x in raw]))
    assert comparators.blending_weights(train_first, val_first, train_first, val_first) is None  # no change


def test_gblending_loss_is_the_weighted_sum_of_the_heads():
    model = toy_model().train()
    inputs, target = toy_batch()
    method = comparators.GBlending(model, None, torch.device("cpu"), super_epoch=2, warmup=0)
    method.active, method.weights = True, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    loss = method.loss(model, inputs, target)
    with torch.no_grad():
        heads = [model(inputs, torch.tensor([keep], dtype=torch.bool).expand(6, -1)) for keep in ((1, 1), (1, 0), (0, 1))]
        expected = sum(w * F.cross_entropy(h, target) for w, h in zip((0.5, 0.3, 0.2), heads))
    assert torch.allclose(loss, expected, atol=1e-5)


def test_greedy_trigger_and_learning_speed_by_hand():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w|^2 = 25
    weight.grad = torch.tensor([[1.0, 2.0]])  # |g|^2 = 5
    assert comparators.learning_speed([weight]) == pytest.approx(0.2)
    # d = log10(bypass / main): log10(2) = 0.301 against log10(1) = 0
    assert comparators.greedy_trigger([2.0, 1.0], [1.0, 1.0], epsilon=0.01) == 0
    assert comparators.greedy_trigger([1.0, 2.0], [1.0, 1.0], epsilon=0.01) == 1
    assert comparators.greedy_trigger([2.0, 1.0], [1.0, 1.0], epsilon=0.5) is None  # gap 0.301 < 0.5
    assert comparators.greedy_trigger([1.0, 4.0, 2.0], [1.0, 1.0, 1.0], epsilon=0.01) == 1


def test_greedy_curation_replaces_the_gate_by_its_running_average():
    model = toy_model("mmtm").train()
    inputs, target = toy_batch()
    greedy = comparators.Greedy(model, epsilon=0.01, window=2)
    gates = []
    model.mixers[0].excitations[0].register_forward_hook(lambda m, a, out: gates.append(2 * torch.sigmoid(out)))
    model(inputs)
    model(inputs)
    average = greedy.gate_sums[0][0] / greedy.gate_steps
    assert torch.allclose(average, (gates[0].mean(0) + gates[1].mean(0)).detach() / 2, atol=1e-6)
    greedy.curated = 0
    model(inputs)
    average = greedy.gate_sums[0][0] / greedy.gate_steps  # now including the third batch, as the official code
    assert torch.allclose(gates[-1], average.expand(6, -1), atol=1e-5)
    for _ in range(2):  # the window counts down, then no modality is curated
        greedy.modulate(model)
    assert greedy.curated is None


# ----------------------------------------------------------------------------------------------
# end to end


def flags_of(data, mode, modalities):
    """Two epochs, the second the method's: tiny synthetic images, or three mfeat views (small MLPs)."""
    if data == "synthetic":
        flags = SYNTHETIC + ["--synthetic-modalities", str(modalities)]
    else:
        flags = MFEAT + ["--views", "pix,mor,fou"[:4 * modalities - 1], "--epochs", "2", "--warmup", "1"]
    return flags + ["--mode", mode] + (["--fusion", "mmtm"] if mode == "greedy" else [])


@pytest.mark.parametrize("data, modalities", [("synthetic", 2), ("mfeat", 3),
                                              pytest.param("synthetic", 3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", comparators.METHODS)
def test_every_comparator_runs_two_epochs(tmp_path, mode, data, modalities):
    out = tmp_path / "run"
    results, log = run_train(out, *flags_of(data, mode, modalities), "--track-phi")
    samples = 48 if data == "synthetic" else 1200
    assert [r["phase"] for r in log] == ["warmup", mode]
    for record in log:  # no copies: D^rs = D; --track-phi values the training set every epoch
        assert record["copies"] == [0] * modalities and record["train_samples"] == samples
        assert len(record["mean_phi"]) == modalities and record["valued_samples"] == samples
        assert os.path.exists(out / "contributions" / f"epoch_{record['epoch']:03d}.npz")
        assert "method" in record
    assert len(results["test_acc_per_modality"]) == modalities
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    assert checkpoint["method"] is not None


def test_gblending_resume_is_exact(tmp_path):
    flags = MFEAT + ["--mode", "gblending", "--warmup", "1", "--super-epoch", "2"]
    _, straight = run_train(tmp_path / "straight", *flags, "--epochs", "4")
    run_train(tmp_path / "resumed", *flags, "--epochs", "2")
    train.main(["--resume", str(tmp_path / "resumed" / "last.pt"), "--epochs", "4"])
    resumed = [{k: v for k, v in r.items() if k not in ("seconds", "valuation_seconds")}
               for r in train.load_log(tmp_path / "resumed" / "log.jsonl")]
    assert resumed == straight
    assert straight[3]["method"]["weights"] != straight[2]["method"]["weights"]  # re-estimated at epoch 3
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("flags, message", [
    (["--mode", "greedy"], "--mode greedy reads the learning speeds of MMTM's cross-modal path and needs --fusion mmtm"),
    (["--mode", "pmr", "--fusion", "centralnet"], "--mode pmr builds prototypes from each modality's own pooled"),
    (["--mode", "agm", "--views", "pix"], "--mode agm balances modalities against each other and needs at least two"),
])
def test_refusals_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(MFEAT + flags + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_eval_only_writes_ogm_scores(tmp_path):
    out = tmp_path / "run"
    run_train(out, *MFEAT, "--mode", "baseline", "--epochs", "1")
    train.main(["--resume", str(out / "best.pt"), "--eval-only", "--eval-split", "val"])
    with open(out / "valuation_val.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 400 and {"ogm_score_pix", "ogm_score_mor"} <= set(rows[0])
    _, dataset = train.evaluate_checkpoint(str(out / "best.pt"), "val")  # the scores: the official form
    checkpoint = torch.load(out / "best.pt", weights_only=False)
    model = train.build_model(train.argparse.Namespace(**checkpoint["args"]), dataset)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    inputs = [torch.stack([dataset[k][0][i] for k in range(8)]) for i in range(2)]
    target = torch.tensor([dataset[k][1] for k in range(8)])
    with torch.no_grad():
        a, v = model.encode(inputs)
        weight, bias = model.head.fc.weight, model.head.fc.bias
        official = (a @ weight[:, :a.shape[1]].T + bias / 2).softmax(1)[torch.arange(8), target]
    by_id = {row["id"]: row for row in rows}
    written = torch.tensor([float(by_id[dataset.sample_ids[k]]["ogm_score_pix"]) for k in range(8)])
    assert torch.allclose(written, official, atol=1e-4)


def test_modulation_ends_returns_to_joint_training(tmp_path):
    _, log = run_train(tmp_path / "run", *MFEAT, "--mode", "ogm-ge", "--epochs", "3", "--warmup", "1",
                       "--modulation-ends", "1")
    assert [r["phase"] for r in log] == ["warmup", "ogm-ge", "joint"]
    assert log[1]["method"]["mean_coefficient"] != [0.0, 0.0]  # the method acted, then stopped
    assert log[2]["method"]["mean_coefficient"] == [0.0, 0.0]


def test_reproduce_tables_pair_each_method_with_its_own_baseline():
    import reproduce

    def record(fusion, mode, seed, acc):
        return dict(setting="sample-level", fusion=fusion, mode=mode, seed=seed, test_acc=acc, test_map=0.9,
                    test_acc_per_modality=[0.6, 0.7] if mode == "baseline" else [0.65, 0.7], modalities=["fou", "zer"],
                    train_samples=100, method_seconds=2.0 if mode == "baseline" else 3.0)

    records = [record("concat", "baseline", s, 0.80) for s in (0, 1)] + [
        record("concat", "sample", 0, 0.81), record("concat", "sample", 1, 0.82),
        record("concat", "pmr", 0, 0.79), record("concat", "pmr", 1, 0.80),
        record("mmtm", "baseline", 0, 0.70), record("mmtm", "baseline", 1, 0.70),
        record("mmtm", "greedy", 0, 0.75), record("mmtm", "greedy", 1, 0.70)]
    cells = reproduce.group(records)
    found = reproduce.gains(cells, "sample-level")
    assert list(found) == ["sample", "pmr", "greedy"]
    assert found["sample"] == pytest.approx([1.0, 2.0]) and found["pmr"] == pytest.approx([-1.0, 0.0])
    assert found["greedy"] == pytest.approx([5.0, 0.0])  # against the mmtm baseline, not concat's
    found = reproduce.table2_comparisons(cells, "sample-level")
    assert found["greedy - baseline"]["mean"] == pytest.approx(0.025)  # against the mmtm baseline
    assert found["sample - greedy (gains)"]["mean"] == pytest.approx(0.015 - 0.025)
    assert found["sample - pmr (gains)"]["mean"] == pytest.approx(0.015 + 0.005)
    rows = reproduce.comparison_table(cells, "sample-level")
    assert "fou (weak) alone" in rows[0]  # the view weaker under the concat baseline
    assert rows[-1].startswith("| greedy | mmtm | 2 | 72.50 ± 3.54 |") and rows[-1].endswith("| 1.00x | 1.50x |")
