"""Tests for data.py: the bundled mfeat set, the synthetic generator, the re-sampled epoch D^rs, and the
KS / MM-Debiased / UCF-101 / CREMA-D readers on tiny fixture trees (writers in conftest.py) in tmp_path."""

import functools
import json

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from torchvision.io import write_jpeg

import data
import train
from conftest import (CREMAD_LISTS, FRAME_STEP, KS_LISTS, MMDEBIASED_TABLE, UCF_CLASSES, make_cremad_tree,
                      make_ks_tree, make_mmdebiased_tree, make_ucf_tree, write_frames)


# ----------------------------------------------------------------------------------------------
# mfeat

def test_mfeat_split_sizes_stratified_and_disjoint():
    splits = {s: data.build_dataset("mfeat", s) for s in data.SPLITS}
    assert {s: len(d) for s, d in splits.items()} == dict(train=1200, val=400, test=400)
    assert torch.bincount(splits["train"].labels).tolist() == [120] * 10
    assert torch.bincount(splits["val"].labels).tolist() == [40] * 10
    assert torch.bincount(splits["test"].labels).tolist() == [40] * 10
    ids = [set(d.sample_ids) for d in splits.values()]
    assert len(ids[0] | ids[1] | ids[2]) == 2000
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    # the split is fixed, whatever the run seed
    assert data.build_dataset("mfeat", "test", seed=7).sample_ids == splits["test"].sample_ids


def test_mfeat_item_views_order_and_specs():
    d = data.build_dataset("mfeat", "train", views=("mor", "fou", "pix"))
    assert d.modalities == ["mor", "fou", "pix"]
    assert d.input_specs == [("vector", 6), ("vector", 76), ("vector", 240)]
    inputs, label, index = d[5]
    assert [x.shape for x in inputs] == [torch.Size([6]), torch.Size([76]), torch.Size([240])]
    assert all(x.dtype == torch.float32 for x in inputs)
    assert isinstance(label, int) and label == d.labels[5].item() and index == 5
    assert d.class_names == [str(c) for c in range(10)] and d.num_classes == 10
    assert d.sample_ids[0].startswith("mfeat-") and len(d.sample_ids[0]) == len("mfeat-0001")
    assert data.build_dataset("mfeat", "train").modalities == ["pix", "mor"]


def test_mfeat_standardised_with_train_statistics_only():
    train = data.build_dataset("mfeat", "train", views=("fac", "mor"))
    test = data.build_dataset("mfeat", "test", views=("fac", "mor"))
    raw = np.load(data.MFEAT_PATH)
    for m, view in enumerate(("fac", "mor")):
        x = train.features[m]
        assert x.mean(0).abs().max() < 1e-4
        nonconstant = raw[view][train.rows.numpy()].std(0) > 0
        assert torch.allclose(x.std(0)[torch.from_numpy(nonconstant)], torch.ones(int(nonconstant.sum())), atol=1e-4)
        # test rows use the train mean and std, not their own
        train_raw = torch.from_numpy(raw[view][train.rows.numpy()])
        mean, std = train_raw.mean(0), train_raw.std(0)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        expected = (torch.from_numpy(raw[view][test.rows.numpy()]) - mean) / std
        assert torch.allclose(test.features[m], expected, atol=1e-4)


def test_mfeat_constant_feature_is_centred_not_divided_by_zero(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    arrays = {v: rng.normal(size=(200, 3)).astype(np.float32) for v in data.MFEAT_VIEWS}
    arrays["pix"][:, 1] = 5.0
    np.savez_compressed(tmp_path / "mfeat.npz", labels=labels, **arrays)
    d = data.build_dataset("mfeat", "train", root=str(tmp_path), views=("pix",))
    assert torch.isfinite(d.features[0]).all()
    assert torch.equal(d.features[0][:, 1], torch.zeros(len(d)))


def test_mfeat_builder_matches_csvs(tmp_path):
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 3)
    widths = dict(fou=2, fac=3, kar=2, pix=4, zer=1, mor=2)
    for view, width in widths.items():
        table = np.column_stack([rng.normal(size=(30, width)), labels])
        header = ",".join(str(c) for c in range(width + 1))
        np.savetxt(csv_dir / f"mfeat-{view}.csv", table, delimiter=",", header=header, comments="")
    data.build_mfeat_npz(str(csv_dir), str(tmp_path / "out" / "mfeat.npz"))
    with np.load(tmp_path / "out" / "mfeat.npz") as archive:
        assert archive["labels"].tolist() == labels.tolist()
        assert archive["pix"].dtype == np.float32 and archive["pix"].shape == (30, 4)
        expected = np.loadtxt(csv_dir / "mfeat-pix.csv", delimiter=",", skiprows=1)[:, :-1]
        assert np.allclose(archive["pix"], expected)


def test_mfeat_errors(tmp_path):
    with pytest.raises(ValueError, match="fou, fac, kar, pix, zer, mor"):
        data.build_dataset("mfeat", "train", views=("pix", "colour"))
    with pytest.raises(ValueError, match="views"):
        data.build_dataset("mfeat", "train", views=("pix", "pix"))
    with pytest.raises(data.DataError, match="mfeat.npz"):
        data.build_dataset("mfeat", "train", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mfeat-fou.csv"):
        data.build_mfeat_npz(str(tmp_path), str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="split"):
        data.build_dataset("mfeat", "training")
    with pytest.raises(ValueError, match="dataset"):
        data.build_dataset("cifar", "train")


def test_mfeat_degrade_corrupts_one_view_per_sample_at_its_strength():
    clean = data.build_dataset("mfeat", "train", views=("fou", "kar"))
    degraded = data.build_dataset("mfeat", "train", views=("fou", "kar"), degrade=0.8)
    again = data.build_dataset("mfeat", "train", views=("fou", "kar"), degrade=0.8, seed=5)
    for v in range(2):
        assert torch.equal(degraded.features[v], again.features[v])  # fixed for the data set, not the run
        untouched = degraded.degraded_view != v
        assert torch.equal(degraded.features[v][untouched], clean.features[v][untouched])
        hit = ~untouched & (degraded.degrade_strength > 0.1)
        assert (degraded.features[v][hit] - clean.features[v][hit]).abs().sum(1).gt(0).all()
    # balanced at the dataset level: each view is the degraded one in about half of the samples
    assert 0.4 < degraded.degraded_view.float().mean() < 0.6
    assert 0.0 <= degraded.degrade_strength.min() and degraded.degrade_strength.max() <= 0.8
    with pytest.raises(ValueError, match="degrade"):
        data.build_dataset("mfeat", "train", degrade=1.5)


# ----------------------------------------------------------------------------------------------
# synthetic

# ----------------------------------------------------------------------------------------------
# the sample-level benchmark: one known weak view per sample


@functools.lru_cache(maxsize=None)
def weak_view_splits(weak_signal=0.2, split_seed=data.MFEAT_SPLIT_SEED):
    return data.build_splits("mfeat", views=("fac", "pix"), weak_signal=weak_signal, split_seed=split_seed)


def test_weak_view_is_balanced_per_class_and_varies_from_sample_to_sample():
    for split, dataset in weak_view_splits().items():
        for label in range(10):
            weak = dataset.degraded_view[dataset.labels == label]
            assert abs(int((weak == 0).sum()) - int((weak == 1).sum())) <= 1, (split, label)


def test_weak_view_keeps_a_share_of_its_signal_and_the_strong_view_is_untouched():
    clean = data.MfeatDataset("test", views=("fac", "pix"))
    weakened = weak_view_splits()["test"]
    for v in range(2):
        strong, weak = weakened.degraded_view != v, weakened.degraded_view == v
        assert torch.equal(weakened.features[v][strong], clean.features[v][strong])
        x, y = clean.features[v][weak], weakened.features[v][weak]
        assert (x * y).mean().item() == pytest.approx(0.2 * (x * x).mean().item(), abs=0.02)  # 0.2 of the signal
        assert (y - 0.2 * x).var().item() == pytest.approx(0.96, abs=0.05)  # the rest is unit-variance noise


def test_weak_view_noise_is_drawn_anew_per_training_read_and_fixed_for_evaluation():
    splits = weak_view_splits()
    train_set, train_eval = splits["train"], splits["train_eval"]
    weak = int(train_set.degraded_view[0])
    torch.manual_seed(0)
    first, second = train_set[0][0], train_set[0][0]
    assert not torch.equal(first[weak], second[weak]) and torch.equal(first[1 - weak], second[1 - weak])
    assert torch.equal(first[1 - weak], train_eval.features[1 - weak][0])
    assert torch.equal(train_eval[0][0][weak], train_eval[0][0][weak])
    assert torch.equal(train_eval[0][0][weak], train_eval.features[weak][0])
    torch.manual_seed(0)
    assert torch.equal(train_set[0][0][weak], first[weak])  # the run's seed fixes the draws


@functools.lru_cache(maxsize=None)
def both_weakened_splits(weak_signal=0.25, strong_signal=0.35, split_seed=1200):
    return data.build_splits("mfeat", views=("fac", "pix"), weak_signal=weak_signal, strong_signal=strong_signal,
                             split_seed=split_seed)


def signal_share(clean, weakened):
    """The share s of weakened = s clean + sqrt(1 - s^2) noise, estimated from [N, D] standardised features."""
    return ((clean * weakened).mean() / (clean * clean).mean()).item()


def test_strong_signal_weakens_the_strong_view_too_and_keeps_the_weak_views_of_the_first_edition():
    clean = data.MfeatDataset("test", views=("fac", "pix"), split_seed=1200)
    first_edition = data.build_dataset("mfeat", "test", views=("fac", "pix"), weak_signal=0.25, split_seed=1200)
    both = both_weakened_splits()["test"]
    assert torch.equal(both.degraded_view, first_edition.degraded_view)  # the same known weak view per sample
    for v in range(2):
        strong, weak = both.degraded_view != v, both.degraded_view == v
        assert torch.equal(both.features[v][weak], first_edition.features[v][weak])  # the same weak-view draws
        assert signal_share(clean.features[v][weak], both.features[v][weak]) == pytest.approx(0.25, abs=0.02)
        assert signal_share(clean.features[v][strong], both.features[v][strong]) == pytest.approx(0.35, abs=0.02)
        rest = both.features[v][strong] - 0.35 * clean.features[v][strong]
        assert rest.var().item() == pytest.approx(1 - 0.35 ** 2, abs=0.05)  # unit-variance noise
        assert not torch.equal(both.features[v][strong], clean.features[v][strong])
    for label in range(10):  # each view the weak one in half the samples of every class
        weak = both.degraded_view[both.labels == label]
        assert abs(int((weak == 0).sum()) - int((weak == 1).sum())) <= 1


def test_strong_signal_one_is_the_first_edition_bit_for_bit():
    for split in ("train", "test"):
        default = data.build_dataset("mfeat", split, views=("fac", "pix"), weak_signal=0.2, augment=True)
        explicit = data.build_dataset("mfeat", split, views=("fac", "pix"), weak_signal=0.2, strong_signal=1.0,
                                      augment=True)
        assert all(torch.equal(a, b) for a, b in zip(default.features, explicit.features))
        torch.manual_seed(0)
        read = default[3][0]
        torch.manual_seed(0)
        assert all(torch.equal(a, b) for a, b in zip(read, explicit[3][0]))


def test_both_views_are_weakened_anew_per_training_read_and_the_draws_are_fixed_by_the_split_seed():
    train_set, train_eval = both_weakened_splits()["train"], both_weakened_splits()["train_eval"]
    torch.manual_seed(0)
    first, second = train_set[0][0], train_set[0][0]
    assert all(not torch.equal(a, b) for a, b in zip(first, second))  # weak and strong view alike
    assert all(torch.equal(x[0], train_eval[0][0][v]) for v, x in enumerate(train_eval.features))
    again = data.build_dataset("mfeat", "test", views=("fac", "pix"), weak_signal=0.25, strong_signal=0.35,
                               split_seed=1200)
    other = data.build_dataset("mfeat", "test", views=("fac", "pix"), weak_signal=0.25, strong_signal=0.35,
                               split_seed=1201)
    assert all(torch.equal(a, b) for a, b in zip(again.features, both_weakened_splits()["test"].features))
    assert torch.equal(again.degraded_view, both_weakened_splits()["test"].degraded_view)
    assert not torch.equal(again.rows, other.rows)


def test_strong_signal_refuses_a_share_below_the_weak_one_or_without_a_weak_view():
    for strong_signal in (0.1, 1.5):
        with pytest.raises(ValueError, match="strong_signal in \\[weak_signal, 1\\]"):
            data.MfeatWeakViewDataset("test", views=("fac", "pix"), weak_signal=0.2, strong_signal=strong_signal)
    with pytest.raises(ValueError, match="give weak_signal too"):
        data.build_dataset("mfeat", "test", views=("fac", "pix"), strong_signal=0.5)


def test_test_fraction_moves_samples_from_train_to_test_per_class():
    default = {s: data.MfeatDataset(s, views=("fac",)) for s in ("train", "val", "test")}
    larger = {s: data.MfeatDataset(s, views=("fac",), test_fraction=0.4) for s in ("train", "val", "test")}
    assert [len(larger[s]) for s in ("train", "val", "test")] == [800, 400, 800]
    assert torch.equal(torch.bincount(larger["test"].labels), torch.full((10,), 80))
    assert torch.equal(torch.bincount(larger["train"].labels), torch.full((10,), 80))
    rows = torch.cat([larger[s].rows for s in ("train", "val", "test")])
    assert len(set(rows.tolist())) == 2000  # disjoint, every sample once
    explicit = data.MfeatDataset("test", views=("fac",), test_fraction=data.MFEAT_FRACTIONS[2])
    assert torch.equal(explicit.rows, default["test"].rows)
    assert torch.equal(explicit.features[0], default["test"].features[0])
    with pytest.raises(ValueError, match="test_fraction must be in"):
        data.MfeatDataset("test", views=("fac",), test_fraction=0.8)


def test_split_seed_draws_another_split_and_the_default_is_the_fixed_one():
    labels = data.MfeatDataset("test", views=("fac",)).labels
    default = data.MfeatDataset("test", views=("fac",))
    other = data.MfeatDataset("test", views=("fac",), split_seed=1000)
    with np.load(data.MFEAT_PATH) as archive:
        all_labels = torch.from_numpy(archive["labels"]).long()
    assert torch.equal(default.rows, data.stratified_split(all_labels, data.MFEAT_FRACTIONS, 2024)[2])
    assert not torch.equal(default.rows, other.rows) and len(other.rows) == len(default.rows) == 400
    assert torch.equal(torch.bincount(other.labels), torch.bincount(labels))


def test_weak_view_refuses_one_view_or_degrade_too():
    with pytest.raises(ValueError, match="two or more views"):
        data.MfeatWeakViewDataset("test", views=("fac",))
    with pytest.raises(ValueError, match="give one"):
        data.build_dataset("mfeat", "test", views=("fac", "pix"), weak_signal=0.2, degrade=0.5)


def test_synthetic_shapes_and_reproducibility():
    d = data.build_dataset("synthetic", "train", seed=3, kinds=("spectrogram", "image", "image"),
                           num_modalities=3, size=16, num_classes=5, train_size=50)
    assert len(d) == 50 and d.num_classes == 5 and d.class_names == ["0", "1", "2", "3", "4"]
    assert d.input_specs == [("image", 1), ("image", 3), ("image", 3)]
    assert len(set(d.modalities)) == 3
    inputs, label, index = d[7]
    assert [x.shape for x in inputs] == [torch.Size([1, 16, 16]), torch.Size([3, 16, 16]), torch.Size([3, 16, 16])]
    assert isinstance(label, int) and 0 <= label < 5 and index == 7
    again = data.build_dataset("synthetic", "train", seed=3, kinds=("spectrogram", "image", "image"),
                               num_modalities=3, size=16, num_classes=5, train_size=50)
    assert all(torch.equal(a, b) for a, b in zip(d.inputs, again.inputs))
    assert torch.equal(d.labels, again.labels) and torch.equal(d.carrier, again.carrier)
    other_seed = data.build_dataset("synthetic", "train", seed=4, kinds=("spectrogram", "image", "image"),
                                    num_modalities=3, size=16, num_classes=5, train_size=50)
    assert not torch.equal(d.inputs[0], other_seed.inputs[0])


def test_synthetic_splits_differ_but_share_patterns():
    train = data.build_dataset("synthetic", "train", strength=3.0, sample_discrepancy=0.0, train_size=400)
    test = data.build_dataset("synthetic", "test", strength=3.0, sample_discrepancy=0.0, test_size=400)
    assert not torch.equal(train.inputs[0][:50], test.inputs[0][:50])
    # class means estimated on either split agree: the class patterns are the same
    for m in range(2):
        for c in range(train.num_classes):
            a = train.inputs[m][train.labels == c].mean(0)
            b = test.inputs[m][test.labels == c].mean(0)
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def class_signal(dataset, m, rows):
    """Mean projection of modality m's inputs on the pattern of their own class, per input element
    (about strength_m where the modality carries the class, about 0 where it is noise). The class
    patterns are estimated on another split (same seed, strong signal) so that noise does not project
    on itself."""
    reference = data.build_dataset("synthetic", "val", num_modalities=len(dataset.modalities), size=8,
                                   num_classes=dataset.num_classes, strength=4.0, sample_discrepancy=0.0,
                                   val_size=400)
    x = dataset.inputs[m][rows].flatten(1)
    means = torch.stack([reference.inputs[m][reference.labels == c].mean(0).flatten()
                         for c in range(dataset.num_classes)])
    own = means[dataset.labels[rows]]
    return ((x * own).sum(1) / own.norm(dim=1)).mean() / x.shape[1] ** 0.5


def test_synthetic_strength_sets_dataset_level_imbalance():
    d = data.build_dataset("synthetic", "train", strength=(2.0, 0.5), sample_discrepancy=0.0, size=8)
    rows = torch.arange(len(d))
    assert abs(class_signal(d, 0, rows) - 2.0) < 0.2 and abs(class_signal(d, 1, rows) - 0.5) < 0.2
    noise_only = data.build_dataset("synthetic", "train", strength=(0.0, 1.0), sample_discrepancy=0.0)
    assert noise_only.inputs[0].mean().abs() < 0.05 and abs(noise_only.inputs[0].std() - 1) < 0.05


def test_synthetic_sample_discrepancy_records_carrier():
    d = data.build_dataset("synthetic", "train", strength=2.0, sample_discrepancy=0.6, size=8,
                           carrier_probs=(0.25, 0.75), train_size=1000)
    assert d.carrier.dtype == torch.long and d.carrier.shape == (1000,)
    assert (d.carrier >= 0).sum() == 600
    assert 0.65 < (d.carrier == 1).sum() / 600 < 0.85
    # where modality 1 alone carries the class, modality 0 is pure noise and vice versa
    only_1, only_0, both = d.carrier == 1, d.carrier == 0, d.carrier == -1
    assert abs(class_signal(d, 0, only_1)) < 0.2 and class_signal(d, 0, only_0) > 1.7
    assert abs(class_signal(d, 1, only_0)) < 0.2 and class_signal(d, 1, only_1) > 1.7
    assert class_signal(d, 0, both) > 1.7 and class_signal(d, 1, both) > 1.7
    balanced = data.build_dataset("synthetic", "train", sample_discrepancy=0.0)
    assert (balanced.carrier == -1).all()


def test_synthetic_errors():
    with pytest.raises(ValueError, match="strength"):
        data.build_dataset("synthetic", "train", strength=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="sample_discrepancy"):
        data.build_dataset("synthetic", "train", sample_discrepancy=1.5)
    with pytest.raises(ValueError, match="carrier_probs"):
        data.build_dataset("synthetic", "train", carrier_probs=(1.0,))
    with pytest.raises(ValueError, match="kinds"):
        data.build_dataset("synthetic", "train", kinds=("audio", "image"))
    with pytest.raises(ValueError, match="views"):
        data.build_dataset("synthetic", "train", views=("pix",))


# ----------------------------------------------------------------------------------------------
# ResampledDataset (D^rs)

def test_resampled_dataset_items_and_masks():
    base = data.build_dataset("synthetic", "train", train_size=10, size=8)
    resampled = data.ResampledDataset(base, torch.tensor([3, 3, 7]), torch.tensor([0, 1, 1]))
    assert len(resampled) == 13
    inputs, label, index, mask = resampled[4]
    assert mask.dtype == torch.bool and mask.tolist() == [True, True] and index == 4
    assert all(torch.equal(a, b) for a, b in zip(inputs, base[4][0]))
    for k, (source, kept) in zip((10, 11, 12), ((3, 0), (3, 1), (7, 1))):
        inputs, label, index, mask = resampled[k]
        assert index == source and label == base.labels[source].item()
        assert mask.tolist() == [m == kept for m in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(inputs, base[source][0]))  # inputs untouched
    with pytest.raises(IndexError):
        resampled[13]


def test_resampled_dataset_collates_in_a_dataloader():
    base = data.build_dataset("mfeat", "val")
    resampled = data.ResampledDataset(base, torch.arange(5), torch.zeros(5, dtype=torch.long))
    batches = list(DataLoader(resampled, batch_size=8, shuffle=False))
    inputs, labels, index, mask = batches[-1]
    assert len(batches) == (len(base) + 5 + 7) // 8
    assert inputs[0].shape == (len(resampled) % 8, 240) and mask.shape == (len(resampled) % 8, 2)
    assert mask.dtype == torch.bool and labels.dtype == torch.long
    assert mask[-5:].tolist() == [[True, False]] * 5 and index[-5:].tolist() == list(range(5))
    empty = data.ResampledDataset(base, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert len(empty) == len(base)


def test_resampled_dataset_errors():
    base = data.build_dataset("synthetic", "train", train_size=10, size=8)
    with pytest.raises(ValueError, match="copy_index"):
        data.ResampledDataset(base, torch.tensor([10]), torch.tensor([0]))
    with pytest.raises(ValueError, match="copy_modality"):
        data.ResampledDataset(base, torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="equal length"):
        data.ResampledDataset(base, torch.tensor([1, 2]), torch.tensor([0]))


# ----------------------------------------------------------------------------------------------
# Clips on disk (fixture trees from conftest.py)

def unnormalise(video, mean, std):
    """[C, T, H, W] normalised floats -> pixel values 0..255."""
    mean, std = torch.tensor(mean).view(-1, 1, 1, 1), torch.tensor(std).view(-1, 1, 1, 1)
    return (video * std + mean) * 255


def picked_frames(video):
    """1-based numbers of the uniform frames in an ImageNet-normalised video [3, T, H, W]."""
    pixels = unnormalise(video, data.IMAGENET_MEAN, data.IMAGENET_STD)
    return [round(pixels[:, t].mean().item() / FRAME_STEP) for t in range(video.shape[1])]


def test_ks_item_shapes_labels_and_metadata(ks_root):
    d = data.build_dataset("ks", "train", root=str(ks_root), image_size=32)
    assert len(d) == 3 and d.sample_ids == ["a1", "b1", "a2"] and d.labels.tolist() == [0, 1, 0]
    assert d.modalities == ["audio", "visual"] and d.input_specs == [("image", 1), ("video", 3)]
    assert d.num_classes == 3 and d.class_names == ["0", "1", "2"]  # max label over all lists + 1
    assert d.skipped == []
    (audio, visual), label, index = d[1]
    assert audio.shape == (1, 16, 8) and audio.dtype == torch.float32 and audio.eq(1).all()
    assert visual.shape == (3, 3, 32, 32) and visual.dtype == torch.float32
    assert label == 1 and index == 1
    assert data.build_dataset("ks", "train", root=str(ks_root), num_classes=31).num_classes == 31


def test_ks_authors_spectrogram_shapes(tmp_path):
    make_ks_tree(tmp_path, dict(test=[("x", 0)]), spectrogram_shape=(1024, 128))
    (audio, _), _, _ = data.build_dataset("ks", "test", root=str(tmp_path), image_size=32)[0]
    assert audio.shape == (1, 1024, 128)
    np.save(tmp_path / "ks_audio" / "test" / "x.npy", np.zeros((257, 1004), dtype=np.float32))
    (audio, _), _, _ = data.build_dataset("ks", "test", root=str(tmp_path), image_size=32)[0]
    assert audio.shape == (1, 257, 1004)


def test_frame_positions_eval_middles_and_train_segments():
    assert data.frame_positions(10, augment=False) == [1, 4, 7]
    assert data.frame_positions(9, augment=False) == [1, 4, 7]
    assert data.frame_positions(4, augment=False) == [0, 1, 2]
    assert data.frame_positions(1, augment=False) == [0, 0, 0]
    assert data.frame_positions(2, augment=False) == [0, 0, 1]
    torch.manual_seed(0)
    draws = [data.frame_positions(10, augment=True) for _ in range(200)]
    segments = ({0, 1, 2}, {3, 4, 5}, {6, 7, 8, 9})
    for t, segment in enumerate(segments):
        assert {d[t] for d in draws} == segment  # every frame of the segment, and only those


def test_ks_frames_picked_in_eval_and_train(ks_root):
    evaluation = data.build_dataset("ks", "test", root=str(ks_root), image_size=32)
    (_, visual), _, _ = evaluation[0]
    assert picked_frames(visual) == [2, 5, 8]  # frame_00002, _00005, _00008: segment middles
    train = data.build_dataset("ks", "train", root=str(ks_root), image_size=32, augment=True)
    torch.manual_seed(0)
    picks = [picked_frames(train[0][0][1]) for _ in range(60)]
    assert {p[0] for p in picks} == {1, 2, 3} and {p[1] for p in picks} == {4, 5, 6}
    assert {p[2] for p in picks} == {7, 8, 9, 10}


def test_ks_clip_with_other_frame_counts(tmp_path):
    make_ks_tree(tmp_path, dict(test=[("short", 0), ("long", 1)]), frames=4)
    write_frames(tmp_path / "ks_visual" / "test" / "long", 12)  # frames 1..12
    d = data.build_dataset("ks", "test", root=str(tmp_path), image_size=32)
    assert picked_frames(d[0][0][1]) == [1, 2, 3]
    assert picked_frames(d[1][0][1]) == [2, 6, 10]  # segments [0, 4), [4, 8), [8, 12)


def test_stack_frames_keeps_decoded_frames_channels_last(tmp_path):
    frames = [torch.randint(0, 256, (3, 24, 40), dtype=torch.uint8) for _ in range(3)]
    for k, frame in enumerate(frames):
        write_jpeg(frame, str(tmp_path / f"f{k}.jpg"), quality=95)
    decoded = [data.read_jpeg(str(tmp_path / f"f{k}.jpg"), data.ImageReadMode.RGB) for k in range(3)]
    stacked = data.stack_frames(decoded)  # [T, C, H, W]
    assert torch.equal(stacked, torch.stack(decoded))
    assert stacked.is_contiguous(memory_format=torch.channels_last)  # a plain copy of decode_jpeg's HWC memory
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    video = data.FrameTransform(16, mean, std)(stacked, augment=False)  # [C, T, 16, 16]
    reference = torch.nn.functional.interpolate(torch.stack(decoded).float(), size=(16, 16), mode="bilinear",
                                                antialias=True, align_corners=False).round().clamp(0, 255)
    reference = (reference / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(video, reference.permute(1, 0, 2, 3), atol=0.03)


def test_train_transform_crops_and_flips_the_frames_alike():
    # left half dark, right half bright: a flip swaps them, in every frame of the clip at once
    frames = torch.zeros(3, 3, 40, 32, dtype=torch.uint8)
    frames[..., 16:] = 200
    transform = data.FrameTransform(32, (0, 0, 0), (1, 1, 1))
    torch.manual_seed(0)
    flipped = []
    for _ in range(20):
        video = transform(frames.clone(), augment=True)  # [3, T, 32, 32]
        assert video.shape == (3, 3, 32, 32)
        assert torch.equal(video[:, 0], video[:, 1]) and torch.equal(video[:, 0], video[:, 2])
        flipped.append(video[0, 0, :, 0].mean() > video[0, 0, :, -1].mean())
    assert any(flipped) and not all(flipped)
    evaluation = data.FrameTransform(16, (0, 0, 0), (1, 1, 1))(frames.clone(), augment=False)
    assert evaluation.shape == (3, 3, 16, 16)
    assert evaluation[0, 0, :, 0].max() < 0.01 and evaluation[0, 0, :, -1].min() > 0.77  # no flip, whole frame


def write_ogm_list(path, entries):
    path.write_text("".join(f"{name},10,{label}\n" for name, label in entries))


def test_ks_ogm_lists_with_val_carved_from_train(tmp_path):
    train_entries = [(f"c{k}-{y}", y) for y in range(3) for k in range(10)]
    make_ks_tree(tmp_path / "root", dict(train=train_entries, test=[("t0", 0), ("t1", 2)]), frames=2)
    lists = tmp_path / "ogm"
    lists.mkdir()
    write_ogm_list(lists / "my_train.txt", train_entries)
    write_ogm_list(lists / "my_test.txt", [("t0", 0), ("t1", 2)])
    (tmp_path / "root" / "ks_audio" / "train_1fps_path.txt").unlink()  # only the OGM-GE lists remain
    build = lambda split: data.build_dataset("ks", split, root=str(tmp_path / "root"), list_dir=str(lists),
                                             image_size=32)
    train, val, test = build("train"), build("val"), build("test")
    assert test.sample_ids == ["t0", "t1"] and test.labels.tolist() == [0, 2]
    assert set(train.sample_ids) | set(val.sample_ids) == {n for n, _ in train_entries}
    assert not set(train.sample_ids) & set(val.sample_ids)
    assert torch.bincount(val.labels).tolist() == [1, 1, 1]  # 10 % of each class
    assert build("val").sample_ids == val.sample_ids  # fixed carve-out
    (audio, visual), label, _ = val[0]
    assert audio.eq(label).all() and visual.shape == (3, 3, 32, 32)  # read from ks_audio/train, ks_visual/train
    write_ogm_list(lists / "my_val.txt", [("t1", 2)])  # an explicit val list wins over the carve-out
    make_ks_tree(tmp_path / "root", dict(val=[("t1", 2)]), frames=2)
    assert build("val").sample_ids == ["t1"] and len(build("train")) == 30


def test_ks_errors(ks_root, tmp_path):
    with pytest.raises(data.DataError, match="needs root"):
        data.build_dataset("ks", "train")
    with pytest.raises(data.DataError, match="nowhere"):
        data.build_dataset("ks", "train", root=str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match="train_1fps_path.txt"):
        data.build_dataset("ks", "train", root=str(ks_root / "ks_visual"))
    with pytest.raises(data.DataError, match="label 2, expected 0..1"):
        data.build_dataset("ks", "val", root=str(ks_root), num_classes=2)
    with pytest.raises(data.DataError, match="my_train.txt"):
        data.build_dataset("ks", "train", root=str(ks_root), list_dir=str(ks_root / "ks_audio" / "train"))
    with pytest.raises(data.DataError, match="folder of OGM-GE lists"):
        data.build_dataset("ks", "train", root=str(ks_root), list_dir=str(ks_root / "ks_audio" / "val_1fps_path.txt"))


def test_ks_list_errors(tmp_path):
    make_ks_tree(tmp_path, dict(train=[("a", 0)]))
    listing = tmp_path / "ks_audio" / "train_1fps_path.txt"
    listing.write_text("a 10 zero\n")
    with pytest.raises(data.DataError, match="train_1fps_path.txt:1: expected"):
        data.build_dataset("ks", "train", root=str(tmp_path))
    listing.write_text("a 10 -1\n")
    with pytest.raises(data.DataError, match="label -1"):
        data.build_dataset("ks", "train", root=str(tmp_path), num_classes=31)
    listing.write_text("\n")
    with pytest.raises(data.DataError, match="empty"):
        data.build_dataset("ks", "train", root=str(tmp_path))
    ogm = tmp_path / "ogm"
    ogm.mkdir()
    (ogm / "my_test.txt").write_text("a 10 0\n")
    with pytest.raises(data.DataError, match="my_test.txt:1: expected 'id,10,label'"):
        data.build_dataset("ks", "test", root=str(tmp_path), list_dir=str(ogm))


def test_missing_clip_files_raise_or_are_skipped(ks_root):
    (ks_root / "ks_audio" / "train" / "b1.npy").unlink()
    for folder in (ks_root / "ks_visual" / "train" / "a2").iterdir():
        folder.unlink()  # a2: empty frame folder
    with pytest.raises(data.DataError, match="b1.npy not found"):
        data.build_dataset("ks", "train", root=str(ks_root))
    d = data.build_dataset("ks", "train", root=str(ks_root), skip_missing=True, image_size=32)
    assert d.sample_ids == ["a1"] and len(d) == 1
    assert [s for s, _ in d.skipped] == ["b1", "a2"]
    assert "b1.npy not found" in d.skipped[0][1] and "holds no .jpg frames" in d.skipped[1][1]
    (ks_root / "ks_visual" / "test" / "a3").rename(ks_root / "elsewhere")
    with pytest.raises(data.DataError, match="a3 not found"):
        data.build_dataset("ks", "test", root=str(ks_root))
    np.save(ks_root / "ks_audio" / "train" / "b1.npy", np.zeros((16, 8), dtype=np.float32))
    with pytest.raises(data.DataError, match="a2 holds no .jpg"):
        data.build_dataset("ks", "train", root=str(ks_root))
    (ks_root / "ks_audio" / "val" / "c1.npy").unlink()
    with pytest.raises(data.DataError, match="no readable clips"):
        data.build_dataset("ks", "val", root=str(ks_root), skip_missing=True)


def test_bad_files_raise_at_load_time_with_their_path(ks_root):
    d = data.build_dataset("ks", "train", root=str(ks_root), image_size=32)
    frame = ks_root / "ks_visual" / "train" / "a1" / "frame_00005.jpg"
    frame.write_bytes(frame.read_bytes()[:200])  # truncated
    with pytest.raises(data.DataError, match=r"frame_00005.jpg: cannot read JPEG \(.*truncated"):
        d[0]
    frame.write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match="frame_00005.jpg: cannot read JPEG"):
        d[0]
    spectrogram = ks_root / "ks_audio" / "train" / "b1.npy"
    np.save(spectrogram, np.zeros((2, 16, 8), dtype=np.float32))
    with pytest.raises(data.DataError, match=r"b1.npy: spectrogram must be 2-D .* \(2, 16, 8\)"):
        d[1]
    np.save(spectrogram, np.full((16, 8), np.nan, dtype=np.float32))
    with pytest.raises(data.DataError, match="b1.npy: spectrogram contains NaN"):
        d[1]
    np.save(spectrogram, np.full((16, 8), np.inf, dtype=np.float32))
    with pytest.raises(data.DataError, match="b1.npy: spectrogram contains NaN or infinite"):
        d[1]
    spectrogram.write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="b1.npy: cannot read spectrogram"):
        d[1]
    for f in (ks_root / "ks_visual" / "train" / "a2").iterdir():
        f.unlink()
    with pytest.raises(data.DataError, match="a2: frame folder holds no .jpg"):
        d[2]


def test_clips_collate_in_a_dataloader(ks_root):
    d = data.build_dataset("ks", "train", root=str(ks_root), image_size=32, augment=True)
    (audio, visual), labels, index = next(iter(DataLoader(d, batch_size=3)))
    assert audio.shape == (3, 1, 16, 8) and visual.shape == (3, 3, 3, 32, 32)
    assert labels.tolist() == [0, 1, 0] and index.tolist() == [0, 1, 2]


def test_build_splits_lists_train_once_and_shares_it_with_train_eval(ks_root, monkeypatch):
    checked = []
    monkeypatch.setattr(data, "missing_frames", lambda folder: checked.append(folder))
    splits = data.build_splits("ks", root=str(ks_root), image_size=32)
    assert sorted(splits) == ["test", "train", "train_eval", "val"]
    assert len(checked) == 3 + 1 + 2  # every clip's frame folder looked at once: the train listing is not read twice
    train, train_eval = splits["train"], splits["train_eval"]
    assert train.augment and not train_eval.augment and not splits["val"].augment and not splits["test"].augment
    assert train_eval.sample_ids is train.sample_ids and train_eval.readers is train.readers
    evaluation = data.build_dataset("ks", "train", root=str(ks_root), image_size=32)
    for i in range(len(evaluation)):
        assert all(torch.equal(a, b) for a, b in zip(train_eval[i][0], evaluation[i][0]))


def test_frame_transforms_are_built_once_per_dataset(ks_root, monkeypatch):
    train = data.build_dataset("ks", "train", root=str(ks_root), image_size=32, augment=True)
    evaluation = data.build_dataset("ks", "test", root=str(ks_root), image_size=32)

    def built_per_item(*args, **kwargs):
        raise AssertionError("a transform was built while reading an item")

    monkeypatch.setattr(data.v2, "RandomResizedCrop", built_per_item)
    monkeypatch.setattr(data.v2, "Resize", built_per_item)
    assert train[0][0][1].shape == (3, 3, 32, 32) and evaluation[0][0][1].shape == (3, 3, 32, 32)


def test_spectrograms_of_another_shape_stop_with_both_files_and_shapes(tmp_path):
    make_ks_tree(tmp_path, KS_LISTS, spectrogram_shape=(64, 32))
    odd = tmp_path / "ks_audio" / "train" / "b1.npy"
    np.save(odd, np.zeros((80, 32), dtype=np.float32))
    with pytest.raises(data.DataError, match=r"b1.npy: spectrogram of shape \(80, 32\), but .*a1.npy has \(64, 32\)"):
        data.build_dataset("ks", "train", root=str(tmp_path))
    np.save(odd, np.zeros((2, 64, 32), dtype=np.float32))
    with pytest.raises(data.DataError, match=r"b1.npy: spectrogram must be 2-D .* \(2, 64, 32\)"):
        data.build_dataset("ks", "train", root=str(tmp_path))
    odd.write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="b1.npy: cannot read spectrogram"):
        data.build_dataset("ks", "train", root=str(tmp_path))
    with open(odd, "wb") as f:  # a version 2.0 header, as numpy writes for long headers
        np.lib.format.write_array(f, np.ones((64, 32), dtype=np.float32), version=(2, 0))
    d = data.build_dataset("ks", "train", root=str(tmp_path), image_size=32)
    assert d[1][0][0].eq(1).all()
    np.save(odd, np.zeros((80, 32), dtype=np.float32))  # replaced after the listing: found when read
    with pytest.raises(data.DataError, match=r"b1.npy: spectrogram of shape \(80, 32\), but .*a1.npy has \(64, 32\)"):
        d[1]


def test_frames_of_other_sizes_in_one_clip_are_brought_to_the_first_frames_size(ks_root):
    clip = ks_root / "ks_visual" / "train" / "b1"
    write_jpeg(torch.full((3, 60, 44), 5 * FRAME_STEP, dtype=torch.uint8), str(clip / "frame_00005.jpg"), quality=100)
    write_jpeg(torch.full((3, 20, 24), 8 * FRAME_STEP, dtype=torch.uint8), str(clip / "frame_00008.jpg"), quality=100)
    evaluation = data.build_dataset("ks", "train", root=str(ks_root), image_size=32)
    assert picked_frames(evaluation[1][0][1]) == [2, 5, 8]
    train = data.build_dataset("ks", "train", root=str(ks_root), image_size=32, augment=True)
    torch.manual_seed(0)
    for _ in range(3):
        (audio, visual), labels, _ = next(iter(DataLoader(train, batch_size=3)))
        assert visual.shape == (3, 3, 3, 32, 32) and labels.tolist() == [0, 1, 0]
    frames = [torch.zeros(3, 40, 32, dtype=torch.uint8), torch.full((3, 20, 16), 7, dtype=torch.uint8)]
    resized = data.same_size(frames)
    assert resized[0] is frames[0] and resized[1].shape == (3, 40, 32) and resized[1].eq(7).all()


def test_ks_clip_names_may_hold_spaces(tmp_path):
    make_ks_tree(tmp_path, dict(train=[("my clip", 0), ("b", 1)]))  # '/data/ks/ks_visual/train/my clip 10 0'
    d = data.build_dataset("ks", "train", root=str(tmp_path), image_size=32)
    assert d.sample_ids == ["my clip", "b"] and d.labels.tolist() == [0, 1] and d[0][0][0].eq(0).all()
    listing = tmp_path / "ks_audio" / "train_1fps_path.txt"
    listing.write_text("ks/train/my clip 0\nks/train/b 1\n")  # no frame count
    assert data.build_dataset("ks", "train", root=str(tmp_path)).sample_ids == ["my clip", "b"]
    ogm = tmp_path / "ogm"
    ogm.mkdir()
    write_ogm_list(ogm / "my_train.txt", [("my clip", 0), ("b", 1)])
    write_ogm_list(ogm / "my_val.txt", [("b", 1)])
    assert data.build_dataset("ks", "train", root=str(tmp_path), list_dir=str(ogm)).sample_ids == ["my clip", "b"]


def test_list_files_must_be_utf8_and_may_start_with_a_bom(ks_root):
    listing = ks_root / "ks_audio" / "train_1fps_path.txt"
    listing.write_bytes(b"/data/ks/ks_visual/train/a1 10 0\n/data/ks/ks_visual/train/caf\xe9 10 1\n")
    with pytest.raises(data.DataError, match=r"train_1fps_path.txt:2: not UTF-8 text \(byte 0xe9 at column 29\)"):
        data.build_dataset("ks", "train", root=str(ks_root))
    ogm = ks_root / "ogm"
    ogm.mkdir()
    (ogm / "my_test.txt").write_bytes(b"\xef\xbb\xbfa3,10,0\r\nb3,10,1\r\n")  # as Windows editors save it
    assert data.build_dataset("ks", "test", root=str(ks_root), list_dir=str(ogm)).sample_ids == ["a3", "b3"]


def test_ks_class_names_and_count_from_ks_classes_txt(ks_root):
    (ks_root / "ks_classes.txt").write_text("playing bagpipes\nplaying harp\nsinging\nlawn mowing\n")
    d = data.build_dataset("ks", "train", root=str(ks_root))
    assert d.class_names == ["playing bagpipes", "playing harp", "singing", "lawn mowing"] and d.num_classes == 4
    assert d.classes_inferred_from is None
    listing = ks_root / "ks_audio" / "train_1fps_path.txt"
    listing.write_text("/data/ks/ks_visual/train/a1 10 0\n/data/ks/ks_visual/train/b1 10 99\n")
    with pytest.raises(data.DataError, match=r"train_1fps_path.txt:2: clip b1 has label 99, expected 0..3 "
                                             r"\(the classes of .*ks_classes.txt\)"):
        data.build_dataset("ks", "test", root=str(ks_root))  # every list is checked, whichever split is built
    with pytest.raises(data.DataError, match="ks_classes.txt: names 4 classes, but num_classes=31"):
        data.build_dataset("ks", "train", root=str(ks_root), num_classes=31)
    (ks_root / "ks_classes.txt").write_text("playing bagpipes\n\nsinging\n")
    with pytest.raises(data.DataError, match="ks_classes.txt:2: empty line"):
        data.build_dataset("ks", "train", root=str(ks_root))
    (ks_root / "ks_classes.txt").write_text("singing\nplaying harp\nsinging\n")
    with pytest.raises(data.DataError, match="ks_classes.txt:3: class name 'singing' repeats line 1"):
        data.build_dataset("ks", "train", root=str(ks_root))


def test_ks_inferred_class_count_says_where_it_comes_from(ks_root):
    d = data.build_dataset("ks", "train", root=str(ks_root))
    assert d.num_classes == 3
    assert d.classes_inferred_from == f"the largest label, 2 at {ks_root / 'ks_audio' / 'val_1fps_path.txt'}:1"
    listing = ks_root / "ks_audio" / "train_1fps_path.txt"
    listing.write_text(listing.read_text().replace("b1 10 1", "b1 10 99"))
    d = data.build_dataset("ks", "train", root=str(ks_root))
    assert d.num_classes == 100
    assert d.classes_inferred_from == f"the largest label, 99 at {listing}:2; 96 labels have no clip"  # 0, 1, 2, 99 used
    assert data.build_dataset("ks", "train", root=str(ks_root), num_classes=100).classes_inferred_from is None


def test_clip_listed_twice_stops_with_both_lines(ks_root):
    listing = ks_root / "ks_audio" / "train_1fps_path.txt"
    listing.write_text(listing.read_text() + "/data/ks/ks_visual/train/b1 10 1\n")
    with pytest.raises(data.DataError, match=r"train_1fps_path.txt:4: clip b1 listed twice \(first at .*"
                                             r"train_1fps_path.txt:2\)"):
        data.build_dataset("ks", "train", root=str(ks_root))


def test_train_startup_line_names_an_inferred_class_count(ks_root, capsys):
    train.main(["--dataset", "ks", "--data-root", str(ks_root), "--image-size", "16", "--epochs", "1",
                "--batch-size", "4", "--workers", "0", "--gpu", "-1", "--mode", "baseline",
                "--out", str(ks_root.parent / "run")])
    listing = ks_root / "ks_audio" / "val_1fps_path.txt"
    assert f", 3 classes (inferred from the largest label, 2 at {listing}:1); mode baseline" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# MM-Debiased

def test_mmdebiased_json_and_layout(tmp_path):
    split_file = make_mmdebiased_tree(tmp_path, MMDEBIASED_TABLE)
    d = data.build_dataset("mmdebiased", "train", root=str(tmp_path), split_file=str(split_file), image_size=32)
    assert d.class_names == ["bowling", "singing", "whistling"] and d.num_classes == 3
    assert d.sample_ids == ["vid1", "vid2", "vid5"] and d.labels.tolist() == [1, 0, 2]
    assert d.modalities == ["audio", "visual"] and d.input_specs == [("image", 1), ("video", 3)]
    (audio, visual), label, index = d[2]
    assert audio.shape == (1, 16, 8) and visual.shape == (3, 3, 32, 32) and label == 2 and index == 2
    assert picked_frames(visual) == [2, 5, 8]
    val = data.build_dataset("mmdebiased", "val", root=str(tmp_path), split_file=str(split_file))
    test = data.build_dataset("mmdebiased", "test", root=str(tmp_path), split_file=str(split_file))
    assert val.sample_ids == ["vid3"] and test.sample_ids == ["vid4"] and test.labels.tolist() == [1]
    names = ["bowling", "lawn mowing", "singing", "whistling"]
    explicit = data.build_dataset("mmdebiased", "test", root=str(tmp_path), split_file=str(split_file),
                                  class_names=names)
    assert explicit.num_classes == 4 and explicit.labels.tolist() == [2]


def test_mmdebiased_errors(tmp_path):
    split_file = make_mmdebiased_tree(tmp_path, MMDEBIASED_TABLE)
    build = lambda split="train", **kw: data.build_dataset("mmdebiased", split, root=str(tmp_path), **kw)
    with pytest.raises(data.DataError, match="needs split_file"):
        build()
    with pytest.raises(data.DataError, match="missing.json: MM-Debiased JSON split file not found"):
        build(split_file=str(tmp_path / "missing.json"))
    with pytest.raises(data.DataError, match="unknown class name 'whistling'"):
        build(split_file=str(split_file), class_names=["bowling", "singing"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(data.DataError, match="bad.json: not valid JSON"):
        build(split_file=str(bad))
    bad.write_text(json.dumps({"vid1": {"subset": "train", "label": "singing"}}))
    with pytest.raises(data.DataError, match="clip vid1: expected"):
        build(split_file=str(bad))
    bad.write_text(json.dumps({"vid1": {"subset": "training", "label": "singing"}}))
    with pytest.raises(data.DataError, match="no clips with subset 'testing'"):
        build("test", split_file=str(bad))
    (tmp_path / "audio" / "vid2.npy").unlink()
    with pytest.raises(data.DataError, match="vid2.npy not found"):
        build(split_file=str(split_file))
    assert build(split_file=str(split_file), skip_missing=True).sample_ids == ["vid1", "vid5"]


def test_mmdebiased_class_names_inferred_from_the_json_and_clip_ids_unique(tmp_path):
    split_file = make_mmdebiased_tree(tmp_path, MMDEBIASED_TABLE)
    build = lambda **kw: data.build_dataset("mmdebiased", "train", root=str(tmp_path), **kw)
    assert build(split_file=str(split_file)).classes_inferred_from == f"the class names in {split_file}"
    names = ["bowling", "singing", "whistling"]
    assert build(split_file=str(split_file), class_names=names).classes_inferred_from is None
    twice = tmp_path / "twice.json"
    twice.write_text('{"vid1": {"subset": "training", "label": "singing"}, "vid2": {"subset": "training", '
                     '"label": "bowling"}, "vid1": {"subset": "testing", "label": "singing"}}')
    with pytest.raises(data.DataError, match=r"twice.json: 'vid1' appears twice in one object \(a clip id listed twice\?\)"):
        build(split_file=str(twice))


@pytest.mark.parametrize("clip_id", ["../../outside/evil", "/tmp/evil", "a/b", "..", "."])
def test_mmdebiased_clip_id_that_is_no_file_name_stops_with_the_file_and_line(tmp_path, clip_id):
    root = tmp_path / "root"
    make_mmdebiased_tree(root, MMDEBIASED_TABLE)
    (tmp_path / "outside").mkdir()  # what root/audio/../../outside/evil.npy and root/visual/../../outside/evil reach
    np.save(tmp_path / "outside" / "evil.npy", np.zeros((16, 8), dtype=np.float32))
    write_frames(tmp_path / "outside" / "evil", 10)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(dict(MMDEBIASED_TABLE, **{clip_id: MMDEBIASED_TABLE["vid1"]}), indent=1))
    line = [text.strip() for text in split_file.read_text().splitlines()].index(f"{json.dumps(clip_id)}: {{") + 1
    with pytest.raises(data.DataError) as error:
        data.build_dataset("mmdebiased", "train", root=str(root), split_file=str(split_file))
    assert str(error.value) == (f"{split_file}:{line}: clip id {clip_id!r} is not a file name (expected a name "
                                f"under {root}/audio and {root}/visual, without '/', not '.' or '..')")


# ----------------------------------------------------------------------------------------------
# UCF-101

def test_ucf101_rgb_and_stacked_flow(ucf_root):
    d = data.build_dataset("ucf101", "test", root=str(ucf_root), image_size=32)
    assert d.modalities == ["rgb", "flow"] and d.input_specs == [("video", 3), ("video", 2)]
    assert d.class_names == UCF_CLASSES and d.num_classes == 3
    assert d.sample_ids[:2] == ["v_ApplyEyeMakeup_g01_c01", "v_ApplyEyeMakeup_g02_c01"]
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    (rgb, flow), label, index = d[3]
    assert rgb.shape == (3, 3, 32, 32) and flow.shape == (2, 3, 32, 32) and label == 1 and index == 3
    assert picked_frames(rgb) == [2, 5, 8]
    pixels = unnormalise(flow, data.FLOW_MEAN, data.FLOW_STD)
    u = [round(pixels[0, t].mean().item()) for t in range(3)]
    v = [round(pixels[1, t].mean().item()) for t in range(3)]
    assert u == [20, 50, 80] and v == [180, 150, 120]  # 9 flow frames: positions 1, 4, 7, u in channel 0


def test_ucf101_flip_negates_horizontal_flow(ucf_root):
    d = data.build_dataset("ucf101", "train", root=str(ucf_root), image_size=32, augment=True)
    torch.manual_seed(0)
    u_values, v_values = set(), set()
    for _ in range(30):
        (_, flow), _, _ = d[0]
        pixels = unnormalise(flow, data.FLOW_MEAN, data.FLOW_STD)
        u, v = round(pixels[0, 0].mean().item()), round(pixels[1, 0].mean().item())
        # frame k of 1..3 (first segment of 9 flow frames): u = 10k, or 255 - 10k when mirrored; v = 200 - 10k
        k = (200 - v) // 10
        assert k in (1, 2, 3)
        u_values.add(u == 10 * k if u < 128 else u == 255 - 10 * k)
        v_values.add(u < 128)
    assert u_values == {True} and v_values == {True, False}


def test_ucf101_val_carved_from_train_by_group(ucf_root):
    train = data.build_dataset("ucf101", "train", root=str(ucf_root))
    val = data.build_dataset("ucf101", "val", root=str(ucf_root))
    assert len(train) + len(val) == 3 * 10 * 2
    assert torch.bincount(val.labels).tolist() == [2, 2, 2]  # 10 % of 10 groups = 1 group of 2 clips per class
    group = lambda video: video.rsplit("_c", 1)[0]
    assert not {group(v) for v in train.sample_ids} & {group(v) for v in val.sample_ids}
    assert data.build_dataset("ucf101", "val", root=str(ucf_root)).sample_ids == val.sample_ids


def test_ucf101_errors(tmp_path):
    make_ucf_tree(tmp_path, groups=range(8, 10), test_groups=range(1, 2))
    build = lambda split="train", **kw: data.build_dataset("ucf101", split, root=str(tmp_path), **kw)
    with pytest.raises(data.DataError, match="trainlist02.txt: UCF-101 split file not found"):
        build(split_id=2)
    with pytest.raises(ValueError, match="split_file"):
        build(split_file="x.json")
    test_list = tmp_path / "splits" / "testlist01.txt"
    test_list.write_text("Bowling/v_Bowling_g01_c01.avi\n")
    with pytest.raises(data.DataError, match="testlist01.txt:1: unknown class name 'Bowling'"):
        build("test")
    test_list.write_text("")
    with pytest.raises(data.DataError, match="testlist01.txt: UCF-101 split file is empty"):
        build("test")
    test_list.write_text("Archery/v_Archery_g01_c01.avi 7\n")
    with pytest.raises(data.DataError, match="label 7 out of range, expected 1..3"):
        build("test")
    test_list.write_text("Archery/v_Archery_g01_c01.avi 1\n")
    with pytest.raises(data.DataError, match="disagrees with class Archery"):
        build("test")
    for f in (tmp_path / "flow" / "v" / "v_Archery_g09_c02").iterdir():
        f.unlink()
    with pytest.raises(data.DataError, match="v_Archery_g09_c02 holds no .jpg"):
        build()
    d = build(skip_missing=True)
    assert [s for s, _ in d.skipped + data.build_dataset("ucf101", "val", root=str(tmp_path),
                                                         skip_missing=True).skipped] == ["v_Archery_g09_c02"]
    (tmp_path / "splits" / "classInd.txt").unlink()
    with pytest.raises(data.DataError, match="classInd.txt: UCF-101 class index not found"):
        build()


def test_ucf101_video_listed_twice_and_flow_planes_of_other_sizes(tmp_path):
    make_ucf_tree(tmp_path, groups=range(8, 10), clips_per_group=1, test_groups=range(1, 2))
    test_list = tmp_path / "splits" / "testlist01.txt"
    lines = test_list.read_text()
    test_list.write_text(lines + lines.splitlines()[1] + "\n")
    with pytest.raises(data.DataError, match=r"testlist01.txt:4: clip v_Archery_g01_c01 listed twice "
                                             r"\(first at .*testlist01.txt:2\)"):
        data.build_dataset("ucf101", "test", root=str(tmp_path))
    test_list.write_text(lines)
    v_frame = tmp_path / "flow" / "v" / "v_Archery_g01_c01" / "frame000005.jpg"  # the middle frame, v = 150
    write_jpeg(torch.full((1, 50, 60), 160, dtype=torch.uint8), str(v_frame), quality=100)  # u frames are 32 x 40
    (_, flow), _, _ = data.build_dataset("ucf101", "test", root=str(tmp_path), image_size=32)[1]
    pixels = unnormalise(flow, data.FLOW_MEAN, data.FLOW_STD)
    assert flow.shape == (2, 3, 32, 32)
    assert [round(pixels[c, t].mean().item()) for c in range(2) for t in range(3)] == [20, 50, 80, 180, 160, 120]


# ----------------------------------------------------------------------------------------------
# CREMA-D

def test_cremad_layout_labels_and_items(tmp_path):
    frames = {"1001_DFA_ANG_XX": 2, "1001_IEO_NEU_XX": 3, "1002_TIE_SAD_LO": 4, "1003_MTI_HAP_HI": 5}
    make_cremad_tree(tmp_path, CREMAD_LISTS, frames=dict(frames, **{"1004_WSI_FEA_MD": 1}),
                     spectrogram_shape=(40, 12))
    splits = data.build_splits("cremad", root=str(tmp_path), image_size=32)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train.sample_ids == list(frames) and train.labels.tolist() == [5, 0, 2, 1]  # ANG, NEU, SAD, HAP
    assert val.labels.tolist() == [3] and test.labels.tolist() == [4, 5]  # FEA; DIS, ANG
    assert train.class_names == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"] and train.num_classes == 6
    assert train.classes_inferred_from is None
    assert train.modalities == ["audio", "visual"] and train.input_specs == [("image", 1), ("video", 3)]
    (audio, visual), label, index = splits["train_eval"][2]
    assert audio.shape == (1, 40, 12) and audio.eq(2).all() and visual.shape == (3, 3, 32, 32)
    assert (label, index) == (2, 2)
    # fewer frames than the 3 segments: frames repeat; evaluation takes each segment's middle
    assert [picked_frames(splits["train_eval"][i][0][1]) for i in range(4)] == [[1, 1, 2], [1, 2, 3], [1, 2, 3],
                                                                                 [1, 2, 4]]
    assert picked_frames(val[0][0][1]) == [1, 1, 1]
    torch.manual_seed(0)
    assert {tuple(picked_frames(train[0][0][1])) for _ in range(10)} == {(1, 1, 2)}
    (audio, visual), labels, _ = next(iter(DataLoader(train, batch_size=4)))
    assert audio.shape == (4, 1, 40, 12) and visual.shape == (4, 3, 3, 32, 32) and labels.tolist() == [5, 0, 2, 1]


def test_cremad_errors(tmp_path):
    make_cremad_tree(tmp_path, CREMAD_LISTS)
    build = lambda split="train", **kw: data.build_dataset("cremad", split, root=str(tmp_path), **kw)
    with pytest.raises(data.DataError, match="cremad needs root"):
        data.build_dataset("cremad", "train")
    with pytest.raises(ValueError, match="split_file applies to mmdebiased only, not to cremad"):
        build(split_file="lists")
    train_csv = tmp_path / "train.csv"
    lines = train_csv.read_text()
    train_csv.write_text(lines + "1007_IEO_XYZ_XX,XYZ\n")
    with pytest.raises(data.DataError, match=r"train.csv:5: expected '<clip>,<EMO>' with EMO one of NEU, HAP, SAD, "
                                             r"FEA, DIS, ANG, got '1007_IEO_XYZ_XX,XYZ'"):
        build()
    train_csv.write_text(lines + "1001_DFA_ANG_XX,ANG\n")
    with pytest.raises(data.DataError, match=r"train.csv:5: clip 1001_DFA_ANG_XX listed twice \(first at .*:1\)"):
        build()
    train_csv.write_text(lines)
    np.save(tmp_path / "audio" / "1002_TIE_SAD_LO.npy", np.zeros((16, 9), dtype=np.float32))
    with pytest.raises(data.DataError, match=r"1002_TIE_SAD_LO.npy: spectrogram of shape \(16, 9\), but "
                                             r".*1001_DFA_ANG_XX.npy has \(16, 8\)"):
        build()
    (tmp_path / "audio" / "1002_TIE_SAD_LO.npy").unlink()
    with pytest.raises(data.DataError, match="1002_TIE_SAD_LO.npy not found"):
        build()
    assert build(skip_missing=True).sample_ids == ["1001_DFA_ANG_XX", "1001_IEO_NEU_XX", "1003_MTI_HAP_HI"]
    (tmp_path / "val.csv").unlink()
    with pytest.raises(data.DataError, match="val.csv: CREMA-D list not found"):
        build("val")


# ----------------------------------------------------------------------------------------------
# the batches of a re-sampled epoch


def batches_of(dataset, batch_size, seed):
    sampler = data.TrainingBatches(dataset, batch_size, torch.Generator().manual_seed(seed))
    return sampler, list(sampler)


def test_training_batches_are_torchs_shuffle_when_no_batch_leaves_a_modality_to_one_sample():
    base = data.SyntheticDataset("train", train_size=40, size=8)
    epoch = data.ResampledDataset(base, torch.arange(10), torch.arange(10) % 2)  # 50 items
    sampler, batches = batches_of(epoch, 16, seed=0)
    reference = list(BatchSampler(RandomSampler(epoch, generator=torch.Generator().manual_seed(0)), 16, False))
    assert batches == reference and len(sampler) == 4


@pytest.mark.parametrize("seed", range(6))
def test_training_batches_never_leave_a_modality_to_one_sample(seed):
    base = data.SyntheticDataset("train", num_modalities=3, train_size=6, size=8)
    copy_index = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5])
    epoch = data.ResampledDataset(base, copy_index, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2]))  # 15 items
    sampler, batches = batches_of(epoch, 2, seed)
    assert sorted(k for batch in batches for k in batch) == list(range(15))  # every item once
    assert len(sampler) == len(batches)
    samples = torch.cat([torch.arange(6), copy_index])
    for batch in batches:
        masks = torch.stack([epoch[k][3] for k in batch])  # [b, 3]
        for i in range(3):
            kept_by = set(samples[torch.tensor(batch)][masks[:, i]].tolist())
            assert len(kept_by) != 1, (batch, i)
