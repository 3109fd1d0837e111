"""method.py and engine.py on their own: the registry, each mode's plan from given contributions (Algorithms 1 and 2,
Table 4), offline and online valuation on fixed weights, the training epoch's calls, and a method added from
outside the project as the README shows it."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import comparators
import data
import engine
import method
import models
import shapley_mm
import train
from conftest import MFEAT, fails, logged, run

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_SAMPLES = 40


class FixedValuation:
    """An offline valuation that returns given contributions, phi [N, n], and counts its calls."""

    def __init__(self, phi):
        self.phi, self.num_samples, self.calls = phi, len(phi), 0

    def __call__(self, model, valued):
        self.calls += 1
        return self.phi[valued]


def some_phi(seed=0):
    """phi [NUM_SAMPLES, 2] as Eq. 1-3 gives them for two modalities: (1, 1), (2, 0), (0, 2), (0, 0) or the halves
    of one correct coalition, in random proportions."""
    correct = torch.rand(NUM_SAMPLES, 4, generator=torch.Generator().manual_seed(seed)) < 0.5
    correct[:, 0] = False
    return shapley_mm.shapley_values(shapley_mm.benefit(correct))


def plan_of(mode, phi, epoch=3, warmup=2, seed=7, **settings):
    valuation = FixedValuation(phi)
    chosen = method.METHODS[mode](valuation, torch.Generator().manual_seed(seed), len(phi), warmup=warmup, **settings)
    return chosen.plan(epoch, None), valuation


# ----------------------------------------------------------------------------------------------
# the registry


def test_the_registry_holds_every_mode_and_the_command_line_reads_it():
    assert tuple(method.METHODS) == ("baseline", "sample", "modality", "naive", "reversed", "ogm-ge", "greedy",
                                     "pmr", "agm", "gblending")
    assert all(cls.name == name for name, cls in method.METHODS.items())
    assert method.METHODS["baseline"] is method.Method  # --mode baseline is the plain method
    assert all(issubclass(method.METHODS[m], method.SampleLevel) for m in ("sample", "modality", "naive", "reversed"))
    assert comparators.COMPARED_MODES == ("ogm-ge", "greedy", "pmr", "agm", "gblending")
    mode_flag = next(a for a in train.get_args_parser()._actions if a.dest == "mode")
    assert tuple(mode_flag.choices) == tuple(method.METHODS)


def test_each_method_flag_acts_in_its_modes_only():
    scope = train.flag_scope()
    expected = {"subset_ratio": ("modality",), "alpha": ("modality",), "f_m": ("modality",),
                "ogm_alpha": ("ogm-ge",), "greedy_epsilon": ("greedy",), "greedy_window": ("greedy",),
                "pmr_alpha": ("pmr",), "pmr_momentum": ("pmr",), "pmr_fraction": ("pmr",), "agm_alpha": ("agm",),
                "super_epoch": ("gblending",), "modulation_ends": comparators.COMPARED_MODES}
    for flag, modes in expected.items():
        applies, where = scope[flag]
        assert where == f"--mode {', '.join(modes)}"
        assert [m for m in method.METHODS if applies(train.make_args(mode=m, fusion=method.METHODS[m].fusion or
                                                                     "concat"))] == list(modes)


def test_train_and_engine_compare_the_mode_with_no_name():
    """Done when: no `... == "sample"`, `mode in (...)` or the like in train.py and engine.py."""
    for name in ("train.py", "engine.py"):
        with open(os.path.join(HERE, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                parts = [n for operand in [node.left, *node.comparators] for n in ast.walk(operand)]
                names_mode = any(isinstance(n, ast.Attribute) and n.attr == "mode" or isinstance(n, ast.Name) and
                                 n.id == "mode" for n in parts)
                names_a_string = any(isinstance(n, ast.Constant) and isinstance(n.value, str) for n in parts)
                assert not (names_mode and names_a_string), f"{name}: {ast.unparse(node)}"


# ----------------------------------------------------------------------------------------------
# the plans of Algorithms 1 and 2 and of Table 4, from given contributions


def eq10(phi):
    return shapley_mm.sample_level_copies(phi)  # [N, n]


def test_warmup_epochs_value_nothing_and_copy_nothing():
    for mode in ("sample", "modality", "naive", "reversed"):
        plan, valuation = plan_of(mode, some_phi(), epoch=1, warmup=2)
        assert plan.phase == "warmup" and plan.phi is None and plan.copies is None and valuation.calls == 0


def test_sample_level_copies_are_eq10_of_every_sample():
    phi = some_phi()
    plan, valuation = plan_of("sample", phi)
    assert plan.phase == "sample" and valuation.calls == 1
    assert torch.equal(plan.valued, torch.arange(NUM_SAMPLES)) and torch.equal(plan.phi, phi)
    assert torch.equal(plan.copies, eq10(phi)) and plan.copies.sum() > 0


def test_naive_keeps_the_sample_totals_per_modality_but_not_their_samples():
    phi = some_phi()
    plan, _ = plan_of("naive", phi)
    assert torch.equal(plan.copies.sum(0), eq10(phi).sum(0))
    assert not torch.equal(plan.copies, eq10(phi))  # the same counts on other samples


def test_reversed_gives_each_sample_its_copies_on_its_highest_contributor():
    phi = some_phi()
    plan, _ = plan_of("reversed", phi)
    assert torch.equal(plan.copies.sum(1), eq10(phi).sum(1))
    copied = plan.copies.sum(1) > 0
    on = plan.copies[copied].argmax(1, keepdim=True)  # the one modality each copied sample's copies keep
    assert ((plan.copies[copied] > 0).sum(1) == 1).all()
    assert torch.equal(phi[copied].gather(1, on).squeeze(1), phi[copied].max(1).values)
    assert not torch.equal(plan.copies, eq10(phi))


def test_modality_level_values_a_subset_z_drawn_from_the_generator_and_copies_one_modality():
    phi = some_phi()
    phi[:, 1] -= 0.5  # modality 1 the lower contributor
    phi[:, 0] += 0.5
    plan, valuation = plan_of("modality", phi, subset_ratio=0.25, seed=3)
    generator = torch.Generator().manual_seed(3)
    z = torch.randperm(NUM_SAMPLES, generator=generator)[:10].sort().values  # round(0.25 * 40) = 10
    assert torch.equal(plan.valued, z) and torch.equal(plan.phi, phi[z])
    modality, probability = shapley_mm.modality_level_plan(phi[z])
    assert modality == 1 and plan.copies[:, 0].sum() == 0
    assert torch.equal(plan.copies, shapley_mm.modality_level_copies(NUM_SAMPLES, 2, modality, probability,
                                                                     generator=generator))


def test_track_phi_values_every_sample_in_the_warmup_and_in_the_baseline():
    phi = some_phi()
    plan, valuation = plan_of("modality", phi, epoch=0, warmup=2, track_phi=True)
    assert plan.phase == "warmup" and torch.equal(plan.valued, torch.arange(NUM_SAMPLES)) and plan.copies is None
    baseline = method.Method(FixedValuation(phi), track_phi=True)
    plan = baseline.plan(0, None)
    assert plan.phase == "baseline" and torch.equal(plan.phi, phi) and plan.copies is None


def test_offline_and_online_valuation_plan_alike_on_fixed_weights():
    """The same weights in eval mode: the plan from the steps' records (online) equals the plan from a pass."""
    dataset = data.build_dataset("synthetic", "train", seed=0, train_size=NUM_SAMPLES, size=16)
    torch.manual_seed(0)
    model = models.build_model(dataset.input_specs, dataset.num_classes, "concat", "feature").eval()
    loader = dict(batch_size=16, num_workers=0)
    offline = method.SampleLevel(method.OfflineValuation(dataset, loader, torch.device("cpu")),
                                 torch.Generator().manual_seed(1), NUM_SAMPLES, warmup=1).plan(1, model)
    online_valuation = method.OnlineValuation(NUM_SAMPLES, 2)
    online = method.SampleLevel(online_valuation, torch.Generator().manual_seed(1), NUM_SAMPLES, warmup=1)
    online.plan(0, model)  # the warm-up epoch records what epoch 1 is planned from
    for start in range(0, NUM_SAMPLES, 16):
        inputs, target, index = torch.utils.data.default_collate([dataset[k] for k in range(start, min(start + 16,
                                                                                                        NUM_SAMPLES))])
        with torch.no_grad():
            online.loss(model, inputs, target, torch.ones(len(target), 2, dtype=torch.bool), index)
    planned = online.plan(1, model)
    assert torch.equal(planned.valued, offline.valued) and torch.equal(planned.phi, offline.phi)
    assert torch.equal(planned.copies, offline.copies) and offline.copies.sum() > 0


# ----------------------------------------------------------------------------------------------
# the training epoch


class Recording(method.Method):
    def __init__(self):
        super().__init__()
        self.calls = []

    def loss(self, model, inputs, target, mask=None, index=None):
        self.calls.append(("loss", len(target)))
        return super().loss(model, inputs, target, mask, index)

    def modulate(self, model):
        assert all(p.grad is not None for p in model.parameters())  # after backward, before the step
        self.calls.append(("modulate",))


def test_train_one_epoch_calls_the_loss_then_the_gradient_hook_once_per_step():
    torch.manual_seed(0)
    model = models.build_model([("vector", 4), ("vector", 3)], 3, "concat", "feature")
    batches = [([torch.randn(b, 4), torch.randn(b, 3)], torch.randint(3, (b,)), torch.arange(b),
                torch.ones(b, 2, dtype=torch.bool)) for b in (5, 6, 7)]
    recording = Recording()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, rows = engine.train_one_epoch(engine.TrainingStep(model, recording), batches, optimizer,
                                        torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), 0)
    assert recording.calls == [("loss", 5), ("modulate",), ("loss", 6), ("modulate",), ("loss", 7), ("modulate",)]
    assert rows == 18 and loss > 0


# ----------------------------------------------------------------------------------------------
# a method added from outside the project: the README's example, run as it is written there


def readme_example():
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    section = text[text.index("### Add your own method"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


@pytest.fixture
def weakest(tmp_path, monkeypatch):
    """The README's my_train.py written to a folder of its own and imported: its mode registered for this test."""
    source = readme_example()
    assert len(source.strip().splitlines()) <= 40
    path = tmp_path / "my_train.py"
    path.write_text(source)
    monkeypatch.setattr(method, "METHODS", dict(method.METHODS))
    monkeypatch.setattr(train, "METHODS", method.METHODS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_train", raising=False)
    __import__("my_train")
    return path


def test_an_added_method_trains_resumes_and_its_flag_is_refused_elsewhere(weakest, tmp_path, capsys):
    flags = MFEAT + ["--mode", "weakest", "--weakest-weight", "0.3", "--warmup", "1", "--epochs", "3", "--seed", "2"]
    run(tmp_path / "straight", *flags)
    run(tmp_path / "split", *flags[:-4], "--epochs", "2", "--seed", "2")
    train.main(["--resume", str(tmp_path / "split" / "last.pt"), "--epochs", "3"])
    straight, split = logged(tmp_path / "straight"), logged(tmp_path / "split")
    assert [r["phase"] for r in straight] == ["warmup", "weakest", "weakest"]
    assert straight == split  # resumed exactly
    run(tmp_path / "plain", *MFEAT, "--mode", "baseline", "--epochs", "3", "--seed", "2")
    plain = logged(tmp_path / "plain")
    assert plain[1]["train_loss"] != straight[1]["train_loss"]  # the added loss acts
    line = fails(capsys, MFEAT + ["--mode", "sample", "--weakest-weight", "0.3", "--out", str(tmp_path / "x")])
    assert line == "error: --weakest-weight has no effect in this run: it acts with --mode weakest only"
    line = fails(capsys, MFEAT + ["--mode", "weakest", "--valuation", "online", "--out", str(tmp_path / "y")])
    assert "--mode weakest plans none" in line


def script(path, *args, torchrun=False):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun
                else [sys.executable])
    env = dict(os.environ, PYTHONPATH=HERE, OMP_NUM_THREADS="1")
    return subprocess.run(launcher + [str(path), *args], capture_output=True, text=True, env=env, timeout=300)


def test_the_readme_script_runs_as_a_command(weakest, tmp_path):
    done = script(weakest, *MFEAT, "--mode", "weakest", "--warmup", "1", "--epochs", "2", "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert [r["phase"] for r in logged(tmp_path / "r")] == ["warmup", "weakest"]


@pytest.mark.slow
def test_the_readme_script_runs_and_resumes_under_torchrun(weakest, tmp_path):
    out = tmp_path / "r"
    done = script(weakest, *MFEAT, "--mode", "weakest", "--warmup", "1", "--epochs", "2", "--out", str(out),
                  torchrun=True)
    assert done.returncode == 0, done.stderr
    done = script(weakest, "--resume", str(out / "last.pt"), "--epochs", "3", torchrun=True)
    assert done.returncode == 0, done.stderr
    assert [r["phase"] for r in logged(out)] == ["warmup", "weakest", "weakest"]
