"""Tests for MBT (models.BottleneckClassifier, --fusion mbt): tokenisers, shapes, absent modalities, the coalition
predictor, the bottleneck as the only path between modalities, and end-to-end runs of train.py."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import conftest
import models
import train

# small stand-ins: a spectrogram whose sides are no multiple of the patch, clips of T=2 frames, a 13-d vector
SHAPES = {("image", 1): (1, 20, 12), ("video", 3): (3, 2, 16, 16), ("vector", 13): (13,)}
TWO = [("image", 1), ("vector", 13)]
THREE = [("image", 1), ("video", 3), ("vector", 13)]
SIZES = dict(layers=3, width=16, heads=2, fusion_layer=1, bottlenecks=2, patch=8)


def make_inputs(specs, batch=5):
    return [torch.randn(batch, *SHAPES[spec]) for spec in specs]


def build(specs, **sizes):
    torch.manual_seed(0)
    return models.build_model(specs, 4, fusion="mbt", mbt=dict(SIZES, **sizes)).eval()


def present_only(model, keep):
    """An MBT built on the modalities `keep` alone, with `model`'s weights for them: the network without the others."""
    sub = models.build_model([model.input_specs[i] for i in keep], model.num_classes, fusion="mbt", mbt=model.sizes)
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("encoders."):
            _, index, rest = name.split(".", 2)
            if int(index) in keep:
                state[f"encoders.{keep.index(int(index))}.{rest}"] = value
        else:
            state[name] = value
    sub.load_state_dict(state)
    return sub.eval()


def test_tokenisers():
    torch.manual_seed(0)
    patches = models.PatchTokens(channels=1, width=6, patch=8, video=False)
    spectrogram = torch.randn(2, 1, 20, 12)
    tokens = patches(spectrogram)
    assert tokens.shape == (2, 3 * 2, 6)  # zero-padded to 24 x 16: 3 x 2 patches
    padded = F.pad(spectrogram, (0, 4, 0, 4))
    corner = padded[:, :, 16:, 8:]  # patch (row 2, column 1), the last token
    expected = (patches.embed.weight * corner[:, None]).sum(dim=(2, 3, 4)) + patches.embed.bias
    assert torch.allclose(tokens[:, -1], expected + patches.rows[2] + patches.columns[1], atol=1e-5)
    # a clip: each frame tokenised as an image, plus the embedding of its frame
    clips = models.PatchTokens(channels=3, width=6, patch=8, video=True)
    clip = torch.randn(2, 3, 4, 16, 16)
    frames = clips(clip).view(2, 4, 4, 6)  # [B, T, h*w, width]
    image = models.PatchTokens(channels=3, width=6, patch=8, video=False)
    image.load_state_dict({k: v for k, v in clips.state_dict().items() if k != "times"})
    for t in range(4):
        assert torch.allclose(frames[:, t], image(clip[:, :, t]) + clips.times[t], atol=1e-5)
    # a vector: groups of VECTOR_PATCH features, each its own linear map and bias
    vectors = models.VectorTokens(features=13, width=6)
    x = torch.randn(2, 13)
    tokens = vectors(x)
    assert tokens.shape == (2, 2, 6)
    assert torch.allclose(tokens[:, 0], x[:, :8] @ vectors.weight[0] + vectors.bias[0], atol=1e-5)
    assert torch.allclose(tokens[:, 1], x[:, 8:] @ vectors.weight[1, :5] + vectors.bias[1], atol=1e-5)
    with pytest.raises(ValueError, match="positional embeddings cover at most 256"):
        models.PatchTokens(channels=1, width=6, patch=1, video=False)(torch.randn(1, 1, 300, 2))


@pytest.mark.parametrize("specs", [TWO, THREE], ids=["2 modalities", "3 modalities"])
def test_output_shapes(specs):
    model = build(specs).train()
    n = len(specs)
    assert isinstance(model, models.InteractionClassifier) and model.mask_mode == "input"
    assert len(model.encoders) == n and all(len(encoder.layers) == SIZES["layers"] for encoder in model.encoders)
    assert model.bottleneck.shape == (1, SIZES["bottlenecks"], SIZES["width"])
    inputs = make_inputs(specs)
    mask = torch.ones(5, n, dtype=torch.bool)
    mask[1:, 0] = False
    mask[2, 1:] = False  # row 2 keeps no modality at all: the classifier's bias
    assert model(inputs).shape == model(inputs, mask).shape == (5, 4)
    with torch.no_grad():
        assert torch.allclose(model(inputs, mask)[2], model.head.bias)


@pytest.mark.parametrize("specs", [TWO, THREE], ids=["2 modalities", "3 modalities"])
def test_an_absent_modality_cannot_change_the_output(specs):
    model = build(specs)
    inputs = make_inputs(specs)
    n = len(specs)
    mask = torch.ones(5, n, dtype=torch.bool)
    mask[:, n - 1] = False  # the last modality is absent from every row
    with torch.no_grad():
        logits = model(inputs, mask)
        changed = inputs[:-1] + [1e3 * torch.randn_like(inputs[-1])]
        assert torch.equal(model(changed, mask), logits)  # its input
        for p in model.encoders[-1].parameters():  # its tokeniser, class token and layers
            p.add_(torch.randn_like(p))
        assert torch.equal(model(inputs, mask), logits)
        # the network run without it: it adds no tokens, and the bottlenecks average the present modalities alone
        assert torch.allclose(logits, present_only(model, list(range(n - 1)))(inputs[:-1]), atol=1e-5)
        assert not torch.allclose(model(inputs), logits, atol=1e-3)  # present, it counts


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("specs", [TWO, THREE], ids=["2 modalities", "3 modalities"])
def test_coalition_predictor_equals_explicitly_masked_forwards(specs, training):
    model = build(specs).train(training)
    inputs = make_inputs(specs)
    n = len(specs)
    codes = torch.tensor([1, 2, 3, 2, 1]) if n == 2 else torch.tensor([7, 1, 6, 5, 2])  # mixed rows
    mixed = torch.stack([(codes >> i) & 1 for i in range(n)], dim=1).bool()
    masks = [torch.tensor([(code >> i) & 1 for i in range(n)], dtype=torch.bool).expand(5, n)
             for code in range(1, 2 ** n)] + [mixed]
    with torch.no_grad():
        predict = model.coalition_predictor(inputs)
        for mask in masks:
            logits = predict(mask)
            for row in range(5):  # each row: the network built on that row's modalities alone
                keep = mask[row].nonzero().squeeze(1).tolist()
                alone = present_only(model, keep)([inputs[i][row:row + 1] for i in keep])
                assert torch.allclose(logits[row:row + 1], alone, atol=1e-5), (mask.tolist(), row)


def record(module, store, pre=False):
    """Keep what `module` takes (pre) or returns, one tensor per call."""
    if pre:
        return module.register_forward_pre_hook(lambda mod, args: store.append(args[0].detach().clone()))
    return module.register_forward_hook(lambda mod, args, out: store.append(out.detach().clone()))


@pytest.mark.parametrize("fusion_layer", [0, 2, 4])
def test_bottlenecks_are_the_only_path_between_modalities(fusion_layer):
    layers = 4
    model = build(TWO, layers=layers, fusion_layer=fusion_layer)
    inputs = make_inputs(TWO)
    perturbed = [inputs[0] + torch.randn_like(inputs[0]), inputs[1]]  # modality 0 changes, modality 1 does not
    watched = model.encoders[1]  # the vector modality: 1 class token + 2 tokens
    clean_in, clean_out, changed_out = [], [], []
    with torch.no_grad():
        hooks = [record(layer, clean_in, pre=True) for layer in watched.layers]
        hooks += [record(layer, clean_out) for layer in watched.layers]
        model(inputs)
        for hook in hooks:
            hook.remove()
        # before the fusion layer a layer sees its modality's tokens alone; from it on, the bottleneck tokens too
        assert [len(x[0]) for x in clean_in] == [3 if layer < fusion_layer else 3 + SIZES["bottlenecks"]
                                                 for layer in range(layers)]
        hooks = [record(layer, changed_out) for layer in watched.layers]
        model(perturbed)
        for hook in hooks:
            hook.remove()
        # the first fused layer still sees the learned bottleneck tokens; after it, they carry modality 0
        for layer in range(layers):
            same = torch.equal(changed_out[layer], clean_out[layer])
            assert same == (layer <= fusion_layer), layer
        # given the clean run's bottleneck tokens, modality 1 is exactly as in the clean run: no other path
        swaps = [layer.register_forward_pre_hook(
            lambda mod, args, clean=clean: (torch.cat([args[0][:, :3], clean[:, 3:]], dim=1),))
            for layer, clean in zip(watched.layers, clean_in) if clean.shape[1] > 3]
        swapped_out = []
        hooks = [record(layer, swapped_out) for layer in watched.layers]
        model(perturbed)
        for hook in hooks + swaps:
            hook.remove()
        assert all(torch.equal(a, b) for a, b in zip(swapped_out, clean_out))


def test_no_fusion_layer_averages_the_unimodal_predictions():
    """fusion_layer = layers: no layer fuses, and the prediction is the mean of the uni-modal logits."""
    model = build(THREE, fusion_layer=SIZES["layers"])
    inputs = make_inputs(THREE)
    with torch.no_grad():
        alone = [model(inputs, torch.eye(3, dtype=torch.bool)[i].expand(5, 3)) for i in range(3)]
        assert torch.allclose(model(inputs), torch.stack(alone).mean(dim=0), atol=1e-5)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="fusion_layer 5 must be at most layers 4"):
        models.build_model(TWO, 4, fusion="mbt", mbt=dict(layers=4, fusion_layer=5))
    with pytest.raises(ValueError, match="width 10 must be a multiple of heads 4"):
        models.build_model(TWO, 4, fusion="mbt", mbt=dict(width=10))
    with pytest.raises(ValueError, match="bottlenecks must be an integer >= 1"):
        models.build_model(TWO, 4, fusion="mbt", mbt=dict(bottlenecks=0))
    with pytest.raises(ValueError, match="unknown MBT settings"):
        models.build_model(TWO, 4, fusion="mbt", mbt=dict(depth=3))
    with pytest.raises(ValueError, match="trained from scratch"):
        models.build_model(TWO, 4, fusion="mbt", pretrained=True)
    with pytest.raises(ValueError, match="apply to fusion 'mbt' only"):
        models.build_model(TWO, 4, fusion="concat", mbt=dict(layers=2))
    with pytest.raises(ValueError, match="feature"):
        models.build_model(TWO, 4, fusion="mbt", mask_mode="feature")


# ----------------------------------------------------------------------------------------------
# train.py --fusion mbt

QUICK = conftest.SYNTHETIC + ["--fusion", "mbt", "--mbt-layers", "2", "--mbt-width", "16", "--mbt-heads", "2",
                              "--mbt-fusion-layer", "1", "--mbt-patch", "8"]


@pytest.mark.parametrize("mode", ("baseline",) + train.RESAMPLING_MODES)
def test_trains_and_values_in_every_mode(tmp_path, mode):
    track = ["--track-phi"] if mode == "baseline" else []
    results, log = conftest.run_train(tmp_path, *QUICK, *track, "--mode", mode)
    assert [record["epoch"] for record in log] == [0, 1] and log[1]["phase"] == mode
    assert len(log[1]["mean_phi"]) == 2 and log[1]["train_samples"] == 48 + sum(log[1]["copies"])
    if mode in ("sample", "naive", "reversed"):  # uni-modal copies went through MBT (Eq. 10: phi < 1)
        assert sum(log[1]["copies"]) > 0
    assert 0.0 <= results["test_acc"] <= 1.0 and len(results["test_acc_per_modality"]) == 2
    config = json.load(open(tmp_path / "args.json"))
    assert (config["fusion"], config["mask"], config["mbt_layers"], config["mbt_fusion_layer"]) == ("mbt", "input", 2, 1)


def test_sample_mode_on_a_kinetics_sounds_tree(tmp_path, ks_root):
    results, log = conftest.run_train(tmp_path / "run", "--dataset", "ks", "--data-root", str(ks_root), "--fusion",
                                      "mbt", "--mode", "sample", "--epochs", "2", "--warmup", "1", "--batch-size", "3",
                                      "--image-size", "32", "--workers", "0", "--gpu", "-1", "--mbt-width", "16",
                                      "--mbt-heads", "2", "--mbt-layers", "2", "--mbt-fusion-layer", "1")
    assert [record["phase"] for record in log] == ["warmup", "sample"]
    assert len(results["test_acc_per_modality"]) == 2 and len(results["test_mean_phi"]) == 2
    # the checkpoint knows its MBT sizes: evaluating it rebuilds the same network
    evaluated = train.main(["--resume", str(tmp_path / "run" / "best.pt"), "--eval-only"])
    assert evaluated["acc"] == results["test_acc"]


def test_a_checkpoint_keeps_its_mbt_sizes(tmp_path, capsys):
    conftest.run_train(tmp_path, *QUICK, "--mode", "baseline", "--epochs", "1")
    checkpoint = train.load_checkpoint(os.path.join(tmp_path, "last.pt"))
    assert checkpoint["model_config"]["mbt"] == dict(layers=2, width=16, heads=2, fusion_layer=1, bottlenecks=4,
                                                    patch=8)
    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2", "--mbt-layers", "3"])
    assert "--mbt-layers 3 differs from the checkpoint's 2" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--mbt-fusion-layer", "5"], "--fusion mbt: MBT --mbt-fusion-layer 5 must be at most --mbt-layers 4"),
    (["--mbt-heads", "3"], "--fusion mbt: MBT --mbt-width 64 must be a multiple of --mbt-heads 3"),
    (["--mbt-layers", "0"], "--fusion mbt: MBT --mbt-layers must be an integer >= 1, got 0"),
    (["--pretrained"], "--fusion mbt: --pretrained (off: --no-pretrained): MBT is trained from scratch"),
    (["--mask", "feature"], "--mask feature is not defined for --fusion mbt"),
])
def test_bad_flags_stop_in_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        train.main(conftest.SYNTHETIC + ["--fusion", "mbt", "--out", str(tmp_path)] + flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
