"""The validation sweep behind reproduce.py's settings: which mfeat views, degradation and training settings.

    python sweep.py                     # about 10 minutes on 2 CPU cores; writes results/sweep.json, sweep.md

Both files are checked to be writable before the first run and saved after each stage, so a stop or a failure
keeps the stages that finished.

Validation split only, seeds 100-102 (never the reported seeds of reproduce.py). It trains each view alone, then
the strong + weak pairs (dataset-level imbalance) and the similar pairs with a per-sample degradation (sample-level
imbalance), then the training settings and the warm-up on the two chosen settings; sweep.md gives the tables and
the choices, which reproduce.SETTINGS and reproduce.TRAINING hold.
"""
import argparse
import json
import os

import numpy as np
import torch

import data
import engine
import reproduce
import train

SEEDS = (100, 101, 102)
SWEEP_STRONG, SWEEP_WEAK = ("fac", "pix", "kar"), ("fou", "zer", "mor")
SWEEP_SIMILAR = ("fou,zer", "fac,kar", "pix,kar")
SWEEP_DEGRADE = (0.3, 0.6, 1.0)
# (epochs, batch) pairs whose full grid fits in 20 minutes on 2 shared CPU cores (the cost grows with epochs / batch)
SWEEP_TRAINING = [dict(epochs=e, batch_size=b, lr=lr)
                  for e, b in ((20, 64), (20, 128), (30, 128)) for lr in (0.01, 0.03)]
SWEEP_WARMUP = (2, 5, 8)


def validation_summary(name, settings, runs_dir):
    """Mean over SEEDS of a run's validation accuracy, the accuracy of each modality alone and the contributions
    (mean, std across samples), all on the validation split, for its validation-chosen checkpoint. `settings`:
    train.py's flags (underscored)."""
    summary = dict(name=name, settings=settings, val_acc=[], alone=[], phi=[], phi_std=[])
    for seed in SEEDS:
        out = os.path.join(runs_dir, "sweep", f"{name}-s{seed}")
        os.makedirs(out, exist_ok=True)
        results = reproduce.train_quietly(os.path.join(out, "stdout.txt"), seed=seed, out=out, **settings)
        evaluation, _ = train.evaluate_checkpoint(os.path.join(out, "best.pt"), "val")
        summary["val_acc"].append(results["val_acc"])
        summary["alone"].append(engine.metrics(evaluation)["acc_per_modality"])
        summary["phi"].append(evaluation["phi"].mean(0).tolist())
        summary["phi_std"].append(evaluation["phi"].std(0, unbiased=False).tolist())
    for key in ("val_acc", "alone", "phi", "phi_std"):
        summary[key] = np.mean(summary[key], axis=0).tolist()
    print(f"  {name}: val acc {100 * summary['val_acc']:.2f}", flush=True)
    return summary


def sweep_row(summary, *extra):
    return ([summary["name"], f"{100 * summary['val_acc']:.2f}"] + [f"{100 * a:.1f}" for a in summary["alone"]]
            + [f"{p:.3f} ({s:.3f})" for p, s in zip(summary["phi"], summary["phi_std"])] + list(extra))


def save_sweep(out, lines, **found):
    """sweep.md (the tables so far) and sweep.json (`found` so far), each written atomically (train.write_atomic)."""
    train.write_atomic(os.path.join(out, "sweep.json"), lambda f: f.write(json.dumps(found, indent=1).encode()))
    train.write_atomic(os.path.join(out, "sweep.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))


def sweep(out, runs_dir):
    """Choose the views, the degradation and the training settings on the validation split (SEEDS):
      1. each view alone (train.py's mfeat defaults);
      2. dataset-level: strong + weak pairs, baseline; the pair with the largest gap of mean contributions wins.
         sample-level: similar views (alone within 2 points) with degradation S; among the settings whose mean
         contributions stay balanced (gap < 0.05), the one with the largest spread of phi across samples wins;
      3. training on both chosen settings: epochs x batch x lr by mean baseline val accuracy, then the warm-up by
         mean sample-level val accuracy (ties: the earlier candidate).
    Writes sweep.json and sweep.md into `out`, after each stage; prints the choices (copy them into
    reproduce.SETTINGS and reproduce.TRAINING)."""
    torch.set_num_threads(1)
    train.check_writable(out)
    train.check_writable(runs_dir, "--runs-dir")
    os.makedirs(out, exist_ok=True)
    base = dict(mode="baseline")
    lines = ["# Validation sweep behind reproduce.py's settings",
             "", f"Validation split only, mean over seeds {', '.join(map(str, SEEDS))}; *alone*: accuracy of "
             f"each modality alone in the joint model; *phi*: mean contribution on val (std across samples).", ""]

    print("1. each view alone")
    alone = {v: validation_summary(f"alone-{v}", dict(base, views=[v]), runs_dir) for v in data.MFEAT_VIEWS}
    lines += ["## 1. Each view alone (40 epochs, batch 64, lr 0.01)", ""]
    lines += reproduce.table(["view", "val acc"], [[v, f"{100 * s['val_acc']:.2f}"] for v, s in alone.items()]) + [""]
    save_sweep(out, lines, alone=alone)

    print("2. settings")
    pairs = [validation_summary(f"{a},{b}", dict(base, views=[a, b]), runs_dir)
             for a in SWEEP_STRONG for b in SWEEP_WEAK]
    gap = lambda s: s["phi"][0] - s["phi"][1]
    dataset_level = max(pairs, key=gap)
    lines += ["## 2a. Dataset-level imbalance: strong + weak view, baseline", ""]
    header = ["views", "val acc", "alone 1", "alone 2", "phi 1 (std)", "phi 2 (std)"]
    lines += reproduce.table(header + ["phi gap", "weak view: alone in joint - alone trained"],
                   [sweep_row(s, f"{gap(s):.3f}",
                              f"{100 * (s['alone'][1] - alone[s['name'].split(',')[1]]['val_acc']):+.1f}")
                    for s in pairs]) + ["", f"Chosen: {dataset_level['name']} (largest gap).", ""]
    degraded = []
    for views in SWEEP_SIMILAR:
        a, b = views.split(",")
        if abs(alone[a]["val_acc"] - alone[b]["val_acc"]) < 0.02:
            degraded += [validation_summary(f"{views}-S{s}", dict(base, views=[a, b], mfeat_degrade=s), runs_dir)
                         for s in SWEEP_DEGRADE]
    balanced = [s for s in degraded if abs(gap(s)) < 0.05]
    sample_level = max(balanced or degraded, key=lambda s: np.mean(s["phi_std"]))
    lines += ["## 2b. Sample-level imbalance: similar views, one degraded per sample, baseline", ""]
    lines += reproduce.table(header + ["phi gap"], [sweep_row(s, f"{gap(s):.3f}") for s in degraded])
    lines += ["", f"Chosen: {sample_level['name']} (balanced means, largest spread across samples).", ""]
    save_sweep(out, lines, alone=alone, pairs=pairs, degraded=degraded)

    print("3. training")
    similar_views, degrade = sample_level["name"].split("-S")
    settings = [dict(views=dataset_level["name"].split(",")),
                dict(views=similar_views.split(","), mfeat_degrade=float(degrade))]

    rows, scores = [], []
    for t in SWEEP_TRAINING:
        name = f"e{t['epochs']}-b{t['batch_size']}-lr{t['lr']}"
        runs = [validation_summary(f"{name}-{k}", dict(base, **setting, **t), runs_dir)
                for k, setting in enumerate(settings)]
        scores.append(np.mean([s["val_acc"] for s in runs]))
        rows.append([t["epochs"], t["batch_size"], t["lr"]] + [f"{100 * s['val_acc']:.2f}" for s in runs]
                    + [f"{100 * scores[-1]:.2f}"])
    chosen = SWEEP_TRAINING[int(np.argmax(scores))]
    lines += ["## 3a. Training, baseline", ""]
    lines += reproduce.table(["epochs", "batch", "lr", "dataset-level", "sample-level", "mean"], rows)
    lines += ["", f"Chosen: {chosen}.", ""]
    save_sweep(out, lines, alone=alone, pairs=pairs, degraded=degraded)
    rows, scores = [], []
    for warmup in SWEEP_WARMUP:
        runs = [validation_summary(f"warmup{warmup}-{k}", dict(setting, mode="sample", warmup=warmup, **chosen),
                                   runs_dir) for k, setting in enumerate(settings)]
        scores.append(np.mean([s["val_acc"] for s in runs]))
        rows.append([warmup] + [f"{100 * s['val_acc']:.2f}" for s in runs] + [f"{100 * scores[-1]:.2f}"])
    warmup = SWEEP_WARMUP[int(np.argmax(scores))]
    lines += ["## 3b. Warm-up, sample-level method", ""]
    lines += reproduce.table(["warm-up", "dataset-level", "sample-level", "mean"], rows) + ["", f"Chosen: {warmup}.", ""]

    choice = dict(dataset_level=dataset_level["name"], sample_level=sample_level["name"],
                  training=dict(chosen, warmup=warmup))
    save_sweep(out, lines, choice=choice, alone=alone, pairs=pairs, degraded=degraded)
    print(f"chosen: {choice}")
    return choice


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="results", help="where sweep.json and sweep.md go")
    parser.add_argument("--runs-dir", default=os.path.join("runs", "reproduce"), help="scratch folder of the runs")
    args = parser.parse_args(argv)
    return reproduce.one_line_errors(lambda: sweep(args.out, args.runs_dir),
                                     f"{os.path.join(args.out, 'sweep.json')} keeps the stages finished before")


if __name__ == "__main__":
    main()
