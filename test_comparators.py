"""Tests of comparators.py: each method's update against a step computed by hand on a toy model, the uni-modal
responses against the official weight-slice and masked-forward forms, every mode end to end with two and three
modalities, exact resume, the refusals, and the OGM-GE columns of --eval-only."""
import copy
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


@pytest.mark.parametrize("mask_mode", ["feature", "input"])
def test_ogm_with_sum_fusion_reads_each_branch_with_its_own_bias(mask_mode):
    """OGM-GE_CVPR2022 main.py, train_epoch: for fusion_method 'sum', out_a = a fc_x.weight^T + fc_x.bias and
    out_v = v fc_y.weight^T + fc_y.bias (lines 82-86), s = sum of the true-class softmax, ratio_v = s_v / s_a,
    and the dominant modality's coefficient 1 - tanh(alpha * ratio) (lines 105-124)."""
    model = toy_model("sum", mask_mode=mask_mode).train()
    with torch.no_grad():
        model.head.fcs[0].bias.copy_(torch.tensor([2.0, -2.0, 0.0, 1.0]))
        model.head.fcs[1].bias.copy_(torch.tensor([-1.0, 0.0, 3.0, 0.0]))
    reference = copy.deepcopy(model)
    inputs, target = toy_batch()
    ogm = comparators.OGMGE(2, alpha=0.5)
    ogm.start_epoch(0, True, None)
    loss = ogm.loss(model, inputs, target)
    with torch.no_grad():
        a, v = reference.encode(inputs)
        fc_x, fc_y = reference.head.fcs
        out_a = torch.mm(a, fc_x.weight.T) + fc_x.bias
        out_v = torch.mm(v, fc_y.weight.T) + fc_y.bias
        score_a = sum(out_a.softmax(1)[i][target[i]] for i in range(6)).item()
        score_v = sum(out_v.softmax(1)[i][target[i]] for i in range(6)).item()
        ratio_v = score_v / score_a
        if ratio_v > 1:
            official = [1.0, 1 - math.tanh(0.5 * ratio_v)]
        else:
            official = [1 - math.tanh(0.5 / ratio_v), 1.0]
        shapley = comparators.ogm_coefficients(comparators.true_class_probability(
            comparators.unimodal_responses(reference, inputs, [a, v] if mask_mode == "feature" else None),
            target).sum(1), 0.5)
    assert ogm.coefficients.tolist() == pytest.approx(official, rel=1e-5)
    assert (ogm.coefficients - shapley).abs().max() > 1e-3  # half of each bias would decide otherwise
    assert torch.allclose(loss, F.cross_entropy(reference(inputs), target), atol=1e-6)


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
    pmr = comparators.PMR(model.num_modalities, None, {}, torch.device("cpu"), None, alpha=2.0, momentum=0.2,
                          fraction=0.1)
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


def official_agm_coefficients_two(score_a, score_v, train_score_a, train_score_v, alpha):
    """AGM_ICCV2023 run/CREMAD_main.py, train, lines 145-152, as written there."""
    ratio_a = math.exp(score_v - score_a)
    ratio_v = math.exp(score_a - score_v)
    optimal_ratio_a = math.exp(train_score_v - train_score_a)
    optimal_ratio_v = math.exp(train_score_a - train_score_v)
    return [math.exp(alpha * min(optimal_ratio_a - ratio_a, 10)), math.exp(alpha * min(optimal_ratio_v - ratio_v, 10))]


def official_agm_coefficients_three(scores, train_scores, alpha):
    """AGM_ICCV2023 run/URFunny_main.py, train, lines 117-130, as written there (one modality per entry)."""
    mean_score = sum(scores) / 3
    ratios = [math.exp((mean_score - s) * 3 / 2) for s in scores]
    optimal_mean_score = sum(train_scores) / 3
    optimal_ratios = [math.exp((optimal_mean_score - s) * 3 / 2) for s in train_scores]
    return [math.exp(alpha * min(o - r, 7)) for o, r in zip(optimal_ratios, ratios)]


@pytest.mark.parametrize("scores, running, alpha", [
    ([1.2, 0.8], [1.0, 1.0], 0.1),  # the modality behind its history (s_a > s-hat_a) is boosted: [1.034, 0.952]
    ([0.3, 2.0], [1.5, 0.2], 1.0),
    ([0.0, 0.0], [10.0, 0.0], 0.1),  # eta_v = e^10: the exponent is capped at alpha * 10 for two modalities
])
def test_agm_coefficients_follow_the_official_two_modality_script(scores, running, alpha):
    k = comparators.agm_coefficients(torch.tensor(scores, dtype=torch.float64),
                                     torch.tensor(running, dtype=torch.float64), alpha)
    assert k.tolist() == pytest.approx(official_agm_coefficients_two(*scores, *running, alpha), rel=1e-12)


def test_agm_coefficients_of_the_example_boost_the_modality_behind_its_history():
    k = comparators.agm_coefficients(torch.tensor([1.2, 0.8], dtype=torch.float64),
                                     torch.tensor([1.0, 1.0], dtype=torch.float64), 0.1)
    assert k.tolist() == pytest.approx([math.exp(0.1 * (1 - math.exp(-0.4))), math.exp(0.1 * (1 - math.exp(0.4)))])
    assert round(k[0].item(), 3) == 1.034 and round(k[1].item(), 3) == 0.952


@pytest.mark.parametrize("scores, running", [
    ([0.5, 1.0, 2.0], [1.0, 1.0, 1.0]),
    ([1.0, 1.0, 1.0], [0.0, 0.0, 9.0]),  # optimal ratios e^4.5 for the first two: capped at 7 for three modalities
])
def test_agm_coefficients_follow_the_official_three_modality_script(scores, running):
    k = comparators.agm_coefficients(torch.tensor(scores, dtype=torch.float64),
                                     torch.tensor(running, dtype=torch.float64), 0.5)
    assert k.tolist() == pytest.approx(official_agm_coefficients_three(scores, running, 0.5), rel=1e-12)


def official_score(out, label):
    """AGM_ICCV2023 run/CREMAD_main.py, train, lines 130-143: the mean of -log softmax(out)[k][label[k]], a
    probability below 1e-8 counted as 1e-8."""
    total = 0.0
    for k in range(out.size(0)):
        p = out.softmax(1)[k][label[k]]
        total += -math.log(max(p.item(), 1e-8))
    return total / out.size(0)


@pytest.mark.parametrize("mask_mode", ["feature", "input"])
def test_agm_step_is_the_official_hooked_backward(mask_mode):
    """One step against AGM's GradMod (model/CREMAD_net.py): total_out from the training forward, the padded
    forwards (eval mode, with gradient, where the model zeroes inputs), m_a = (total - pad_audio + pad_visual) / 2,
    backward hooks multiplying the gradient of m_a and m_v by their coefficients, loss CE(m_a + m_v); and the
    running scores' update of run/CREMAD_main.py, lines 154-155. Every parameter's gradient must agree: encoder
    weights, biases, BatchNorm and the fusion head alike."""
    model = toy_model(mask_mode=mask_mode).train()
    reference = copy.deepcopy(model)
    inputs, target = toy_batch()
    agm = comparators.AGM(2, alpha=1.0)
    agm.running_losses, agm.running_steps = torch.tensor([1.1, 1.6], dtype=torch.float64), 3
    agm.start_epoch(0, True, None)
    loss = agm.loss(model, inputs, target)
    loss.backward()

    keep = lambda a, v: torch.tensor([[a, v]], dtype=torch.bool).expand(6, -1)
    if mask_mode == "feature":  # the harness's coalitions: the head on the training forward's features
        features = reference.encode(inputs)
        total_out = reference.fuse(features)
        pad_visual_out, pad_audio_out = reference.fuse(features, keep(1, 0)), reference.fuse(features, keep(0, 1))
    else:  # GradMod.forward: the padded forwards in eval mode
        total_out = reference(inputs)
        reference.eval()
        pad_visual_out, pad_audio_out = reference(inputs, keep(1, 0)), reference(inputs, keep(0, 1))
        reference.train()
    out_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
    out_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
    score_a, score_v = official_score(out_a, target), official_score(out_v, target)
    coeff_a, coeff_v = official_agm_coefficients_two(score_a, score_v, 1.1, 1.6, alpha=1.0)
    out_a.register_hook(lambda g: g * coeff_a)  # hooka / hookv
    out_v.register_hook(lambda g: g * coeff_v)
    official_loss = F.cross_entropy(out_a + out_v, target)
    official_loss.backward()

    assert agm.coefficients.tolist() == pytest.approx([coeff_a, coeff_v], rel=1e-5)
    assert abs(coeff_a - 1) > 0.05 and abs(coeff_v - 1) > 0.05  # the step does modulate
    assert torch.allclose(loss, official_loss, atol=1e-6)
    iteration = 4
    running = [1.1 * (iteration - 1) / iteration + score_a / iteration,
               1.6 * (iteration - 1) / iteration + score_v / iteration]
    assert agm.running_losses.tolist() == pytest.approx(running, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_agm_measures_without_acting_outside_its_epochs():
    """AGM's code updates the running scores at every step of training from epoch 1 (run/CREMAD_main.py, lines
    154-155) whether or not it modulates: the warm-up's steps enter the running mean, and its loss is plain CE."""
    model = toy_model().train()
    inputs, target = toy_batch()
    agm = comparators.AGM(2, alpha=1.0)
    agm.start_epoch(0, False, None)
    loss = agm.loss(model, inputs, target)
    with torch.no_grad():
        features = model.encode(inputs)
        keep = lambda a, v: torch.tensor([[a, v]], dtype=torch.bool).expand(6, -1)
        total, pad_visual, pad_audio = model.fuse(features), model.fuse(features, keep(1, 0)), model.fuse(features, keep(0, 1))
        scores = [official_score(0.5 * (total - pad_audio + pad_visual), target),
                  official_score(0.5 * (total - pad_visual + pad_audio), target)]
    assert torch.allclose(loss, F.cross_entropy(model(inputs), target), atol=1e-6)
    assert agm.running_steps == 1 and agm.running_losses.tolist() == pytest.approx(scores, rel=1e-6)
    assert agm.summary() == dict(mean_coefficient=[0.0, 0.0])


@pytest.mark.parametrize("n, head_grad, clipped", [(2, 0.9, False), (2, 1.5, True), (3, 4.0, False), (3, 6.0, True)])
def test_agm_clip_follows_the_official_scripts(n, head_grad, clipped):
    """run/CREMAD_main.py, lines 233-243 (two modalities): when the fusion head's weight gradient leaves [-1, 1],
    clip_grad_norm_(model.parameters(), 1.0); run/URFunny_main.py, lines 203-207 (three): the same at 5."""
    model = toy_model(n=n)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.head.fc.weight.grad.fill_(head_grad)
    before = [p.grad.clone() for p in model.parameters()]
    agm = comparators.AGM(n, alpha=1.0)
    agm.active = True
    agm.modulate(model)
    max_norm = 1.0 if n == 2 else 5.0
    total_norm = math.sqrt(sum((g.double() ** 2).sum().item() for g in before))
    scale = min(1.0, max_norm / (total_norm + 1e-6)) if clipped else 1.0  # torch's clip_grad_norm_
    assert total_norm > max_norm  # a clip by norm alone would change these gradients
    for p, g in zip(model.parameters(), before):
        assert torch.allclose(p.grad, g * scale)


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
    method = comparators.GBlending(model.num_modalities, None, {}, torch.device("cpu"), super_epoch=2)
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


# every method on three mfeat views in the default run; on two image modalities (ResNet encoders) one method there,
# the others under -m slow with the three-modality synthetic runs
@pytest.mark.parametrize("mode, data, modalities", [
    pytest.param(mode, data, n, marks=() if (data, n) == ("mfeat", 3) or (mode, n) == ("gblending", 2)
                 else pytest.mark.slow)
    for mode in comparators.COMPARED_MODES for data, n in (("synthetic", 2), ("mfeat", 3), ("synthetic", 3))])
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


def straight_and_resumed(tmp_path, flags, stop, epochs):
    """The log of a run of `epochs` epochs, after checking that one stopped after `stop` epochs and resumed
    writes the same log and the same final weights."""
    _, straight = run_train(tmp_path / "straight", *flags, "--epochs", str(epochs))
    run_train(tmp_path / "resumed", *flags, "--epochs", str(stop))
    train.main(["--resume", str(tmp_path / "resumed" / "last.pt"), "--epochs", str(epochs)])
    resumed = [{k: v for k, v in r.items() if k not in ("seconds", "valuation_seconds")}
               for r in train.load_log(tmp_path / "resumed" / "log.jsonl")]
    assert resumed == straight
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    return straight


def test_gblending_resume_is_exact(tmp_path):
    flags = MFEAT + ["--mode", "gblending", "--warmup", "1", "--super-epoch", "2"]
    straight = straight_and_resumed(tmp_path, flags, stop=2, epochs=4)
    assert straight[3]["method"]["weights"] != straight[2]["method"]["weights"]  # re-estimated at epoch 3


def test_agm_resume_is_exact(tmp_path):
    """AGM's running scores, kept from the warm-up's first step on, travel in the checkpoint."""
    straight = straight_and_resumed(tmp_path, MFEAT + ["--mode", "agm", "--warmup", "1"], stop=2, epochs=3)
    assert [r["phase"] for r in straight] == ["warmup", "agm", "agm"]
    assert all(k != 1.0 for r in straight[1:] for k in r["method"]["mean_coefficient"])


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
    with open(out / "valuation_val_best.csv") as f:
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
    assert rows[-1].startswith("| greedy | mmtm | 2 | 72.50 ± 3.54 |") and rows[-1].endswith("| 1.00x |")
