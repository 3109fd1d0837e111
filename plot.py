"""Pictures of a train.py run, drawn from the files the run wrote (matplotlib, optional, imported only here).

    python plot.py runs/X        # draw runs/X/training.png again, and a picture beside each valuation_*.csv

training.png, per epoch, drawn at the end of every run (after results.json) from log.jsonl and contributions/:
    contributions   the mean phi of each modality over the valued training samples, with its spread across them
                    (one standard deviation; Figure 3)
    copies          the uni-modal copies of each modality that the epoch trained on (Eq. 10, Eq. 11)
    loss            the training loss
    accuracy        the validation accuracy of all modalities together and of each modality alone
with the warm-up (and, for a compared method, the epochs after --modulation-ends) shaded.

valuation_<split>_<checkpoint>.png, drawn beside the CSV of `train.py --eval-only` (Figure 2c, over a whole split):
    the distribution of phi of each modality, and the share of samples whose modality contributes less than 1
    (low-contributing: Remark 1, the re-sampling threshold of Eq. 10), among the correctly and the wrongly predicted.

run_curves and valuation_summary return what is drawn, as numbers read from the files; run_figure and
valuation_figure draw them.
"""
import csv
import glob
import json
import os
import sys

import numpy as np

RUN_PICTURE = "training.png"
SHADED_PHASES = {"warmup": ("warm-up", 0.18), "joint": ("joint after the method", 0.07)}  # phase: (label, grey)
LOG_KEYS = ("epoch", "phase", "train_loss", "copies", "mean_phi", "val_acc", "val_acc_per_modality")


# ----------------------------------------------------------------------------------------------
# the numbers


def read_log(run_dir):
    """log.jsonl of `run_dir` as a list of records; ValueError naming the file and what is wrong."""
    path = os.path.join(run_dir, "log.jsonl")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}: line {number} is not JSON")
            missing = [key for key in LOG_KEYS if key not in record]
            if missing:
                raise ValueError(f"{path}: line {number} lacks {', '.join(missing)}; expected a log of train.py")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no epoch yet")
    return records


def modality_names(run_dir, count):
    """The modalities of a run: results.json's, or a contributions file's, or numbered (a run stopped early)."""
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            return json.load(f)["modalities"]
    except (OSError, ValueError, KeyError):
        pass
    saved = sorted(glob.glob(os.path.join(run_dir, "contributions", "epoch_*.npz")))
    if saved:
        with np.load(saved[0]) as contributions:
            return contributions["modalities"].tolist()
    return [f"modality {i}" for i in range(count)]


def phase_spans(phases):
    """[(phase, first epoch, last epoch)] of each run of equal phases, in order."""
    spans = []
    for epoch, phase in enumerate(phases):
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], epoch)
        else:
            spans.append((phase, epoch, epoch))
    return spans


def run_curves(run_dir):
    """What training.png draws, per epoch of log.jsonl: the log's numbers, and the standard deviation of phi across
    the valued samples from contributions/epoch_NNN.npz (NaN where an epoch valued nothing). Arrays are [E] or
    [E, n]."""
    log = read_log(run_dir)
    num_modalities = len(log[0]["copies"])
    mean_phi = np.full((len(log), num_modalities), np.nan)
    std_phi = np.full((len(log), num_modalities), np.nan)
    for row, record in enumerate(log):
        if record["mean_phi"] is not None:
            mean_phi[row] = record["mean_phi"]
            path = os.path.join(run_dir, "contributions", f"epoch_{record['epoch']:03d}.npz")
            if os.path.exists(path):  # a run copied without its contributions/ has no spread to draw
                with np.load(path) as saved:
                    std_phi[row] = saved["phi"].astype(np.float64).std(0)
    phases = [record["phase"] for record in log]
    return dict(run_dir=run_dir, modalities=modality_names(run_dir, num_modalities),
                epoch=np.array([record["epoch"] for record in log]), phase=phases, spans=phase_spans(phases),
                train_loss=np.array([record["train_loss"] for record in log]),
                copies=np.array([record["copies"] for record in log]), mean_phi=mean_phi, std_phi=std_phi,
                online=any(record.get("valuation") == "online" for record in log if record["mean_phi"] is not None),
                val_acc=np.array([record["val_acc"] for record in log]),
                val_acc_per_modality=np.array([record["val_acc_per_modality"] for record in log]))


def valuation_summary(csv_path):
    """What the valuation picture draws, from a CSV of train.py --eval-only: per modality, how many samples have each
    value of phi (values [V], counts [n, V]), and the share of the correctly / wrongly predicted samples whose phi is
    below 1 (low_correct, low_wrong [n]; NaN where a group is empty)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
        columns = [name for name in (rows[0] if rows else []) if name.startswith("phi_")]
    if not columns or any(key not in rows[0] for key in ("label", "prediction")):
        raise ValueError(f"{csv_path}: expected a per-sample valuation CSV of train.py --eval-only (columns label, "
                         f"prediction, phi_<modality>) with at least one sample")
    phi = np.array([[float(row[name]) for name in columns] for row in rows])  # [N, n]
    correct = np.array([row["label"] == row["prediction"] for row in rows])  # [N]
    values = np.unique(phi)
    low = phi < 1

    def share(group):
        return low[group].mean(0) if group.any() else np.full(len(columns), np.nan)

    return dict(csv=csv_path, modalities=[name[len("phi_"):] for name in columns], samples=len(rows),
                correct=int(correct.sum()), values=values,
                counts=np.array([[(phi[:, m] == v).sum() for v in values] for m in range(len(columns))]),
                low_correct=share(correct), low_wrong=share(~correct),
                low_counts=(low[correct].sum(0), low[~correct].sum(0)))


# ----------------------------------------------------------------------------------------------
# the pictures


def new_figure(width, height):
    """A matplotlib Figure drawn off-screen (no pyplot: no backend or global state changed), or None without
    matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(width, height))


def mark_phases(ax, spans):
    """Shade the warm-up, and the joint epochs after a compared method's last epoch."""
    for phase, first, last in spans:
        if phase in SHADED_PHASES:
            ax.axvspan(first - 0.5, last + 0.5, color="k", alpha=SHADED_PHASES[phase][1], linewidth=0)


def run_figure(curves):
    """training.png's Figure from run_curves' numbers (None without matplotlib); panels in the order contributions,
    copies, loss, accuracy."""
    fig = new_figure(11, 7)
    if fig is None:
        return None
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.91, hspace=0.2, wspace=0.15)  # fixed: drawn fast
    contributions, copies, loss, accuracy = fig.subplots(2, 2, sharex=True).flat
    loss.xaxis.get_major_locator().set_params(integer=True)  # epochs
    epochs, names = curves["epoch"], curves["modalities"]
    for ax in (contributions, copies, loss, accuracy):
        mark_phases(ax, curves["spans"])
    online = " (online)" if curves["online"] else ""
    contributions.set(title=f"mean contribution{online} of the valued training samples, ± 1 std (Figure 3)",
                      ylabel="phi")
    if np.isnan(curves["mean_phi"]).all():
        contributions.text(0.5, 0.5, "no valuation in this run\n(--track-phi values the training set every epoch)",
                           ha="center", va="center", transform=contributions.transAxes, color="grey")
    else:
        for m, name in enumerate(names):
            mean, std = curves["mean_phi"][:, m], curves["std_phi"][:, m]
            contributions.plot(epochs, mean, ".-", color=f"C{m}", label=name)
            contributions.fill_between(epochs, mean - std, mean + std, color=f"C{m}", alpha=0.2, linewidth=0)
        contributions.axhline(1, color="grey", linestyle=":", linewidth=1)  # Eq. 10: phi < 1 is re-sampled
        contributions.legend(fontsize=8)
    copies.set(title="uni-modal copies trained on (Eq. 10, 11)", ylabel="copies")
    if not curves["copies"].any():
        copies.text(0.5, 0.5, "no uni-modal copies in this run", ha="center", va="center", transform=copies.transAxes,
                    color="grey")
    for m, name in enumerate(names):
        copies.plot(epochs, curves["copies"][:, m], ".-", color=f"C{m}", label=name)
    copies.legend(fontsize=8)
    loss.plot(epochs, curves["train_loss"], ".-", color="k", label="training loss")
    loss.set(title="training loss (uni-modal copies included)", xlabel="epoch", ylabel="loss")
    accuracy.plot(epochs, 100 * curves["val_acc"], ".-", color="k", label="all modalities")
    for m, name in enumerate(names):
        accuracy.plot(epochs, 100 * curves["val_acc_per_modality"][:, m], ".--", color=f"C{m}", label=f"{name} alone")
    accuracy.set(title="validation accuracy", xlabel="epoch", ylabel="%")
    accuracy.legend(fontsize=8)
    phases = ", ".join(f"{SHADED_PHASES.get(phase, (phase,))[0]} {first}" + (f"-{last}" if last > first else "")
                       + (" (shaded)" if phase in SHADED_PHASES else "") for phase, first, last in curves["spans"])
    fig.suptitle(f"{os.path.basename(os.path.abspath(curves['run_dir']))}, epochs: {phases}", fontsize=10)
    return fig


def valuation_figure(summary):
    """The valuation picture's Figure from valuation_summary's numbers (None without matplotlib)."""
    fig = new_figure(11, 4)
    if fig is None:
        return None
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.85, wspace=0.15)
    spread, low = fig.subplots(1, 2)
    names, values = summary["modalities"], summary["values"]
    gap = np.diff(values).min() if len(values) > 1 else 1.0
    width = 0.8 * gap / len(names)
    for m, name in enumerate(names):
        spread.bar(values + (m - (len(names) - 1) / 2) * width, summary["counts"][m], width, color=f"C{m}", label=name)
    spread.axvline(1, color="grey", linestyle=":", linewidth=1, zorder=3)
    spread.set(title="contribution of each modality, per sample (Figure 2c)", xlabel="phi", ylabel="samples")
    spread.legend(fontsize=8)
    positions = np.arange(len(names))
    wrong = summary["samples"] - summary["correct"]
    for k, (group, total, color) in enumerate((("correct", summary["correct"], "C2"), ("wrong", wrong, "C3"))):
        shares = summary[f"low_{group}"]
        bars = low.bar(positions + 0.4 * k - 0.2, 100 * np.nan_to_num(shares), 0.4, color=color,
                       label=f"{group}ly predicted ({total})")
        low.bar_label(bars, [f"{count}/{total}" for count in summary["low_counts"][k]], fontsize=8)
    low.set_xticks(positions, names)
    low.set(title="samples whose modality contributes phi < 1 (Remark 1)", ylabel="% of the group",
            ylim=(0, 125))
    low.legend(fontsize=8, loc="upper center", ncol=2)
    accuracy = 100 * summary["correct"] / summary["samples"]
    fig.suptitle(f"{os.path.basename(summary['csv'])}: {summary['samples']} samples, {accuracy:.2f} % predicted "
                 f"correctly", fontsize=10)
    return fig


def save(fig, path):
    fig.savefig(path, dpi=80)
    print(f"picture: {path}")
    return path


def not_drawn(path, run_dir):
    print(f"{os.path.basename(path)} not drawn: matplotlib is not installed (pip install matplotlib, then "
          f"python plot.py {run_dir})")


def draw_run(run_dir):
    """RUN_DIR/training.png from the run's log (train.py draws it at the end of a run, after results.json); its
    path, or None and one line saying how to draw it without matplotlib."""
    path = os.path.join(run_dir, RUN_PICTURE)
    fig = run_figure(run_curves(run_dir))
    if fig is None:
        return not_drawn(path, run_dir)
    return save(fig, path)


def draw_valuation(csv_path):
    """The picture of a valuation CSV of --eval-only, beside it with the same name (.png); its path, or None and one
    line saying how to draw it without matplotlib."""
    path = os.path.splitext(csv_path)[0] + ".png"
    fig = valuation_figure(valuation_summary(csv_path))
    if fig is None:
        return not_drawn(path, os.path.dirname(csv_path))
    return save(fig, path)


def main(argv=None):
    from train import OneLineParser  # train.py's command-line rule: errors in one line, exit status 2
    parser = OneLineParser(description="Draw the pictures of a train.py run folder again: training.png from "
                                                 "log.jsonl and contributions/, and one beside each valuation CSV")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of train.py (holding log.jsonl)")
    run_dir = parser.parse_args(argv).run_dir
    try:
        if not os.path.isfile(os.path.join(run_dir, "log.jsonl")):
            raise ValueError(f"{run_dir}: expected a run folder of train.py, holding log.jsonl"
                             + ("" if os.path.isdir(run_dir) else " (no such folder)"))
        if new_figure(1, 1) is None:
            raise ValueError("plot.py draws with matplotlib, which is not installed (pip install matplotlib)")
        paths = [draw_run(run_dir)]
        for csv_path in sorted(glob.glob(os.path.join(run_dir, "valuation_*.csv"))):
            paths.append(draw_valuation(csv_path))
    except (OSError, ValueError) as error:  # a file that cannot be read or written, or is not the run's
        message = f"{error.filename}: {error.strerror}" if isinstance(error, OSError) and error.filename else error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    return paths


if __name__ == "__main__":
    main()
