"""Tests for data.py: the bundled mfeat set, the synthetic generator, the re-sampled epoch D^rs, and the
KS / MM-Debiased / UCF-101 readers on tiny fixture trees written to tmp_path."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import data


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


# ----------------------------------------------------------------------------------------------
# synthetic

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
