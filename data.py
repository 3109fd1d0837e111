"""
Datasets for multimodal training with sample-level modality valuation (Wei et al., CVPR 2024).

Every dataset returns `(inputs, label, index)` per item, `inputs` being a tuple with one tensor per
modality, and describes itself with `modalities`, `input_specs` (kind, channels) per modality,
`num_classes`, `class_names`, `sample_ids`, `labels` and `skipped`. `build_dataset` is the entry point.

- mfeat: UCI Multiple Features, six views of 2,000 handwritten digits, bundled as data/mfeat.npz
  (build it with `python data.py --build-mfeat CSV_DIR`). No download, runs on a CPU.
- synthetic: image-like modalities generated in memory, with knobs for dataset-level imbalance
  (`strength`) and sample-level imbalance (`sample_discrepancy`).
- ks, mmdebiased, ucf101: clips on disk in the layouts described in each reader's docstring.

`ResampledDataset` is the re-sampled training epoch D^rs of Algorithms 1 and 2: the original
samples plus uni-modal copies, each item carrying a mask of the modalities it keeps.
"""

import argparse
import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DATASETS = ("mfeat", "ks", "mmdebiased", "ucf101", "synthetic")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Missing, malformed or inconsistent data; the message names the file or argument at fault."""


def check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def stratified_split(labels, fractions, seed):
    """Split sample indices class by class into len(fractions) parts of the given fractions.
    labels: LongTensor[N]. Returns one sorted LongTensor of indices per part; the last part takes
    what rounding leaves over. Fixed by `seed` alone (a torch.Generator, stable across runs)."""
    generator = torch.Generator().manual_seed(seed)
    parts = [[] for _ in fractions]
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for p, fraction in enumerate(fractions):
            stop = len(members) if p == len(fractions) - 1 else start + round(fraction * len(members))
            parts[p].append(members[start:stop])
            start = stop
    return [torch.sort(torch.cat(part)).values for part in parts]


# ----------------------------------------------------------------------------------------------
# UCI Multiple Features (mfeat): six views of the same 2,000 digits, 200 per class

MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
MFEAT_DEFAULT_VIEWS = ("pix", "mor")  # a strong view (pixels) with a weak one (6 morphological features)
MFEAT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mfeat.npz")
MFEAT_SPLIT_SEED = 2024  # the train / val / test split is fixed, whatever the run's --seed
MFEAT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, per class


def build_mfeat_npz(csv_dir, out_path):
    """Convert the six UCI mfeat CSVs (`csv_dir/mfeat-<view>.csv`: a header row, then one row per digit,
    the last column the label) into one compressed float32 .npz with one array per view and `labels`."""
    arrays, labels = {}, None
    for view in MFEAT_VIEWS:
        path = os.path.join(csv_dir, f"mfeat-{view}.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: mfeat CSV not found (expected mfeat-<view>.csv for views "
                                    f"{', '.join(MFEAT_VIEWS)})")
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
        view_labels = table[:, -1].astype(np.int64)
        if labels is None:
            labels = view_labels
        elif not np.array_equal(labels, view_labels):
            raise DataError(f"{path}: labels differ from those of mfeat-{MFEAT_VIEWS[0]}.csv (rows out of order?)")
        arrays[view] = table[:, :-1].astype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(out_path, labels=labels, **arrays)


class MfeatDataset(Dataset):
    """UCI Multiple Features: one "vector" modality per chosen view, in the order given.
    The split is stratified 60/20/20 per class from a fixed seed; each view is standardised with the
    train split's mean and std (features with zero std are only centred)."""

    def __init__(self, split, views=MFEAT_DEFAULT_VIEWS, path=MFEAT_PATH):
        check_split(split)
        if isinstance(views, str):
            views = tuple(v for v in views.split(",") if v)
        views = tuple(views)
        unknown = [v for v in views if v not in MFEAT_VIEWS]
        if not views or unknown or len(set(views)) != len(views):
            raise ValueError(f"views must be distinct names from {', '.join(MFEAT_VIEWS)}, got {views!r}")
        if not os.path.isfile(path):
            raise DataError(f"{path}: mfeat data not found (build it with `python data.py --build-mfeat CSV_DIR`)")
        with np.load(path) as archive:
            missing = [key for key in ("labels",) + views if key not in archive.files]
            if missing:
                raise DataError(f"{path}: arrays {missing} missing (expected labels and the views {MFEAT_VIEWS})")
            all_labels = torch.from_numpy(archive["labels"]).long()
            all_features = [torch.from_numpy(archive[v]).float() for v in views]
        parts = stratified_split(all_labels, MFEAT_FRACTIONS, MFEAT_SPLIT_SEED)
        train_rows, rows = parts[0], parts[SPLITS.index(split)]
        self.features = []  # one [N, D_view] tensor per view
        for x in all_features:
            mean, std = x[train_rows].mean(0), x[train_rows].std(0)
            std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant feature: centre only
            self.features.append((x[rows] - mean) / std)
        self.modalities = list(views)
        self.input_specs = [("vector", x.shape[1]) for x in self.features]
        self.labels = all_labels[rows]
        self.num_classes = 10
        self.class_names = [str(c) for c in range(10)]
        self.sample_ids = [f"mfeat-{row + 1:04d}" for row in rows.tolist()]
        self.rows = rows  # row of each sample in the CSV files (0-based, header excluded)
        self.skipped = []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return tuple(x[i] for x in self.features), self.labels[i].item(), i


# ----------------------------------------------------------------------------------------------
# Synthetic: image-like modalities with controllable dataset- and sample-level imbalance

SYNTHETIC_SIZES = dict(train=600, val=200, test=200)
SYNTHETIC_KINDS = {"spectrogram": 1, "image": 3}  # kind -> channels


def split_seed(seed, split):
    """A seed for one split derived from the run seed and the split name (stable across Python runs)."""
    return zlib.crc32(f"{seed}/{split}".encode())


def synthetic_patterns(kind, num_classes, size, generator):
    """One fixed, smooth pattern per class, scaled to unit RMS: [K, C, size, size].
    spectrogram: a class-specific frequency profile held over time (horizontal bands);
    image: a class-specific low-resolution colour layout, upsampled."""
    channels = SYNTHETIC_KINDS[kind]
    if kind == "spectrogram":
        profile = torch.randn(num_classes, 1, 8, 1, generator=generator)
        patterns = F.interpolate(profile, size=(size, 1), mode="bilinear", align_corners=False).expand(-1, -1, -1, size)
    else:
        layout = torch.randn(num_classes, channels, 4, 4, generator=generator)
        patterns = F.interpolate(layout, size=(size, size), mode="bilinear", align_corners=False)
    return patterns / patterns.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()


class SyntheticDataset(Dataset):
    """Noise plus a class pattern per modality: x_m = strength_m * pattern_m[y] + N(0, 1).

    `strength` (one scale per modality) sets the dataset-level imbalance, as in KS where audio
    dominates. `sample_discrepancy` sets the sample-level imbalance: in that fraction of samples only one
    modality, drawn per sample from `carrier_probs`, carries the class and the others are pure noise,
    as in MM-Debiased. `carrier[i]` records that modality (-1: every modality carries the class).
    Patterns depend on `seed` only; samples on `seed` and the split name."""

    def __init__(self, split, seed=0, num_modalities=2, kinds=None, size=32, num_classes=4, strength=1.0,
                 sample_discrepancy=0.5, carrier_probs=None, train_size=SYNTHETIC_SIZES["train"],
                 val_size=SYNTHETIC_SIZES["val"], test_size=SYNTHETIC_SIZES["test"]):
        check_split(split)
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be at least 1, got {num_modalities}")
        if kinds is None:
            kinds = tuple(("spectrogram", "image")[m % 2] for m in range(num_modalities))
        kinds = tuple(kinds)
        if len(kinds) != num_modalities or any(k not in SYNTHETIC_KINDS for k in kinds):
            raise ValueError(f"kinds must be {num_modalities} names from {', '.join(SYNTHETIC_KINDS)}, got {kinds!r}")
        strength = torch.tensor([float(strength)] * num_modalities if np.isscalar(strength) else strength,
                                dtype=torch.float32)
        if strength.shape != (num_modalities,):
            raise ValueError(f"strength must be a number or {num_modalities} numbers, got {strength.tolist()}")
        if not 0.0 <= sample_discrepancy <= 1.0:
            raise ValueError(f"sample_discrepancy must be in [0, 1], got {sample_discrepancy}")
        carrier_probs = torch.full((num_modalities,), 1.0 / num_modalities) if carrier_probs is None \
            else torch.tensor(carrier_probs, dtype=torch.float64)
        if carrier_probs.shape != (num_modalities,) or (carrier_probs < 0).any() or carrier_probs.sum() <= 0:
            raise ValueError(f"carrier_probs must be {num_modalities} non-negative numbers with a positive sum, "
                             f"got {carrier_probs.tolist()}")
        if size < 1 or num_classes < 2:
            raise ValueError(f"size must be >= 1 and num_classes >= 2, got size={size}, num_classes={num_classes}")
        num_samples = dict(train=train_size, val=val_size, test=test_size)[split]
        if num_samples < 1:
            raise ValueError(f"{split}_size must be at least 1, got {num_samples}")

        pattern_generator = torch.Generator().manual_seed(split_seed(seed, "patterns"))
        patterns = [synthetic_patterns(kind, num_classes, size, pattern_generator) for kind in kinds]
        generator = torch.Generator().manual_seed(split_seed(seed, split))
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator)
        # the round(sample_discrepancy * N) samples whose class lives in one modality only
        self.carrier = torch.full((num_samples,), -1, dtype=torch.long)
        uni = torch.randperm(num_samples, generator=generator)[:round(sample_discrepancy * num_samples)]
        if len(uni) > 0:
            self.carrier[uni] = torch.multinomial(carrier_probs, len(uni), replacement=True, generator=generator)
        self.inputs = []  # one [N, C, size, size] tensor per modality
        for m, pattern in enumerate(patterns):
            carries = ((self.carrier == -1) | (self.carrier == m)).float().view(-1, 1, 1, 1)
            noise = torch.randn((num_samples,) + pattern.shape[1:], generator=generator)
            self.inputs.append(strength[m] * carries * pattern[self.labels] + noise)
        self.modalities = [f"{kind}{m}" for m, kind in enumerate(kinds)]
        self.input_specs = [("image", SYNTHETIC_KINDS[kind]) for kind in kinds]
        self.num_classes = num_classes
        self.class_names = [str(c) for c in range(num_classes)]
        self.sample_ids = [f"synthetic-{split}-{i:05d}" for i in range(num_samples)]
        self.skipped = []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return tuple(x[i] for x in self.inputs), self.labels[i].item(), i


# ----------------------------------------------------------------------------------------------
# The re-sampled epoch D^rs (Algorithm 1 line 9, Algorithm 2 line 10)

class ResampledDataset(Dataset):
    """The original samples, then one uni-modal copy per (copy_index[j], copy_modality[j]).

    Items are (inputs, label, index, mask), mask a BoolTensor[n] of the modalities kept: all True for
    the originals, one-hot at copy_modality[j] for copy j. The inputs are the base sample's, untouched:
    the model applies the mask. `index` is the base sample's index, for originals and copies alike."""

    def __init__(self, base, copy_index, copy_modality):
        copy_index, copy_modality = torch.as_tensor(copy_index).long(), torch.as_tensor(copy_modality).long()
        n = len(base.modalities)
        if copy_index.dim() != 1 or copy_index.shape != copy_modality.shape:
            raise ValueError(f"copy_index and copy_modality must be 1-D and of equal length, got shapes "
                             f"{tuple(copy_index.shape)} and {tuple(copy_modality.shape)}")
        if len(copy_index) and (copy_index.min() < 0 or copy_index.max() >= len(base)):
            raise ValueError(f"copy_index must lie in [0, {len(base)}), got values from "
                             f"{copy_index.min().item()} to {copy_index.max().item()}")
        if len(copy_modality) and (copy_modality.min() < 0 or copy_modality.max() >= n):
            raise ValueError(f"copy_modality must lie in [0, {n}), got values from "
                             f"{copy_modality.min().item()} to {copy_modality.max().item()}")
        self.base, self.copy_index, self.copy_modality = base, copy_index, copy_modality
        self.modalities = base.modalities

    def __len__(self):
        return len(self.base) + len(self.copy_index)

    def __getitem__(self, k):
        if k < 0 or k >= len(self):
            raise IndexError(f"index {k} out of range for a re-sampled set of {len(self)} items")
        n = len(self.modalities)
        if k < len(self.base):
            inputs, label, index = self.base[k]
            return inputs, label, index, torch.ones(n, dtype=torch.bool)
        j = k - len(self.base)
        inputs, label, index = self.base[self.copy_index[j].item()]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[self.copy_modality[j]] = True
        return inputs, label, index, mask


# ----------------------------------------------------------------------------------------------
# Entry point

def build_dataset(name, split, *, root=None, split_file=None, views=None, augment=False, skip_missing=False,
                  seed=0, **options):
    """The `split` ("train", "val" or "test") of data set `name` (one of DATASETS).
    augment=True selects training transforms and random frame choice; False, evaluation transforms.
    `views` (mfeat only) picks and orders the views; further `options` go to the data set's class."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    check_split(split)
    if views is not None and name != "mfeat":
        raise ValueError(f"views applies to mfeat only, not to {name}")
    if name == "mfeat":
        path = MFEAT_PATH if root is None else os.path.join(root, "mfeat.npz")
        return MfeatDataset(split, views=MFEAT_DEFAULT_VIEWS if views is None else views, path=path, **options)
    if name == "synthetic":
        return SyntheticDataset(split, seed=seed, **options)
    raise NotImplementedError(name)


def main():
    parser = argparse.ArgumentParser(description="Data utilities.")
    parser.add_argument("--build-mfeat", metavar="CSV_DIR", required=True,
                        help="folder holding the UCI mfeat CSVs (mfeat-fou.csv ...); writes data/mfeat.npz")
    parser.add_argument("--out", default=MFEAT_PATH, help="where to write the .npz")
    args = parser.parse_args()
    build_mfeat_npz(args.build_mfeat, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
