"""Reproduce the paper's effects (Tables 1-4; Figures 3-6) on the bundled UCI Multiple Features data, on a CPU.

The paper's numbers need GPUs and Kinetics-scale data; this script shows the same *effects* on real data in minutes:

    python reproduce.py                                            # the grid below; writes results/
    python reproduce.py --settings sample-level --modes naive --seeds 3   # re-run one cell, merged into results/
    python reproduce.py --table2 --jobs 2                          # Table 2 and Figure 1 with power (see table2)
    python reproduce.py --table2-second --jobs 2                   # its second edition and the regime map

Two settings, built deterministically from the real mfeat views (data.MfeatDataset; the split is fixed):
  dataset-level  views fac (216 profile correlations, 97.8 % val accuracy alone) + fou (76 Fourier coefficients,
                 85.0 % alone): one clearly stronger view, so joint training leans on it (like Kinetics-Sounds and
                 UCF-101, Tables 1, 2, 4, Figures 3 and 6).
  sample-level   views fou + zer (47 Zernike moments, 83.8 % alone) with --mfeat-degrade 0.6: two views of similar
                 strength, and in every sample one of them, drawn uniformly, blended with noise at strength
                 U(0, 0.6); the mean contributions stay balanced while per-sample contributions differ (like
                 MM-Debiased, Table 2 and Figure 4).

The grid, for each setting and each seed (SEEDS): concat fusion with every mode of train.py (baseline, sample,
modality, naive, reversed: Tables 1, 2, 4; the compared methods ogm-ge, pmr, agm, gblending: Table 2), greedy on
the fusion it needs (mmtm), every other fusion in models.FUSIONS, read at run time, with baseline and sample
(Table 3, MBT included), and MMTM with modality at dataset level (Figure 5); then concat with sample and modality
under online valuation (train.py --valuation online: each epoch planned from the values its previous epoch's
training steps took), next to the same modes valued offline as the paper does (--valuations offline leaves them
out). Every run has the same budget (TRAINING). Each run calls train.train in-process on the CPU (one torch thread,
so that the same seeds on the same machine give the same numbers), with --track-phi so that the contributions of
baseline and of warm-up epochs are logged too, then train.evaluate_checkpoint on its validation-chosen checkpoint
for the per-sample valuation of the test split. Runs go to --runs-dir (scratch, default runs/reproduce); results go
to --out (default results/):
  results.json  one record per run (setting, mode, fusion, valuation, seed, test_acc, test_map, per-modality
                accuracy, test contributions and their spread, per-epoch training-set contributions, trained
                samples, wall time), plus the Figure 4 examples and the Figure 5 numbers; saved after each run
                (atomically); a re-run cell replaces its records, the others are kept; a results.json of other
                training settings is refused unless --overwrite (which starts it afresh)
  results.md    the tables: accuracy / mAP / accuracy of each modality alone / contributions, contributions per
                epoch (Figures 3, 6), the Figure 4 examples, Figure 5's separability of the low-contributing
                modality's features (nearest-centroid accuracy on test), the paper's claims checked on these runs,
                online against offline valuation, the cost
  *.png         the figures, when matplotlib is installed (it is optional); features_dataset-level.png (Figure 5)
                is a t-SNE when scikit-learn is installed (optional too), else the first two principal components
Every number comes from these runs; settings were chosen on the validation split, the test split is only reported.
Everything but the wall-time columns is reproduced exactly by a second run with the same seeds.

The views, the degradation and the training settings were chosen on the validation split by sweep.py (its
tables: results/sweep.md).

--table2 tests the paper's central claim (Sec. 4.3, Table 2, Figure 1) on dataset-level and on
sample-level-weak-view (views fac + pix, in every sample one of them, known and balanced per class, weakened to a
fifth of its signal: data.MfeatWeakViewDataset): every method's main knob tuned on validation alike (KNOBS), then
20 (seed, split seed) pairs per cell, paired differences with 95 % CIs, exact sign-flip tests with Holm's
correction per table, and the decision rule of README applied (decide, claim_verdict); tuning.json holds the tuning.
Its second edition, --table2-second (table2_second, TABLE2_SECOND_*), writes into <--out>/table2-second and leaves
the first edition's files as they are: the tuning on 4 pairs with ties going to each method's default, each choice's
margin in validation samples and the candidates under which a method never acts; one Holm family without duplicate
comparisons; and the regime map (regime_map): the sample-level family's gain against the strength of the per-sample
imbalance, with the mechanism measured at each strength. Both editions resume: every finished run leaves its record
in its run directory (record.json), keyed by its settings and the fingerprint of the code it ran (code_fingerprint),
and a rerun of the same command reuses exactly those.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np
import torch

import comparators
import data
import engine
import models
import shapley_mm
import train

SETTINGS = {
    "dataset-level": dict(views="fac,fou", degrade=0.0,
                          about="dataset-level imbalance: a strong and a weak view (like Kinetics-Sounds, UCF-101)"),
    "sample-level": dict(views="fou,zer", degrade=0.6,
                         about="sample-level imbalance at dataset-level balance: two similar views, one of them "
                               "degraded per sample (like MM-Debiased)"),
    # the sample-level benchmark of Table 2 (data.MfeatWeakViewDataset): two views that each tell all ten digits,
    # one of them per sample (half the samples of each class each) keeping a fifth of its signal
    "sample-level-weak-view": dict(views="fac,pix", degrade=0.0, weak_signal=0.2,
                                   about="sample-level imbalance at dataset-level balance: two strong views, and in "
                                         "every sample one of them, known, weakened to a fifth of its signal (like "
                                         "MM-Debiased)"),
    # Table 2, second edition: benchmarks with room, fixed from baseline-only pilots (pilot, README). Train 40 % /
    # validation 20 % / test 40 % per class: 800 test samples, and fewer training samples to learn from
    "sample-level-2": dict(views="fac,pix", degrade=0.0, weak_signal=0.25, strong_signal=0.4, test_fraction=0.4,
                           about="sample-level imbalance at dataset-level balance with room: two strong views, both "
                                 "weakened in every sample, one of them, known, to a quarter of its signal and the "
                                 "other to 40 %, so that neither alone decides (like MM-Debiased)"),
    "dataset-level-2": dict(views="fac,fou", degrade=0.0, weak_signal=0.35, strong_signal=0.35, test_fraction=0.4,
                            about="dataset-level imbalance with room: a strong and a weak view, every view of every "
                                  "sample weakened alike to 35 % of its signal (like Kinetics-Sounds, UCF-101)"),
}
FIRST_EDITION_SETTINGS = ("dataset-level", "sample-level", "sample-level-weak-view")  # the grid's (--settings)
# the regime map's strengths of the sample-level family: the weak view's signal share at sample-level-2's strong
# share 0.4, from "the weak view is nearly noise" to "the views are nearly equal" (0.25: the benchmark itself), and
# a setting for each of the others
REGIME_WEAK_SIGNALS = (0.05, 0.15, 0.25, 0.37)
REGIME_SETTINGS = {f"sample-level-2-weak-{w}": dict(SETTINGS["sample-level-2"], weak_signal=w,
                                                    about=f"sample-level-2 with the weak view keeping {w:.0%}")
                   for w in REGIME_WEAK_SIGNALS if w != SETTINGS["sample-level-2"]["weak_signal"]}
SETTINGS.update(REGIME_SETTINGS)
TRAINING = dict(epochs=30, warmup=2, lr=0.03, batch_size=128)  # chosen by sweep.py on validation
SEEDS = (0, 1, 2, 3, 4)
FUSION_MODES = ("baseline", "sample")  # what every fusion other than concat runs (Table 3)
# Figure 5: the models whose low-contributing modality's features are drawn, on the setting with one clearly
# weaker modality (as the visual modality of Kinetics-Sounds): Concatenation, MMTM, MMTM-Sample, MMTM-Modality
FEATURE_SETTING = "dataset-level"
FEATURE_MODELS = (("concat", "baseline"), ("mmtm", "baseline"), ("mmtm", "sample"), ("mmtm", "modality"))
TIME_FIELDS = ("wall_seconds", "method_seconds", "valuation_seconds")  # vary with the machine's load
VALUATIONS = ("offline", "online")  # train.py --valuation; offline, the paper's procedure, is every cell's
ONLINE_MODES = ("sample", "modality")  # the modes also run with online valuation (concat)


# ----------------------------------------------------------------------------------------------
# one run


def grid(settings, modes, fusions):
    """The (setting, fusion, mode) cells: concat with every mode (a method that needs another fusion,
    its Method.fusion, with that one), the other fusions with FUSION_MODES, and the models of Figure 5
    (FEATURE_MODELS on FEATURE_SETTING)."""
    return [(setting, fusion, mode) for setting in settings for fusion in fusions for mode in modes
            if fusion == (train.METHODS[mode].fusion or "concat") or mode in FUSION_MODES
            or (setting == FEATURE_SETTING and (fusion, mode) in FEATURE_MODELS)]


def online_grid(settings, modes):
    """The (setting, fusion, mode) cells also run with online valuation: concat with ONLINE_MODES."""
    return [(setting, "concat", mode) for setting in settings for mode in ONLINE_MODES if mode in modes]


def training_args(**settings):
    """train.py's arguments of a run with `settings` (its flags, underscored), checked as train.py checks them."""
    return train.make_args(dataset="mfeat", gpu=-1, overwrite=True, **settings)


def train_quietly(stdout_path, **settings):
    """train.train with `settings` (train.py's flags, underscored), its per-epoch lines sent to a file (warnings
    still reach stderr); returns its results."""
    args = training_args(**settings)
    with open(stdout_path, "w") as f, contextlib.redirect_stdout(f):
        return train.train(args)


def cell_settings(setting, fusion, mode, seed, training, runs_dir, valuation="offline", split_seed=data.MFEAT_SPLIT_SEED,
                  knobs=None, study="grid", track_phi=True):
    """train.py's settings (underscored) of one cell's run, its run directory under `runs_dir` included (a study
    other than the grid: in a folder of its own, named with the split seed and the knobs too)."""
    knobs = knobs or {}
    name = f"{fusion}-{mode}{'-online' if valuation == 'online' else ''}-s{seed}"
    if study != "grid":
        name = os.path.join(study, name + f"-split{split_seed}" + "".join(f"-{k}{v}" for k, v in knobs.items()))
    return dict(views=SETTINGS[setting]["views"].split(","), mfeat_degrade=SETTINGS[setting]["degrade"],
                mfeat_weak_signal=SETTINGS[setting].get("weak_signal", 0.0),
                mfeat_strong_signal=SETTINGS[setting].get("strong_signal", 1.0),
                mfeat_test_fraction=SETTINGS[setting].get("test_fraction", data.MFEAT_FRACTIONS[2]),
                split_seed=split_seed, mode=mode,
                fusion=fusion, seed=seed, valuation=valuation, track_phi=track_phi,
                out=os.path.join(runs_dir, setting, name), **dict(training, **knobs))


def check_grid(runs, training, runs_dir):
    """Refuse, before the first run, a grid with a run train.py would refuse (--warmup 0 for online valuation,
    say), in one line naming the run; train.py's warnings come with the runs themselves."""
    for (setting, fusion, mode), valuation, seed in runs:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                training_args(**cell_settings(setting, fusion, mode, seed, training, runs_dir, valuation))
        except train.TrainingError as error:
            raise train.TrainingError(f"the run {describe_run(setting, fusion, mode, valuation, seed)}: {error}")


def describe_run(setting, fusion, mode, valuation, seed):
    """'sample-level concat sample online seed 0': one run, as the progress lines and the errors name it."""
    return f"{setting} {fusion} {mode}{' online' if valuation == 'online' else ''} seed {seed}"


def valuation_of(run_dir, split="test"):
    """The per-sample valuation of a run's validation-chosen checkpoint on `split`: ids, labels [N],
    predictions [N], phi [N, n] (numpy), modalities."""
    result, dataset = train.evaluate_checkpoint(os.path.join(run_dir, "best.pt"), split)
    ids = [dataset.sample_ids[i] for i in result["index"].tolist()]
    return (ids, result["labels"].numpy(), result["prediction"].numpy(), result["phi"].numpy().astype(float),
            list(dataset.modalities))


def run_cell(setting, fusion, mode, seed, training, runs_dir, valuation="offline", split_seed=data.MFEAT_SPLIT_SEED,
             knobs=None, study="grid", track_phi=True):
    """Train one cell, value its test split, and return its record. split_seed, knobs (train.py settings of the
    method, e.g. the tuned ones of Table 2) and study (which grid the run belongs to) go into the record; on the
    weak-view setting the record also holds weak_view_measures."""
    knobs = knobs or {}
    settings = cell_settings(setting, fusion, mode, seed, training, runs_dir, valuation, split_seed, knobs, study,
                             track_phi)
    out = settings["out"]
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    results = train_quietly(os.path.join(out, "stdout.txt"), **settings)
    wall_seconds = time.perf_counter() - start
    _, _, _, test_phi, _ = valuation_of(out)

    log = train.load_log(os.path.join(out, "log.jsonl"))
    method = [r for r in log if r["phase"] in train.RESAMPLING_MODES]  # the others valued only to log phi
    train_mean_phi, train_std_phi = [], []  # per epoch: phi of the training set that planned that epoch
    for record in log:
        if record["mean_phi"] is None:  # online valuation's first epoch: nothing trained before it to value
            train_mean_phi.append(None)
            train_std_phi.append(None)
            continue
        phi = np.load(os.path.join(out, "contributions", f"epoch_{record['epoch']:03d}.npz"))["phi"].astype(float)
        train_mean_phi.append(np.round(phi.mean(0), 4).tolist())  # [n]; 4 decimals keep results.json small
        train_std_phi.append(np.round(phi.std(0), 4).tolist())
    record = dict(
        setting=setting, views=SETTINGS[setting]["views"], degrade=SETTINGS[setting]["degrade"], mode=mode,
        fusion=fusion, valuation=valuation, seed=seed, modalities=results["modalities"],
        best_epoch=results["best_epoch"],
        val_acc=results["val_acc"], test_acc=results["test_acc"], test_map=results["test_map"],
        test_acc_per_modality=results["test_acc_per_modality"],
        test_mean_phi=test_phi.mean(0).tolist(), test_std_phi=test_phi.std(0).tolist(),
        train_mean_phi=train_mean_phi, train_std_phi=train_std_phi,
        train_samples=sum(r["train_samples"] for r in log),
        copies=np.sum([r["copies"] for r in log], axis=0).tolist(),
        valued_samples=sum(r["valued_samples"] for r in method),
        # the method's own cost: the epochs' time without the valuation done only to log phi (--track-phi)
        method_seconds=sum(r["seconds"] for r in log) - sum(r["valuation_seconds"] for r in log if r not in method),
        valuation_seconds=sum(r["valuation_seconds"] for r in method),
        wall_seconds=wall_seconds, run_dir=out)
    if study != "grid":
        record.update(study=study, split_seed=split_seed, knobs=knobs)
    if has_weak_view(SETTINGS[setting]):
        record.update(weak_view_measures(out, SETTINGS[setting], split_seed))
    return record


# ----------------------------------------------------------------------------------------------
# aggregation


def group(records, valuation="offline", study="grid"):
    """(setting, fusion, mode) -> that cell's records of `study` valued by `valuation`, sorted by seed (records from
    before online valuation: offline; from before studies: the grid)."""
    cells = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        if record.get("valuation", "offline") == valuation and record.get("study", "grid") == study:
            cells.setdefault((record["setting"], record["fusion"], record["mode"]), []).append(record)
    return cells


def mean_std(values):
    """Mean and standard deviation over seeds (ddof 1; 0 for a single seed)."""
    values = np.asarray(values, dtype=float)
    return values.mean(0), (values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(values.mean(0)))


def percent(values):
    mean, std = mean_std(100 * np.asarray(values, dtype=float))
    return f"{mean:.2f} ± {std:.2f}"


def paired(cells, setting, fusion, mode_a, mode_b, key):
    """Per-seed differences key(mode_a) - key(mode_b) over the seeds both cells ran."""
    a = {r["seed"]: r for r in cells.get((setting, fusion, mode_a), [])}
    b = {r["seed"]: r for r in cells.get((setting, fusion, mode_b), [])}
    return np.array([key(a[s]) - key(b[s]) for s in sorted(a.keys() & b.keys())])


def describe_difference(diffs, unit=" points", scale=100.0):
    """'+0.45 ± 0.30 points (higher in 4, lower in 1 of 5 seeds)' for per-seed differences."""
    mean, std = mean_std(scale * diffs)
    higher, lower = int((diffs > 1e-9).sum()), int((diffs < -1e-9).sum())
    return f"{mean:+.2f} ± {std:.2f}{unit} (higher in {higher}, lower in {lower} of {len(diffs)} seeds)"


def ordered_cells(cells, setting):
    """The table's row order: concat with every mode, then each other fusion, as train.MODES and models.FUSIONS."""
    fusions = [f for f in models.FUSIONS if any(key[:2] == (setting, f) for key in cells)]
    return [(setting, f, m) for f in fusions for m in train.MODES if (setting, f, m) in cells]


def on_main_table(key):
    """Whether a cell is one of the paper's methods on its main fusion: concat, or the fusion a compared method
    needs (greedy on mmtm)."""
    return key[1] == (train.METHODS[key[2]].fusion or "concat")


def baseline_of(key):
    """The baseline cell a cell is compared with: the same setting and fusion."""
    return (key[0], key[1], "baseline")


def epoch_columns(num_epochs, warmup):
    """A handful of epochs to show: about five evenly spaced, the end of warm-up and the last."""
    step = max(1, num_epochs // 5)
    return sorted({e for e in range(0, num_epochs, step)} | {min(warmup, num_epochs - 1), num_epochs - 1})


# ----------------------------------------------------------------------------------------------
# Figure 4: two test samples of one class that rely on different modalities


def pick_examples(setting, cells):
    """Valuation before (baseline) and after (sample) of two test samples of one class, as in Figure 4.

    The samples are chosen on the baseline model's test valuation and on the data alone, never on the result
    after: in each class, A is the sample with the largest phi_1 - phi_2 and B the one with the largest
    phi_2 - phi_1, among equal gaps the one whose other view is the most degraded (the reason to lean on one view,
    like the hidden motorcycle of Figure 2a; no degradation: the first); the class whose A and B lean most clearly
    (the larger min of the two gaps, then of the two degradations; ties: the lower class) wins. Both models are
    the concat runs of the first seed they share."""
    baseline = {r["seed"]: r for r in cells.get((setting, "concat", "baseline"), [])}
    sample = {r["seed"]: r for r in cells.get((setting, "concat", "sample"), [])}
    seeds = sorted(baseline.keys() & sample.keys())
    if not seeds:
        return None
    before, after = baseline[seeds[0]]["run_dir"], sample[seeds[0]]["run_dir"]
    if not (os.path.exists(os.path.join(before, "best.pt")) and os.path.exists(os.path.join(after, "best.pt"))):
        return None
    ids, labels, predictions, phi, modalities = valuation_of(before)
    test_set = data.build_dataset("mfeat", "test", views=SETTINGS[setting]["views"].split(","),
                                  degrade=SETTINGS[setting]["degrade"])
    test_row = {sample_id: k for k, sample_id in enumerate(test_set.sample_ids)}
    rows = [test_row[sample_id] for sample_id in ids]
    degraded = np.zeros_like(phi)  # [N, 2]: the degradation strength of each sample's modalities
    degraded[np.arange(len(ids)), test_set.degraded_view[rows].numpy()] = test_set.degrade_strength[rows].numpy()
    best = None
    for label in sorted(set(labels.tolist())):
        in_class = np.flatnonzero(labels == label).tolist()
        a = max(in_class, key=lambda k: (phi[k, 0] - phi[k, 1], degraded[k, 1]))  # max: the first of equal keys
        b = max(in_class, key=lambda k: (phi[k, 1] - phi[k, 0], degraded[k, 0]))
        score = (min(phi[a, 0] - phi[a, 1], phi[b, 1] - phi[b, 0]), min(degraded[a, 1], degraded[b, 0]))
        if best is None or score > best[0]:
            best = (score, label, a, b)
    _, label, a, b = best
    after_ids, _, after_predictions, after_phi, _ = valuation_of(after)
    after_row = {sample_id: k for k, sample_id in enumerate(after_ids)}
    examples = []
    for name, k in (("A", a), ("B", b)):
        j, t = after_row[ids[k]], test_row[ids[k]]
        example = dict(name=name, id=ids[k], label=int(labels[k]),
                       baseline=dict(phi=phi[k].tolist(), prediction=int(predictions[k])),
                       sample=dict(phi=after_phi[j].tolist(), prediction=int(after_predictions[j])))
        if SETTINGS[setting]["degrade"] > 0:
            example.update(degraded_view=modalities[int(test_set.degraded_view[t])],
                           degrade_strength=float(test_set.degrade_strength[t]))
        examples.append(example)
    # Figure 4's comparison: OGM-GE's per-sample confidence beside phi, under the baseline and the OGM-GE model
    shown = dict(baseline=before)
    ogm = {r["seed"]: r["run_dir"] for r in cells.get((setting, "concat", "ogm-ge"), [])}
    if seeds[0] in ogm and os.path.exists(os.path.join(ogm[seeds[0]], "best.pt")):
        shown["ogm-ge"] = ogm[seeds[0]]
    for model, run_dir in shown.items():
        found = confidence_of(run_dir, [example["id"] for example in examples])
        for example in examples:
            example.setdefault("confidence", {})[model] = found[example["id"]]
    return dict(setting=setting, seed=seeds[0], label=int(label), modalities=modalities, samples=examples)


def confidence_of(run_dir, ids, split="test"):
    """phi, OGM-GE's confidence per modality (the true-class softmax of each modality's response, the summand of
    its score) and the prediction of the samples `ids` under a run's validation-chosen checkpoint."""
    result, dataset = train.evaluate_checkpoint(os.path.join(run_dir, "best.pt"), split, confidence=True)
    row = {dataset.sample_ids[index]: k for k, index in enumerate(result["index"].tolist())}
    return {sample_id: dict(phi=result["phi"][row[sample_id]].tolist(),
                            ogm_score=result["ogm_score"][row[sample_id]].tolist(),
                            prediction=int(result["prediction"][row[sample_id]])) for sample_id in ids}


# ----------------------------------------------------------------------------------------------
# Figure 5: the features of the low-contributing modality's encoder, and how separable their classes are


def head_features(run_dir, modality):
    """What the fusion head of a run's validation-chosen checkpoint reads for modality `modality` (an index), with
    every modality present, in eval mode: {"train": (features [N, d], labels [N]), "test": (...)}, the training
    split with evaluation transforms. For Concatenation that is the modality's encoder feature; for MMTM its stream
    after the last MMTM module, pooled: the encoder features of the paper's Figure 5."""
    checkpoint = train.load_checkpoint(os.path.join(run_dir, "best.pt"))
    args = argparse.Namespace(**checkpoint["args"])
    splits = train.build_datasets(args)
    model = train.build_model(args, splits["test"])
    model.load_state_dict(checkpoint["model"])

    def read_head_input(model, inputs, target):  # the head's input for the modality, [B, d], through a hook
        read = []
        hook = model.head.register_forward_pre_hook(lambda head, head_inputs: read.append(head_inputs[0][modality]))
        model(inputs)
        hook.remove()
        return dict(feature=read[0])

    loader_kwargs = dict(batch_size=256, num_workers=0)
    features = {}
    for name, split in (("train", "train_eval"), ("test", "test")):
        result = engine.evaluate(model, splits[split], read_head_input, loader_kwargs, torch.device("cpu"))
        features[name] = (result["feature"].numpy(), result["labels"].numpy())
    return features


def nearest_centroid_accuracy(train_features, train_labels, test_features, test_labels):
    """How separable the classes of some features are: the accuracy on the test features of assigning each to the
    class whose mean training feature (centroid) is nearest, in Euclidean distance."""
    classes = np.unique(train_labels)
    centroids = np.stack([train_features[train_labels == c].mean(0) for c in classes])  # [K, d]
    distances = ((test_features[:, None] - centroids[None]) ** 2).sum(-1)  # [N, K]
    return float((classes[distances.argmin(1)] == test_labels).mean())


def feature_study(cells):
    """Figure 5's numbers: the modality of FEATURE_SETTING with the lowest mean contribution on test in the
    Concatenation baseline (mean over seeds), and for each of FEATURE_MODELS the nearest-centroid accuracy of that
    modality's head features on test, per seed (the seeds every model ran). None where a model or checkpoint is
    missing."""
    runs = [{r["seed"]: r for r in cells.get((FEATURE_SETTING, fusion, mode), [])} for fusion, mode in FEATURE_MODELS]
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in runs)))
    if not seeds or not all(os.path.exists(os.path.join(by_seed[s]["run_dir"], "best.pt"))
                            for by_seed in runs for s in seeds):
        return None
    modality = int(np.argmin(np.mean([runs[0][s]["test_mean_phi"] for s in seeds], axis=0)))
    rows = []
    for (fusion, mode), by_seed in zip(FEATURE_MODELS, runs):
        accuracy = []
        for s in seeds:
            features = head_features(by_seed[s]["run_dir"], modality)
            accuracy.append(nearest_centroid_accuracy(*features["train"], *features["test"]))
        rows.append(dict(fusion=fusion, mode=mode, nearest_centroid=accuracy,
                         alone=[by_seed[s]["test_acc_per_modality"][modality] for s in seeds]))
    return dict(setting=FEATURE_SETTING, modality=runs[0][seeds[0]]["modalities"][modality], index=modality,
                seeds=seeds, models=rows, run_dirs=[by_seed[seeds[0]]["run_dir"] for by_seed in runs])


def feature_lines(study):
    """Figure 5's table and the paper's claim about it, checked seed by seed, as Markdown lines."""
    m = study["modality"]
    rows = [[f"{row['fusion']} {row['mode']}", percent(row["nearest_centroid"]), percent(row["alone"])]
            for row in study["models"]]
    lines = [f"Figure 5: how separable the classes are in the features of `{m}`, the modality with the lowest mean "
             f"contribution in the Concatenation baseline (what the fusion head reads from it, all modalities "
             f"present); *nearest centroid*: accuracy on test of the nearest class mean of the training features; "
             f"*{m} alone*: the joint model's accuracy with `{m}` alone:", ""]
    lines += table(["model", f"nearest centroid ({m} features)", f"{m} alone"], rows) + [""]
    accuracy = {(row["fusion"], row["mode"]): np.array(row["nearest_centroid"]) for row in study["models"]}
    for a, b in ((("mmtm", "baseline"), ("concat", "baseline")), (("mmtm", "sample"), ("mmtm", "baseline")),
                 (("mmtm", "modality"), ("mmtm", "baseline"))):
        lines.append(f"- {m} features more separable with {' '.join(a)} than with {' '.join(b)} (Figure 5): "
                     f"nearest-centroid accuracy {describe_difference(accuracy[a] - accuracy[b])}")
    return lines


def principal_components(features):
    """The first two principal components of features [N, d]: [N, 2]."""
    centred = features - features.mean(0)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    return centred @ directions[:2].T


def write_feature_figure(out, study):
    """Figure 5 as features_<setting>.png: the test features of the study's modality in 2-D, one panel per model of
    FEATURE_MODELS (first seed), coloured by class, with the nearest-centroid accuracy above each. t-SNE with
    scikit-learn (optional); without it the first two principal components, as the title says. [] without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: Figure 5 skipped (its numbers are in results.md)")
        return []
    try:
        from sklearn.manifold import TSNE
        method, embed = "t-SNE", lambda x: TSNE(n_components=2, init="pca", random_state=0).fit_transform(x)
    except ImportError:
        method, embed = "first two principal components (scikit-learn, for t-SNE, is not installed)", \
            principal_components
    fig, axes = plt.subplots(1, len(study["models"]), figsize=(4 * len(study["models"]), 4.3))
    for ax, row, run_dir in zip(axes, study["models"], study["run_dirs"]):
        features, labels = head_features(run_dir, study["index"])["test"]
        points = embed(features)
        ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=5)
        ax.set_title(f"{row['fusion']} {row['mode']}: nearest centroid {100 * row['nearest_centroid'][0]:.1f} %",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{study['setting']}: {study['modality']} features on test, seed {study['seeds'][0]}, {method}; "
                 f"colour: class", fontsize=10)
    fig.tight_layout()
    name = f"features_{study['setting']}.png"
    fig.savefig(os.path.join(out, name), dpi=120)
    plt.close(fig)
    return [name]


# ----------------------------------------------------------------------------------------------
# Table 2 and Figure 1 with power: tuned methods, (seed, split) pairs, paired tests, a rule fixed in advance


TABLE2_SETTINGS = ("dataset-level", "sample-level-weak-view")
TABLE2_MODES = ("baseline", "sample", "modality") + comparators.COMPARED_MODES  # greedy on mmtm, against mmtm's baseline
TABLE2_TRAINING = dict(TRAINING, epochs=20)  # 20 epochs: the grid's 360 runs fit 45 minutes on 2 CPU cores
TABLE2_PAIRS = tuple((k, 1000 + k) for k in range(20))  # (seed, split seed): weights, order and split all vary
TUNING_PAIRS = ((100, 1100), (101, 1101))  # the tuning's own pairs, none of the grid's
# each method's main knob (a train.py setting) and its candidates, three each, the default among them
KNOBS = {"sample": ("warmup", (1, 2, 4)), "modality": ("warmup", (1, 2, 4)),
         "ogm-ge": ("ogm_alpha", (0.1, 0.3, 0.8)), "pmr": ("pmr_alpha", (1.0, 2.0, 3.0)),
         "agm": ("agm_alpha", (0.1, 0.5, 1.0)), "greedy": ("greedy_epsilon", (0.005, 0.01, 0.05)),
         "gblending": ("super_epoch", (5, 10, 15))}
# The second edition (--table2-second, into <--out>/table2-second/; the first edition's files stay as they are):
# the benchmarks with room (README: "Second edition: benchmarks with room", fixed from baseline-only pilots),
# tuning on 4 pairs with ties going to each method's default, one Holm family without duplicates, the regime map.
TABLE2_SECOND_SETTINGS = ("dataset-level-2", "sample-level-2")
TABLE2_SECOND_TRAINING = TABLE2_TRAINING
# 40 (seed, split seed) pairs, none of the first edition's, the pilots' or the tuning's: the pilots' paired spread
# (about 1.1-1.5 points) gives a 95 % CI of sample - baseline of about +-0.35-0.5 points on 800 test samples
TABLE2_SECOND_PAIRS = tuple((300 + k, 1300 + k) for k in range(40))
# its replication (--table2-second --replicate): the same tuning and rule on 40 pairs that no other study uses
TABLE2_SECOND_REPLICATION_PAIRS = tuple((500 + k, 1500 + k) for k in range(40))
TABLE2_SECOND_TUNING_PAIRS = tuple((100 + k, 1100 + k) for k in range(4))  # none of the grid's
# each method's main knob and its candidates; its default in train.py (knob_default: the official code's, README's
# table of compared methods; the warm-up: mfeat's preset) is one of them, and ties go to it
TABLE2_SECOND_KNOBS = dict(KNOBS, sample=("warmup", (1, 2, 4, 5)), modality=("warmup", (1, 2, 4, 5)))
REGIME_MODES = ("baseline", "sample", "naive", "modality")  # the sample-level family of the regime map
# what a regime point's number is: the weak view's share of signal, against the strong view's 0.4 (sample-level-2)
REGIME_AXIS = "weak view's share of signal W (strong view: 0.4; the imbalance is strongest at small W)"
REGIME_KNOBS_OF = {"naive": "sample"}  # naive re-samples Algorithm 1's counts: it takes sample's tuned warm-up
# the regime map's points, (the weak view's share of signal, setting), from 'the weaker view is nearly noise' (0.05)
# to 'the views are nearly equal' (0.37, beside the strong view's 0.4)
TABLE2_SECOND_REGIME = tuple((w, f"sample-level-2-weak-{w}" if f"sample-level-2-weak-{w}" in SETTINGS
                              else "sample-level-2") for w in REGIME_WEAK_SIGNALS)
TABLE2_SECOND_REGIME_PAIRS = tuple((400 + k, 1400 + k) for k in range(10))  # none of any other study's
TABLE2_SECOND_REGIME_KNOBS_FROM = "sample-level-2"  # the setting whose tuned knobs it takes
DATASET_LEVEL_METHODS = ("ogm-ge", "greedy", "pmr", "agm")  # the methods the paper says barely help (Sec. 4.3)
CLAIM_COMPARISONS = ("sample - baseline",) + tuple(f"sample - {m} (gains)" for m in DATASET_LEVEL_METHODS)
ALPHA = 0.05  # the family-wise error rate of each table (Holm)
TEST_UNIT = 1 / 400  # one sample of mfeat's default test split (20 % of 200 per class): accuracy differences are
# multiples of it; test_unit(setting) for a setting's own split
VAL_UNIT = 1 / 400  # one sample of mfeat's validation split (20 % of 200 per class)
# what a run's checkpoint gives: equal in every field to its baseline's in the same pair, the method changed nothing
OUTCOME_FIELDS = ("best_epoch", "val_acc", "test_acc", "test_map", "test_acc_per_modality", "test_mean_phi",
                  "test_std_phi")
CODE_FILES = ("train.py", "engine.py", "method.py", "comparators.py", "data.py", "models.py", "shapley_mm.py")


def weak_view_measures(run_dir, spec, split_seed):
    """What shows that a weak-view benchmark (spec: its SETTINGS entry) is what it claims, from one run:
    below_one[e], the share of training
    samples with a contribution below 1 among those valued before epoch e (the only ones Eq. 10 copies; None where
    nothing was valued); weak_copy_share[e], the share of the copies Eq. 10 gives those values that keep each
    sample's known weak view; alone_weak / alone_strong [n], the test accuracy of each view alone on the test
    samples where it is the weak / the strong view."""
    train_set = data.build_dataset("mfeat", "train", views=spec["views"].split(","), weak_signal=spec["weak_signal"],
                                   strong_signal=spec.get("strong_signal", 1.0),
                                   test_fraction=spec.get("test_fraction", data.MFEAT_FRACTIONS[2]),
                                   split_seed=split_seed)
    below_one, weak_copy_share = [], []
    for epoch in range(len(train.load_log(os.path.join(run_dir, "log.jsonl")))):
        path = os.path.join(run_dir, "contributions", f"epoch_{epoch:03d}.npz")
        if not os.path.exists(path):
            below_one.append(None)
            weak_copy_share.append(None)
            continue
        with np.load(path) as values:
            phi, index = values["phi"].astype(float), values["index"]
        below_one.append(share_below_one(phi))
        weak_copy_share.append(share_of_copies_on_weak_view(phi, train_set.degraded_view[index].numpy()))
    result, test_set = train.evaluate_checkpoint(os.path.join(run_dir, "best.pt"))
    alone = alone_accuracy_by_weak_view(result["correct"].numpy(), test_set.degraded_view[result["index"]].numpy())
    return dict(below_one=below_one, weak_copy_share=weak_copy_share, alone_weak=alone[:, 0].tolist(),
                alone_strong=alone[:, 1].tolist())


def share_below_one(phi):
    """The share of samples, phi [N, n], with some modality's contribution below 1 (those Eq. 10 gives copies)."""
    return float((phi < 1).any(1).mean())


def share_of_copies_on_weak_view(phi, weak):
    """The share of the uni-modal copies Eq. 10 gives the contributions phi [N, n] that keep each sample's weak view
    weak [N]; None without copies."""
    copies = shapley_mm.sample_level_copies(torch.as_tensor(phi)).numpy()  # [N, n]
    total = copies.sum()
    return float(copies[np.arange(len(weak)), weak].sum() / total) if total else None


def alone_accuracy_by_weak_view(correct, weak):
    """[n, 2]: the accuracy of each modality alone (coalition 2**i of correct [N, 2**n], shapley_mm.coalitions) on
    the samples whose weak view it is (column 0) and on the others (column 1); nan where there are none."""
    n = correct.shape[1].bit_length() - 1
    out = np.full((n, 2), np.nan)
    for i in range(n):
        alone = correct[:, 1 << i]
        for column, where in enumerate((weak == i, weak != i)):
            if where.any():
                out[i, column] = alone[where].mean()
    return out


def stronger_alone(correct, weak):
    """The accuracy of each sample's stronger view alone (two views; the one not weakened, weak [N]), from the
    coalitions' correctness correct [N, 4] (shapley_mm.coalitions: coalition 1 << v is view v alone)."""
    return float(correct[np.arange(len(weak)), 1 << (1 - weak)].mean())


def cooperation_margin(correct, weak):
    """How much the joint model adds to each sample's stronger view: its accuracy with both views (coalition 3 of
    correct [N, 4]) minus that of the stronger view alone (stronger_alone)."""
    return float(correct[:, 3].mean()) - stronger_alone(correct, weak)


def cooperation_margin_of(run_dir):
    """cooperation_margin of a weak-view run's validation-chosen checkpoint on test."""
    result, test_set = train.evaluate_checkpoint(os.path.join(run_dir, "best.pt"))
    return cooperation_margin(result["correct"].numpy(), test_set.degraded_view[result["index"]].numpy())


def sign_flip_p_value(diffs, unit):
    """Two-sided exact paired permutation test: the share of the 2**n sign assignments of the differences whose
    |sum| is at least the observed |sum|. diffs must be multiples of `unit` (accuracy differences on a test split of
    N samples: 1 / N); the distribution of the sum is counted exactly over integers, so any n is cheap."""
    steps = np.rint(np.asarray(diffs, dtype=float) / unit).astype(np.int64)
    if not np.allclose(steps * unit, diffs, atol=0.01 * unit):  # accuracies are stored as float32
        raise ValueError(f"differences are not multiples of {unit}")
    size = int(np.abs(steps).sum())
    counts = np.zeros(2 * size + 1)  # counts[s + size]: sign assignments so far with sum s
    counts[size] = 1.0
    for d in np.abs(steps):
        counts = (np.roll(counts, d) + np.roll(counts, -d)) if d else 2 * counts  # no wrap: |sum| <= size
    sums = np.arange(-size, size + 1)
    return float(counts[np.abs(sums) >= abs(steps.sum())].sum() / 2.0 ** len(steps))


def holm(p_values):
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest p times (m - k + 1), made
    non-decreasing, capped at 1."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def t_quantile(q, dof):
    """The q-quantile (q > 0.5) of Student's t with `dof` degrees of freedom: its density integrated numerically
    (trapezoids on a fine grid) and inverted by interpolation."""
    x = np.linspace(0.0, 60.0, 600001)
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    density = np.exp(log_c - (dof + 1) / 2 * np.log1p(x ** 2 / dof))
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(x))])
    return float(np.interp(q, cdf, x))


def paired_summary(diffs, unit):
    """Mean, 95 % t confidence interval, exact sign-flip p-value and pair counts of paired differences; the counts
    in whole units (test samples), so that a float32 rounding error is no difference."""
    diffs = np.asarray(diffs, dtype=float)
    mean = diffs.mean()
    half = t_quantile(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else np.nan
    steps = np.rint(diffs / unit)
    return dict(mean=float(mean), low=float(mean - half), high=float(mean + half), n=len(diffs),
                p=sign_flip_p_value(diffs, unit), higher=int((steps > 0).sum()), lower=int((steps < 0).sum()),
                tied=int((steps == 0).sum()))


def decide(summary):
    """The rule written in README before the runs: held where the Holm-adjusted p is below ALPHA and the mean
    difference positive, against where it is below ALPHA and the mean negative, else undecided."""
    if summary["p_holm"] >= ALPHA:
        return "undecided"
    return "held" if summary["mean"] > 0 else "against"


def test_unit(setting):
    """One sample of `setting`'s test split, as a fraction of it (mfeat: 2000 samples, test_fraction of them)."""
    return 1 / round(2000 * SETTINGS[setting].get("test_fraction", data.MFEAT_FRACTIONS[2]))


def has_weak_view(spec):
    """Whether a setting weakens a known view per sample more than the other (what weak_view_measures reads)."""
    return "weak_signal" in spec and spec["weak_signal"] < spec.get("strong_signal", 1.0)


def table2_comparisons(cells, setting, unit=None):
    """Every comparison of one setting's Table 2, Holm-corrected together: each method minus its fusion's baseline,
    then `sample`'s gain minus each other compared method's gain (accuracies as fractions, paired by pair: the
    record's seed names its pair). A comparison whose differences are those of an earlier one, pair by pair in
    whole units (sample - greedy's gain where greedy never acted: sample - baseline), is one hypothesis: it is left
    out of the Holm family (m shrinks) and takes that one's adjusted p and decision, with duplicate_of naming it."""
    gain = {}
    for key in compared_cells(cells, setting):
        base = {r["seed"]: r["test_acc"] for r in cells.get(baseline_of(key), [])}
        if key[2] != "baseline":
            gain[key[2]] = {r["seed"]: r["test_acc"] - base[r["seed"]] for r in cells[key] if r["seed"] in base}
    found = {f"{method} - baseline": g for method, g in gain.items()}
    for method in gain:
        if "sample" in gain and method not in ("sample", "modality"):
            common = sorted(gain["sample"].keys() & gain[method].keys())
            found[f"sample - {method} (gains)"] = {s: gain["sample"][s] - gain[method][s] for s in common}
    found = {name: d for name, d in found.items() if len(d) > 1}
    unit = unit or test_unit(setting)
    summaries = {name: paired_summary(list(d.values()), unit) for name, d in found.items()}
    steps = {name: {s: int(np.rint(x / unit)) for s, x in d.items()} for name, d in found.items()}
    first = {name: next(other for other in found if steps[other] == steps[name]) for name in found}
    family = [name for name in found if first[name] == name]
    for name, p in zip(family, holm([summaries[name]["p"] for name in family])):
        summaries[name].update(p_holm=float(p), decision=decide(dict(summaries[name], p_holm=p)), family=len(family))
    for name in found:
        if first[name] != name:
            summaries[name].update({k: summaries[first[name]][k] for k in ("p_holm", "decision", "family")},
                                   duplicate_of=first[name])
    return summaries


def claim_verdict(summaries):
    """The paper's claim on one setting (Sec. 4.3, Figure 1): held when every CLAIM_COMPARISONS is held, against when
    any is against, else undecided."""
    decisions = [summaries[name]["decision"] for name in CLAIM_COMPARISONS if name in summaries]
    if len(decisions) < len(CLAIM_COMPARISONS):
        return "undecided (not every comparison ran)"
    return "against" if "against" in decisions else "held" if set(decisions) == {"held"} else "undecided"


def knob_default(knob):
    """A knob's default in train.py (mfeat's preset for the warm-up; comparators.add_arguments for the compared
    methods, which follow the official code: README, Compared methods)."""
    return getattr(train.get_args_parser("mfeat").parse_args([]), knob)


def ranked_candidates(records, setting, method, knob, candidates, default=None):
    """[(value, mean correct validation samples over the tuning pairs)] of one method's candidates, best first, on
    whole samples (val_acc / VAL_UNIT), so that ties are exact. Ties go to `default`, else to the value nearest it,
    else (default None: the first edition's rule) to the candidate listed first."""
    runs = [r for r in records if r["setting"] == setting and r["mode"] == method]
    means = {value: np.mean([np.rint(r["val_acc"] / VAL_UNIT) for r in runs if r["knobs"][knob] == value] or [-1.0])
             for value in candidates}
    if default is None:
        return sorted(means.items(), key=lambda item: -item[1])  # a stable sort: ties in listed order
    return sorted(means.items(), key=lambda item: (-item[1], abs(item[0] - default), item[0]))


def choose_knobs(records, setting, knobs=KNOBS, ties_to_default=False):
    """{method: {knob: value}}: the candidate of `knobs` with the highest mean validation accuracy over the tuning
    pairs (ties: ranked_candidates; to knob_default with ties_to_default, else the candidate listed first)."""
    return {method: {knob: ranked_candidates(records, setting, method, knob, candidates,
                                             knob_default(knob) if ties_to_default else None)[0][0]}
            for method, (knob, candidates) in knobs.items()}


def tuning_choices(records, setting, knobs):
    """Per method of `knobs`, how its value was chosen (ties to its default): knob, default, the candidates' mean
    correct validation samples, the chosen value, its margin over the runner-up in validation samples (0: a tie the
    default decided), and never_acts: the candidates under which the method changed nothing (never_acted)."""
    found = {}
    for method, (knob, candidates) in knobs.items():
        default = knob_default(knob)
        ranked = ranked_candidates(records, setting, method, knob, candidates, default)
        runs = [r for r in records if r["setting"] == setting and r["mode"] == method]
        found[method] = dict(knob=knob, default=default, samples=[[v, m] for v, m in ranked], chosen=ranked[0][0],
                             margin=float(ranked[0][1] - ranked[1][1]) if len(ranked) > 1 else None,
                             never_acts=[v for v in candidates if never_acted(
                                 [r for r in runs if r["knobs"][knob] == v], records)])
    return found


def never_acted(runs, records):
    """Whether a method's runs changed nothing: each equal, in every OUTCOME_FIELDS, to the baseline of its study,
    fusion and pair among `records` (False without runs or without those baselines)."""
    pair = lambda r: (r.get("study"), r["setting"], r["fusion"], r["seed"], r.get("split_seed"))
    base = {pair(r): r for r in records if r["mode"] == "baseline"}
    pairs = [base.get(pair(r)) for r in runs]
    return bool(runs) and all(b is not None and all(r[k] == b[k] for k in OUTCOME_FIELDS)
                              for r, b in zip(runs, pairs))


def pair_tasks(settings, cells_of, pairs, training, runs_dir, study, knobs_of):
    """The run_cell calls of a study: (setting, fusion, mode, seed, training, runs_dir, valuation, split seed,
    knobs, study, track_phi) per cell and pair; phi is tracked where the contributions per epoch are shown."""
    return [(setting, (train.METHODS[mode].fusion or "concat") if fusion is None else fusion, mode, seed,
             training, runs_dir, "offline", split_seed, knobs, study, mode in ("baseline", "sample"))
            for setting in settings for fusion, mode, knobs in cells_of(setting, knobs_of)
            for seed, split_seed in pairs]


def tuning_cells(setting, knobs_of):
    return [(None, method, {knob: value}) for method, (knob, candidates) in KNOBS.items() for value in candidates]


def table2_cells(setting, knobs_of):
    cells = [(None, mode, knobs_of[setting].get(mode, {})) for mode in TABLE2_MODES]
    return cells + [("mmtm", "baseline", {})]  # greedy's baseline


def code_fingerprint():
    """The SHA-256 of the code a run executes (CODE_FILES, beside this file): a finished run's record is reused only
    under the same one."""
    digest = hashlib.sha256()
    for name in CODE_FILES:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def task_key(task):
    """Every setting that determines a run_cell task's record: train.py's settings of the run (cell_settings), its
    setting's name and SETTINGS entry, its study; as JSON gives it back."""
    setting, study = task[0], task[9]
    return json.loads(json.dumps(dict(train=cell_settings(*task), setting=setting, spec=SETTINGS[setting],
                                      study=study)))


def record_path(task):
    return os.path.join(cell_settings(*task)["out"], "record.json")


def finished_record(task, code):
    """The record a finished run of `task` left (record.json in its run directory, written last), if its key and
    code fingerprint are this task's and this code's; else None."""
    saved = read_json(record_path(task), None)
    if saved is None or saved.get("key") != task_key(task) or saved.get("code") != code:
        return None
    return saved["record"]


def run_task(task_and_code):
    """run_cell of one task, its record then saved (atomically) in its run directory with its key and the code's
    fingerprint; an earlier record there is removed first, so that it never outlives the run it describes."""
    task, code = task_and_code
    torch.set_num_threads(1)  # in a worker process too: the same seeds give the same numbers
    with contextlib.suppress(FileNotFoundError):
        os.remove(record_path(task))
    record = run_cell(*task)
    train.save_json(record_path(task), dict(key=task_key(task), code=code, record=record))
    return record


def run_tasks(tasks, jobs):
    """The records of run_cell over `tasks`, in order, `jobs` processes at a time; a task whose run finished before
    with the same settings and code (finished_record) is not run again but its record reused."""
    start, code = time.perf_counter(), code_fingerprint()
    records = [finished_record(task, code) for task in tasks]
    todo = [task for task, record in zip(tasks, records) if record is None]
    print(f"{len(tasks) - len(todo)} of {len(tasks)} runs finished before with these settings and code: reused",
          flush=True)
    with multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 and len(todo) > 1 else \
            contextlib.nullcontext() as pool:
        results = (pool.imap if pool is not None else map)(run_task, [(task, code) for task in todo])
        done = iter(results)
        for k, record in enumerate(records):
            if record is not None:
                continue
            records[k] = record = next(done)
            print(f"[{k + 1}/{len(tasks)}] {record['setting']} {record['fusion']} {record['mode']} {record['knobs']} "
                  f"seed {record['seed']} split {record['split_seed']}: val {100 * record['val_acc']:.2f} "
                  f"test {100 * record['test_acc']:.2f} ({time.perf_counter() - start:.0f}s in all)", flush=True)
    return records, time.perf_counter() - start


def table2(out, runs_dir, jobs=1, pairs=TABLE2_PAIRS, tuning_pairs=TUNING_PAIRS, settings=TABLE2_SETTINGS,
           training=TABLE2_TRAINING):
    """Table 2 and Figure 1 with power: tune every method's knob on validation (KNOBS over tuning_pairs, unless
    out/tuning.json holds that tuning already), then run every method with its chosen value on `pairs`; the records
    join results.json as study "table2" (replacing the 5-seed compared-method runs of the grid), the tuning goes to
    tuning.json, and results.md is written again with the tables, tests and verdicts. The outputs and an earlier
    results.json are checked before the first run; both JSON files are written atomically."""
    torch.set_num_threads(1)
    train.check_writable(out)
    train.check_writable(runs_dir, "--runs-dir")
    json_path = os.path.join(out, "results.json")
    previous = read_json(json_path, dict(training=TRAINING, settings=SETTINGS, records=[], examples={}, features=None))
    os.makedirs(out, exist_ok=True)
    tuning_path = os.path.join(out, "tuning.json")
    spec = dict(pairs=[list(p) for p in tuning_pairs], training=training, knobs={m: [k, list(v)] for m, (k, v) in
                                                                                  KNOBS.items()})
    tuning = read_json(tuning_path, None)
    if tuning is not None and (tuning.get("spec") != spec or set(settings) - set(tuning["chosen"])):
        tuning = None
    if tuning is None:
        tasks = pair_tasks(settings, tuning_cells, tuning_pairs, training, runs_dir, "tuning", None)
        tuned, seconds = run_tasks(tasks, jobs)
        tuning = dict(spec=spec, chosen={s: choose_knobs(tuned, s) for s in settings}, seconds=seconds,
                      runs=[{k: r[k] for k in ("setting", "mode", "knobs", "seed", "split_seed", "val_acc")}
                            for r in tuned])
        train.save_json(tuning_path, tuning)
    print(f"chosen on validation: {tuning['chosen']}")
    tasks = pair_tasks(settings, table2_cells, pairs, training, runs_dir, "table2", tuning["chosen"])
    records, seconds = run_tasks(tasks, jobs)
    kept = [r for r in previous["records"] if r.get("study", "grid") != "table2"
            and not (r.get("study", "grid") == "grid" and r["mode"] in comparators.COMPARED_MODES)]
    previous.update(records=kept + records, table2=dict(seconds=seconds, jobs=jobs, training=training,
                                                         pairs=[list(p) for p in pairs]))
    train.write_atomic(json_path, lambda f: f.write(json.dumps(previous).encode()))
    write_reports(out, previous, tuning)
    print(f"Table 2 grid: {len(records)} runs in {seconds / 60:.1f} min ({jobs} processes): {json_path}")
    return records


def tuning_tasks(settings, knobs, pairs, training, runs_dir):
    """The second edition's tuning runs: every candidate of `knobs` on every pair, and the baseline of each fusion
    the methods run on (what never_acted compares with)."""
    fusions = sorted({(train.METHODS[method].fusion or "concat") for method in knobs})

    def cells(setting, knobs_of):
        return [(fusion, "baseline", {}) for fusion in fusions] + [
            (None, method, {knob: value}) for method, (knob, candidates) in knobs.items() for value in candidates]
    return pair_tasks(settings, cells, pairs, training, runs_dir, "tuning", None)


def regime_cells(setting, knobs_of):
    return [(None, mode, knobs_of.get(mode, {})) for mode in REGIME_MODES]


def regime_map(out, runs_dir, points, pairs, training, knobs, jobs=1):
    """The regime map: REGIME_MODES (each with knobs[mode]) on every pair at each point (strength, setting) of the
    per-sample imbalance; returns their records (study "regime", each with its cooperation_margin), the rows of
    regime_rows and the seconds the runs took, and writes regime.md and regime.png (matplotlib optional) into `out`.
    Finished runs are reused (run_tasks)."""
    tasks = pair_tasks([setting for _, setting in points], regime_cells, pairs, training, runs_dir, "regime", knobs)
    records, seconds = run_tasks(tasks, jobs)
    for record in records:
        record["cooperation_margin"] = cooperation_margin_of(record["run_dir"])
    rows = regime_rows(records, points)
    figures = write_regime_figure(out, rows)
    with open(os.path.join(out, "regime.md"), "w") as f:
        f.write("\n".join(regime_lines(rows, figures)) + "\n")
    return records, rows, seconds


def regime_rows(records, points):
    """Per point (strength, setting): the baseline's test accuracy, each method's gain over it (paired_summary over
    the pairs), and the mechanism, means over the pairs: each view alone where it is the weak and where the strong
    one (baseline, mean over the views), the share of Eq. 10's copies on the known weak view in the last epoch
    (sample) and the cooperation margin of every mode."""
    cells = group(records, study="regime")
    rows = []
    for strength, setting in points:
        base, sample = cells.get((setting, "concat", "baseline"), []), cells.get((setting, "concat", "sample"), [])
        gains = {mode: paired(cells, setting, "concat", mode, "baseline", lambda r: r["test_acc"])
                 for mode in REGIME_MODES if mode != "baseline"}
        shares = [r["weak_copy_share"][-1] for r in sample if r["weak_copy_share"][-1] is not None]
        rows.append(dict(strength=strength, setting=setting, pairs=len(base),
                         baseline=float(np.mean([r["test_acc"] for r in base])),
                         gains={mode: paired_summary(d, test_unit(setting)) for mode, d in gains.items()
                                if len(d) > 1},
                         alone_weak=float(np.mean([r["alone_weak"] for r in base])),
                         alone_strong=float(np.mean([r["alone_strong"] for r in base])),
                         weak_copy_share=float(np.mean(shares)) if shares else None,
                         cooperation_margin={mode: float(np.mean([r["cooperation_margin"] for r in runs]))
                                             for mode in REGIME_MODES
                                             for runs in [cells.get((setting, "concat", mode), [])] if runs}))
    return rows


def regime_lines(rows, figures):
    """The regime map's table as Markdown lines."""
    methods = [mode for mode in REGIME_MODES if mode != "baseline"]
    lines = ["## Regime map: the sample-level family against the strength of the per-sample imbalance", "",
             f"Per point, W: the {REGIME_AXIS} (its setting in brackets), concat: the baseline's test accuracy; each method's gain over "
             "it in points, mean [95 % t CI] over the pairs; the mechanism, means over the pairs: each view alone "
             "on the test samples where it is the known weak view and where it is the strong one (baseline, mean "
             "over the views), the share of Eq. 10's copies that keep the weak view in the last epoch (sample; 50 % "
             "is chance), and the cooperation margin (the joint accuracy minus that of each sample's stronger view "
             "alone, in points) of every mode:", ""]
    table_rows = []
    for row in rows:
        gains = [f"{100 * g['mean']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]" if g else "-"
                 for g in (row["gains"].get(mode) for mode in methods)]
        share = row["weak_copy_share"]
        table_rows.append([f"{row['strength']} ({row['setting']})", row["pairs"], f"{100 * row['baseline']:.2f}"]
                          + gains + [f"{100 * row['alone_weak']:.2f}", f"{100 * row['alone_strong']:.2f}",
                                     f"{100 * share:.1f}" if share is not None else "-"]
                          + [f"{100 * row['cooperation_margin'][m]:+.2f}" if m in row["cooperation_margin"] else "-"
                             for m in REGIME_MODES])
    lines += table(["W", "pairs", "baseline test acc"] + [f"{m} gain" for m in methods]
                   + ["view alone where weak", "where strong", "copies on the weak view (%)"]
                   + [f"cooperation margin {m}" for m in REGIME_MODES], table_rows)
    if figures:
        lines += ["", "Figure: " + ", ".join(f"[{name}]({name})" for name in figures)]
    return lines


def write_regime_figure(out, rows):
    """regime.png: each method's gain over the baseline (95 % CI) against the strength; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: the regime figure is skipped")
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, mode in enumerate(m for m in REGIME_MODES if m != "baseline"):
        found = [(row["strength"], row["gains"][mode]) for row in rows if mode in row["gains"]]
        x = np.array([strength for strength, _ in found], dtype=float)
        mean = np.array([100 * g["mean"] for _, g in found])
        error = [[100 * (g["mean"] - g["low"]) for _, g in found], [100 * (g["high"] - g["mean"]) for _, g in found]]
        ax.errorbar(x, mean, yerr=error, marker="o", capsize=3, color=f"C{k}", label=mode)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set(xlabel=REGIME_AXIS, ylabel="test acc gain over the baseline (points)",
           title="gain over the baseline, 95 % CI, along the per-sample imbalance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "regime.png"), dpi=120)
    plt.close(fig)
    return ["regime.png"]


def table2_second(out, runs_dir, jobs=1, settings=TABLE2_SECOND_SETTINGS, pairs=TABLE2_SECOND_PAIRS,
                  tuning_pairs=TABLE2_SECOND_TUNING_PAIRS, training=TABLE2_SECOND_TRAINING, knobs=TABLE2_SECOND_KNOBS,
                  regime=TABLE2_SECOND_REGIME, regime_pairs=TABLE2_SECOND_REGIME_PAIRS,
                  regime_knobs_from=TABLE2_SECOND_REGIME_KNOBS_FROM, command="python reproduce.py --table2-second"):
    """Table 2's second edition, in one call: the tuning (every candidate of `knobs` and the baselines on
    tuning_pairs; ties to each method's default; margins and never-acting candidates: tuning_choices) into
    tuning.json, every method with its chosen value on `pairs` (study "table2"), and the regime map (regime_map, the
    sample-level family with the knobs chosen on `regime_knobs_from`); results.json, results.md, regime.md and the
    figures into `out`, the wall time of the whole printed and stored. Finished runs are reused (run_tasks), so an
    interrupted edition resumes where it stopped."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    train.check_writable(out)
    train.check_writable(runs_dir, "--runs-dir")
    for method, (knob, candidates) in knobs.items():
        if knob_default(knob) not in candidates:
            raise train.TrainingError(f"the knob {knob} of {method}: its default {knob_default(knob)} is not among "
                                      f"the candidates {list(candidates)}")
    if regime and regime_knobs_from not in settings:
        raise train.TrainingError(f"the regime map takes the knobs chosen on {regime_knobs_from}, which is not "
                                  f"among the settings {list(settings)}")
    os.makedirs(out, exist_ok=True)
    tuned, tuning_seconds = run_tasks(tuning_tasks(settings, knobs, tuning_pairs, training, runs_dir), jobs)
    choices = {setting: tuning_choices(tuned, setting, knobs) for setting in settings}
    tuning = dict(spec=dict(pairs=[list(p) for p in tuning_pairs], training=training, ties="default",
                            knobs={m: [k, list(v)] for m, (k, v) in knobs.items()}),
                  chosen={s: {m: {c["knob"]: c["chosen"]} for m, c in found.items()} for s, found in choices.items()},
                  choices=choices, seconds=tuning_seconds,
                  runs=[{k: r[k] for k in ("setting", "fusion", "mode", "knobs", "seed", "split_seed") + OUTCOME_FIELDS}
                        for r in tuned])
    train.save_json(os.path.join(out, "tuning.json"), tuning)
    print(f"chosen on validation: {tuning['chosen']}")
    tasks = pair_tasks(settings, table2_cells, pairs, training, runs_dir, "table2", tuning["chosen"])
    records, grid_seconds = run_tasks(tasks, jobs)
    regime_records, rows, regime_seconds = regime_map(
        out, runs_dir, regime, regime_pairs, training,
        {mode: tuning["chosen"][regime_knobs_from].get(REGIME_KNOBS_OF.get(mode, mode), {}) for mode in REGIME_MODES},
        jobs) if regime else \
        ([], [], 0.0)
    seconds = time.perf_counter() - start
    used = sorted(set(settings) | {setting for _, setting in regime}, key=list(SETTINGS).index)
    results = dict(training=training, settings={s: SETTINGS[s] for s in used}, records=records + regime_records,
                   table2=dict(seconds=grid_seconds, jobs=jobs, training=training, pairs=[list(p) for p in pairs]),
                   regime=dict(points=[list(p) for p in regime], pairs=[list(p) for p in regime_pairs],
                               seconds=regime_seconds, rows=rows),
                   seconds=seconds, run_seconds=sum(r["wall_seconds"] for r in tuned + records + regime_records))
    train.write_atomic(os.path.join(out, "results.json"), lambda f: f.write(json.dumps(results).encode()))
    figures = write_gains_figure(out, records, settings)
    lines = ["# Table 2, second edition", "",
             "The first edition (`python reproduce.py --table2`: ../results.md, ../tuning.json, ../results.json) "
             f"stays as it was. This one: `{command}`, tuning on "
             f"{len(tuning_pairs)} pairs with ties to each method's default, one Holm family without duplicates, "
             "and the regime map.", ""]
    lines += table2_lines(records, results["table2"], tuning, "Table 2 and Figure 1 (second edition)",
                          "--table2-second")
    if rows:
        lines += regime_lines(rows, ["regime.png"] if os.path.exists(os.path.join(out, "regime.png")) else []) + [""]
    lines += [f"Wall time of the whole edition: {seconds / 60:.1f} min with {jobs} processes (runs reused from an "
              f"earlier call take none); the {len(tuned) + len(records) + len(regime_records)} runs themselves: "
              f"{results['run_seconds'] / 60:.1f} min."]
    if figures:
        lines += ["", "Figures: " + ", ".join(f"[{name}]({name})" for name in figures)]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"Table 2, second edition: {len(tuned) + len(records) + len(regime_records)} runs, wall time "
          f"{seconds / 60:.1f} min ({jobs} processes): {out}")
    return results


def read_json(path, missing):
    """The contents of a JSON file reproduce.py wrote, `missing` if there is none; one line if it cannot be read."""
    if not os.path.exists(path):
        return missing
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as error:  # a cut file, not JSON, not UTF-8
        raise train.TrainingError(f"{path} could not be read ({error.__class__.__name__}: {error}); move it away")


def write_reports(out, results, tuning):
    """results.md and the figures from the contents of results.json (`results`) and tuning.json (`tuning`)."""
    write_markdown(os.path.join(out, "results.md"), results["records"], results["examples"], results["training"],
                   write_figures(out, results["records"], results["examples"], results["training"])
                   + [name for name in [f"features_{(results.get('features') or {}).get('setting')}.png"]
                      if os.path.exists(os.path.join(out, name))],  # drawn from the grid's runs (Figure 5)
                   results.get("features"), table2_info=results.get("table2"), tuning=tuning)


def table2_lines(records, info, tuning, title="Table 2 and Figure 1 (first edition)", command="--table2"):
    """Table 2 and Figure 1 of the study "table2" as Markdown lines: per setting the methods, every comparison with
    its 95 % CI, exact sign-flip p and Holm-adjusted p, the rule applied, the verdict on the paper's claim, and on the
    weak-view setting what shows the benchmark is what it claims; then the tuning."""
    cells = group(records, study="table2")
    training = info["training"]
    lines = [f"## {title}: tuned methods, (seed, split) pairs, paired tests", "",
             f"Written by `python reproduce.py {command}`. {len(info['pairs'])} (seed, split seed) pairs per cell "
             f"(the split, the weights and the order all change from pair to pair); {training['epochs']} epochs, "
             f"SGD lr {training['lr']}, batch {training['batch_size']}, warm-up {training['warmup']} unless tuned; "
             f"each method with the value of its main knob chosen on validation (below). Accuracies in % on the test "
             f"split, checkpoint chosen on validation. Comparisons: paired differences in points over the pairs, "
             f"mean and 95 % t confidence interval, pairs higher / lower / tied in whole test samples, the exact "
             f"two-sided sign-flip permutation p-value, and that p Holm-adjusted over the comparisons of the "
             f"setting's table (a comparison with the very differences of another, pair by pair, is that one "
             f"hypothesis again: left out of the family, it takes that one's adjusted p); decision (README, fixed "
             f"before the runs): *held* where the adjusted p < {ALPHA} and the mean > 0, *against* where < {ALPHA} "
             f"and < 0, else *undecided*. The paper's claim (Sec. 4.3, Figure 1) holds on a setting when "
             f"{', '.join(CLAIM_COMPARISONS)} are all held, goes against it when any is against, and is undecided "
             f"otherwise. The grid took {info['seconds'] / 60:.1f} min with {info['jobs']} processes on this "
             f"machine.", ""]
    for setting in SETTINGS:
        if not any(key[0] == setting for key in cells):
            continue
        summaries = table2_comparisons(cells, setting)
        chosen = tuning["chosen"].get(setting, {}) if tuning else {}
        lines += [f"### {setting}: views {' + '.join(SETTINGS[setting]['views'].split(','))}", "",
                  "Knobs chosen on validation: " + ", ".join(f"{m} {k.replace('_', '-')} {v}" for m, knob in
                                                              chosen.items() for k, v in knob.items()) + ".", ""]
        lines += comparison_table(cells, setting) + [""]
        idle = [key[2] for key in compared_cells(cells, setting)
                if key[2] != "baseline" and never_acted(cells[key], records)]
        if idle:
            lines += [f"Never acted (every pair's checkpoint equal to its baseline's, OUTCOME_FIELDS): "
                      f"{', '.join(idle)}.", ""]
        rows = [[name, f"{100 * s['mean']:+.2f}", f"[{100 * s['low']:+.2f}, {100 * s['high']:+.2f}]",
                 f"{s['higher']} / {s['lower']} / {s['tied']} of {s['n']}", f"{s['p']:.4f}",
                 f"{s['p_holm']:.4f}" + (f" (= {s['duplicate_of']})" if "duplicate_of" in s else ""), s["decision"]]
                for name, s in summaries.items()]
        duplicates = [f"{name} (= {s['duplicate_of']})" for name, s in summaries.items() if "duplicate_of" in s]
        family = next(iter(summaries.values()))["family"] if summaries else 0
        lines += ["Figure 1 analogue and the paired tests (gain: test accuracy minus the same fusion's baseline; "
                  f"greedy runs on mmtm, against the mmtm baseline); Holm over {family} comparisons"
                  + (f", left out as duplicates: {', '.join(duplicates)}" if duplicates else "") + ":", ""]
        lines += table(["comparison", "mean (points)", "95 % CI", "higher / lower / tied", "p", "p (Holm)",
                        "decision"], rows) + [""]
        lines += [f"**The paper's claim on this setting: {claim_verdict(summaries)}.**", ""]
        if has_weak_view(SETTINGS[setting]):
            lines += weak_view_lines(cells, setting, training) + [""]
    if tuning:
        lines += tuning_lines(tuning)
    return lines


def tuning_lines(tuning):
    """The tuning as Markdown lines: per setting and method each candidate's mean correct validation samples, the
    choice and its margin over the runner-up in validation samples; with the second edition's choices (ties to the
    default) the default and the candidates under which the method never acted too."""
    knobs = {method: (knob, candidates) for method, (knob, candidates) in tuning["spec"]["knobs"].items()}
    second = "choices" in tuning
    pairs = tuning["spec"]["pairs"]
    lines = ["### Tuning", "", f"Each method's main knob, every candidate run on the same {len(pairs)} (seed, split "
             f"seed) pairs {', '.join(map(str, map(tuple, pairs)))} (none of the grid's); chosen by the mean "
             f"validation accuracy in whole samples (ties: "
             + ("the method's default in train.py, which follows the official code, else the candidate nearest it"
                if second else "the first listed") + "). *margin*: the chosen candidate's mean minus the runner-up's, "
             f"in validation samples (of {round(1 / VAL_UNIT)}; 0: a tie)"
             + ("; *never acts*: candidates under which every tuning pair's checkpoint equals its baseline's"
                if second else "") + ":", ""]
    rows = []
    for setting, chosen in tuning["chosen"].items():
        for method, (knob, candidates) in knobs.items():
            if second:
                choice = tuning["choices"][setting][method]
                ranked, default = choice["samples"], choice["default"]
            else:
                ranked, default = ranked_candidates(tuning["runs"], setting, method, knob, candidates), None
            means = dict((v, m) for v, m in ranked)
            value = chosen[method][knob]
            row = [setting, method, knob.replace("_", "-"),
                   ", ".join(f"{v}: {means[v]:.1f}" for v in candidates), value,
                   f"{ranked[0][1] - ranked[1][1]:.1f}" if len(ranked) > 1 else "-"]
            if second:
                idle = choice["never_acts"]
                row += [default, ", ".join(map(str, idle)) or "-"]
                if value in idle:
                    row[4] = f"{value} (never acts)"
            rows.append(row)
    header = ["setting", "method", "knob", "candidates (mean correct val samples)", "chosen", "margin"]
    return lines + table(header + (["default", "never acts"] if second else []), rows) + [""]


def weak_view_lines(cells, setting, training):
    """What shows that the weak-view setting is what it claims (weak_view_measures, mean over the pairs)."""
    lines = []
    base = cells.get((setting, "concat", "baseline"), [])
    sample = cells.get((setting, "concat", "sample"), [])
    if not base:
        return lines
    modalities = base[0]["modalities"]
    rows = [[f"{m} alone", percent([r["test_acc_per_modality"][i] for r in base]),
             percent([r["alone_strong"][i] for r in base]), percent([r["alone_weak"][i] for r in base])]
            for i, m in enumerate(modalities)]
    lines += ["What the benchmark is, measured: the baseline's accuracy of each view alone on all test samples "
              "(dataset-level balance), on those where it is the strong view and on those where it is the known weak "
              "view (per-sample imbalance; the weak view keeps signal: chance is 10 %):", ""]
    lines += table(["view", "all test samples", "where strong", "where weak"], rows) + [""]
    columns = epoch_columns(training["epochs"], training["warmup"])
    rows = []
    for mode, runs in (("baseline", base), ("sample", sample)):
        for label, key in (("share of samples with a phi below 1", "below_one"),
                           ("share of Eq. 10's copies on the weak view", "weak_copy_share")):
            values = [[r[key][e] for r in runs if r[key][e] is not None] for e in columns]
            rows.append([mode, label] + [f"{100 * np.mean(v):.1f}" if v else "-" for v in values])
    lines += ["Per epoch, over the training set valued before it (mean over the pairs, %): the samples Eq. 10 would "
              "copy, and how many of its copies keep the sample's known weak view (50 % is chance):", ""]
    lines += table(["model", "measure"] + [f"epoch {e}" for e in columns], rows)
    return lines


# ----------------------------------------------------------------------------------------------
# Table 2, second edition: benchmarks with room, their construction fixed from baseline-only pilot runs


PILOT_PAIRS = tuple((200 + k, 1200 + k) for k in range(12))  # (seed, split seed): none of any study's pairs
PILOT_SEEDS = tuple(range(220, 229))  # more seeds on the first pair's split: the run-to-run spread within one split
SETTING_KEYS = ("views", "weak_signal", "strong_signal", "test_fraction")
# the constructions piloted (baseline, concat): the two benchmarks on PILOT_PAIRS, the sample-level one with
# PILOT_SEEDS too, and the regime map's other strengths on the first four pairs
PILOT_CANDIDATES = {
    **{name: dict({k: SETTINGS[name][k] for k in SETTING_KEYS}, pairs=PILOT_PAIRS, seeds=seeds)
       for name, seeds in (("sample-level-2", PILOT_SEEDS), ("dataset-level-2", ()))},
    **{f"sample-level-2 weak {w}": dict({k: SETTINGS["sample-level-2"][k] for k in SETTING_KEYS}, weak_signal=w,
                                        pairs=PILOT_PAIRS[:4])
       for w in REGIME_WEAK_SIGNALS if w != SETTINGS["sample-level-2"]["weak_signal"]},
}


def pilot_task(task):
    """One baseline run of a pilot (two views): (name, spec, seed, split seed, training, runs_dir) -> its measures on
    test: joint accuracy, each view alone over the set, where weak and where strong, each sample's strong view
    alone (stronger_alone), either view alone right, and the training time."""
    name, spec, seed, split_seed, training, runs_dir = task
    torch.set_num_threads(1)
    out = os.path.join(runs_dir, "pilot", f"{name}-s{seed}-split{split_seed}")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    results = train_quietly(os.path.join(out, "stdout.txt"), views=spec["views"].split(","), mode="baseline",
                            fusion="concat", mfeat_weak_signal=spec["weak_signal"],
                            mfeat_strong_signal=spec.get("strong_signal", 1.0),
                            mfeat_test_fraction=spec.get("test_fraction", data.MFEAT_FRACTIONS[2]),
                            split_seed=split_seed, seed=seed, track_phi=False, out=out, **training)
    seconds = time.perf_counter() - start
    result, test_set = train.evaluate_checkpoint(os.path.join(out, "best.pt"))
    correct = result["correct"].numpy()  # [N, 4]: coalitions {}, {view 0}, {view 1}, both (shapley_mm.coalitions)
    weak = test_set.degraded_view[result["index"]].numpy()  # [N]
    alone = alone_accuracy_by_weak_view(correct, weak)
    return dict(name=name, seed=seed, split_seed=split_seed, val_acc=results["val_acc"],
                best_epoch=results["best_epoch"], joint=float(correct[:, 3].mean()),
                alone=correct[:, [1, 2]].mean(0).tolist(),
                alone_weak=alone[:, 0].tolist(), alone_strong=alone[:, 1].tolist(),
                stronger_alone=stronger_alone(correct, weak),
                either_alone=float(np.maximum(correct[:, 1], correct[:, 2]).mean()), seconds=seconds)


def pilot_rows(runs, candidates):
    """The criteria table of the pilots: per construction, means over its pairs (in %) and the spreads."""
    rows = []
    for name, spec in candidates.items():
        pairs = {tuple(pair) for pair in spec["pairs"]}
        found = [r for r in runs if r["name"] == name and (r["seed"], r["split_seed"]) in pairs]
        within = [r["joint"] for r in runs if r["name"] == name and r["split_seed"] == spec["pairs"][0][1]]
        mean = lambda key: 100 * np.mean([r[key] for r in found], axis=0)
        alone, weak, strong = mean("alone"), mean("alone_weak"), mean("alone_strong")
        joint = 100 * np.array([r["joint"] for r in found])
        rows.append(dict(name=name, views=spec["views"], weak_signal=spec["weak_signal"],
                         strong_signal=spec.get("strong_signal", 1.0), pairs=len(found), alone=alone.tolist(),
                         alone_gap=float(abs(alone[0] - alone[1])), alone_weak=weak.tolist(),
                         alone_strong=strong.tolist(),
                         stronger_alone=float(mean("stronger_alone")), either_alone=float(mean("either_alone")),
                         joint=float(joint.mean()), joint_sd_pairs=float(joint.std(ddof=1)) if len(joint) > 1 else None,
                         joint_sd_seeds=float(100 * np.std(within, ddof=1)) if len(within) > 1 else None,
                         seeds_on_one_split=len(within), margin=float(joint.mean() - mean("stronger_alone")),
                         seconds=float(np.mean([r["seconds"] for r in found]))))
    return rows


def pilot_lines(rows):
    """The criteria table as text lines."""
    header = ["construction", "pairs", "view alone (all)", "gap", "alone where weak", "alone where strong",
              "stronger alone", "joint", "margin", "SD pairs", "SD seeds (n)", "s / run"]
    fmt = lambda values: " / ".join(f"{v:.1f}" for v in values)
    body = [[r["name"], r["pairs"], fmt(r["alone"]), f"{r['alone_gap']:.1f}", fmt(r["alone_weak"]),
             fmt(r["alone_strong"]), f"{r['stronger_alone']:.1f}", f"{r['joint']:.1f}", f"{r['margin']:+.1f}",
             "-" if r["joint_sd_pairs"] is None else f"{r['joint_sd_pairs']:.2f}",
             "-" if r["joint_sd_seeds"] is None else f"{r['joint_sd_seeds']:.2f} ({r['seeds_on_one_split']})",
             f"{r['seconds']:.1f}"] for r in rows]
    return table(header, body)


def pilot(out, runs_dir, jobs=1, candidates=None, training=TABLE2_TRAINING):
    """Baseline-only pilot runs (concat) of the candidate constructions, each on its (seed, split seed) pairs plus,
    where it has "seeds", those seeds on its first pair's split: writes out/pilot.json (every run's measures and the
    criteria table) and prints the table. No other mode runs here: the constructions are fixed before any method
    sees them."""
    candidates = PILOT_CANDIDATES if candidates is None else candidates
    torch.set_num_threads(1)
    train.check_writable(out)
    train.check_writable(runs_dir, "--runs-dir")
    tasks = [(name, spec, seed, split_seed, training, runs_dir) for name, spec in candidates.items()
             for seed, split_seed in list(map(tuple, spec["pairs"]))
             + [(seed, spec["pairs"][0][1]) for seed in spec.get("seeds", ())]]
    start, runs = time.perf_counter(), []
    with multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        for k, run in enumerate(pool.imap(pilot_task, tasks) if pool is not None else map(pilot_task, tasks), 1):
            runs.append(run)
            print(f"[{k}/{len(tasks)}] {run['name']} seed {run['seed']} split {run['split_seed']}: joint "
                  f"{100 * run['joint']:.2f}, stronger alone {100 * run['stronger_alone']:.2f} "
                  f"({time.perf_counter() - start:.0f}s in all)", flush=True)
    rows = pilot_rows(runs, candidates)
    os.makedirs(out, exist_ok=True)
    train.save_json(os.path.join(out, "pilot.json"), dict(training=training, candidates=candidates, rows=rows,
                                                          runs=runs, seconds=time.perf_counter() - start, jobs=jobs))
    print("\n".join(pilot_lines(rows)))
    return rows


# ----------------------------------------------------------------------------------------------
# the Markdown report


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def results_table(cells, setting):
    keys = ordered_cells(cells, setting)
    modalities = cells[keys[0]][0]["modalities"]
    header = (["fusion", "method", "seeds", "test acc", "test mAP"] + [f"{m} alone" for m in modalities]
              + [f"phi {m} (std)" for m in modalities] + ["trained samples"])
    rows = []
    for key in keys:
        runs = cells[key]
        phi_mean, _ = mean_std([r["test_mean_phi"] for r in runs])
        phi_spread, _ = mean_std([r["test_std_phi"] for r in runs])
        base = {r["seed"]: r["train_samples"] for r in cells.get((setting, key[1], "baseline"), [])}
        ratio = [r["train_samples"] / base[r["seed"]] for r in runs if r["seed"] in base]
        rows.append([key[1], key[2], len(runs), percent([r["test_acc"] for r in runs]),
                     percent([r["test_map"] for r in runs])]
                    + [percent([r["test_acc_per_modality"][i] for r in runs]) for i in range(len(modalities))]
                    + [f"{phi_mean[i]:.3f} ({phi_spread[i]:.3f})" for i in range(len(modalities))]
                    + [f"{np.mean(ratio):.2f}x" if ratio else "-"])
    return table(header, rows)


def contribution_table(cells, setting, training):
    """Figures 3 and 6: mean contribution of each modality over the training set per epoch (its spread across
    samples in brackets), concat runs, mean over seeds."""
    keys = [key for key in ordered_cells(cells, setting) if on_main_table(key)]
    modalities = cells[keys[0]][0]["modalities"]
    num_epochs = min(len(r["train_mean_phi"]) for key in keys for r in cells[key])
    columns = epoch_columns(num_epochs, training["warmup"])
    rows = []
    for key in keys:
        runs = cells[key]
        mean_phi, _ = mean_std([r["train_mean_phi"][:num_epochs] for r in runs])  # [E, n]
        std_phi, _ = mean_std([r["train_std_phi"][:num_epochs] for r in runs])
        for i, m in enumerate(modalities):
            rows.append([key[2], m] + [f"{mean_phi[e, i]:.2f} ({std_phi[e, i]:.2f})" for e in columns])
    return table(["method", "modality"] + [f"epoch {e}" for e in columns], rows)


def examples_table(example):
    modalities = example["modalities"]
    rows = []
    for sample in example["samples"]:
        degraded = (f"{sample['degraded_view']} at {sample['degrade_strength']:.2f}"
                    if "degraded_view" in sample else "-")
        for model in ("baseline", "sample"):
            phi = sample[model]["phi"]
            rows.append([sample["name"], sample["id"], degraded, model]
                        + [f"{p:+.1f}" for p in phi] + [sample[model]["prediction"]])
    return table(["sample", "id", "degraded view", "model"] + [f"phi {m}" for m in modalities] + ["prediction"], rows)


def confidence_table(example):
    """Figure 4 analogue: phi beside OGM-GE's per-sample confidence of the two samples."""
    modalities = example["modalities"]
    rows = []
    for sample in example["samples"]:
        for model, found in sample.get("confidence", {}).items():
            score = found["ogm_score"]
            rows.append([sample["name"], model] + [f"{p:+.1f}" for p in found["phi"]] + [f"{s:.3f}" for s in score]
                        + [f"{score[0] / max(score[1], 1e-12):.2f}", found["prediction"]])
    return table(["sample", "model"] + [f"phi {m}" for m in modalities] + [f"OGM-GE score {m}" for m in modalities]
                 + [f"score ratio {modalities[0]}/{modalities[1]}", "prediction"], rows)


def compared_cells(cells, setting):
    """The Table 2 rows: the paper's method and the methods it is compared with, each on its main fusion."""
    return [key for key in ordered_cells(cells, setting) if on_main_table(key) and key[2] not in ("naive", "reversed")]


def weak_view(cells, setting):
    """The index of the view with the lower accuracy alone under the concat baseline (mean over seeds)."""
    runs = cells.get((setting, "concat", "baseline"), [])
    return int(np.argmin(np.mean([r["test_acc_per_modality"] for r in runs], axis=0))) if runs else 1


def comparison_table(cells, setting):
    """Table 2 analogue: accuracy, mAP, the weak view alone and trained samples relative to the same fusion's
    baseline (no wall time: it depends on the machine's load, and these tables are reproduced exactly)."""
    keys = compared_cells(cells, setting)
    weak = weak_view(cells, setting)
    modalities = cells[keys[0]][0]["modalities"]
    rows = []
    for key in keys:
        runs = cells[key]
        base = {r["seed"]: r for r in cells.get(baseline_of(key), [])}
        samples = [r["train_samples"] / base[r["seed"]]["train_samples"] for r in runs if r["seed"] in base]
        rows.append([key[2], key[1], len(runs), percent([r["test_acc"] for r in runs]),
                     percent([r["test_map"] for r in runs]),
                     percent([r["test_acc_per_modality"][weak] for r in runs]),
                     f"{np.mean(samples):.2f}x" if samples else "-"])
    return table(["method", "fusion", "pairs", "test acc", "test mAP", f"{modalities[weak]} (weak) alone",
                  "trained samples"], rows)


def gains(cells, setting):
    """Figure 1 analogue: {method: per-seed test accuracy minus the same fusion's baseline, in points}."""
    found = {}
    for key in compared_cells(cells, setting):
        if key[2] != "baseline":
            diffs = paired(cells, setting, key[1], key[2], "baseline", lambda r: r["test_acc"])
            if len(diffs):
                found[key[2]] = 100 * diffs
    return found


def claims(cells, setting):
    """The paper's claims, checked on these runs (paired by seed; concat unless named)."""
    lines = []
    acc = lambda r: r["test_acc"]
    for mode, claim in (("sample", "sample-level > baseline (Tables 1, 2)"),
                        ("modality", "modality-level > baseline (Tables 1, 2)"),
                        ("naive", "naive re-sample > baseline (Table 4)")):
        diffs = paired(cells, setting, "concat", mode, "baseline", acc)
        if len(diffs):
            lines.append(f"- {claim}: test acc {describe_difference(diffs)}")
    for a, b, claim in (("sample", "naive", "sample-level > naive re-sample (Table 4)"),
                        ("baseline", "reversed", "reversed re-sample < baseline (Table 4)")):
        diffs = paired(cells, setting, "concat", a, b, acc)
        if len(diffs):
            lines.append(f"- {claim}: {a} - {b}, test acc {describe_difference(diffs)}")
    modalities = cells[ordered_cells(cells, setting)[0]][0]["modalities"]
    for mode in ("sample", "modality"):
        for i, m in enumerate(modalities):
            diffs = paired(cells, setting, "concat", mode, "baseline", lambda r: r["test_acc_per_modality"][i])
            if len(diffs):
                lines.append(f"- {m} alone more accurate with {mode} (Remark 2): {mode} - baseline "
                             f"{describe_difference(diffs)}")
    gap = lambda r: abs(r["test_mean_phi"][0] - r["test_mean_phi"][1])
    spread = lambda r: float(np.mean(r["test_std_phi"]))
    for mode in ("sample", "modality", "naive", "reversed"):
        diffs = paired(cells, setting, "concat", mode, "baseline", gap)
        if len(diffs):
            lines.append(f"- contributions more balanced with {mode} (Figures 3, 6): |phi_1 - phi_2| on test, "
                         f"{mode} - baseline {describe_difference(diffs, unit='', scale=1.0)}")
    for mode in ("sample", "modality"):
        diffs = paired(cells, setting, "concat", mode, "baseline", spread)
        if len(diffs):
            lines.append(f"- per-sample spread of phi on test (std across samples), {mode} - baseline: "
                         f"{describe_difference(diffs, unit='', scale=1.0)}")
    for key in ("train_samples", "valued_samples"):
        diffs = paired(cells, setting, "concat", "modality", "sample", lambda r: float(r[key]))
        if len(diffs):
            lines.append(f"- modality-level cheaper than sample-level (Sec. 3.4.2): {key.replace('_', ' ')}, "
                         f"modality - sample {describe_difference(diffs, unit='', scale=1.0)}")
    for fusion in models.FUSIONS:
        diffs = paired(cells, setting, fusion, "sample", "baseline", acc)
        if fusion != "concat" and len(diffs):
            lines.append(f"- {fusion}: sample-level > baseline (Table 3): test acc {describe_difference(diffs)}")
    return lines


def cost_table(cells, setting):
    rows = []
    for key in ordered_cells(cells, setting):
        runs = cells[key]
        base = {r["seed"]: r for r in cells.get((setting, key[1], "baseline"), [])}
        time_ratio = [r["method_seconds"] / base[r["seed"]]["method_seconds"] for r in runs if r["seed"] in base]
        rows.append([key[1], key[2], f"{np.mean([r['train_samples'] for r in runs]):.0f}",
                     f"{np.mean([r['valued_samples'] for r in runs]):.0f}",
                     f"{np.mean([r['method_seconds'] for r in runs]):.1f}",
                     f"{np.mean([r['valuation_seconds'] for r in runs]):.1f}",
                     f"{np.mean(time_ratio):.2f}x" if time_ratio else "-"])
    return table(["fusion", "method", "trained samples", "valued samples", "time (s)", "of which valuation (s)",
                  "time x baseline"], rows)


def online_section(records, setting):
    """Online against offline valuation (concat, ONLINE_MODES, paired by seed), the baseline for reference: a table
    and the differences. The weak view is the one the baseline (else any run) predicts worse alone."""
    cells = group(records)  # offline; the online cells join them as mode "<mode> online"
    cells.update({(s, f, f"{m} online"): runs for (s, f, m), runs in group(records, "online").items()})
    reference = cells.get((setting, "concat", "baseline")) or [r for r in records if r["setting"] == setting]
    modalities = reference[0]["modalities"]
    weak = int(np.argmin(np.mean([r["test_acc_per_modality"] for r in reference], axis=0)))
    acc = lambda r: r["test_acc"]
    weak_alone = lambda r: r["test_acc_per_modality"][weak]
    gap = lambda r: abs(r["test_mean_phi"][0] - r["test_mean_phi"][1])
    base = {r["seed"]: r for r in cells.get((setting, "concat", "baseline"), [])}
    rows = []
    for mode in ("baseline",) + tuple(f"{m}{v}" for m in ONLINE_MODES for v in ("", " online")):
        runs = cells.get((setting, "concat", mode), [])
        if not runs:
            continue
        ratios = {key: [r[key] / base[r["seed"]][key] for r in runs if r["seed"] in base]
                  for key in ("train_samples", "method_seconds")}
        valuation = "-" if mode == "baseline" else "online" if mode.endswith(" online") else "offline"
        rows.append([mode.split()[0], valuation, len(runs),
                     percent([acc(r) for r in runs]), percent([weak_alone(r) for r in runs]),
                     f"{np.mean([gap(r) for r in runs]):.3f}"]
                    + [f"{np.mean(ratio):.2f}x" if ratio else "-" for ratio in ratios.values()]
                    + [f"{np.mean([r['method_seconds'] for r in runs]):.1f}"])
    measures = (("test acc", acc, " points", 100.0), (f"{modalities[weak]} alone", weak_alone, " points", 100.0),
                ("phi gap", gap, "", 1.0), ("time", lambda r: r["method_seconds"], " s", 1.0))
    lines = []
    for mode in ONLINE_MODES:
        for other, name in ((mode, f"{mode} offline"), ("baseline", "baseline")):
            parts = []
            for label, key, unit, scale in measures:
                diffs = paired(cells, setting, "concat", f"{mode} online", other, key)
                if len(diffs):
                    parts.append(f"{label} {describe_difference(diffs, unit, scale)}")
            if parts:
                lines.append(f"- {mode} online - {name}: " + "; ".join(parts))
    header = ["method", "valuation", "seeds", "test acc", f"{modalities[weak]} alone (weak)", "phi gap", "trained",
              "time x baseline", "time (s)"]
    return table(header, rows) + [""] + lines


def write_markdown(path, records, examples, training, figures, features=None, table2_info=None, tuning=None):
    cells = group(records)
    seeds = sorted({r["seed"] for runs in cells.values() for r in runs})
    lines = ["# Sample-level modality valuation on UCI Multiple Features (CPU reproduction)", "",
             f"Written by `python reproduce.py` (reproduce.py explains the settings and the validation sweep that "
             f"chose them). Training: {training['epochs']} epochs, warm-up {training['warmup']}, SGD lr "
             f"{training['lr']}, batch {training['batch_size']}; seeds {', '.join(map(str, seeds))}. Test split, "
             f"checkpoint chosen on validation; mean ± std over seeds (accuracies in %). *alone*: accuracy of each "
             f"modality alone in the joint model (the other one masked). *phi*: mean contribution (Eq. 3) over the "
             f"test samples, its std across samples in brackets. *trained samples*: per epoch summed, relative to "
             f"the same fusion's baseline. Every number here except the wall times of the cost section is "
             f"reproduced exactly by a second run with the same seeds on the same machine.", ""]
    for setting in SETTINGS:
        if not any(key[0] == setting for key in cells):
            continue
        spec = SETTINGS[setting]
        lines += [f"## {setting}: views {' + '.join(spec['views'].split(','))}"
                  + (f", degradation {spec['degrade']}" if spec["degrade"] else ""), "", spec["about"] + ".", ""]
        lines += results_table(cells, setting) + [""]
        if any(key[:2] == (setting, "concat") for key in cells):
            lines += ["Contributions over the training set per epoch (Figures 3 and 6; valued before the epoch's "
                      "training; concat; mean over seeds, std across samples in brackets):", ""]
            lines += contribution_table(cells, setting, training) + [""]
        if setting in examples:
            example = examples[setting]
            lines += [f"Figure 4: two test samples of class {example['label']} valued by the baseline and by the "
                      f"sample-level model (concat, seed {example['seed']}); chosen on the baseline's valuation "
                      f"alone, as the samples of one class that lean most on each modality:", ""]
            lines += examples_table(example) + [""]
            if any("confidence" in sample for sample in example["samples"]):
                lines += ["Figure 4 analogue: the same two samples, phi beside OGM-GE's per-sample confidence (the "
                          "true-class softmax of each view's response; OGM-GE sums it over a batch and compares the "
                          "sums as a ratio):", ""]
                lines += confidence_table(example) + [""]
        if features is not None and features["setting"] == setting:
            lines += feature_lines(features) + [""]
        lines += ["The paper's claims on these runs (paired by seed, concat unless named):", ""]
        lines += claims(cells, setting) + [""]
    if table2_info is not None:
        lines += table2_lines(records, table2_info, tuning)
    online = [setting for setting in SETTINGS if any(key[0] == setting for key in group(records, "online"))]
    if online:
        lines += ["## Online valuation", "", "Concatenation fusion; `sample` and `modality` valued offline (the "
                  "paper: before each epoch, in eval mode, with evaluation transforms; `modality` on a subset Z) and "
                  "online (train.py --valuation online: from the training steps of the previous epoch, every sample "
                  "seen), the baseline for reference. *weak*: the view the baseline predicts worse alone; *phi gap*: "
                  "|phi_1 - phi_2| of the mean contributions on test; *trained*: samples trained on, relative to the "
                  "baseline; *time*: as in the cost section. Differences "
                  "paired by seed:", ""]
        for setting in online:
            lines += [f"### {setting}", ""] + online_section(records, setting) + [""]
    lines += ["## Cost", "", "Trained samples and valued samples summed over the epochs (valuation done only to log "
              "contributions, --track-phi, is left out); time: the epochs' wall time on this machine without that "
              "logging valuation, mean over seeds. Wall times vary with the machine's load; nothing else depends "
              "on them.", ""]
    for setting in SETTINGS:
        if any(key[0] == setting for key in cells):
            lines += [f"### {setting}", ""] + cost_table(cells, setting) + [""]
    total = sum(r["wall_seconds"] for r in records)
    lines += [f"Total wall time of the {len(records)} runs: {total / 60:.1f} min."]
    if figures:
        lines += ["", "Figures: " + ", ".join(f"[{name}]({name})" for name in figures)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# figures (optional: matplotlib)


def write_figures(out, records, examples, training):
    """Contributions per epoch (Figures 3, 6) and the Figure 4 examples as PNGs; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib to draw them)")
        return []
    cells = group(records)
    names = []
    for setting in SETTINGS:
        keys = [key for key in ordered_cells(cells, setting) if on_main_table(key)] if any(
            key[0] == setting for key in cells) else []
        if keys:
            modalities = cells[keys[0]][0]["modalities"]
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for k, key in enumerate(keys):
                mean_phi, _ = mean_std([r["train_mean_phi"] for r in cells[key]])  # [E, n]
                std_phi, _ = mean_std([r["train_std_phi"] for r in cells[key]])
                for i, m in enumerate(modalities):
                    style = dict(color=f"C{k}", linestyle="-" if i == 0 else "--", label=f"{key[2]}: {m}")
                    axes[0].plot(mean_phi[:, i], **style)
                    axes[1].plot(std_phi[:, i], **style)
            for ax in axes:
                ax.axvline(training["warmup"], color="grey", linewidth=0.5)  # the first re-sampled epoch
            axes[0].set(title=f"{setting}: mean contribution (train set)", xlabel="epoch", ylabel="mean phi")
            axes[1].set(title="spread across samples", xlabel="epoch", ylabel="std of phi")
            axes[0].legend(fontsize=7, ncol=2)
            fig.tight_layout()
            names.append(f"contributions_{setting}.png")
            fig.savefig(os.path.join(out, names[-1]), dpi=120)
            plt.close(fig)
        if setting in examples:
            example = examples[setting]
            fig, axes = plt.subplots(1, len(example["samples"]), figsize=(8, 3.5), sharey=True)
            for ax, sample in zip(np.atleast_1d(axes), example["samples"]):
                positions = np.arange(len(example["modalities"]))
                for j, model in enumerate(("baseline", "sample")):
                    ax.bar(positions + 0.4 * j - 0.2, sample[model]["phi"], width=0.4, label=model)
                ax.set_xticks(positions, example["modalities"])
                ax.set_title(f"sample {sample['name']} ({sample['id']}, class {example['label']})", fontsize=9)
            np.atleast_1d(axes)[0].set_ylabel("phi")
            np.atleast_1d(axes)[0].legend(fontsize=8)
            fig.tight_layout()
            names.append(f"valuation_examples_{setting}.png")
            fig.savefig(os.path.join(out, names[-1]), dpi=120)
            plt.close(fig)
    return names + write_gains_figure(out, records, TABLE2_SETTINGS)


def write_gains_figure(out, records, settings):
    """gains.png, Figure 1 analogue: the study "table2"'s gain per method on each of `settings`, 95 % CI; [] without
    matplotlib or with too few gains."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    pairs = group(records, study="table2")
    found = {setting: gains(pairs, setting) for setting in settings if any(k[0] == setting for k in pairs)}
    if sum(len(g) for g in found.values()) <= 2:
        return []
    fig, axes = plt.subplots(1, len(found), figsize=(11, 3.8), sharey=True)
    for ax, (setting, per_method) in zip(np.atleast_1d(axes), found.items()):
        for k, (method, d) in enumerate(per_method.items()):
            summary = paired_summary(d / 100, test_unit(setting))
            ax.bar(k, np.mean(d), yerr=[[100 * (summary["mean"] - summary["low"])],
                                        [100 * (summary["high"] - summary["mean"])]], color=f"C{k}", alpha=0.6)
            ax.plot([k] * len(d), d, "k.", markersize=3)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xticks(range(len(per_method)), list(per_method), rotation=45, fontsize=8)
        ax.set_title(f"{setting}: test acc gain over baseline (95 % CI)", fontsize=9)
    np.atleast_1d(axes)[0].set_ylabel("points")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gains.png"), dpi=120)
    plt.close(fig)
    return ["gains.png"]


# ----------------------------------------------------------------------------------------------


def load_previous(path, training, overwrite=False):
    """The records, examples and Figure 5 numbers of an earlier run into the same --out, which the new runs join;
    none with `overwrite` (--overwrite). Results of other settings (a full run's, before a quick check) and a file
    that is not one reproduce.py wrote are refused in one line unless `overwrite`: replacing them loses runs."""
    if overwrite or not os.path.exists(path):
        return [], {}, None
    try:
        with open(path) as f:
            previous = json.load(f)
        records, examples = previous["records"], previous["examples"]
    except (ValueError, KeyError, TypeError) as error:  # a cut file, another file's JSON, not UTF-8
        raise train.TrainingError(f"{path} is not a results.json of reproduce.py ({error.__class__.__name__}: "
                                  f"{error}); move it away, or pass --overwrite to replace it")
    if previous.get("training") != training or any(SETTINGS.get(name) != spec  # settings added since: kept
                                                   for name, spec in previous.get("settings", {}).items()):
        differs = (f"training {previous.get('training')}, this run {training}" if previous.get("training") != training
                   else "the settings of reproduce.SETTINGS")
        raise train.TrainingError(f"{path} holds {len(records)} runs made with other settings ({differs}); pass "
                                  f"--overwrite to replace them, or choose another --out")
    return records, examples, previous.get("features")


def record_order(record):
    """The order of results.json: setting, fusion, valuation, mode, seed."""
    return (list(SETTINGS).index(record["setting"]), models.FUSIONS.index(record["fusion"]),
            VALUATIONS.index(record.get("valuation", "offline")), train.MODES.index(record["mode"]), record["seed"])


def save_results(path, training, records, examples, features):
    """results.json, written atomically (train.write_atomic): a full disk or a kill keeps the previous file whole."""
    results = dict(training=training, settings=SETTINGS, records=sorted(records, key=record_order),
                   examples=examples, features=features)
    try:
        train.write_atomic(path, lambda f: f.write(json.dumps(results).encode()))
    except OSError as error:
        raise train.TrainingError(f"{path}: cannot write it ({error.strerror or error}); the previous file is kept")


def run_key(record):
    """What identifies a run: its study, cell, valuation, seed and split seed (records from before online valuation:
    offline; from before split seeds: the fixed split)."""
    return (record.get("study", "grid"), record["setting"], record["fusion"], record["mode"],
            record.get("valuation", "offline"), record["seed"], record.get("split_seed", data.MFEAT_SPLIT_SEED))


def reproduce(settings, modes, fusions, seeds, out, runs_dir, training, valuations=VALUATIONS, overwrite=False):
    """Check the outputs, the earlier results in `out` and every run of the grid, then train the runs one by one,
    results.json saved after each, then the tables and figures."""
    torch.set_num_threads(1)  # the runs are tiny, and the thread count changes the floating-point sums
    train.check_writable(out)
    train.check_writable(runs_dir, "--runs-dir")
    json_path = os.path.join(out, "results.json")
    records, examples, features = load_previous(json_path, training, overwrite)
    cells = [(cell, valuation, seed)
             for valuation, valuation_cells in (("offline", grid(settings, modes, fusions)),
                                                ("online", online_grid(settings, modes)))
             if valuation in valuations for cell in valuation_cells for seed in seeds]
    check_grid(cells, training, runs_dir)
    os.makedirs(out, exist_ok=True)
    print(f"{len(cells)} runs into {runs_dir}, results into {out}")
    start = time.perf_counter()
    for k, ((setting, fusion, mode), valuation, seed) in enumerate(cells, start=1):
        try:
            record = run_cell(setting, fusion, mode, seed, training, runs_dir, valuation)
        except (KeyboardInterrupt, train.TrainingError) as error:  # train.train says Ctrl-C as code 130
            if isinstance(error, train.TrainingError) and error.code != 130:
                raise
            raise train.TrainingError(f"interrupted in run {k} of {len(cells)} "
                                      f"({describe_run(setting, fusion, mode, valuation, seed)}): {json_path} keeps "
                                      f"the runs finished before it", code=130)
        records = [r for r in records if run_key(r) != run_key(record)] + [record]
        save_results(json_path, training, records, examples, features)
        print(f"[{k}/{len(cells)}] {describe_run(setting, fusion, mode, valuation, seed)}: "
              f"test acc {100 * record['test_acc']:.2f} mAP {100 * record['test_map']:.2f} "
              f"({record['wall_seconds']:.1f}s, {time.perf_counter() - start:.0f}s in all)", flush=True)
    records.sort(key=record_order)
    cells = group(records)
    for setting in settings:
        example = pick_examples(setting, cells)
        if example is not None:
            examples[setting] = example
    features = feature_study(cells)
    save_results(json_path, training, records, examples, features)
    figures = write_figures(out, records, examples, training)
    if features is not None:
        figures += write_feature_figure(out, features)
    write_markdown(os.path.join(out, "results.md"), records, examples, training, figures, features)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min: {json_path}, {os.path.join(out, 'results.md')}"
          + (", " + ", ".join(figures) if figures else ""))
    return records


def comma_list(allowed):
    """An argparse `type`: the comma-separated items of a flag, each one of `allowed` (argparse names the flag in
    its one-line refusal)."""
    def parse(text):
        items = [x for x in text.split(",") if x]
        unknown = [x for x in items if x not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or repr(text)}; expected some of "
                                             f"{', '.join(allowed)}")
        return items
    return parse


def main(argv=None):
    """The command line; a refusal, a file that cannot be read or written and Ctrl-C are one line on stderr (exit
    status 2; 130 for Ctrl-C), and leave results.json as it was after the last finished run."""
    parser = train.OneLineParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--settings", type=comma_list(tuple(SETTINGS)), default=",".join(FIRST_EDITION_SETTINGS),
                        help=f"from {', '.join(SETTINGS)}")
    parser.add_argument("--modes", type=comma_list(train.MODES), default=",".join(train.MODES),
                        help=f"from {', '.join(train.MODES)}; fusions other than concat run only "
                             f"{' and '.join(FUSION_MODES)}")
    parser.add_argument("--fusions", type=comma_list(models.FUSIONS), default=",".join(models.FUSIONS),
                        help=f"from {', '.join(models.FUSIONS)}")
    parser.add_argument("--valuations", type=comma_list(VALUATIONS), default=",".join(VALUATIONS),
                        help=f"from {', '.join(VALUATIONS)}; online runs concat with {' and '.join(ONLINE_MODES)}")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--out", default="results", help="where results.json, results.md and the figures go")
    parser.add_argument("--runs-dir", default=os.path.join("runs", "reproduce"), help="scratch folder of the runs")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results.json in --out instead of adding the runs to it (needed when it "
                             "holds runs of other settings)")
    parser.add_argument("--epochs", type=train.number(int, 1), default=TRAINING["epochs"],
                        help="total epochs (quick checks only)")
    parser.add_argument("--warmup", type=train.number(int, 0), default=TRAINING["warmup"],
                        help="warm-up epochs (quick checks only)")
    parser.add_argument("--table2", action="store_true",
                        help=f"instead of the grid: Table 2 and Figure 1 with power ({', '.join(TABLE2_MODES)} on "
                             f"{' and '.join(TABLE2_SETTINGS)}, each knob tuned on validation first, "
                             f"{len(TABLE2_PAIRS)} (seed, split) pairs, paired tests; see table2)")
    parser.add_argument("--table2-second", action="store_true",
                        help=f"instead of the grid: Table 2's second edition into <--out>/table2-second, runs into "
                             f"<--runs-dir>/table2-second (tuning on {len(TABLE2_SECOND_TUNING_PAIRS)} pairs, ties to "
                             f"each method's default; {' and '.join(TABLE2_SECOND_SETTINGS)}; the regime map at "
                             f"{len(TABLE2_SECOND_REGIME)} strengths; see table2_second)")
    parser.add_argument("--pilot", action="store_true",
                        help="instead of the grid: the baseline-only pilot runs that fixed the second edition's "
                             "benchmarks (PILOT_CANDIDATES); writes pilot.json into --out and prints the criteria")
    parser.add_argument("--replicate", action="store_true",
                        help="with --table2-second: its Table 2 again, same tuning and rule, on "
                             f"{len(TABLE2_SECOND_REPLICATION_PAIRS)} other pairs, into <--out>/table2-second-replication")
    parser.add_argument("--jobs", type=train.number(int, 1), default=1,
                        help="--table2, --table2-second, --pilot: runs at a time, one process each")
    args = parser.parse_args(argv)
    if args.table2 and args.table2_second:
        parser.error("argument --table2-second: not with --table2 (each edition is its own command)")
    if args.replicate and not args.table2_second:
        parser.error("argument --replicate: replicates --table2-second; add it")
    resumed = "the runs finished are in --runs-dir, and the same command resumes from them"
    if args.pilot:
        return one_line_errors(lambda: pilot(args.out, args.runs_dir, args.jobs), "no pilot.json was written")
    if args.table2:
        return one_line_errors(lambda: table2(args.out, args.runs_dir, args.jobs),
                               f"{resumed}; results.json is as it was")
    if args.table2_second and args.replicate:  # the tuning's runs are the edition's own, reused
        return one_line_errors(lambda: table2_second(
            os.path.join(args.out, "table2-second-replication"), os.path.join(args.runs_dir, "table2-second"),
            args.jobs, pairs=TABLE2_SECOND_REPLICATION_PAIRS, regime=(),
            command="python reproduce.py --table2-second --replicate"), resumed)
    if args.table2_second:
        return one_line_errors(lambda: table2_second(os.path.join(args.out, "table2-second"),
                                                     os.path.join(args.runs_dir, "table2-second"), args.jobs),
                               resumed)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"argument --seeds: expected integers separated by commas, got {args.seeds!r}")
    training = dict(TRAINING, epochs=args.epochs, warmup=args.warmup)
    return one_line_errors(lambda: reproduce(args.settings, args.modes, args.fusions, seeds, args.out, args.runs_dir,
                                             training, args.valuations, args.overwrite),
                           f"{os.path.join(args.out, 'results.json')} keeps the runs finished before")


def one_line_errors(work, kept):
    """work(); a refusal, a file that cannot be read or written and Ctrl-C become one line on stderr, exit status
    2 (130 for Ctrl-C, saying what is `kept`)."""
    try:
        return work()
    except (train.TrainingError, data.DataError) as error:
        print(f"error: {train.one_line(error)}", file=sys.stderr)
        raise SystemExit(getattr(error, "code", 2))
    except OSError as error:  # disk full, permissions
        print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"error: interrupted; {kept}", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
