"""Tests of preprocess.py: the spectrogram recipes against independent references (torchaudio through a committed
fixture, scipy, numpy), then tiny videos made here with PyAV (frames whose grey level encodes their index, a sine
tone) pre-processed for ks, cremad and ucf101: layouts, frame choice, spectrograms, failures.csv, resumption, the
command line, and one epoch of train.py on the output.

fixtures/kaldi_fbank_ogm_ks.npz was made once, outside the project, with real torchaudio (torch 2.9.1, torchaudio
2.9.1, in a throwaway venv: pip install torch==2.9.1 'torchaudio==2.9.*' numpy):

    rng = np.random.default_rng(16)
    t = np.arange(8000) / 16000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (200 + 3000 * t) * t) \\
        + 0.05 * rng.standard_normal(8000) + 0.1
    x[-1600:] = 0.0  # digital silence: the log floor
    x = x.astype(np.float32)
    kwargs = dict(htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                  num_mel_bins=128, dither=0.0, frame_shift=10)  # OGM-GE's Kinetics-Sounds call
    fbank = torchaudio.compliance.kaldi.fbank(torch.from_numpy(x)[None], **kwargs)  # in float32, as OGM-GE ran it
    fbank_double = torchaudio.compliance.kaldi.fbank(torch.from_numpy(x)[None].double(), **kwargs)
    np.savez_compressed("fixtures/kaldi_fbank_ogm_ks.npz", waveform=x, fbank=fbank.numpy(),
                        fbank_double=fbank_double.float().numpy())

fixtures/stft_ogm_librosa.npz was made once, outside the project, with librosa 0.11.0 (soxr 1.1.0; in a throwaway
venv: pip install librosa resampy):

    rng = np.random.default_rng(22050)
    t = np.arange(16000) / 16000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (300 + 3500 * t) * t) \\
        + 0.1 * np.sin(2 * np.pi * 7600 * t) + 0.03 * rng.standard_normal(16000)
    pcm = np.round(x * 32767).astype(np.int16)  # a 16-bit WAV's samples
    samples = librosa.resample(pcm.astype(np.float32) / 32768, orig_sr=16000, target_sr=22050)  # librosa.load(sr=22050)
    r = np.tile(samples, 3)[:22050 * 3]  # OGM-GE's dataset/CramedDataset.py, CramedDataset.__getitem__
    r[r > 1.] = 1.
    r[r < -1.] = -1.
    spectrogram = np.log(np.abs(librosa.stft(r, n_fft=512, hop_length=353, pad_mode="reflect")) + 1e-7)
    np.savez_compressed("fixtures/stft_ogm_librosa.npz", pcm=pcm, spectrogram=spectrogram.astype(np.float16))

(pad_mode="reflect": the default of the librosa of OGM-GE's time.) The same with res_type="kaiser_best" (resampy
0.4.3, what librosa <= 0.9 used) differs from it by up to 2.34 mean absolute difference per row (rows above 7.5 kHz;
up to 1.28 below, in spectral valleys; 0.63 over all rows); FFmpeg's default resampler, used before, by up to 8.5
(39 rows above 1).
"""
import csv
import errno
import fractions
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from torchvision.io import decode_jpeg, read_file

import data
import preprocess
import train

HERE = os.path.dirname(os.path.abspath(__file__))
PREPROCESS_MISSING = not all(importlib.util.find_spec(m) for m in ("av", "soxr"))
needs_av = pytest.mark.skipif(PREPROCESS_MISSING, reason="PyAV or soxr is not installed (pip install -r "
                                                         "requirements-preprocess.txt)")
needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy is not installed")


# ----------------------------------------------------------------------------------------------
# Recipes

def test_kaldi_fbank_equals_torchaudio_on_the_fixture():
    fixture = np.load(os.path.join(HERE, "fixtures", "kaldi_fbank_ogm_ks.npz"))
    ours = preprocess.kaldi_fbank(fixture["waveform"], 16000, 128)
    assert ours.shape == fixture["fbank_double"].shape == (48, 128)
    np.testing.assert_allclose(ours.numpy(), fixture["fbank_double"], rtol=0, atol=1e-4)
    # torchaudio's own float32 arithmetic (OGM-GE's call) strays up to 2e-4 from its float64 result here
    np.testing.assert_allclose(ours.numpy(), fixture["fbank"], rtol=0, atol=5e-4)
    assert ours[-1].eq(np.log(np.finfo(np.float32).eps)).all()  # the silent frames sit on the floor


def test_fbank_recipe_removes_the_mean_pads_cuts_and_normalises():
    t = np.arange(16000 * 12) / 16000
    waveform = 0.4 * np.sin(2 * np.pi * 1000 * t) + 0.2  # 12 s, with an offset the recipe removes
    raw = preprocess.kaldi_fbank(waveform - waveform.mean(), 16000, 128).numpy()
    assert raw.shape == (1198, 128)
    long = preprocess.fbank_ogm_ks(waveform)
    assert long.shape == (1024, 128) and long.dtype == np.float32
    np.testing.assert_allclose(long, (raw[:1024] + 4.503877) / (5.141276 * 2), atol=1e-6)
    short = preprocess.fbank_ogm_ks(waveform[:16000])  # 1 s: 98 frames, then zero rows
    np.testing.assert_allclose(short[:98], (raw[:98] + 4.503877) / (5.141276 * 2), atol=1e-5)
    np.testing.assert_allclose(short[98:], 4.503877 / (5.141276 * 2), atol=1e-7)


def reference_stft_pmr(waveform):
    """PMR's data/CREMAD recipe with scipy (tiling as often as needed)."""
    from scipy import signal
    x = np.clip(np.resize(waveform, 160000), -1, 1)
    _, _, spectrogram = signal.spectrogram(x, 16000, nperseg=512, noverlap=353)
    spectrogram = np.log(spectrogram + 1e-7)
    return (spectrogram - spectrogram.mean()) / (spectrogram.std() + 1e-9)


@needs_scipy
def test_stft_pmr_equals_scipy_and_tiles_short_clips():
    from scipy import signal
    np.testing.assert_allclose(preprocess.tukey_window(512, 0.25).numpy(), signal.get_window(("tukey", 0.25), 512),
                               atol=1e-12)
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 3) / 16000
    waveform = 0.5 * np.sin(2 * np.pi * 700 * t) + 0.1 * rng.standard_normal(len(t)) + 0.05
    ours = preprocess.stft_pmr(waveform)
    assert ours.shape == (257, 1004) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference_stft_pmr(waveform), atol=1e-4)
    short = waveform[:8000]  # 0.5 s: PMR's np.tile(x, 10) would give 5 s and fail its shape check
    np.testing.assert_allclose(preprocess.stft_pmr(short), reference_stft_pmr(np.tile(short, 20)), atol=1e-4)


def test_stft_ogm_equals_a_numpy_librosa_stft():
    """librosa.stft(n_fft=512, hop_length=353) of OGM-GE's time: frames centred by reflecting 256 samples at each
    end, periodic Hann window; written here with numpy alone."""
    t = np.arange(22050 * 2) / 22050  # 2 s, tiled to 3 s
    waveform = 0.6 * np.sin(2 * np.pi * 300 * t) * np.cos(2 * np.pi * 2 * t)
    x = np.clip(np.resize(waveform, 66150), -1, 1)
    padded = np.pad(x, 256, mode="reflect")
    frames = np.stack([padded[i * 353:i * 353 + 512] for i in range(1 + len(x) // 353)])
    expected = np.log(np.abs(np.fft.rfft(frames * np.hanning(513)[:-1], axis=1)).T + 1e-7)
    ours = preprocess.stft_ogm_cremad(waveform)
    assert ours.shape == (257, 188) == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_recipe_table_shapes():
    for name, (rate, recipe, shape) in preprocess.RECIPES.items():
        assert recipe(np.sin(np.arange(rate) / 7.0)).shape == shape, name


# ----------------------------------------------------------------------------------------------
# Tiny videos

def grey_level(index):
    """The grey level of frame `index` in the test videos, so that a saved JPEG tells which frame it was."""
    return 8 + (4 * index) % 240


def make_video(path, seconds, fps=10, size=(64, 48), tone=440.0, audio_rate=44100, channels=1, codec="libx264",
               audio_codec="aac", video=True, moving_square=False):
    """A video of uniform grey frames (grey_level of the index; or, with moving_square, a white square moving
    right by 2 pixels a frame over a still background of 8 x 8 blocks) and a sine tone (tone=None: no audio
    track; with channels=2 the right channel is silent)."""
    import av
    with av.open(path, "w") as container:
        if video:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if tone is not None:
            sound = container.add_stream(audio_codec, rate=audio_rate, layout="mono" if channels == 1 else "stereo")
        blocks = np.random.default_rng(0).integers(0, 160, (size[1] // 8, size[0] // 8, 1), dtype=np.uint8)
        for i in range(round(seconds * fps) if video else 0):
            image = np.full((size[1], size[0], 3), grey_level(i), np.uint8)
            if moving_square:
                image[:] = blocks.repeat(8, axis=0).repeat(8, axis=1)
                image[size[1] // 3:size[1] // 3 + 16, 8 + 2 * i:24 + 2 * i] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        if video:
            container.mux(stream.encode())
        if tone is not None:
            samples = np.round(16000 * np.sin(2 * np.pi * tone * np.arange(round(seconds * audio_rate)) / audio_rate))
            samples = np.stack([samples] + [np.zeros_like(samples)] * (channels - 1))  # [channels, N], int16 scale
            step = sound.codec_context.frame_size or 1024
            for start in range(0, samples.shape[1], step):
                chunk, name = samples[:, start:start + step], sound.codec_context.format.name
                array = {"fltp": chunk / 32768, "s16": chunk.T.reshape(1, -1), "s32p": chunk * 65536}[name]
                dtype = {"fltp": np.float32, "s16": np.int16, "s32p": np.int32}[name]
                frame = av.AudioFrame.from_ndarray(array.astype(dtype), format=name, layout=sound.layout.name)
                frame.sample_rate, frame.pts = audio_rate, start
                container.mux(sound.encode(frame))
            container.mux(sound.encode())


def run_preprocess(*argv, capsys=None):
    """preprocess.main in this process; returns (stdout, stderr) when capsys is given."""
    preprocess.main([str(a) for a in argv])
    return capsys.readouterr() if capsys is not None else None


def jpeg_levels(folder):
    names = sorted(os.listdir(folder))
    return [decode_jpeg(read_file(os.path.join(folder, n))).float().mean().item() for n in names]


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


KS_CLIPS = {  # split -> class folder -> [(clip, seconds)]
    "train": {"playing drums": [("d1", 3), ("d2", 3), ("d3", 2.5)], "singing": [("s1", 3), ("s2", 3), ("s3", 3)]},
    "val": {"playing drums": [("d4", 3)], "singing": [("s4", 3)]},
    "test": {"playing drums": [("d5", 3)], "singing": [("s5", 3)]},
}


@pytest.fixture(scope="module")
def ks_videos(tmp_path_factory):
    if PREPROCESS_MISSING:
        pytest.skip("PyAV or soxr is not installed (pip install -r requirements-preprocess.txt)")
    root = tmp_path_factory.mktemp("ks_videos")
    for split, classes in KS_CLIPS.items():
        for class_name, clips in classes.items():
            os.makedirs(root / split / class_name)
            for clip, seconds in clips:
                make_video(str(root / split / class_name / f"{clip}.mp4"), seconds)
    # 16 kHz 16-bit PCM in stereo: decoded without loss, so its spectrogram can be recomputed exactly
    make_video(str(root / "train" / "singing" / "pcm.mkv"), 2, audio_codec="pcm_s16le", audio_rate=16000, channels=2)
    make_video(str(root / "train" / "singing" / "silent.mp4"), 2, tone=None)
    make_video(str(root / "train" / "playing drums" / "soundonly.mp4"), 2, video=False)
    with open(root / "test" / "singing" / "corrupt.mp4", "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return root


@pytest.fixture(scope="module")
def ks_root(ks_videos, tmp_path_factory):
    root = tmp_path_factory.mktemp("ks_root")
    run_preprocess("ks", "--videos", ks_videos, "--out", root, "--workers", 1)
    return root


@needs_av
def test_ks_layout_lists_classes_and_frames(ks_root):
    assert read_lines(ks_root / "ks_classes.txt") == ["playing drums", "singing"]
    train = read_lines(ks_root / "ks_audio" / "train_1fps_path.txt")
    assert sorted(train) == sorted(["ks_visual/train/d1 3 0", "ks_visual/train/d2 3 0", "ks_visual/train/d3 3 0",
                                    "ks_visual/train/s1 3 1", "ks_visual/train/s2 3 1", "ks_visual/train/s3 3 1",
                                    "ks_visual/train/pcm 2 1"])
    assert sorted(read_lines(ks_root / "ks_audio" / "test_1fps_path.txt")) == ["ks_visual/test/d5 3 0",
                                                                              "ks_visual/test/s5 3 1"]
    val_list = data.read_ks_list(str(ks_root / "ks_audio" / "val_1fps_path.txt"), ogm_format=False)
    assert [(clip, label) for clip, label, _ in val_list] == [("d4", 0), ("s4", 1)]
    for split, clip in (("train", "d1"), ("train", "d3"), ("val", "s4")):
        # ks keeps the first frame of each second: frames 0, 10, 20 at 10 fps (d3 lasts 2.5 s: 3 seconds begin)
        levels = jpeg_levels(ks_root / "ks_visual" / split / clip)
        np.testing.assert_allclose(levels, [grey_level(0), grey_level(10), grey_level(20)], atol=2)
        spectrogram = np.load(ks_root / "ks_audio" / split / f"{clip}.npy")
        assert spectrogram.shape == (1024, 128) and spectrogram.dtype == np.float32
    assert not any(name.endswith(preprocess.PARTIAL) for _, dirs, files in os.walk(ks_root) for name in dirs + files)


@needs_av
def test_ks_spectrogram_is_the_recipe_of_the_decoded_mono_audio(ks_root):
    # pcm.mkv: lossless 16 kHz stereo, left a 440 Hz sine, right silent -> mono is half the left channel
    left = np.round(16000 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)) / 32768
    np.testing.assert_allclose(np.load(ks_root / "ks_audio" / "train" / "pcm.npy"),
                               preprocess.fbank_ogm_ks((left / 2).astype(np.float32)), atol=1e-5)
    # d1.mp4: 440 Hz through AAC at 44.1 kHz, resampled to 16 kHz: its energy peaks in the mel band of 440 Hz
    spectrogram = np.load(ks_root / "ks_audio" / "train" / "d1.npy")
    mel = 1127 * np.log1p(np.array([20.0, 440.0, 8000.0]) / 700)
    band = (mel[1] - mel[0]) / ((mel[2] - mel[0]) / 129) - 1  # the filter centred nearest 440 Hz
    assert abs(spectrogram[:290].mean(axis=0).argmax() - band) <= 1
    np.testing.assert_allclose(spectrogram[300:], 4.503877 / (5.141276 * 2), atol=1e-6)  # 3 s: 298 frames, then pad


@needs_av
def test_ks_failures_are_listed_with_their_reason_and_left_out(ks_root, ks_videos):
    with open(ks_root / "failures.csv") as f:
        rows = {row["clip"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"silent", "soundonly", "corrupt"}
    assert rows["silent"]["reason"] == "no audio track"
    assert rows["soundonly"]["reason"] == "no video track"
    assert rows["corrupt"]["reason"].startswith("cannot open (Invalid data")
    assert rows["corrupt"]["video"] == str(ks_videos / "test" / "singing" / "corrupt.mp4")
    listed = " ".join(read_lines(ks_root / "ks_audio" / f"{s}_1fps_path.txt")[0] for s in data.SPLITS)
    assert not any(clip in listed for clip in rows)
    assert not os.path.exists(ks_root / "ks_visual" / "train" / "silent")


def copy_videos(source, target, clips):
    """Copy the named clips of the ks test videos, keeping their split / class folders."""
    for split, classes in KS_CLIPS.items():
        for class_name, names in classes.items():
            for clip, _ in names:
                if clip in clips:
                    os.makedirs(target / split / class_name, exist_ok=True)
                    shutil.copy(source / split / class_name / f"{clip}.mp4", target / split / class_name)


@needs_av
def test_rerun_skips_finished_clips_and_redoes_interrupted_ones(ks_videos, tmp_path, capsys, monkeypatch):
    videos, root = tmp_path / "videos", tmp_path / "root"
    copy_videos(ks_videos, videos, {"d1", "s1", "d4", "d5"})
    out, _ = run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1, capsys=capsys)
    assert out.startswith("ks: 4 clips written, 0 skipped (already on disk), 0 failed")
    out, _ = run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1, capsys=capsys)
    assert out.startswith("ks: 0 clips written, 4 skipped")
    # a run killed while writing clip s1: its outputs are still under temporary names, nothing half-written in place
    def killed(path, array):
        raise KeyboardInterrupt

    shutil.rmtree(root / "ks_visual" / "train" / "s1")
    os.remove(root / "ks_audio" / "train" / "s1.npy")
    monkeypatch.setattr(preprocess, "save_array", killed)
    with pytest.raises(SystemExit) as exit_info:
        run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1)
    assert exit_info.value.code == 130 and "rerun the same command" in capsys.readouterr().err
    assert os.path.isdir(str(root / "ks_visual" / "train" / "s1") + preprocess.PARTIAL)
    assert not os.path.exists(root / "ks_visual" / "train" / "s1")
    monkeypatch.undo()
    # an older kind of leftover: frames in place but no spectrogram, and a stray temporary file
    os.remove(root / "ks_audio" / "train" / "d1.npy")
    with open(str(root / "ks_audio" / "train" / "d1.npy") + preprocess.PARTIAL, "wb") as f:
        f.write(b"half")
    out, _ = run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1, capsys=capsys)
    assert out.startswith("ks: 2 clips written, 2 skipped")
    for clip in ("d1", "s1"):
        assert np.load(root / "ks_audio" / "train" / f"{clip}.npy").shape == (1024, 128)
        assert len(os.listdir(root / "ks_visual" / "train" / clip)) == 3
    assert not any(name.endswith(preprocess.PARTIAL) for _, dirs, files in os.walk(root) for name in dirs + files)
    assert not os.path.exists(root / "failures.csv")


@needs_av
def test_ks_from_authors_lists_with_class_names_and_other_recipes(ks_videos, tmp_path, capsys):
    lists = tmp_path / "lists"
    os.makedirs(lists)
    for split, lines in dict(train=["x/d1 10 0", "x/s1 10 1", "x/missing 10 1"], val=["x/d4 10 0"],
                             test=["x/d5 10 0", "x/s5 10 1"]).items():
        with open(lists / f"{split}_1fps_path.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(lists / "ks_classes.txt", "w") as f:
        f.write("playing drums\nsinging\n")
    root = tmp_path / "root"
    out, _ = run_preprocess("ks", "--videos", ks_videos, "--out", root, "--lists", lists, "--workers", 1,
                            "--recipe", "stft-pmr", "--short-side", 32, capsys=capsys)
    assert out.startswith("ks: 5 clips written, 0 skipped (already on disk), 1 failed")
    assert read_lines(root / "ks_classes.txt") == ["playing drums", "singing"]
    assert read_lines(root / "ks_audio" / "train_1fps_path.txt") == ["ks_visual/train/d1 3 0", "ks_visual/train/s1 3 1"]
    with open(root / "failures.csv") as f:
        assert [row["reason"] for row in csv.DictReader(f)] == [f"no video named missing.* under {ks_videos}"]
    assert np.load(root / "ks_audio" / "test" / "s5.npy").shape == (257, 1004)
    assert decode_jpeg(read_file(str(root / "ks_visual" / "val" / "d4" / "frame_00001.jpg"))).shape == (3, 32, 43)
    # OGM-GE lists (id,10,label), no val list: val is carved from train as data.py's reader carves it
    for split, lines in dict(train=["d1,10,0", "d2,10,0", "s1,10,1", "s2,10,1"], test=["d5,10,0"]).items():
        with open(tmp_path / f"my_{split}.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    ogm = tmp_path / "ogm"
    os.makedirs(ogm)
    for split in ("train", "test"):
        shutil.move(str(tmp_path / f"my_{split}.txt"), ogm)
    run_preprocess("ks", "--videos", ks_videos, "--out", tmp_path / "root_ogm", "--lists", ogm, "--workers", 1,
                   "--recipe", "stft-ogm")
    lists_written = {s: read_lines(tmp_path / "root_ogm" / "ks_audio" / f"{s}_1fps_path.txt") for s in data.SPLITS}
    assert len(lists_written["train"]) == 2 and len(lists_written["val"]) == 2 and len(lists_written["test"]) == 1
    assert np.load(tmp_path / "root_ogm" / "ks_audio" / "test" / "d5.npy").shape == (257, 188)


CREMAD_ACTORS = ("1001", "1002", "1003", "1004", "1005", "1006")


@pytest.fixture(scope="module")
def cremad_videos(tmp_path_factory):
    if PREPROCESS_MISSING:
        pytest.skip("PyAV or soxr is not installed (pip install -r requirements-preprocess.txt)")
    root = tmp_path_factory.mktemp("cremad_videos")
    for actor in CREMAD_ACTORS:  # CREMA-D's own kind of file: Sorenson H.263 and MP3 in FLV
        for emotion in ("ANG", "NEU"):
            make_video(str(root / f"{actor}_IEO_{emotion}_HI.flv"), 2.5, fps=30, size=(80, 60), codec="flv",
                       audio_codec="libmp3lame", audio_rate=22050)
    make_video(str(root / "interview.flv"), 1, codec="flv", audio_codec="libmp3lame", audio_rate=22050)
    return root


@needs_av
def test_cremad_speaker_disjoint_split_first_frames_and_recipe(cremad_videos, tmp_path, capsys):
    root = tmp_path / "root"
    out, _ = run_preprocess("cremad", "--videos", cremad_videos, "--out", root, "--workers", 1, capsys=capsys)
    assert out.startswith("cremad: 12 clips written, 0 skipped (already on disk), 1 failed")
    lists = {s: [line.split(",") for line in read_lines(root / f"{s}.csv")] for s in data.SPLITS}
    speakers = {s: {clip.split("_")[0] for clip, _ in lines} for s, lines in lists.items()}
    assert [len(speakers[s]) for s in data.SPLITS] == [4, 1, 1]  # int(0.7 * 6), int(0.1 * 6) -> 1, the rest
    assert set().union(*speakers.values()) == set(CREMAD_ACTORS)
    assert all(emotion == clip.split("_")[2] for lines in lists.values() for clip, emotion in lines)
    again = tmp_path / "again"  # the split is fixed by its seed alone
    run_preprocess("cremad", "--videos", cremad_videos, "--out", again, "--workers", 1)
    assert all(read_lines(again / f"{s}.csv") == read_lines(root / f"{s}.csv") for s in data.SPLITS)
    clip = lists["test"][0][0]
    # the first frame of each second, as OGM-GE's data/CREMAD/video_preprocessing.py (video2frame_update) keeps:
    # frames 0, 30 and 60 at 30 fps (2.5 s: three seconds begin)
    np.testing.assert_allclose(jpeg_levels(root / "visual" / clip), [grey_level(0), grey_level(30), grey_level(60)],
                               atol=2)
    spectrogram = np.load(root / "audio" / f"{clip}.npy")
    assert spectrogram.shape == (257, 188) and spectrogram.dtype == np.float32
    peak = spectrogram.mean(axis=1).argmax()  # bin width 22050 / 512 Hz
    assert abs(peak - 440 / (22050 / 512)) <= 1
    with open(root / "failures.csv") as f:
        assert [row["reason"] for row in csv.DictReader(f)] == ["name is not <actor>_<sentence>_<EMO>_<level>"]
    assert "CREMAD_EMOTIONS" not in vars(preprocess)  # one list of emotions, data.py's (OGM-GE's label order)


@needs_av
def test_cremad_lists_with_validation_held_out_by_speaker(cremad_videos, tmp_path):
    lists = tmp_path / "lists"
    os.makedirs(lists)
    train = [f"{a}_IEO_{e}_HI,{e}" for a in CREMAD_ACTORS[:5] for e in ("ANG", "NEU")]
    with open(lists / "train.csv", "w", encoding="utf-8-sig") as f:  # OGM-GE's files open with a BOM
        f.write("\n".join(train) + "\n")
    with open(lists / "test.csv", "w") as f:
        f.write("1006_IEO_ANG_HI,ANG\n")
    root = tmp_path / "root"
    run_preprocess("cremad", "--videos", cremad_videos, "--out", root, "--lists", lists, "--workers", 1)
    written = {s: read_lines(root / f"{s}.csv") for s in data.SPLITS}
    assert sorted(written["train"] + written["val"]) == sorted(train)
    assert {line[:4] for line in written["val"]} == {written["val"][0][:4]} and len(written["val"]) == 2
    assert not {line[:4] for line in written["val"]} & {line[:4] for line in written["train"]}
    assert written["test"] == ["1006_IEO_ANG_HI,ANG"]


@needs_av
def test_stft_ogm_resamples_as_librosa_does_on_the_fixture():
    """fixtures/stft_ogm_librosa.npz: 1 s of 16-bit audio at 16 kHz and OGM-GE's CREMA-D spectrogram of it as
    librosa 0.11 computes it (librosa.load's resampling to 22,050 Hz, soxr_hq, then dataset/CramedDataset.py)."""
    fixture = np.load(os.path.join(HERE, "fixtures", "stft_ogm_librosa.npz"))
    waveform = fixture["pcm"].astype(np.float32) / 32768  # as a WAV's samples are read
    ours = preprocess.stft_ogm_cremad(preprocess.resample(waveform, 16000, 22050))
    assert ours.shape == fixture["spectrogram"].shape == (257, 188)
    assert np.abs(ours - fixture["spectrogram"].astype(np.float32)).mean(axis=1).max() < 0.1  # 0.002 here
    assert len(preprocess.resample(waveform[:1001], 16000, 22050)) == 1380  # ceil(1001 * 22050 / 16000)


@needs_av
def test_at_29_97_fps_the_frame_on_screen_at_each_second_is_kept(tmp_path):
    # OGM-GE's video2frame_update counts with int(fps) = 29 and keeps frames 0, 29, 58, ..., 290 (second 10 at
    # 9.68 s); the frame on screen at 10 s is frame 299
    make_video(str(tmp_path / "ntsc.mp4"), 10.2, fps=fractions.Fraction(30000, 1001), size=(32, 32), tone=None)
    frames, _, _ = preprocess.decode_clip(str(tmp_path / "ntsc.mp4"), 0, False, False, 0)
    expected = [grey_level(int(k * 30000 / 1001)) for k in range(11)]
    assert expected[-1] != grey_level(290)
    np.testing.assert_allclose([frame.mean() for frame in frames], expected, atol=2)


@needs_av
def test_cremad_min_frames_tops_up_with_other_frames_in_time_order(tmp_path):
    videos = tmp_path / "videos"
    os.makedirs(videos)
    make_video(str(videos / "1001_IEO_ANG_HI.flv"), 1.3, fps=30, codec="flv", audio_codec="libmp3lame",
               audio_rate=22050)
    for actor in ("1002", "1003", "1004"):  # four speakers: the fewest a three-way split takes
        shutil.copy(videos / "1001_IEO_ANG_HI.flv", videos / f"{actor}_IEO_ANG_HI.flv")
    levels = {}
    for frames in (1, 3):
        root = tmp_path / f"root{frames}"
        run_preprocess("cremad", "--videos", videos, "--out", root, "--workers", 1, "--min-frames", frames)
        levels[frames] = jpeg_levels(root / "visual" / "1001_IEO_ANG_HI")
    # 1.3 s at 30 fps: frames 0 and 30 begin a second (OGM-GE's 2); PMR's min_save_frame=3 adds one at random
    np.testing.assert_allclose(levels[1], [grey_level(0), grey_level(30)], atol=2)
    assert len(levels[3]) == 3 and levels[3] == sorted(levels[3])
    extra = [level for level in levels[3] if min(abs(level - np.array(levels[1]))) > 2]
    assert len(extra) == 1 and min(abs(extra[0] - grey_level(i)) for i in range(1, 39) if i != 30) <= 2
    assert jpeg_levels(tmp_path / "root3" / "visual" / "1002_IEO_ANG_HI") != levels[3]  # drawn per clip


@needs_av
def test_cremad_audio_from_the_wav_folder(cremad_videos, tmp_path, capsys):
    wavs = tmp_path / "AudioWAV"
    os.makedirs(wavs)
    clips = sorted(os.path.splitext(name)[0] for name in os.listdir(cremad_videos) if name.startswith("100"))
    for clip in clips[1:]:  # CREMA-D's own files: 16 kHz mono 16-bit PCM; the first clip has none
        make_video(str(wavs / f"{clip}.wav"), 1, video=False, tone=1000.0, audio_codec="pcm_s16le", audio_rate=16000)
    root = tmp_path / "root"
    out, _ = run_preprocess("cremad", "--videos", cremad_videos, "--out", root, "--audio", wavs, "--workers", 1,
                            "--recipe", "stft-pmr", capsys=capsys)
    assert out.startswith("cremad: 11 clips written, 0 skipped (already on disk), 2 failed")
    tone = np.round(16000 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)) / 32768
    np.testing.assert_allclose(np.load(root / "audio" / f"{clips[1]}.npy"), preprocess.stft_pmr(tone), atol=1e-4)
    with open(root / "failures.csv") as f:
        reasons = {row["clip"]: row["reason"] for row in csv.DictReader(f)}
    assert reasons[clips[0]] == f"no audio file {wavs / clips[0]}.wav"
    assert not os.path.exists(root / "visual" / clips[0])


@pytest.mark.slow
@needs_av
def test_a_rotated_video_is_saved_upright(tmp_path):
    import av
    path = str(tmp_path / "videos" / "train" / "c" / "phone.mp4")
    os.makedirs(os.path.dirname(path))
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if not hasattr(stream, "set_display_rotation"):
            pytest.skip("this PyAV cannot write a display matrix (VideoStream.set_display_rotation)")
        stream.set_display_rotation(90)  # stored landscape, shown portrait
        for i in range(10):
            image = np.zeros((48, 64, 3), np.uint8)
            image[:, :16] = 255  # white on the left of the stored picture: at the bottom once turned 90 degrees
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    frames, _, _ = preprocess.decode_clip(path, 0, False, False, 0)
    assert frames[0].shape == (64, 48, 3)
    assert frames[0][-12:].mean() > 200 and frames[0][:40].mean() < 30
    if importlib.util.find_spec("cv2") is not None:  # OpenCV's FFmpeg reader turns frames upright by itself
        import cv2
        capture = cv2.VideoCapture(path)
        _, bgr = capture.read()
        capture.release()
        assert np.abs(bgr[..., ::-1].astype(int) - frames[0]).mean() < 3


@needs_av
def test_clips_in_sub_folders_and_linked_folders_are_processed(ks_videos, tmp_path, capsys):
    videos = tmp_path / "videos"
    copy_videos(ks_videos, videos, {"d1", "s1", "d5", "s5"})
    os.makedirs(videos / "train" / "singing" / "takes")
    shutil.move(str(videos / "train" / "singing" / "s1.mp4"), videos / "train" / "singing" / "takes")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(videos / "test" / "playing drums"), elsewhere)
    os.symlink(elsewhere, videos / "test" / "playing drums")
    os.symlink(videos / "train" / "singing", videos / "train" / "singing" / "takes" / "loop")  # walked once
    root = tmp_path / "root"
    out, _ = run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1, capsys=capsys)
    assert out.startswith("ks: 4 clips written")
    assert "ks_visual/train/s1 3 1" in read_lines(root / "ks_audio" / "train_1fps_path.txt")
    assert "ks_visual/test/d5 3 0" in read_lines(root / "ks_audio" / "test_1fps_path.txt")
    lists = tmp_path / "lists"  # found by name under --videos, through the linked folder too
    os.makedirs(lists)
    for split, line in dict(train="x/s1 3 1", test="x/d5 3 0").items():
        with open(lists / f"{split}_1fps_path.txt", "w") as f:
            f.write(line + "\n")
    out, _ = run_preprocess("ks", "--videos", videos, "--out", tmp_path / "listed", "--lists", lists,
                            "--workers", 1, capsys=capsys)
    assert out.startswith("ks: 2 clips written, 0 skipped (already on disk), 0 failed")


@needs_av
def test_one_clip_name_in_two_class_folders_is_refused_before_any_work(ks_videos, tmp_path, capsys):
    videos = tmp_path / "videos"
    copy_videos(ks_videos, videos, {"d1", "s1", "d5"})
    shutil.copy(videos / "train" / "playing drums" / "d1.mp4", videos / "train" / "singing")
    with pytest.raises(SystemExit) as exit_info:
        run_preprocess("ks", "--videos", videos, "--out", tmp_path / "root", "--workers", 1)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: two videos named d1 in split train: {videos / 'train' / 'playing drums' / 'd1.mp4'} "
                          f"and {videos / 'train' / 'singing' / 'd1.mp4'}")
    assert os.listdir(tmp_path / "root") == []


def no_temporary_files(root):
    return not any(name.endswith(preprocess.PARTIAL) for _, dirs, files in os.walk(root) for name in dirs + files)


@needs_av
def test_a_clip_name_of_250_bytes_is_written_under_a_short_temporary_name(ks_videos, tmp_path, capsys):
    videos, root = tmp_path / "videos", tmp_path / "root"
    copy_videos(ks_videos, videos, {"d1", "s1", "d4", "d5"})
    long = "x" * 250  # a valid file name (.mp4 makes 254 bytes), though <name>.partial would pass 255
    shutil.copy(videos / "train" / "singing" / "s1.mp4", videos / "train" / "singing" / f"{long}.mp4")
    out, _ = run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1, capsys=capsys)
    assert out.startswith("ks: 5 clips written, 0 skipped (already on disk), 0 failed")
    assert f"ks_visual/train/{long} 3 1" in read_lines(root / "ks_audio" / "train_1fps_path.txt")
    assert np.load(root / "ks_audio" / "train" / f"{long}.npy").shape == (1024, 128)
    # a run killed while writing it leaves a short temporary name, which the rerun removes
    frames = str(root / "ks_visual" / "train" / long)
    temporary = preprocess.partial_path(frames)
    assert temporary.endswith(preprocess.PARTIAL) and len(os.path.basename(temporary)) <= preprocess.SHORT_NAME
    assert os.path.dirname(temporary) == os.path.dirname(frames) and temporary != preprocess.partial_path(frames + "y")
    shutil.rmtree(frames)
    os.makedirs(temporary)
    out, _ = run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1, capsys=capsys)
    assert out.startswith("ks: 1 clips written, 4 skipped")
    assert len(os.listdir(frames)) == 3 and no_temporary_files(root)


@needs_av
def test_a_clip_name_too_long_for_the_file_system_of_out_is_a_failure(ks_videos, tmp_path, capsys, monkeypatch):
    videos, root = tmp_path / "videos", tmp_path / "root"
    copy_videos(ks_videos, videos, {"d1", "s1", "d4", "d5"})
    long = "y" * 140  # fits the file system of --videos, not that of --out (as on eCryptfs: 143 bytes)
    shutil.copy(videos / "train" / "singing" / "s1.mp4", videos / "train" / "singing" / f"{long}.mp4")
    real_pathconf = os.pathconf
    monkeypatch.setattr(os, "pathconf", lambda path, name: 143 if str(path) == str(root) and name == "PC_NAME_MAX"
                        else real_pathconf(path, name))
    out, _ = run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1, capsys=capsys)
    assert out.startswith("ks: 4 clips written, 0 skipped (already on disk), 1 failed")
    with open(root / "failures.csv", encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == [dict(clip=long, video=str(videos / "train" / "singing" / f"{long}.mp4"),
                                                reason=f"output name {long}.npy is 144 bytes, more than the 143 "
                                                       f"that the file system of {root} allows")]
    assert not os.path.exists(root / "ks_visual" / "train" / long) and no_temporary_files(root)


@needs_av
def test_a_clip_name_that_is_not_utf8_is_a_failure_and_failures_csv_stays_utf8(ks_videos, tmp_path, capsys):
    videos, root = tmp_path / "videos", tmp_path / "root"
    copy_videos(ks_videos, videos, {"d1", "s1", "d4", "d5"})
    latin1 = os.fsdecode(b"caf\xe9")  # a Latin-1 name from an old archive
    shutil.copy(videos / "train" / "singing" / "s1.mp4", videos / "train" / "singing" / f"{latin1}.mp4")
    out, _ = run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1, capsys=capsys)
    assert out.startswith("ks: 4 clips written, 0 skipped (already on disk), 1 failed")
    with open(root / "failures.csv", encoding="utf-8") as f:  # valid UTF-8, the bytes shown as \xNN
        assert list(csv.DictReader(f)) == [dict(clip="caf\\xe9", video=f"{videos}/train/singing/caf\\xe9.mp4",
                                                reason="name is not UTF-8 (byte 0xe9), which the lists are read as; "
                                                       "rename the file in UTF-8")]
    for split in data.SPLITS:  # the lists read back, without it
        assert all(clip.isascii() for clip, _, _ in
                   data.read_ks_list(str(root / "ks_audio" / f"{split}_1fps_path.txt"), ogm_format=False))
    assert not os.path.exists(root / "ks_visual" / "train" / latin1) and no_temporary_files(root)


@pytest.mark.parametrize("folder, why", [(b"sing\ning", "it holds a line break"),
                                         (b"singing ", "it begins or ends with white space"),
                                         (b"sing\xe9ing", "it is not UTF-8 (byte 0xe9)")])
@needs_av
def test_a_class_folder_name_that_cannot_be_one_line_is_refused_before_any_work(ks_videos, tmp_path, capsys,
                                                                                folder, why):
    videos, root = tmp_path / "videos", tmp_path / "root"
    copy_videos(ks_videos, videos, {"d1", "s1", "d5"})
    shutil.move(str(videos / "train" / "singing"), videos / "train" / os.fsdecode(folder))
    with pytest.raises(SystemExit) as exit_info:
        run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1)
    err = capsys.readouterr().err
    shown = folder.decode("utf-8", "backslashreplace").replace("\n", "\\n")
    assert exit_info.value.code == 2 and err == (f"error: {videos / 'train' / shown}: class folder name cannot be one "
                                                 f"line of ks_classes.txt as it is ({why}); rename the folder\n")
    assert os.listdir(root) == []


def test_ucf101_names_that_are_not_utf8_or_hold_white_space_are_failures_with_no_class():
    index = {name: [f"videos/{name}.avi"] for name in
             ("v_Archery_g01_c01", os.fsdecode(b"v_Caf\xe9_g01_c01"), "v_Bad\rName_g08_c01", "v_Bowling_g08_c01")}
    failures = []
    class_names, split_files = preprocess.plan_ucf101("videos", None, index, failures)
    assert class_names == ["Archery", "Bowling"]
    assert [(clip, reason.split(" (")[0]) for clip, _, reason in sorted(failures)] == [
        ("v_Bad\rName_g08_c01", "clip name contains white space, which the lists cannot hold"),
        (os.fsdecode(b"v_Caf\xe9_g01_c01"), "name is not UTF-8")]
    assert split_files["testlist01.txt"] == [("v_Archery_g01_c01", "Archery/v_Archery_g01_c01.avi")]


@needs_av
def test_a_full_disk_removes_the_temporary_files_of_every_clip(ks_videos, tmp_path, capsys, monkeypatch):
    """With several workers, the others may be writing clips when one finds the disk full: their temporary files
    go too (here one process stands in for them: the second clip finds the first one's leftovers)."""
    videos, root = tmp_path / "videos", tmp_path / "root"
    copy_videos(ks_videos, videos, {"d1", "s1", "d5"})
    calls = []

    def interrupted_then_full(job):
        calls.append(job)
        if len(calls) == 1:  # as if a worker were stopped while writing the first clip
            os.makedirs(job["frames"] + preprocess.PARTIAL)
            return job["key"], "written", 0
        raise preprocess.OutputError(f"{job['frames']}: cannot write (No space left on device); expected room")

    monkeypatch.setattr(preprocess, "process_clip", interrupted_then_full)
    with pytest.raises(SystemExit) as exit_info:
        run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1)
    assert exit_info.value.code == 2 and "No space left on device" in capsys.readouterr().err
    assert len(calls) == 2 and os.path.isdir(root / "ks_visual")
    assert not any(name.endswith(preprocess.PARTIAL) for _, dirs, files in os.walk(root) for name in dirs + files)


@pytest.mark.parametrize("where", ["read-only", "full disk while writing a clip", "full disk while writing a list"])
@needs_av
def test_unwritable_out_ends_in_one_line_and_leaves_nothing_half_written(ks_videos, tmp_path, capsys, monkeypatch,
                                                                         where):
    videos, root = tmp_path / "videos", tmp_path / "root"
    copy_videos(ks_videos, videos, {"d1", "s1", "d5"})
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).startswith(str(root)) and (where == "read-only" or str(path).endswith(".txt.partial")):
            code = errno.EACCES if where == "read-only" else errno.ENOSPC
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    def full(path, array):
        with real_open(path, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(preprocess, "open", failing_open, raising=False)  # the checks run as any user, root too
    if where == "full disk while writing a clip":
        monkeypatch.setattr(preprocess, "save_array", full)
    with pytest.raises(SystemExit) as exit_info:
        run_preprocess("ks", "--videos", videos, "--out", root, "--workers", 1)
    err = capsys.readouterr().err  # the progress lines, then one line
    assert exit_info.value.code == 2 and err.count("error") == 1, err
    err = err.splitlines(keepends=True)[-1]
    if where == "read-only":
        assert err == (f"error: {root / '.write-check'}: cannot write (Permission denied); expected a folder you "
                       f"can write to\n")
        assert not os.path.exists(root / "ks_visual")
    else:
        assert err.startswith(f"error: {root}") and "cannot write (No space left on device); expected room" in err
    assert not any(name.endswith(preprocess.PARTIAL) for _, dirs, files in os.walk(root) for name in dirs + files)


@pytest.fixture(scope="module")
def ucf_videos(tmp_path_factory):
    if PREPROCESS_MISSING:
        pytest.skip("PyAV or soxr is not installed (pip install -r requirements-preprocess.txt)")
    root = tmp_path_factory.mktemp("ucf_videos")
    for class_name in ("Archery", "Bowling"):
        os.makedirs(root / class_name)
        for group in (1, 8, 9, 10):  # group 1 is in testlist01, the others in trainlist01
            make_video(str(root / class_name / f"v_{class_name}_g{group:02d}_c01.avi"), 2.2, fps=25, size=(96, 72),
                       codec="mpeg4", tone=None, moving_square=True)
    return root


@needs_av
def test_ucf101_rgb_flow_and_split_files(ucf_videos, tmp_path):
    if not preprocess.tvl1_available():
        pytest.skip("OpenCV's contrib module (cv2.optflow) is not installed")
    root = tmp_path / "root"
    run_preprocess("ucf101", "--videos", ucf_videos, "--out", root, "--workers", 1)
    assert read_lines(root / "splits" / "classInd.txt") == ["1 Archery", "2 Bowling"]
    assert sorted(read_lines(root / "splits" / "testlist01.txt")) == ["Archery/v_Archery_g01_c01.avi",
                                                                     "Bowling/v_Bowling_g01_c01.avi"]
    assert "Bowling/v_Bowling_g10_c01.avi 2" in read_lines(root / "splits" / "trainlist01.txt")
    assert len(read_lines(root / "splits" / "testlist02.txt")) == 6  # groups 8-14
    clip = "v_Bowling_g08_c01"
    assert sorted(os.listdir(root / "rgb" / clip)) == ["frame_00001.jpg", "frame_00002.jpg"]  # 2.2 s, middles
    u_names = sorted(os.listdir(root / "flow" / "u" / clip))
    assert u_names == ["frame000001.jpg", "frame000002.jpg"] == sorted(os.listdir(root / "flow" / "v" / clip))
    # the square moves 2 pixels right a frame, u = 127.5 + 2 * 255 / 40 = 140.25 where TV-L1 sees it move (its
    # edges; its uniform inside less), v stays at 127.5, and so does the still background
    u = decode_jpeg(read_file(str(root / "flow" / "u" / clip / u_names[0]))).float()[0]
    v = decode_jpeg(read_file(str(root / "flow" / "v" / clip / u_names[0]))).float()[0]
    square = (slice(24, 40), slice(32, 50))  # where the square is around frame 12 (t = 0.5 s)
    assert u[square].mean() > 131 and 136 <= u[square].max() <= 145
    assert abs(v[square].mean() - 127.5) < 2 and abs(u[:16].mean() - 127.5) < 1.5
    # with the official lists: copied, naming only the clips on disk
    lists = tmp_path / "lists"
    os.makedirs(lists)
    with open(lists / "classInd.txt", "w") as f:
        f.write("1 Archery\n2 Bowling\n")
    with open(lists / "trainlist01.txt", "w") as f:
        f.write("Archery/v_Archery_g08_c01.avi 1\nBowling/v_Bowling_g08_c01.avi 2\nBowling/v_Bowling_g11_c01.avi 2\n")
    with open(lists / "testlist01.txt", "w") as f:
        f.write("Archery/v_Archery_g01_c01.avi\n")
    official = tmp_path / "official"
    run_preprocess("ucf101", "--videos", ucf_videos, "--out", official, "--lists", lists, "--workers", 1)
    assert read_lines(official / "splits" / "trainlist01.txt") == ["Archery/v_Archery_g08_c01.avi 1",
                                                                  "Bowling/v_Bowling_g08_c01.avi 2"]
    assert sorted(os.listdir(official / "rgb")) == ["v_Archery_g01_c01", "v_Archery_g08_c01", "v_Bowling_g08_c01"]


@needs_av
def test_ucf101_without_opencv_contrib_writes_rgb_and_says_so(ucf_videos, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preprocess, "tvl1_available", lambda: False)
    _, err = run_preprocess("ucf101", "--videos", ucf_videos, "--out", tmp_path, "--workers", 1, capsys=capsys)
    assert "cv2.optflow" in err and "opencv-contrib-python-headless" in err
    assert len(os.listdir(tmp_path / "rgb")) == 8 and not os.path.exists(tmp_path / "flow")


# ----------------------------------------------------------------------------------------------
# Command line

@pytest.mark.parametrize("flags, message", [
    (["ks", "--videos", "{missing}", "--out", "{out}"], "error: --videos {missing}: folder not found"),
    (["ks", "--videos", "{empty}", "--out", "{out}"],
     "error: {empty} (expected {empty}/<split>/<class name>/<clip>.mp4): no train or test split found"),
    (["ks", "--videos", "{empty}", "--out", "{out}", "--workers", "0"], "error: --workers must be at least 1, got 0"),
    (["ucf101", "--videos", "{empty}", "--out", "{out}", "--recipe", "fbank"], "error: --recipe does not apply"),
    (["cremad", "--videos", "{empty}", "--out", "{out}"], "error: {empty}: no CREMA-D videos"),
    (["ucf101", "--videos", "{empty}", "--out", "{out}", "--lists", "{empty}"], "error: {empty}/classInd.txt: "
                                                                                "UCF-101 class index not found"),
    (["mmdebiased", "--videos", "{empty}", "--out", "{out}"], "preprocess.py: error: argument dataset: invalid"),
    (["ks", "--out", "{out}"], "preprocess.py: error: the following arguments are required: --videos"),
    (["cremad", "--videos", "{empty}", "--out", "{out}", "--audio", "{missing}"],
     "error: --audio {missing}: folder not found"),
    (["ks", "--videos", "{empty}", "--out", "{out}", "--audio", "{empty}"], "error: --audio applies to cremad only"),
    (["cremad", "--videos", "{empty}", "--out", "{out}", "--min-frames", "0"],
     "error: --min-frames must be at least 1, got 0"),
])
@needs_av
def test_bad_flags_and_folders_give_one_line_and_exit_2(tmp_path, capsys, flags, message):
    names = dict(missing=tmp_path / "missing", empty=tmp_path / "empty", out=tmp_path / "out")
    os.makedirs(names["empty"])
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main([flag.format(**names) for flag in flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(message.format(**names)), err


@needs_av
def test_stft_ogm_without_soxr_is_one_line_before_any_work(cremad_videos, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "soxr", None)  # import soxr fails
    with pytest.raises(SystemExit) as exit_info:
        run_preprocess("cremad", "--videos", cremad_videos, "--out", tmp_path / "out")
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        "error: recipe stft-ogm resamples with soxr, as librosa does: pip install -r requirements-preprocess.txt\n")
    assert not os.path.exists(tmp_path / "out")


@needs_av
def test_ks_label_beyond_the_class_list_is_an_error(ks_videos, tmp_path, capsys):
    lists = tmp_path / "lists"
    os.makedirs(lists)
    for split, line in dict(train="d1 10 0", test="d5 10 2").items():
        with open(lists / f"{split}_1fps_path.txt", "w") as f:
            f.write(line + "\n")
    with open(lists / "ks_classes.txt", "w") as f:
        f.write("playing drums\nsinging\n")
    with pytest.raises(SystemExit) as exit_info:
        run_preprocess("ks", "--videos", ks_videos, "--out", tmp_path / "out", "--lists", lists)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "clip d5 has label 2" in err and "names 2 classes (labels 0..1)" in err


@pytest.mark.slow  # the worker processes start a fresh interpreter each (spawn): seconds on a small machine
@needs_av
def test_two_workers_report_progress_and_summary(ks_videos, tmp_path, capsys):
    videos = tmp_path / "videos"
    copy_videos(ks_videos, videos, {"d1", "d2", "s1", "s2", "d5"})
    out, err = run_preprocess("ks", "--videos", videos, "--out", tmp_path / "root", "--workers", 2, capsys=capsys)
    assert "5/5 clips: 5 written, 0 skipped, 0 failed" in err
    assert out.splitlines()[0] == "ks: 5 clips written, 0 skipped (already on disk), 0 failed"
    assert f"python train.py --dataset ks --data-root {tmp_path / 'root'}" in out
    assert sorted(os.listdir(tmp_path / "root" / "ks_audio" / "train")) == ["d2.npy", "s2.npy"]  # 1 per class to val


@pytest.mark.slow  # starts a Python process: about 5 s
def test_command_line_runs_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "preprocess.py"), "ks", "--videos",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == f"error: --videos {tmp_path / 'missing'}: folder not found\n"


# ----------------------------------------------------------------------------------------------
# Straight into train.py

def train_one_epoch(dataset, root, out, *flags):
    """One epoch of train.py on the pre-processed `root`; returns its log record (every listed clip trained on)."""
    train.main(["--dataset", dataset, "--data-root", str(root), "--epochs", "1", "--warmup", "0", "--batch-size", "2",
                "--image-size", "32", "--gpu", "-1", "--workers", "0", "--out", str(out), *flags])
    (record,) = train.load_log(out / "log.jsonl")
    assert record["train_samples"] - sum(record["copies"]) == len(data.build_dataset(dataset, "train", root=str(root))) > 0
    return record


@pytest.mark.parametrize("recipe", ["fbank", pytest.param("stft-pmr", marks=pytest.mark.slow),
                                    pytest.param("stft-ogm", marks=pytest.mark.slow)])
@needs_av
def test_train_one_epoch_on_the_ks_output(ks_videos, tmp_path, recipe):
    copy_videos(ks_videos, tmp_path / "videos", {"d1", "d2", "s1", "s2", "d5", "s5"})
    run_preprocess("ks", "--videos", tmp_path / "videos", "--out", tmp_path / "root", "--workers", 1,
                   "--recipe", recipe)
    train_one_epoch("ks", tmp_path / "root", tmp_path / "run")
    assert len(train.load_log(str(tmp_path / "run" / "log.jsonl"))) == 1


@pytest.mark.slow
@needs_av
def test_train_one_epoch_on_the_ucf101_output(ucf_videos, tmp_path):
    if not preprocess.tvl1_available():
        pytest.skip("OpenCV's contrib module (cv2.optflow) is not installed: no flow to train on")
    run_preprocess("ucf101", "--videos", ucf_videos, "--out", tmp_path / "root", "--workers", 1)
    train_one_epoch("ucf101", tmp_path / "root", tmp_path / "run", "--no-pretrained")  # no network needed


@pytest.mark.slow
@needs_av
def test_train_one_epoch_on_the_cremad_output(cremad_videos, tmp_path):
    run_preprocess("cremad", "--videos", cremad_videos, "--out", tmp_path / "root", "--workers", 1)
    train_one_epoch("cremad", tmp_path / "root", tmp_path / "run")


@needs_av
def test_cremad_videos_and_wav_folder_preprocess_and_train(tmp_path):
    """CREMA-D as it is distributed: VideoFlash/*.flv and AudioWAV/*.wav (16 kHz mono PCM), through preprocess.py
    with the references' frames and spectrogram, then two epochs of train.py."""
    videos, wavs = tmp_path / "VideoFlash", tmp_path / "AudioWAV"
    os.makedirs(videos)
    os.makedirs(wavs)
    make_video(str(videos / "1001_IEO_ANG_HI.flv"), 1.3, fps=30, size=(48, 32), codec="flv", audio_codec="libmp3lame",
               audio_rate=22050)
    make_video(str(wavs / "1001_IEO_ANG_HI.wav"), 1.3, video=False, audio_codec="pcm_s16le", audio_rate=16000)
    for actor in ("1001", "1002", "1003", "1004"):
        for emotion in ("ANG", "NEU"):
            for folder, extension in ((videos, "flv"), (wavs, "wav")):
                target = folder / f"{actor}_IEO_{emotion}_HI.{extension}"
                if not target.exists():
                    shutil.copy(folder / f"1001_IEO_ANG_HI.{extension}", target)
    root = tmp_path / "root"
    run_preprocess("cremad", "--videos", videos, "--audio", wavs, "--out", root, "--workers", 1)
    assert len(os.listdir(root / "visual" / "1002_IEO_NEU_HI")) == 2  # 1.3 s: frames 0 and 30, as OGM-GE's script
    if importlib.util.find_spec("cv2") is not None:
        # the frames OGM-GE's data/CREMAD/video_preprocessing.py (videoReader.video2frame_update) saves, read with
        # OpenCV as there: those whose index count satisfies count % int(CAP_PROP_FPS) == 0
        import cv2
        capture = cv2.VideoCapture(str(videos / "1002_IEO_NEU_HI.flv"))
        fps, theirs, count = int(capture.get(cv2.CAP_PROP_FPS)), [], 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            if count % fps == 0:
                theirs.append(bgr[..., ::-1].astype(float))
            count += 1
        capture.release()
        ours = [decode_jpeg(read_file(str(path))).permute(1, 2, 0).float().numpy()
                for path in sorted((root / "visual" / "1002_IEO_NEU_HI").iterdir())]
        assert len(ours) == len(theirs) == 2
        assert all(np.abs(a - b).mean() < 3 for a, b in zip(ours, theirs))
    assert np.load(root / "audio" / "1002_IEO_NEU_HI.npy").shape == (257, 188)
    train.main(["--dataset", "cremad", "--data-root", str(root), "--epochs", "2", "--warmup", "1", "--batch-size", "2",
                "--image-size", "32", "--gpu", "-1", "--workers", "0", "--out", str(tmp_path / "run")])
    log = train.load_log(str(tmp_path / "run" / "log.jsonl"))
    assert [record["epoch"] for record in log] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in log)
