"""Tests for models.py: encoder shapes, modality masks, the coalition predictor, late fusion heads, CentralNet and
MMTM, and argument checks."""

import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

import models

pytestmark = pytest.mark.full_resnet  # ResNet-18 as torchvision builds it

# small stand-ins for the real inputs: 32x32 images, clips of T=2 frames, 6-d and 4-d vector views
SHAPES = {("image", 1): (1, 32, 32), ("image", 3): (3, 32, 32), ("video", 3): (3, 2, 32, 32),
          ("video", 2): (2, 2, 32, 32), ("vector", 6): (6,), ("vector", 4): (4,)}
TWO = [("image", 1), ("vector", 6)]
THREE = [("image", 1), ("vector", 6), ("vector", 4)]
# every fusion with every masking it allows (CentralNet, MMTM and MBT: input masking only)
FUSION_MASKS = [(fusion, mask_mode) for fusion in models.FUSIONS for mask_mode in models.allowed_masks(fusion)]


def make_inputs(specs, batch=6):
    return [torch.randn(batch, *SHAPES[spec]) for spec in specs]


def coalition_masks(n, batch):
    """Every non-empty coalition as a [B, n] mask, the same row repeated (as shapley_mm.valuate asks)."""
    for code in range(1, 2 ** n):
        row = torch.tensor([(code >> i) & 1 for i in range(n)], dtype=torch.bool)
        yield row.expand(batch, n)


def count_calls(module):
    """Record the batch size of every call to `module` (forward hook)."""
    calls = []
    module.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("spec", [("image", 1), ("image", 3), ("video", 3), ("video", 2), ("vector", 6)])
def test_encoder_output_shape(spec):
    torch.manual_seed(0)
    encoder = models.build_encoder(*spec)
    out = encoder(torch.randn(3, *SHAPES[spec]))
    expected = 128 if spec[0] == "vector" else 512
    assert encoder.out_dim == expected
    assert out.shape == (3, expected)


def test_encoder_stages_are_named_children():
    resnet = models.build_encoder("image", 3)
    assert [name for name, _ in resnet.stages.named_children()] == ["stem", "layer1", "layer2", "layer3", "layer4",
                                                                    "pool"]
    mlp = models.build_encoder("vector", 6)
    assert [name for name, _ in mlp.stages.named_children()] == ["layer1", "layer2"]
    x = torch.randn(3, 6)
    mlp.eval()
    assert torch.equal(mlp(x), mlp.stages.layer2(mlp.stages.layer1(x)))


def test_video_encoder_averages_frame_features():
    torch.manual_seed(0)
    encoder = models.build_encoder("video", 2).eval()
    clip = torch.randn(3, 2, 4, 32, 32)  # [B, C, T, H, W]
    frames = torch.stack([encoder.stages(clip[:, :, t]) for t in range(4)], dim=1)  # [B, T, 512]
    assert torch.allclose(encoder(clip), frames.mean(dim=1), atol=1e-5)


def test_model_output_shape_with_every_kind():
    torch.manual_seed(0)
    specs = [("image", 1), ("image", 3), ("video", 3), ("video", 2), ("vector", 6)]
    model = models.build_model(specs, num_classes=7)
    assert (model.num_modalities, model.num_classes, model.fusion, model.mask_mode) == (5, 7, "concat", "feature")
    assert model.input_specs == specs
    mask = torch.rand(4, 5) > 0.5
    mask[:, 0] = True
    assert model(make_inputs(specs, batch=4), mask).shape == (4, 7)


@pytest.mark.parametrize("mask_mode", models.LateFusionClassifier.MASKS)
def test_all_ones_mask_equals_no_mask(mask_mode):
    torch.manual_seed(0)
    model = models.build_model(THREE, 5, mask_mode=mask_mode).eval()
    inputs = make_inputs(THREE)
    assert torch.equal(model(inputs, torch.ones(6, 3, dtype=torch.bool)), model(inputs))


def test_feature_masked_modality_gets_zero_gradient():
    torch.manual_seed(0)
    model = models.build_model(TWO, 5, fusion="concat", mask_mode="feature")
    inputs, target = make_inputs(TWO), torch.randint(0, 5, (6,))
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[:3, 1] = False  # rows 0-2 drop the vector modality
    logits = model(inputs, mask)
    F.cross_entropy(logits[:3], target[:3]).backward()  # a loss from the rows without modality 1 only
    grads = [p.grad for p in model.encoders[1].parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.encoders[0].parameters())


def test_encode_skips_encoders_of_absent_modalities():
    torch.manual_seed(0)
    model = models.build_model(THREE, 5)
    calls = [count_calls(encoder) for encoder in model.encoders]
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    features = model.encode(make_inputs(THREE), mask)
    assert calls == [[5], [3], []]  # encoder i saw only its present rows; encoder 2 never ran
    assert torch.count_nonzero(features[2]) == 0 and features[2].shape == (6, 128)


def test_feature_mode_sub_batch_rows_equal_full_batch_in_eval():
    torch.manual_seed(0)
    model = models.build_model(TWO, 5).eval()
    inputs = make_inputs(TWO)
    mask = torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    full, masked = model.encode(inputs), model.encode(inputs, mask)
    for i in range(2):
        assert torch.allclose(masked[i][mask[:, i]], full[i][mask[:, i]], atol=1e-5)
        assert torch.count_nonzero(masked[i][~mask[:, i]]) == 0


def test_feature_mode_batchnorm_statistics_come_from_present_rows():
    torch.manual_seed(0)
    model = models.build_model(TWO, 5).train()
    reference = models.build_model(TWO, 5).train()
    reference.load_state_dict(model.state_dict())
    inputs = make_inputs(TWO)
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    model(inputs, mask)
    reference.encoders[1](inputs[1][mask[:, 1]])  # the present rows alone
    bn, bn_reference = model.encoders[1].stages.layer1[1], reference.encoders[1].stages.layer1[1]
    assert torch.allclose(bn.running_mean, bn_reference.running_mean)
    assert torch.allclose(bn.running_var, bn_reference.running_var)


def zeroed(inputs, mask):
    return [x * mask[:, i].view(-1, *[1] * (x.dim() - 1)) for i, x in enumerate(inputs)]


@pytest.mark.parametrize("fusion", models.FUSION_HEADS)
def test_input_mode_eval_constant_feature_equals_zeroed_inputs(fusion):
    torch.manual_seed(0)
    specs = [("image", 1), ("video", 2), ("vector", 6)]
    model = models.build_model(specs, 5, fusion=fusion, mask_mode="input")
    model(make_inputs(specs, batch=8))  # BatchNorm statistics away from (0, 1): a fresh ResNet maps zeros to zeros
    model.eval()
    inputs = make_inputs(specs)
    assert torch.count_nonzero(model.absent_feature(0, inputs[0])) > 0
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    calls = count_calls(model.encoders[0])
    shortcut = model(inputs, mask)
    assert calls == [1, 4]  # one zero sample for the constant feature, then only the 4 present rows
    assert torch.allclose(shortcut, model(zeroed(inputs, mask)), atol=1e-5)


def test_input_mode_training_runs_encoders_on_zeroed_inputs():
    torch.manual_seed(0)
    model = models.build_model(TWO, 5, mask_mode="input").train()
    inputs = make_inputs(TWO)
    mask = torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    calls = count_calls(model.encoders[0])
    masked = model(inputs, mask)
    assert calls == [6]  # the whole batch: BatchNorm's batch statistics include the zeroed rows
    assert torch.allclose(masked, model(zeroed(inputs, mask)), atol=1e-5)


def explicitly_masked_logits(model, inputs, mask):
    """The full network on explicitly removed modalities, without the mask argument: the head on encoder features
    multiplied by the mask (feature masking), or the model on zeroed inputs (input masking)."""
    if model.mask_mode == "feature":
        features = [encoder(x) * mask[:, i, None] for i, (encoder, x) in enumerate(zip(model.encoders, inputs))]
        return model.head(features)
    return model(zeroed(inputs, mask))


@pytest.mark.parametrize("specs", [TWO, THREE], ids=["2 modalities", "3 modalities"])
@pytest.mark.parametrize("fusion, mask_mode", [case for case in FUSION_MASKS if case[0] != "mbt"])  # MBT: test_mbt.py
def test_coalition_predictor_equals_explicitly_masked_network(fusion, mask_mode, specs):
    torch.manual_seed(0)
    model = models.build_model(specs, 5, fusion=fusion, mask_mode=mask_mode)
    model(make_inputs(specs, batch=8))  # one training step's worth of BatchNorm statistics
    model.eval()
    inputs = make_inputs(specs)
    # late fusion: the encoders run as a whole; CentralNet, MMTM: their stages run in lock-step
    interaction = isinstance(model, models.InteractionClassifier)
    calls = count_calls(model.encoders[0].stages[0] if interaction else model.encoders[0])
    masks = list(coalition_masks(len(specs), batch=6)) + [torch.rand(6, len(specs)) > 0.5]  # last: mixed rows
    with torch.no_grad():
        predict = model.coalition_predictor(inputs)
        predicted = [predict(mask) for mask in masks]
        if interaction:  # the whole network per coalition, each time one call over the whole batch
            assert calls == [6] * len(masks)
        else:  # the batch (and, in input mode, one zero sample) encoded once; only the head per coalition
            assert calls == ([6] if mask_mode == "feature" else [6, 1])
        for mask, logits in zip(masks, predicted):
            assert torch.allclose(logits, explicitly_masked_logits(model, inputs, mask), atol=1e-5), mask.tolist()


@pytest.mark.parametrize("fusion, mask_mode", [("concat", "feature"), ("concat", "input"), ("centralnet", "input"),
                                               ("mmtm", "input")])
def test_coalition_predictor_in_training_mode_equals_forward(fusion, mask_mode):
    torch.manual_seed(0)
    model = models.build_model(TWO, 5, fusion=fusion, mask_mode=mask_mode).train()
    inputs = make_inputs(TWO)
    predict = model.coalition_predictor(inputs)
    mixed = torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)  # uni-modal copies
    for mask in list(coalition_masks(2, batch=6)) + [mixed]:  # batch statistics depend on the present rows
        logits = predict(mask)
        assert torch.allclose(logits, model(inputs, mask), atol=1e-5), mask.tolist()
        if mask_mode == "input":  # the whole batch, absent inputs zeroed, in BatchNorm's batch statistics
            assert torch.allclose(logits, model(zeroed(inputs, mask)), atol=1e-5), mask.tolist()


def test_coalition_predictor_absent_cache_encodes_the_zero_sample_once_per_pass():
    torch.manual_seed(0)
    model = models.build_model(TWO, 5, fusion="concat", mask_mode="input")
    model(make_inputs(TWO, batch=8))  # BatchNorm statistics of one training step
    model.eval()
    batches = [make_inputs(TWO) for _ in range(3)]
    calls = count_calls(model.encoders[0])
    cache = {}
    with torch.no_grad():
        predicted = []
        for inputs in batches:  # three batches of one pass share one cache
            predict = model.coalition_predictor(inputs, cache)
            predicted.append([predict(mask) for mask in coalition_masks(2, batch=6)])
        assert calls == [6, 1, 6, 6]  # the all-zero sample is encoded once, with the first batch
        for inputs, logits in zip(batches, predicted):
            for mask, expected in zip(coalition_masks(2, batch=6), logits):
                assert torch.allclose(expected, model(inputs, mask), atol=1e-5), mask[0].tolist()


def test_decision_fusion_averages_the_classifiers_over_zeroed_features():
    torch.manual_seed(0)
    model = models.build_model(THREE, 5, fusion="decision").eval()
    inputs = make_inputs(THREE)
    features = model.encode(inputs)
    mask = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    logits = model(inputs, mask)
    for row in range(6):  # an absent modality's classifier sees a zero feature and votes with its bias
        votes = [fc(features[i][row] if mask[row, i] else torch.zeros_like(features[i][row]))
                 for i, fc in enumerate(model.head.fcs)]
        assert torch.allclose(logits[row], torch.stack(votes).mean(dim=0), atol=1e-5)


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_conditioning_modality_changes_the_prediction(fusion):
    torch.manual_seed(0)
    head = models.FUSION_HEADS[fusion]([6, 4, 8], num_classes=5)
    features = [torch.randn(3, 6), torch.randn(3, 4), torch.randn(3, 8)]
    for i in range(3):
        changed = list(features)
        changed[i] = torch.randn(3, features[i].shape[1])
        assert not torch.allclose(head(changed), head(features))


# ----------------------------------------------------------------------------------------------
# cross-modal interaction: CentralNet and MMTM


def fold_frames(clip):
    """[B, C, T, H, W] -> [B*T, C, H, W], clip b's frames in rows b*T .. b*T + T - 1 (as ResNetEncoder.to_frames)."""
    return clip.transpose(1, 2).flatten(0, 1)


# (specs, levels per fusion): ResNets alone meet after every tap; with an MLP, at the MLP's two hidden layers
INTERACTION_SPECS = [
    ([("image", 3), ("video", 2)], {"centralnet": 4, "mmtm": 3}),
    ([("video", 3), ("image", 1), ("vector", 6)], {"centralnet": 2, "mmtm": 2}),
    ([("vector", 6), ("vector", 4)], {"centralnet": 2, "mmtm": 2}),
]


@pytest.mark.parametrize("specs, levels", INTERACTION_SPECS, ids=["image+video", "video+image+vector", "vector+vector"])
@pytest.mark.parametrize("fusion", models.MIXING_TAPS)
def test_interaction_fusion_shapes_and_levels(fusion, specs, levels):
    torch.manual_seed(0)
    model = models.build_model(specs, 7, fusion=fusion)
    assert isinstance(model, models.InteractionClassifier) and model.mask_mode == "input" and len(model.mixers) == levels[fusion]
    inputs = make_inputs(specs, batch=3)
    mask = torch.tensor([[True] * len(specs), [True] + [False] * (len(specs) - 1), [False] + [True] * (len(specs) - 1)])
    assert model(inputs).shape == (3, 7) and model(inputs, mask).shape == (3, 7)
    model.eval()
    with torch.no_grad():  # in eval mode a row's logits depend on that row alone: frames never cross samples
        together = model(inputs, mask)
        for row in range(3):
            alone = model([x[row:row + 1] for x in inputs], mask[row:row + 1])
            assert torch.allclose(alone, together[row:row + 1], atol=1e-5)


@pytest.mark.parametrize("fusion", models.FUSIONS)
def test_each_fusion_allows_its_maskings_default_first(fusion):
    vectors = [("vector", 6), ("vector", 4)]
    # late fusion: feature masking (the authors' code) by default, input masking too; interaction: input only
    expected = ("feature", "input") if fusion in models.FUSION_HEADS else ("input",)
    assert models.allowed_masks(fusion) == expected
    assert models.build_model(vectors, 5, fusion=fusion).mask_mode == expected[0]
    for mask_mode in ("feature", "input"):
        if mask_mode in expected:
            assert models.build_model(vectors, 5, fusion=fusion, mask_mode=mask_mode).mask_mode == mask_mode
        else:
            with pytest.raises(ValueError, match=f"mask_mode '{mask_mode}' is not defined for fusion '{fusion}'"):
                models.build_model(vectors, 5, fusion=fusion, mask_mode=mask_mode)


@pytest.mark.parametrize("fusion, mask_mode", FUSION_MASKS)
def test_gradients_reach_every_encoder(fusion, mask_mode):
    torch.manual_seed(0)
    specs = [("video", 2), ("image", 1), ("vector", 6)]
    model = models.build_model(specs, 5, fusion=fusion, mask_mode=mask_mode).train()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    F.cross_entropy(model(make_inputs(specs), mask), torch.randint(0, 5, (6,))).backward()
    assert all(p.grad is not None for p in model.parameters())  # every encoder stage, mixer and head took part
    for encoder in model.encoders:
        assert any(torch.count_nonzero(p.grad) > 0 for p in encoder.parameters())


def test_mmtm_gates_each_clip_channel_wise_from_all_modalities():
    torch.manual_seed(0)
    mmtm = models.MMTM([4, 3])
    assert mmtm.joint.out_features == 2 * (4 + 3) // 4  # C_Z = 2 * sum C_i / ratio, ratio 4
    clip, vector = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 3)  # a video stream [B, C, T, H, W], a vector stream
    out_clip, out_vector = mmtm([fold_frames(clip), vector], [3, 1])
    # Joze et al. 2020, Sec. 3.1: squeeze over space and time, joint FC + ReLU, per-modality excitation FC
    joint = torch.relu(mmtm.joint(torch.cat([clip.mean(dim=(2, 3, 4)), vector], dim=1)))
    gates = [2 * torch.sigmoid(excitation(joint)) for excitation in mmtm.excitations]  # [B, 4], [B, 3]
    assert all(((gate > 0) & (gate < 2)).all() for gate in gates)
    assert torch.allclose(out_clip, fold_frames(clip * gates[0][:, :, None, None, None]), atol=1e-6)
    assert torch.allclose(out_vector, vector * gates[1], atol=1e-6)


@pytest.mark.parametrize("first", [True, False])
def test_centralnet_level_steps_from_a_weighted_sum(first):
    torch.manual_seed(0)
    level = models.CentralNetLevel([4, 3], width=5, first=first)
    with torch.no_grad():
        level.weights.copy_(torch.rand(level.weights.shape))
    level.eval()
    assert level.weights.shape == ((2,) if first else (3,))  # alpha_1, alpha_2[, alpha_C]
    clip, vector, central = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 3), torch.randn(2, 5)
    # Vielzeuf et al. 2018: z = alpha_C * c + sum_i alpha_i * h_i, here h_i = P_i(stream i pooled over space, time)
    z = (level.weights[0] * level.projections[0](clip.mean(dim=(2, 3, 4)))
         + level.weights[1] * level.projections[1](vector))
    if not first:
        z = z + level.weights[2] * central
    assert torch.allclose(level(central, [fold_frames(clip), vector], [3, 1]), level.layer(z), atol=1e-6)


def test_centralnet_ignores_a_modality_whose_weights_are_zero():
    torch.manual_seed(0)
    model = models.build_model(THREE, 5, fusion="centralnet").eval()
    inputs = make_inputs(THREE)
    changed = [inputs[0], torch.randn_like(inputs[1]), inputs[2]]
    with torch.no_grad():
        assert not torch.allclose(model(changed), model(inputs))
        for level in model.mixers:
            level.weights[1] = 0.0  # alpha of modality 1 at every level
        assert torch.allclose(model(changed), model(inputs), atol=1e-6)


@pytest.mark.parametrize("fusion", models.MIXING_TAPS)
def test_interaction_fusion_trains_a_batch_of_one_sample(fusion):
    torch.manual_seed(0)
    model = models.build_model(TWO, 3, fusion=fusion).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    running = [norm.running_mean.clone() for norm in norms]
    loss = F.cross_entropy(model(make_inputs(TWO, batch=1), torch.tensor([[True, False]])), torch.tensor([2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.equal(norm.running_mean, before) for norm, before in zip(norms, running))


def test_adapt_first_conv_averages_rgb_kernels():
    torch.manual_seed(0)
    rgb = torch.randn(64, 3, 7, 7)
    for channels in (1, 2, 4):
        adapted = models.adapt_first_conv(rgb, channels)
        assert adapted.shape == (64, channels, 7, 7)
        for c in range(channels):
            assert torch.allclose(adapted[:, c], (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3)
    assert torch.equal(models.adapt_first_conv(rgb, 3), rgb)
    with pytest.raises(ValueError, match="RGB kernels"):
        models.adapt_first_conv(torch.randn(64, 2, 7, 7), 1)


def test_pretrained_starts_from_the_imagenet_state(monkeypatch):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()
    requested = []

    def fake_loader(url, **kwargs):
        requested.append(url)
        return {name: value.clone() for name, value in imagenet.items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_loader)
    flow = models.build_encoder("video", 2, pretrained=True)
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(flow.stages.stem[0].weight, models.adapt_first_conv(imagenet["conv1.weight"], 2))
    assert torch.equal(flow.stages.layer3[1].conv2.weight, imagenet["layer3.1.conv2.weight"])
    assert torch.equal(flow.stages.stem[1].running_var, imagenet["bn1.running_var"])
    rgb = models.build_model([("image", 3), ("vector", 6)], 5, pretrained=True)
    assert torch.equal(rgb.encoders[0].stages.stem[0].weight, imagenet["conv1.weight"])


def test_pretrained_without_weights_raises_a_clear_error(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="resnet18-f37072fd.pth") as error:
        models.build_encoder("image", 1, pretrained=True)
    assert torch.hub.get_dir() in str(error.value) and "--weights FILE" in str(error.value)


@pytest.mark.parametrize("fusion, mask_mode", FUSION_MASKS)
def test_every_fusion_trains(fusion, mask_mode):
    torch.manual_seed(0)
    model = models.build_model(TWO, 5, fusion=fusion, mask_mode=mask_mode).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs, target = make_inputs(TWO, batch=8), torch.randint(0, 5, (8,))
    mask = torch.ones(8, 2, dtype=torch.bool)
    mask[0, 1] = mask[1, 1] = mask[2, 0] = mask[3, 0] = False  # two uni-modal copies of each modality
    before = [p.detach().clone() for p in model.head.parameters()]
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(inputs, mask), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.head.parameters()))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="concat"):
        models.build_model(TWO, 5, fusion="attention")
    with pytest.raises(ValueError, match="unknown fusion"):
        models.allowed_masks("attention")
    with pytest.raises(ValueError, match="not a late fusion"):
        models.LateFusionClassifier(TWO, 5, fusion="mmtm")
    with pytest.raises(ValueError, match="not a stage-mixing fusion"):
        models.StageMixingClassifier(TWO, 5, fusion="concat")
    with pytest.raises(ValueError, match="feature"):
        models.build_model(TWO, 5, mask_mode="dropout")
    with pytest.raises(ValueError, match="image"):
        models.build_model([("audio", 1)], 5)
    with pytest.raises(ValueError, match="channels"):
        models.build_encoder("image", 0)
    with pytest.raises(ValueError, match="num_classes"):
        models.build_model(TWO, 1)
    with pytest.raises(ValueError, match="pretrained"):
        models.build_encoder("vector", 6, pretrained=True)
    with pytest.raises(ValueError, match="pretrained"):
        models.build_model([("vector", 6), ("vector", 4)], 5, pretrained=True)
    with pytest.raises(ValueError, match="input_specs"):
        models.build_model([], 5)
    model = models.build_model(TWO, 5)
    inputs = make_inputs(TWO)
    with pytest.raises(ValueError, match="2 tensors"):
        model(inputs[:1])
    with pytest.raises(ValueError, match=r"inputs\[0\]"):
        model([torch.randn(6, 3, 32, 32), inputs[1]])
    with pytest.raises(ValueError, match="batch size"):
        model([inputs[0], inputs[1][:4]])
    with pytest.raises(ValueError, match="mask"):
        model(inputs, torch.ones(6, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="BoolTensor"):
        model(inputs, torch.ones(6, 2))


def test_a_single_present_row_of_a_vector_trains_on_running_statistics():
    """A re-sampled batch can hold one row that keeps a modality: an MLP's BatchNorm has no statistics for it."""
    torch.manual_seed(0)
    model = models.build_model([("vector", 6), ("vector", 5)], num_classes=3)
    model.train()
    inputs = [torch.randn(4, 6), torch.randn(4, 5)]
    mask = torch.tensor([[True, True], [False, True], [False, True], [False, True]])  # modality 0 in one row
    norm = model.encoders[0].stages.layer1[1]
    running_mean = norm.running_mean.clone()
    loss = torch.nn.functional.cross_entropy(model(inputs, mask), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(norm.running_mean, running_mean)  # the lone row does not update the statistics
    assert model.encoders[0].stages.layer1[0].weight.grad.abs().sum() > 0
    # a whole training batch of one sample goes through too
    model(inputs=[x[:1] for x in inputs]).sum().backward()


# (ours, torch's, input shape): more than one sample, a single sample with H * W values per channel, a single
# sample with one value per channel
BATCHNORM_CASES = [(models.BatchNorm2d, torch.nn.BatchNorm2d, (3, 4, 2, 5)),
                   (models.BatchNorm2d, torch.nn.BatchNorm2d, (1, 4, 2, 5)),
                   (models.BatchNorm2d, torch.nn.BatchNorm2d, (1, 4, 1, 1)),
                   (models.BatchNorm1d, torch.nn.BatchNorm1d, (3, 4)),
                   (models.BatchNorm1d, torch.nn.BatchNorm1d, (1, 4))]


@pytest.mark.parametrize("ours, theirs, shape", BATCHNORM_CASES, ids=lambda case: str(case))
def test_batchnorm_normalises_a_single_sample_without_updating_the_running_statistics(ours, theirs, shape):
    """torch's BatchNorm in training, except that a single sample is normalised with its own statistics (torch in
    training) where it has more than one value per channel, with the running statistics (torch in eval mode) where
    it has one, and leaves the running statistics as they are."""
    torch.manual_seed(0)
    norm, reference = ours(4), theirs(4)
    state = {name: torch.rand_like(value) + 0.5 for name, value in norm.state_dict().items() if value.dim() == 1}
    norm.load_state_dict(state, strict=False)
    reference.load_state_dict(state, strict=False)
    x = 3 * torch.randn(shape) + 1
    single, values_per_channel = shape[0] == 1, x.numel() // shape[1]
    reference.train(not (single and values_per_channel == 1))
    assert torch.allclose(norm.train()(x), reference(x), atol=1e-5)
    expected = state if single else reference.state_dict()
    assert torch.equal(norm.running_mean, expected["running_mean"])
    assert torch.equal(norm.running_var, expected["running_var"])


def test_single_present_rows_after_a_short_warm_up_keep_the_loss_sane():
    """Re-sampled batches in which a ResNet modality has a single present row, right after a warm-up of two steps:
    that row normalised with the barely initialised running statistics of every layer drove the loss to 1e5, then
    nan; with its own statistics over H, W it stays about log 2."""
    torch.manual_seed(0)
    model = models.build_model([("image", 1), ("image", 3)], 2).train()  # spectrograms and images
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    labels = torch.tensor([0, 1, 0, 1])
    inputs = [torch.randn(4, 1, 64, 32) + labels.view(4, 1, 1, 1), torch.randn(4, 3, 32, 32)]
    both, first, second = [True, True], [True, False], [False, True]
    steps = [([0, 1], [both, both]), ([2, 3], [both, both]),  # the warm-up
             ([0, 1], [both, second]), ([1, 2], [first, both]), ([3, 0], [first, second])]  # lone rows
    for rows, mask in steps:
        loss = F.cross_entropy(model([x[rows] for x in inputs], torch.tensor(mask)), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert loss.item() < 5, (rows, mask)
