"""Test-wide settings and shared data fixtures.

One intra-op thread, so that tests run in parallel with other work on a small machine do not oversubscribe
its cores (tiny CPU kernels slow down by orders of magnitude then).

Fixture trees on disk, in the layouts data.py reads (KS, MM-Debiased, UCF-101, CREMA-D). Frame k (1-based)
of a clip is a uniform JPEG of value FRAME_STEP * k, so the frames a dataset picked can be read back from
its output; a KS or CREMA-D spectrogram is filled with its clip's label."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from torchvision.io import write_jpeg
from torchvision.models.resnet import BasicBlock

import data
import train

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# A narrower ResNet-18 for the tests' runs (stage widths 16, 32, 64, 96 instead of 64, 128, 256, 512): the same class,
# stages and blocks, so every code path of models.ResNetEncoder and of the fusions that tap its stages runs, with
# checkpoints of 12 MB instead of 135 MB (two encoders and Adam's state) and faster steps. A user's run, and the
# tests marked full_resnet, build torchvision's own ResNet-18.


class NarrowResNet18(torchvision.models.ResNet):
    def __init__(self, norm_layer=torch.nn.BatchNorm2d, widths=(16, 32, 64, 96)):
        torch.nn.Module.__init__(self)
        self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = norm_layer, widths[0], 1, 1, 64
        self.conv1 = torch.nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = norm_layer(widths[0]), torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], 2)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 2, stride=2)
        self.avgpool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(widths[3], 1000)


TORCHVISION_RESNET18 = torchvision.models.resnet18


@pytest.fixture(scope="session", autouse=True)
def narrow_resnets():
    """For the whole session, module-scoped runs included (a test marked full_resnet takes torchvision's back)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchvision.models, "resnet18",
                      lambda weights=None, norm_layer=torch.nn.BatchNorm2d: NarrowResNet18(norm_layer))
        yield


@pytest.fixture(autouse=True)
def full_resnet_where_marked(request, monkeypatch):
    if request.node.get_closest_marker("full_resnet") is not None:
        monkeypatch.setattr(torchvision.models, "resnet18", TORCHVISION_RESNET18)

FRAME_STEP = 20


# ----------------------------------------------------------------------------------------------
# train.py runs: quick flags and one helper

MFEAT = ["--dataset", "mfeat", "--batch-size", "200", "--gpu", "-1"]  # 6 batches an epoch, about 0.1 s
SYNTHETIC = ["--dataset", "synthetic", "--synthetic-samples", "48", "--synthetic-size", "16", "--batch-size", "48",
             "--epochs", "2", "--warmup", "1", "--gpu", "-1"]  # one batch per epoch before re-sampling
TIMING = ("seconds", "valuation_seconds")  # the log's wall-clock fields


def run(out, *flags):
    """train.main(flags) writing into `out`; its results."""
    return train.main(list(flags) + ["--out", str(out)])


def run_train(out, *flags):
    """train.main(flags) writing into `out`: (its results, its log without the wall-clock fields)."""
    return run(out, *flags), logged(out)


def fails(capsys, argv):
    """Run train.main expecting the one-line error exit (status 2); return the line."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def weights(path):
    """The model weights of a checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def logged(out):
    """log.jsonl of the run in `out`, without its wall-clock fields."""
    return [{k: v for k, v in record.items() if k not in TIMING} for record in train.load_log(os.path.join(out, "log.jsonl"))]



def write_frames(folder, count, name="frame_{:05d}.jpg", gray=False, value=None, size=(40, 32)):
    """`count` uniform JPEG frames in `folder`; frame k has value value(k), FRAME_STEP * k by default."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(1, count + 1):
        pixel = FRAME_STEP * k if value is None else value(k)
        image = torch.full((1 if gray else 3,) + size, pixel, dtype=torch.uint8)
        write_jpeg(image, str(folder / name.format(k)), quality=100)


def make_ks_tree(root, lists, frames=10, spectrogram_shape=(16, 8)):
    """Authors' KS layout; lists = {split: [(clip name, label)]}."""
    (root / "ks_audio").mkdir(parents=True, exist_ok=True)
    for split, entries in lists.items():
        with open(root / "ks_audio" / f"{split}_1fps_path.txt", "w") as f:
            for name, label in entries:
                f.write(f"/data/ks/ks_visual/{split}/{name} 10 {label}\n")
        (root / "ks_audio" / split).mkdir(exist_ok=True)
        for name, label in entries:
            np.save(root / "ks_audio" / split / f"{name}.npy", np.full(spectrogram_shape, label, dtype=np.float32))
            write_frames(root / "ks_visual" / split / name, frames)


KS_LISTS = dict(train=[("a1", 0), ("b1", 1), ("a2", 0)], val=[("c1", 2)], test=[("a3", 0), ("b3", 1)])


@pytest.fixture
def ks_root(tmp_path):
    """A KS tree of KS_LISTS (3 classes, 10 frames per clip) in tmp_path / "ks"."""
    root = tmp_path / "ks"
    make_ks_tree(root, KS_LISTS)
    return root


def make_mmdebiased_tree(root, table):
    """MM-Debiased clips of `table` ({clip_id: {"subset": ..., "label": ...}}) and its JSON; returns the JSON path."""
    for clip_id in table:
        (root / "audio").mkdir(parents=True, exist_ok=True)
        np.save(root / "audio" / f"{clip_id}.npy", np.zeros((16, 8), dtype=np.float32))
        write_frames(root / "visual" / clip_id, 10)
    split_file = root / "MM-Debiased.json"
    split_file.write_text(json.dumps(table))
    return split_file


MMDEBIASED_TABLE = {
    "vid1": {"subset": "training", "label": "singing"},
    "vid2": {"subset": "training", "label": "bowling"},
    "vid3": {"subset": "validation", "label": "whistling"},
    "vid4": {"subset": "testing", "label": "singing"},
    "vid5": {"subset": "training", "label": "whistling"},
}

UCF_CLASSES = ["ApplyEyeMakeup", "Archery", "Basketball"]


def make_ucf_tree(root, groups=range(8, 18), clips_per_group=2, test_groups=range(1, 3)):
    """UCF-101 split files for UCF_CLASSES, 10 RGB frames and 9 flow frames per clip (u = 10k, v = 200 - 10k)."""
    (root / "splits").mkdir(parents=True)
    (root / "splits" / "classInd.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(UCF_CLASSES)))
    train_lines, test_lines = [], []
    for k, c in enumerate(UCF_CLASSES):
        for g in groups:
            train_lines += [f"{c}/v_{c}_g{g:02d}_c{n:02d}.avi {k + 1}\n" for n in range(1, clips_per_group + 1)]
        for g in test_groups:
            test_lines += [f"{c}/v_{c}_g{g:02d}_c01.avi\n"]
    (root / "splits" / "trainlist01.txt").write_text("".join(train_lines))
    (root / "splits" / "testlist01.txt").write_text("".join(test_lines))
    for line in train_lines + test_lines:
        video = line.split()[0].split("/")[1][:-4]
        write_frames(root / "rgb" / video, 10)
        write_frames(root / "flow" / "u" / video, 9, name="frame{:06d}.jpg", gray=True, value=lambda k: 10 * k)
        write_frames(root / "flow" / "v" / video, 9, name="frame{:06d}.jpg", gray=True, value=lambda k: 200 - 10 * k)


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf101")
    make_ucf_tree(root)
    return root


def make_cremad_tree(root, lists, frames=None, spectrogram_shape=(16, 8)):
    """CREMA-D layout; lists = {split: [(clip name, emotion code)]}; frames = {clip name: frame count}, 3 for
    the clips it leaves out."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for split, entries in lists.items():
        (root / f"{split}.csv").write_text("".join(f"{name},{emotion}\n" for name, emotion in entries))
        for name, emotion in entries:
            label = data.CREMAD_EMOTIONS.index(emotion)
            np.save(root / "audio" / f"{name}.npy", np.full(spectrogram_shape, label, dtype=np.float32))
            write_frames(root / "visual" / name, (frames or {}).get(name, 3))


CREMAD_LISTS = dict(train=[("1001_DFA_ANG_XX", "ANG"), ("1001_IEO_NEU_XX", "NEU"), ("1002_TIE_SAD_LO", "SAD"),
                           ("1003_MTI_HAP_HI", "HAP")],
                    val=[("1004_WSI_FEA_MD", "FEA")],
                    test=[("1005_ITS_DIS_XX", "DIS"), ("1006_IWL_ANG_HI", "ANG")])
