"""
Raw videos -> the on-disk layouts that data.py reads, for Kinetics-Sounds (ks), CREMA-D (cremad) and UCF-101
(ucf101):

    python preprocess.py DATASET --videos DIR --out ROOT [--lists DIR] [--audio DIR] [--workers N] [--recipe NAME]

Decoding uses PyAV and the stft-ogm recipe's resampling soxr (`pip install -r requirements-preprocess.txt`; the
`av` wheel carries its own FFmpeg); TV-L1 flow for ucf101 uses OpenCV's contrib module where it is installed
(requirements-flow.txt). None is needed by train.py or data.py.

What is read (videos are found by name anywhere under --videos, symbolically linked folders included: .mp4,
.mkv, .webm, .avi, .flv, .mov, ...) and written under ROOT (the lists name only the clips on disk):
  ks      --videos DIR/<split>/<class name>/<clip>.mp4 (split: train, test, and val, which is carved from train
          where missing, as data.py carves it from OGM-GE's lists; videos in sub-folders of a class folder belong
          to it; two videos of one name in one split stop the run before any work); labels number the sorted
          class names, written to ROOT/ks_classes.txt. Or --lists with the authors' <split>_1fps_path.txt or
          OGM-GE's my_<split>.txt (and a ks_classes.txt, copied and checked against the labels, if there).
          -> ks_audio/<split>_1fps_path.txt ('ks_visual/<split>/<clip> <frames> <label>' per line),
             ks_audio/<split>/<clip>.npy, ks_visual/<split>/<clip>/frame_00001.jpg ...
  cremad  <actor>_<sentence>_<EMO>_<level>.flv, split by speaker: 70 / 10 / 20 % of the actors, seed 2024. Or
          --lists with train.csv, test.csv and val.csv ('<clip>,<EMO>', OGM-GE's format; without val.csv, a
          tenth of train's speakers is held out). --audio DIR: the audio of each clip is read from DIR/<clip>.wav
          (CREMA-D's own AudioWAV folder, 16 kHz mono, which OGM-GE's and PMR's recipes read) instead of the
          video's audio track.
          -> {train,val,test}.csv ('<clip>,<EMO>'), audio/<clip>.npy, visual/<clip>/frame_00001.jpg ...
  ucf101  v_<Class>_g<group>_c<clip>.avi; classes in sorted order and the official splits' rule (testlist0k:
          groups 1-7, 8-14, 15-21). Or --lists with the official classInd.txt, trainlist0k.txt, testlist0k.txt.
          -> splits/classInd.txt, trainlist0k.txt, testlist0k.txt, rgb/<clip>/frame_00001.jpg ...,
             flow/u/<clip>/frame000001.jpg ..., flow/v/<clip>/frame000001.jpg ...

Frames: 1 per second of video, turned upright by the container's display rotation (a phone video stored on its
side, with a display matrix saying so), saved as JPEG (quality 95, cv2.imencode's default, which OGM-GE's
Kinetics-Sounds script used), downscaled so that the shorter side is at most --short-side (default 256; 0 keeps
the decoded size; the readers resize to --image-size anyway). The frame kept for second k is the one on screen
at time k + offset, measured from the first frame (the last frame for times past its end):
    ks      offset 0    the first frame of each second, as OGM-GE's VGGSound / Kinetics-Sounds script keeps
                        (frame index divisible by the frame rate)
    cremad  offset 0    the first frame of each second, as OGM-GE's data/CREMAD/video_preprocessing.py
                        (videoReader.video2frame_update: count % fps == 0) and PMR's script of the same name keep
    ucf101  offset 0.5  the middle of each second
A clip of D seconds gets one frame per second that starts before its end (offset 0: ceil(D); a 10 s clip gives
frame_00001.jpg ... frame_00010.jpg; a 1.3 s CREMA-D clip 2), and at least one. The scripts count frames with
fps = int(CAP_PROP_FPS): at 29.97 fps that keeps frames 0, 29, 58, ..., which drift 0.03 s a second earlier
than the second they stand for (frame 290, 0.32 s early, for second 10); we keep the frame on screen at each
second (frames 0, 29, 59, ..., 299 at 29.97 fps; the same frames as theirs at a whole rate). --min-frames N
tops a clip up to N frames with others drawn at random (seeded by the clip name), all saved in time order, as
PMR's video2frame_update(min_save_frame=3) does for CREMA-D (frame 0 repeated where the clip has fewer than N
frames); the default, 1, is OGM-GE's.

Audio: the first audio track (of DIR/<clip>.wav with --audio), decoded, averaged over its channels to mono and
resampled to 16 kHz with FFmpeg's resampler, like the `ffmpeg -ar 16000` step of OGM-GE and PMR. (OGM-GE's
Kinetics-Sounds wavs kept the source's channels and torchaudio's fbank then read channel 0 only; we average the
channels.) Spectrogram recipes, named by --recipe, as float32 .npy:

  fbank      (1024, 128), default for ks. OGM-GE's data/KineticSound/process_audio.py: waveform minus its mean,
             torchaudio.compliance.kaldi.fbank(htk_compat=True, sample_frequency=16000, use_energy=False,
             window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10), i.e. Kaldi's defaults
             otherwise: 25 ms frames (400 samples) every 10 ms (160), whole frames only (snip_edges), DC offset
             removed per frame, pre-emphasis 0.97, symmetric Hann window, zero-padded to a 512-point FFT, power
             spectrum, 128 triangular mel filters (mel = 1127 ln(1 + f / 700)) from 20 Hz to 8 kHz, log with a
             floor at float32's eps. Computed here with torch (kaldi_fbank), equal to torchaudio's to 1e-4
             (test_preprocess.py). Then padded with zero rows or cut to 1024 frames (10.24 s) and normalised
             (x + 4.503877) / (5.141276 * 2) (AudioSet's fbank mean and std, as that script uses).
  stft-pmr   (257, 1004). PMR's data/CREMAD scripts: waveform at 16 kHz tiled and cut to 160,000 samples (10 s),
             clipped to [-1, 1], scipy.signal.spectrogram(x, 16000, nperseg=512, noverlap=353) (its defaults:
             periodic Tukey window alpha 0.25, each segment's mean removed, one-sided power spectral density,
             1 + (160000 - 512) // 159 = 1004 segments), log(S + 1e-7), then standardised by the clip's own
             mean and std (+ 1e-9). Computed here with numpy / torch. (PMR's audio_preprocessing.py loads at
             librosa's default 22,050 Hz but still cuts 16000 * 10 samples, 7.3 s; its video_preprocessing.py
             loads at 16 kHz, which we follow. Both tile exactly 10 times, so clips under 1 s come out short
             and fail their shape assert; we tile as often as needed.)
  stft-ogm   (257, 188), default for cremad. OGM-GE's dataset/CramedDataset.py (CramedDataset.__getitem__, on the
             fly there): the 16 kHz audio resampled to 22,050 Hz as librosa.load(sr=22050) does in librosa >=
             0.10 (soxr's 'soxr_hq', then cut or zero-padded to ceil(N * 22050 / 16000) samples; equal to
             librosa 0.11 within 0.002 mean absolute difference per row on a committed fixture; the librosa of
             OGM-GE's time used resampy's kaiser_best, which differs by up to 2.3 per row there), tiled and cut
             to 66,150 samples (3 s), clipped to [-1, 1], librosa.stft(n_fft=512, hop_length=353)
             with librosa's defaults of its time (periodic Hann window, centred frames, reflect padding; librosa
             0.10 changed the padding to zeros), log(|S| + 1e-7), not normalised: 1 + 66150 // 353 = 188 frames.
A clip shorter than a recipe's length is padded (fbank) or tiled (stft-*) as that recipe says; a longer one is cut.

UCF-101 optical flow (where cv2.optflow exists: `pip install -r requirements-flow.txt`): OpenCV's
Dual TV-L1 between each kept frame and the next decoded frame (the one before, for the last frame), on the
grayscale frames at the saved size; u and v clipped to [-20, 20] pixels and mapped linearly to 0..255 (zero
flow at 127.5), saved as grayscale JPEGs, one pair per RGB frame.

Real data: clips run in --workers processes with a progress line on stderr; a clip is written under temporary
names and renamed into place, so clips already written are skipped by a rerun and a killed run leaves no half
clip; a clip that cannot be decoded, has no audio track (ks, cremad) or has no video frames, or whose name the
lists cannot hold (white space, bytes that are not UTF-8) or the file system of ROOT cannot (too long), is listed
in ROOT/failures.csv with the reason, and the rest go on. A ks class folder whose name cannot be one line of
ks_classes.txt as it is stops the run before any work. The lists written name only the clips on disk. An output
that cannot be written (a read-only --out is found before any work; a full disk) stops the run with one line
naming the path, and leaves no temporary file.
"""

import argparse
import csv
import errno
import fractions
import hashlib
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
import zlib

import numpy as np
import torch
from torchvision.io import encode_jpeg

import data

AUDIO_RATE = 16000  # every recipe starts from 16 kHz mono, as the ffmpeg -ar 16000 steps of OGM-GE and PMR
JPEG_QUALITY = 95
DEFAULT_SHORT_SIDE = 256
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".flv", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp")
PARTIAL = ".partial"  # suffix of an output being written; renamed into place when complete
SHORT_NAME = 128  # bytes: the longest temporary name (partial_path), below file systems' limit on a name (143, 255)
FLOW_BOUND = 20.0  # pixels; flow beyond is clipped before quantisation to 0..255

KS_NORM_MEAN, KS_NORM_STD = -4.503877, 5.141276  # OGM-GE's Kinetics-Sounds fbank normalisation
KS_FRAMES = 1024

CREMAD_NAME = re.compile(rf"^(\d+)_([A-Z]+)_({'|'.join(data.CREMAD_EMOTIONS)})_([A-Z]+)$")  # actor_sentence_EMO_level
CREMAD_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test speakers, without --lists
SPLIT_SEED = 2024  # speaker splits are fixed by this seed alone

UCF_NAME = re.compile(r"^v_(.+)_g(\d+)_c(\d+)$")
UCF_TEST_GROUPS = {1: range(1, 8), 2: range(8, 15), 3: range(15, 22)}  # the official splits' test groups


class PreprocessError(ValueError):
    """A bad flag, folder or list; the message names it."""


class ClipError(Exception):
    """Why one clip cannot be pre-processed (it goes to failures.csv)."""


class OutputError(PreprocessError):
    """An output that cannot be written (no permission, a full disk): the run stops, nothing half-written."""


def output_error(path, error):
    """OutputError naming `path`, the system's reason and what is expected."""
    expected = ("room on that disk: free some space and rerun the same command (clips written so far are kept)"
                if error.errno == errno.ENOSPC else "a folder you can write to")
    return OutputError(f"{path}: cannot write ({error.strerror or error}); expected {expected}")


def partial_path(path):
    """The temporary name under which output `path` is written, in its folder: <name>.partial, or where that would
    be longer than SHORT_NAME bytes (a 250-byte clip name is a valid file name, plus .partial is not), the SHA-1 of
    the name in hex and .partial (48 bytes), one for each output."""
    folder, name = os.path.split(path)
    if len(os.fsencode(name + PARTIAL)) <= SHORT_NAME:
        return path + PARTIAL
    return os.path.join(folder, hashlib.sha1(os.fsencode(name)).hexdigest() + PARTIAL)


def name_limit(folder):
    """The most bytes a file name may have in `folder` (255, that of most file systems, where the system does not
    say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255


def printable(text):
    """A name or path from the disk as one line of UTF-8 text: its bytes that are not UTF-8 (which Python holds as
    surrogates) as \\xNN, line breaks and other unprintable characters as Python writes them (\\n, \\x1b)."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def utf8_problem(name):
    """'not UTF-8 (byte 0xNN)' for a name from the disk whose bytes are not UTF-8 (a Latin-1 name from an old
    archive), else None: the lists are UTF-8 (data.read_text_lines), so such a name could not be read back."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"not UTF-8 (byte 0x{os.fsencode(name[error.start])[0]:02x})"
    return None


def clip_name_problem(clip):
    """Why the lists cannot name clip `clip` (they are UTF-8, with fields split at white space), or None."""
    not_utf8 = utf8_problem(clip)
    if not_utf8:
        return f"name is {not_utf8}, which the lists are read as; rename the file in UTF-8"
    if re.search(r"\s", clip):
        return "clip name contains white space, which the lists cannot hold"
    return None


def class_name_problem(name):
    """Why `name` cannot be one line of ks_classes.txt that data.read_class_names reads back as it is (UTF-8 lines,
    stripped), or None."""
    not_utf8 = utf8_problem(name)
    if not_utf8:
        return f"it is {not_utf8}"
    if name.splitlines() != [name]:
        return "it holds a line break"
    if name != name.strip():
        return "it begins or ends with white space"
    return None


# ----------------------------------------------------------------------------------------------
# Spectrogram recipes (numpy / torch only)

def mel_banks(num_bins, fft_size, sample_rate, low_freq=20.0):
    """Kaldi's triangular mel filters [num_bins, fft_size // 2] over the FFT bins below Nyquist, evenly spaced
    on mel = 1127 ln(1 + f / 700) from low_freq to Nyquist, each rising from its left edge to 1 at its centre
    and falling to its right edge (edges = the neighbours' centres). In float32, as torchaudio computes them
    whatever the waveform's precision: its rounding of the filter edges moves narrow low-frequency bands by up
    to 1e-4 in log energy, and the features are to match torchaudio's."""
    def mel(freq):
        return 1127.0 * math.log(1.0 + freq / 700.0)
    mel_low = mel(low_freq)
    delta = (mel(sample_rate / 2) - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)  # [num_bins, 1]
    left, center, right = (mel_low + (index + k) * delta for k in (0.0, 1.0, 2.0))
    bin_mel = 1127.0 * (1.0 + sample_rate / fft_size * torch.arange(fft_size // 2) / 700.0).log()  # [fft_size // 2]
    rising, falling = (bin_mel - left) / (center - left), (right - bin_mel) / (right - center)
    return torch.minimum(rising, falling).clamp_min(0.0)


def kaldi_fbank(waveform, sample_rate, num_mel_bins):
    """Log mel filterbank energies [frames, num_mel_bins] of a mono waveform [N] (float, any scale), as
    torchaudio.compliance.kaldi.fbank computes them with dither 0, a 'hanning' window and Kaldi's other
    defaults (see the module docstring). Frames: 1 + (N - 25 ms) // 10 ms; none for N < 25 ms."""
    waveform = torch.as_tensor(waveform, dtype=torch.float64)
    frame_length, frame_shift = int(sample_rate * 0.025), int(sample_rate * 0.010)
    fft_size = 1 << (frame_length - 1).bit_length()  # next power of two: 400 -> 512
    if len(waveform) < frame_length:
        return torch.zeros(0, num_mel_bins)
    frames = waveform.unfold(0, frame_length, frame_shift)  # [T, frame_length]
    frames = frames - frames.mean(dim=1, keepdim=True)  # DC offset removed per frame
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # x[j - 1], the first sample against itself
    frames = (frames - 0.97 * previous) * torch.hann_window(frame_length, periodic=False, dtype=torch.float64)
    power = torch.fft.rfft(frames, n=fft_size).abs().pow(2)  # [T, fft_size // 2 + 1]
    banks = mel_banks(num_mel_bins, fft_size, sample_rate).double()
    energies = power[:, :fft_size // 2] @ banks.T  # the Nyquist bin has no filter
    return energies.clamp_min(torch.finfo(torch.float32).eps).log().float()


def fbank_ogm_ks(waveform):
    """Recipe `fbank`: [16 kHz waveform] -> float32 (1024, 128), OGM-GE's Kinetics-Sounds spectrogram."""
    waveform = np.asarray(waveform, dtype=np.float64)
    fbank = kaldi_fbank(waveform - waveform.mean(), AUDIO_RATE, 128)[:KS_FRAMES]
    fbank = torch.cat([fbank, torch.zeros(KS_FRAMES - len(fbank), 128)])  # zero rows, before normalisation
    return ((fbank - KS_NORM_MEAN) / (KS_NORM_STD * 2)).numpy()


def tukey_window(length, alpha):
    """scipy.signal.get_window(('tukey', alpha), length): the periodic Tukey window (cosine tapers over
    alpha / 2 of the period at each end, flat in between)."""
    n = torch.arange(length, dtype=torch.float64)
    from_edge = torch.minimum(n, length - n)  # distance to the nearer end of the period
    taper = 0.5 * (1 - torch.cos(2 * math.pi * from_edge / (alpha * length)))
    return torch.where(from_edge < alpha * length / 2, taper, torch.ones_like(taper))


def stft_pmr(waveform):
    """Recipe `stft-pmr`: [16 kHz waveform] -> float32 (257, 1004), PMR's standardised log spectrogram."""
    x = torch.from_numpy(np.clip(np.resize(np.asarray(waveform, dtype=np.float64), AUDIO_RATE * 10), -1, 1))
    window = tukey_window(512, 0.25)
    segments = x.unfold(0, 512, 512 - 353)  # [1004, 512]
    segments = (segments - segments.mean(dim=1, keepdim=True)) * window  # detrend='constant', then the window
    psd = torch.fft.rfft(segments).abs().pow(2) / (AUDIO_RATE * window.pow(2).sum())  # scaling='density'
    psd[:, 1:-1] *= 2  # one-sided: the energy of the negative frequencies, except at DC and Nyquist
    spectrogram = torch.log(psd.T + 1e-7)  # [257, 1004], frequency x time as scipy returns it
    return ((spectrogram - spectrogram.mean()) / (spectrogram.std(unbiased=False) + 1e-9)).float().numpy()


def stft_ogm_cremad(waveform):
    """Recipe `stft-ogm`: [22,050 Hz waveform] -> float32 (257, 188), OGM-GE's CREMA-D log magnitude."""
    x = torch.from_numpy(np.clip(np.resize(np.asarray(waveform, dtype=np.float64), 22050 * 3), -1, 1))
    stft = torch.stft(x, n_fft=512, hop_length=353, window=torch.hann_window(512, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True)  # [257, 188]
    return torch.log(stft.abs() + 1e-7).float().numpy()


RECIPES = {  # name -> (sample rate the recipe takes, function, output shape)
    "fbank": (AUDIO_RATE, fbank_ogm_ks, (1024, 128)),
    "stft-pmr": (AUDIO_RATE, stft_pmr, (257, 1004)),
    "stft-ogm": (22050, stft_ogm_cremad, (257, 188)),
}
DATASET_DEFAULTS = {  # name -> (default recipe, which frame of each second: seconds after its start)
    "ks": ("fbank", fractions.Fraction(0)),
    "cremad": ("stft-ogm", fractions.Fraction(0)),
    "ucf101": (None, fractions.Fraction(1, 2)),
}


# ----------------------------------------------------------------------------------------------
# Decoding (PyAV) and optical flow (OpenCV contrib)

def require_av():
    try:
        import av
    except ImportError:
        raise PreprocessError("preprocess.py needs PyAV: pip install -r requirements-preprocess.txt") from None
    return av


def tvl1_available():
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "optflow") and hasattr(cv2.optflow, "DualTVL1OpticalFlow_create")


def require_soxr():
    try:
        import soxr
    except ImportError:
        raise PreprocessError("recipe stft-ogm resamples with soxr, as librosa does: pip install -r "
                              "requirements-preprocess.txt") from None
    return soxr


def resample(waveform, rate_in, rate_out):
    """float32 mono waveform at rate_in -> rate_out as librosa.load(sr=rate_out) resamples it in librosa >= 0.10
    (librosa.resample, res_type 'soxr_hq': soxr.resample(quality='soxr_hq'), then librosa.util.fix_length to
    ceil(N * rate_out / rate_in) samples, zero-padded or cut)."""
    if rate_in == rate_out:
        return waveform
    resampled = require_soxr().resample(waveform, rate_in, rate_out, quality="soxr_hq")
    size = math.ceil(len(waveform) * rate_out / rate_in)
    return np.pad(resampled[:size], (0, max(0, size - len(resampled))))


def output_size(width, height, short_side):
    """(width, height) with the shorter side brought down to short_side (aspect kept); never upscaled."""
    if short_side <= 0 or min(width, height) <= short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def decoded_audio(resampler, frame):
    """One decoded audio frame (None: flush the resampler) -> float32 mono arrays at AUDIO_RATE."""
    return [f.to_ndarray().mean(axis=0) for f in resampler.resample(frame)]


def joined_audio(chunks):
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if len(audio) == 0:
        raise ClipError("audio track holds no samples")
    return audio.astype(np.float32, copy=False)


def read_audio(path):
    """The first audio track of an audio or video file (CREMA-D's AudioWAV/<clip>.wav): float32 [N], mono at
    AUDIO_RATE. Raises ClipError with the reason."""
    av = require_av()
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise ClipError(f"{path}: no audio track")
            resampler = av.AudioResampler(format="fltp", rate=AUDIO_RATE)
            chunks = [chunk for frame in container.decode(container.streams.audio[0])
                      for chunk in decoded_audio(resampler, frame)]
            return joined_audio(chunks + decoded_audio(resampler, None))
    except av.error.FFmpegError as error:
        raise ClipError(f"{path}: cannot decode ({error.strerror or error})") from None


def upright(image, rotation):
    """An image [H, W, ...] as it is displayed: turned by the container's display rotation (PyAV's
    VideoFrame.rotation, degrees counter-clockwise, read from the display matrix)."""
    return np.ascontiguousarray(np.rot90(image, k=round(rotation / 90) % 4))


def decode_clip(path, frame_offset, want_audio, want_flow, short_side, min_frames=1, seed=0):
    """Decode one video. Returns (frames, flow_pairs, audio):
    frames: uint8 [H, W, 3] RGB arrays upright (the container's display rotation applied), one per second (see
    the module docstring for which frame), then topped up to min_frames with frames drawn at random (seed)
    among the others, all in time order;
    flow_pairs: per frame, two gray uint8 [H, W] frames to compute its flow from (it and the next decoded
    frame; for the last frame, the one before and it), when want_flow, else None;
    audio: float32 [N] mono at AUDIO_RATE, when want_audio, else None. Raises ClipError with the reason."""
    av = require_av()
    try:
        container = av.open(path)
    except av.error.FFmpegError as error:
        raise ClipError(f"cannot open ({error.strerror or error})") from None
    with container:
        if not container.streams.video:
            raise ClipError("no video track")
        video = container.streams.video[0]
        streams = [video]
        if want_audio:
            if not container.streams.audio:
                raise ClipError("no audio track")
            streams.append(container.streams.audio[0])
            resampler = av.AudioResampler(format="fltp", rate=AUDIO_RATE)
        rate = video.average_rate
        frames, pairs, kept, audio = [], [], [], []  # kept: the decoded index of each frame kept
        decoded = []  # every decoded frame, only where a top-up may need them
        last_kept = None  # (frame, rgb, pair) of the frame kept last, converted once however often it is kept

        def keep(shown, neighbour):  # shown, neighbour: (frame, seconds since the first frame, decoded index)
            nonlocal last_kept
            if last_kept is None or last_kept[0] is not shown[0]:
                size = dict(zip(("width", "height"), output_size(shown[0].width, shown[0].height, short_side)))
                rgb = upright(shown[0].to_ndarray(format="rgb24", interpolation="AREA", **size), shown[0].rotation)
                first, second = (shown, neighbour) if neighbour[1] >= shown[1] else (neighbour, shown)
                pair = tuple(upright(f[0].to_ndarray(format="gray", interpolation="AREA", **size), f[0].rotation)
                             for f in (first, second)) if want_flow else None
                last_kept = (shown[0], rgb, pair)
            frames.append(last_kept[1])
            pairs.append(last_kept[2])
            kept.append(shown[2])

        start, count, second = None, 0, 0
        before = previous = None  # the last two decoded frames, as (frame, seconds since the first frame, index)
        try:
            for packet in container.demux(streams):
                for frame in packet.decode():
                    if packet.stream.type == "audio":
                        audio += decoded_audio(resampler, frame)
                        continue
                    t = frame.pts * frame.time_base if frame.pts is not None else count / rate  # exact Fractions
                    start = t if start is None else start
                    current = (frame, t - start, count)
                    while previous is not None and second + frame_offset < current[1]:
                        keep(previous, current)  # previous is on screen at that time
                        second += 1
                    before, previous, count = previous, current, count + 1
                    if min_frames > 1:
                        decoded.append(current)
            if want_audio:
                audio += decoded_audio(resampler, None)
        except av.error.FFmpegError as error:
            raise ClipError(f"cannot decode ({error.strerror or error})") from None
        if previous is None:
            raise ClipError("no video frames")
        # the last frame lasts one frame period (the gap before it where the rate is unknown), less the time
        # base to which its timestamp was rounded; it takes the seconds left and is kept at least once
        period = 1 / rate if rate else previous[1] - before[1] if before is not None else 0
        end = previous[1] + period - video.time_base
        while second + frame_offset < end or not frames:
            keep(previous, before if before is not None else previous)
            second += 1
        # PMR's data/CREMAD/video_preprocessing.py, videoReader.video2frame_update(min_save_frame=3): frames drawn
        # at random among the others until there are min_frames; frame 0 again where the clip has too few
        others = [i for i in range(count) if i not in kept]
        extra = np.random.default_rng(seed).permutation(others)[:max(0, min_frames - len(frames))].tolist()
        for i in extra + [0] * (min_frames - len(frames) - len(extra)):
            keep(decoded[i], decoded[i + 1] if i + 1 < count else decoded[max(0, i - 1)])
    order = sorted(range(len(frames)), key=kept.__getitem__)  # time order (stable: repeats stay together)
    frames, pairs = [frames[k] for k in order], [pairs[k] for k in order]
    return frames, pairs, joined_audio(audio) if want_audio else None


def tvl1_flow(first, second):
    """TV-L1 flow from gray frame `first` to `second` -> (u, v) uint8 [H, W], zero flow at 127.5."""
    import cv2
    flow = cv2.optflow.DualTVL1OpticalFlow_create().calc(first, second, None)  # [H, W, 2] pixels
    scaled = (np.clip(flow, -FLOW_BOUND, FLOW_BOUND) + FLOW_BOUND) * (255 / (2 * FLOW_BOUND))
    quantised = np.round(scaled).astype(np.uint8)
    return quantised[..., 0], quantised[..., 1]


# ----------------------------------------------------------------------------------------------
# One clip: decode and compute in memory, then write under temporary names and rename into place

def write_jpeg(path, image):
    """uint8 [H, W, 3] RGB or [H, W] gray -> a JPEG file."""
    tensor = torch.from_numpy(image)
    tensor = tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor.unsqueeze(0)
    with open(path, "wb") as f:
        f.write(encode_jpeg(tensor.contiguous(), quality=JPEG_QUALITY).numpy().tobytes())


def write_images(folder, images, name_format):
    os.makedirs(folder)
    for k, image in enumerate(images, start=1):
        write_jpeg(os.path.join(folder, name_format.format(k)), image)


def save_array(path, array):
    with open(path, "wb") as f:
        np.save(f, array)


def remove_path(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def count_jpegs(folder):
    return sum(name.endswith(".jpg") for name in os.listdir(folder))


def clip_outputs(job):
    """The final paths of one clip's outputs: its frame folder, flow folders, spectrogram."""
    return [job["frames"]] + list(job["flow"] or ()) + ([job["spectrogram"]] if job["spectrogram"] else [])


def process_clip(job):
    """Pre-process one clip. Returns (key, status, detail): ("written" | "skipped", number of frames) or
    ("failed", reason). A clip whose outputs all exist is skipped; outputs are written under temporary names
    (partial_path) and renamed into place once all are written, so an interrupted clip leaves no final output
    half-written. An output that cannot be written (a full disk, no permission) raises OutputError naming it, its
    temporary files removed."""
    outputs = clip_outputs(job)
    for path in outputs:
        remove_path(partial_path(path))  # left by an interrupted run
    if all(os.path.exists(path) for path in outputs):
        return job["key"], "skipped", count_jpegs(job["frames"])
    try:
        frames, pairs, audio = decode_clip(job["video"], job["frame_offset"],
                                           job["spectrogram"] is not None and job["audio"] is None,
                                           job["flow"] is not None, job["short_side"], job["min_frames"],
                                           zlib.crc32(job["clip"].encode()))
        flows = [tvl1_flow(*pair) for pair in pairs] if job["flow"] else None
        if job["spectrogram"]:
            rate, recipe, _ = RECIPES[job["recipe"]]
            spectrogram = recipe(resample(read_audio(job["audio"]) if job["audio"] else audio, AUDIO_RATE, rate))
    except ClipError as error:
        return job["key"], "failed", str(error)
    except PreprocessError:
        raise
    except Exception as error:  # whatever else one file makes a decoder or converter raise: the run goes on
        return job["key"], "failed", f"{error.__class__.__name__}: {error}"
    output = job["frames"]  # the output being written, named if it cannot be
    try:
        write_images(partial_path(output), frames, "frame_{:05d}.jpg")
        for output, channel in zip(job["flow"] or (), (0, 1)):  # u, v
            write_images(partial_path(output), [flow[channel] for flow in flows], "frame{:06d}.jpg")
        if job["spectrogram"]:
            output = job["spectrogram"]
            save_array(partial_path(output), spectrogram)
        for output in outputs:
            remove_path(output)  # an incomplete earlier attempt
            os.rename(partial_path(output), output)
    except OSError as error:
        for path in outputs:
            remove_path(partial_path(path))
        raise output_error(output, error) from None
    return job["key"], "written", len(frames)


def init_worker():
    torch.set_num_threads(1)  # one process per core
    if tvl1_available():
        import cv2
        cv2.setNumThreads(1)


def run_jobs(jobs, workers):
    """Process every job, with a progress line on stderr. Returns {key: (status, detail)}."""
    results, counts = {}, dict(written=0, skipped=0, failed=0)
    started, every, tty = time.time(), max(1, len(jobs) // 20), sys.stderr.isatty()
    if workers == 1:
        outcomes = map(process_clip, jobs)
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker)  # no fork of live threads
        outcomes = pool.imap_unordered(process_clip, jobs)
    try:
        for done, (key, status, detail) in enumerate(outcomes, start=1):
            results[key] = (status, detail)
            counts[status] += 1
            rate = done / max(time.time() - started, 1e-6)
            line = (f"{done}/{len(jobs)} clips: {counts['written']} written, {counts['skipped']} skipped, "
                    f"{counts['failed']} failed; {rate:.1f} clips/s, {(len(jobs) - done) / rate:.0f} s left")
            if tty:  # one line, rewritten in place
                print(f"\r{line}", end="\n" if done == len(jobs) else "", file=sys.stderr, flush=True)
            elif done % every == 0 or done == len(jobs):  # a log file: about 20 lines
                print(line, file=sys.stderr, flush=True)
    except OutputError:  # the disk is full: the other workers stop too, and no clip's temporary files stay
        if workers > 1:
            pool.terminate()
            pool.join()
        for job in jobs:
            for path in clip_outputs(job):
                remove_path(partial_path(path))
        raise
    finally:
        if workers > 1:
            pool.terminate()
    return results


# ----------------------------------------------------------------------------------------------
# Finding the clips of each data set. An entry is (split, clip name, label, video path or None).

def index_videos(folder):
    """{file name without extension: [paths]} of the video files under `folder`, recursively, through
    symbolically linked folders too (each real folder once, so a link to a folder above cannot loop)."""
    index, seen = {}, set()
    for parent, folders, names in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(parent))
        folders[:] = sorted(f for f in folders if os.path.realpath(os.path.join(parent, f)) not in seen)
        for name in sorted(names):
            stem, extension = os.path.splitext(name)
            if extension.lower() in VIDEO_EXTENSIONS:
                index.setdefault(stem, []).append(os.path.join(parent, name))
    return index


def find_video(index, clip, videos):
    """The one video named `clip`, or a ClipError saying why not."""
    paths = index.get(clip, [])
    if len(paths) != 1:
        raise ClipError(f"no video named {clip}.* under {videos}" if not paths else
                        f"{len(paths)} videos named {clip}: {', '.join(paths)}")
    return paths[0]


def require_splits(found, where):
    missing = [split for split in ("train", "test") if split not in found]
    if missing:
        raise PreprocessError(f"{where}: no {' or '.join(missing)} split found (train and test are needed; "
                              f"val is carved from train where missing)")


def carve_ks_validation(entries):
    """Hold out validation clips from train, as data.py's ks reader does for OGM-GE lists."""
    train = [e for e in entries if e[0] == "train"]
    is_val = data.carve_validation([e[2] for e in train], [e[1] for e in train])
    held_out = {e[1] for e, v in zip(train, is_val) if v}
    return [("val",) + e[1:] if e[0] == "train" and e[1] in held_out else e for e in entries]


def plan_ks(videos, lists):
    """Kinetics-Sounds entries and class names (None where unknown).
    Without lists: videos/<split>/<class name>/<clip>.<ext>, split in train, val (optional), test; labels
    number the class folders in sorted order. With lists: the authors' <split>_1fps_path.txt or OGM-GE's
    my_<split>.txt in `lists` give clips and labels (and lists/ks_classes.txt, if there, the class names);
    videos/**/<clip>.<ext> are found by name."""
    if lists is None:
        found = []  # (split, class name, clip, path)
        for split in data.SPLITS:
            split_dir = os.path.join(videos, split)
            if not os.path.isdir(split_dir):
                continue
            for class_name in sorted(os.listdir(split_dir)):
                class_dir = os.path.join(split_dir, class_name)
                if not os.path.isdir(class_dir):
                    if class_name.lower().endswith(VIDEO_EXTENSIONS):
                        raise PreprocessError(f"{class_dir}: expected videos in class folders "
                                              f"{split_dir}/<class name>/, or lists given with --lists")
                    continue
                problem = class_name_problem(class_name)
                if problem:  # refused, not skipped: without this class every later label would shift
                    raise PreprocessError(f"{printable(class_dir)}: class folder name cannot be one line of "
                                          f"ks_classes.txt as it is ({problem}); rename the folder")
                found += [(split, class_name, clip, path) for clip, paths in index_videos(class_dir).items()
                          for path in paths]  # sub-folders of a class folder belong to it
        require_splits({f[0] for f in found}, f"{videos} (expected {videos}/<split>/<class name>/<clip>.mp4)")
        first = {}  # (split, clip) -> path
        for split, _, clip, path in found:
            if first.setdefault((split, clip), path) != path:
                raise PreprocessError(f"two videos named {clip} in split {split}: {first[split, clip]} and {path}; "
                                      f"clip names must be unique within a split (rename one, or give --lists)")
        class_names = sorted({f[1] for f in found})
        entries = [(split, clip, class_names.index(name), path) for split, name, clip, path in found]
    else:
        ogm = not os.path.isfile(os.path.join(lists, "train_1fps_path.txt"))
        files = {s: os.path.join(lists, f"my_{s}.txt" if ogm else f"{s}_1fps_path.txt") for s in data.SPLITS}
        files = {s: path for s, path in files.items() if os.path.isfile(path)}
        require_splits(files, f"{lists} (expected the authors' <split>_1fps_path.txt or OGM-GE's my_<split>.txt)")
        entries = [(s, clip, label, None) for s, path in files.items()
                   for clip, label, _ in data.read_ks_list(path, ogm_format=ogm)]
        class_names = None
        class_path = os.path.join(lists, "ks_classes.txt")
        if os.path.isfile(class_path):
            class_names = [name for _, name in data.read_text_lines(class_path, "class list")]
            for split, clip, label, _ in entries:
                if not 0 <= label < len(class_names):
                    raise PreprocessError(f"{files[split]}: clip {clip} has label {label}, but {class_path} "
                                          f"names {len(class_names)} classes (labels 0..{len(class_names) - 1})")
    if not any(e[0] == "val" for e in entries):
        entries = carve_ks_validation(entries)
    return entries, class_names


def speaker_split(speakers, fractions, seed):
    """{speaker: part index}: the sorted distinct speakers in a random order fixed by `seed` (a
    torch.Generator, stable across runs), cut into len(fractions) parts of int(fraction * n) speakers (at
    least one each); the last part takes the rest."""
    speakers = sorted(set(speakers))
    counts = [max(1, int(f * len(speakers))) for f in fractions[:-1]]
    if len(speakers) - sum(counts) < 1:
        raise PreprocessError(f"{len(speakers)} speakers cannot be split {len(fractions)} ways without sharing one")
    order = torch.randperm(len(speakers), generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = np.cumsum([0] + counts + [len(speakers) - sum(counts)])
    return {speakers[i]: part for part in range(len(fractions)) for i in order[bounds[part]:bounds[part + 1]]}


def read_cremad_list(path):
    entries = []
    for number, line in data.read_text_lines(path, "CREMA-D list"):
        fields = line.lstrip("\ufeff").split(",")
        if len(fields) != 2 or fields[1] not in data.CREMAD_EMOTIONS or not fields[0]:
            raise PreprocessError(f"{path}:{number}: expected '<clip>,<EMO>' with EMO one of "
                                  f"{', '.join(data.CREMAD_EMOTIONS)}, got {line!r}")
        entries.append(tuple(fields))
    return entries


def plan_cremad(videos, lists, failures):
    """CREMA-D entries. Without lists: every video under `videos` named <actor>_<sentence>_<EMO>_<level>,
    split train / val / test by speaker (CREMAD_FRACTIONS of the actors, SPLIT_SEED); other video names go
    to `failures`. With lists: lists/train.csv, test.csv and val.csv (optional; else SPLIT_SEED holds out a
    tenth of train's speakers) with lines '<clip>,<EMO>' (OGM-GE's format)."""
    if lists is None:
        clips = {}  # clip -> (actor, EMO)
        for stem, paths in sorted(index_videos(videos).items()):
            match = CREMAD_NAME.match(stem)
            if match:
                clips[stem] = (match.group(1), match.group(3))
            else:
                failures += [(stem, path, "name is not <actor>_<sentence>_<EMO>_<level>") for path in paths]
        if not clips:
            raise PreprocessError(f"{videos}: no CREMA-D videos (named <actor>_<sentence>_<EMO>_<level>.flv)")
        part = speaker_split([actor for actor, _ in clips.values()], CREMAD_FRACTIONS, SPLIT_SEED)
        return [(data.SPLITS[part[actor]], clip, emotion, None) for clip, (actor, emotion) in clips.items()]
    files = {s: os.path.join(lists, f"{s}.csv") for s in data.SPLITS}
    files = {s: path for s, path in files.items() if os.path.isfile(path)}
    require_splits(files, f"{lists} (expected train.csv, val.csv, test.csv)")
    entries = [(s, clip, emotion, None) for s, path in files.items() for clip, emotion in read_cremad_list(path)]
    if "val" not in files:
        train = [clip for split, clip, _, _ in entries if split == "train"]
        unnamed = [clip for clip in train if not CREMAD_NAME.match(clip)]
        if unnamed:
            raise PreprocessError(f"{files['train']}: cannot tell the speaker of clip {unnamed[0]} to hold out "
                                  f"a validation split by speaker; give {lists}/val.csv")
        part = speaker_split([CREMAD_NAME.match(c).group(1) for c in train], (0.9, 0.1), SPLIT_SEED)
        held_out = {clip for clip in train if part[CREMAD_NAME.match(clip).group(1)] == 1}
        entries = [("val",) + e[1:] if e[0] == "train" and e[1] in held_out else e for e in entries]
    return entries


def plan_ucf101(videos, lists, index, failures):
    """UCF-101 clips, class names and split files {file name: [(clip, line)]}. With lists: the official
    classInd.txt, trainlist0k.txt and testlist0k.txt in `lists` (k = 1 at least). Without: every video under
    `videos` named v_<Class>_g<group>_c<clip> (others go to `failures`); classes numbered in sorted order;
    the official splits' rule, testlist0k holding groups 1-7, 8-14, 15-21 for k = 1, 2, 3."""
    if lists is not None:
        class_path = os.path.join(lists, "classInd.txt")
        class_names = []
        for number, line in data.read_text_lines(class_path, "UCF-101 class index"):
            fields = line.split()
            if len(fields) != 2 or fields[0] != str(len(class_names) + 1):
                raise PreprocessError(f"{class_path}:{number}: expected '{len(class_names) + 1} <ClassName>', "
                                      f"got {line!r}")
            class_names.append(fields[1])
        split_files = {}
        for k in UCF_TEST_GROUPS:
            for kind in ("train", "test"):
                path = os.path.join(lists, f"{kind}list0{k}.txt")
                if os.path.isfile(path):
                    split_files[os.path.basename(path)] = [
                        (os.path.splitext(os.path.basename(line.split()[0]))[0], line)
                        for _, line in data.read_text_lines(path, "UCF-101 split file")]
        if not {"trainlist01.txt", "testlist01.txt"} <= set(split_files):
            raise PreprocessError(f"{lists}: expected the official UCF-101 split files trainlist01.txt and "
                                  f"testlist01.txt beside classInd.txt")
        return class_names, split_files
    named = {}  # clip -> (class name, group, file name)
    for stem, paths in sorted(index.items()):
        match = UCF_NAME.match(stem)
        problem = clip_name_problem(stem) or ("name is not v_<Class>_g<group>_c<clip>" if not match else
                                              f"{len(paths)} videos named {stem}" if len(paths) != 1 else None)
        if problem:  # the class name, a part of the clip name, is left out with it
            failures += [(stem, path, problem) for path in paths]
        else:
            named[stem] = (match.group(1), int(match.group(2)), os.path.basename(paths[0]))
    if not named:
        raise PreprocessError(f"{videos}: no UCF-101 videos (named v_<Class>_g<group>_c<clip>.avi)")
    class_names = sorted({name for name, _, _ in named.values()})
    split_files = {}
    for k, test_groups in UCF_TEST_GROUPS.items():
        split_files[f"trainlist0{k}.txt"] = [(clip, f"{name}/{file} {class_names.index(name) + 1}")
                                            for clip, (name, group, file) in named.items() if group not in test_groups]
        split_files[f"testlist0{k}.txt"] = [(clip, f"{name}/{file}")
                                           for clip, (name, group, file) in named.items() if group in test_groups]
    return class_names, split_files


# ----------------------------------------------------------------------------------------------
# Outputs of each data set

def make_jobs(dataset, entries, index, args, flow, failures):
    """One job per distinct clip of `entries`; a clip whose video cannot be found, whose name the lists cannot
    hold, or whose outputs' names are too long for the file system of --out goes to `failures`."""
    recipe = args.recipe or DATASET_DEFAULTS[dataset][0]
    jobs, seen, longest = [], set(), name_limit(args.out)
    for split, clip, _, video in entries:
        if dataset == "ks":
            frames, spectrogram = f"ks_visual/{split}/{clip}", f"ks_audio/{split}/{clip}.npy"
        elif dataset == "cremad":
            frames, spectrogram = f"visual/{clip}", f"audio/{clip}.npy"
        else:
            frames, spectrogram = f"rgb/{clip}", None
        if frames in seen:
            continue
        seen.add(frames)
        try:
            video = video or find_video(index, clip, args.videos)
        except ClipError as error:
            failures.append((clip, "", str(error)))
            continue
        problem = clip_name_problem(clip)
        if problem:
            failures.append((clip, video, problem))
            continue
        audio = os.path.join(args.audio, f"{clip}.wav") if args.audio else None
        if audio and not os.path.isfile(audio):
            failures.append((clip, video, f"no audio file {audio}"))
            continue
        job = dict(key=frames, clip=clip, video=video, recipe=recipe, frame_offset=DATASET_DEFAULTS[dataset][1],
                   audio=audio, min_frames=args.min_frames,
                   short_side=args.short_side, frames=os.path.join(args.out, frames),
                   spectrogram=os.path.join(args.out, spectrogram) if spectrogram else None,
                   flow=tuple(os.path.join(args.out, "flow", c, clip) for c in "uv") if flow else None)
        too_long = [name for name in map(os.path.basename, clip_outputs(job)) if len(os.fsencode(name)) > longest]
        if too_long:
            failures.append((clip, video, f"output name {too_long[0]} is {len(os.fsencode(too_long[0]))} bytes, more "
                                          f"than the {longest} that the file system of {args.out} allows"))
            continue
        jobs.append(job)
    for job in jobs:
        for path in clip_outputs(job):
            make_folder(os.path.dirname(path))
    return jobs


def make_folder(path):
    """os.makedirs, or OutputError naming the folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise output_error(path, error) from None


def check_writable(out):
    """Make --out and try a file in it, so that a read-only folder stops the run before any work."""
    make_folder(out)
    write_text(os.path.join(out, ".write-check"), lambda f: None)
    os.remove(os.path.join(out, ".write-check"))


def write_text(path, write):
    """Write a UTF-8 text file whole: write(file) under a temporary name, then rename; OutputError if it cannot
    be written (the temporary file removed)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(partial_path(path), "w", newline="", encoding="utf-8") as f:
            write(f)
        os.replace(partial_path(path), path)
    except OSError as error:
        remove_path(partial_path(path))
        raise output_error(path, error) from None


def write_lines(path, lines):
    write_text(path, lambda f: f.writelines(f"{line}\n" for line in lines))


def write_lists(dataset, out, entries, done, class_names, split_files):
    """The lists the readers of data.py take, naming only the clips on disk (done: {job key: frames}).
    Returns [(path, number of clips)]; a list that would be empty is not written."""
    lists = {}
    if dataset == "ks":
        for split in data.SPLITS:
            lists[f"ks_audio/{split}_1fps_path.txt"] = [
                f"ks_visual/{split}/{clip} {done[f'ks_visual/{split}/{clip}']} {label}"
                for s, clip, label, _ in entries if s == split and f"ks_visual/{split}/{clip}" in done]
    elif dataset == "cremad":
        for split in data.SPLITS:
            lists[f"{split}.csv"] = [f"{clip},{emotion}" for s, clip, emotion, _ in entries
                                     if s == split and f"visual/{clip}" in done]
    else:
        for name, lines in split_files.items():
            lists[f"splits/{name}"] = [line for clip, line in lines if f"rgb/{clip}" in done]
    written = []
    for name, lines in lists.items():
        if lines:
            write_lines(os.path.join(out, name), lines)
            written.append((os.path.join(out, name), len(lines)))
    if class_names is not None:
        name = "ks_classes.txt" if dataset == "ks" else "splits/classInd.txt"
        write_lines(os.path.join(out, name),
                    class_names if dataset == "ks" else [f"{k} {c}" for k, c in enumerate(class_names, start=1)])
    return written


def write_failures(out, failures):
    """ROOT/failures.csv (clip,video,reason) with this run's failures, names as printable UTF-8; removed when
    there are none."""
    path = os.path.join(out, "failures.csv")
    if not failures:
        remove_path(path)
        return None
    rows = [[printable(field) for field in failure] for failure in sorted(failures)]
    write_text(path, lambda f: csv.writer(f).writerows([["clip", "video", "reason"]] + rows))
    return path


# ----------------------------------------------------------------------------------------------
# Command line

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser():
    parser = ArgumentParser(prog="preprocess.py", description="Raw videos -> the layouts data.py reads (frames at "
                            "1 fps, spectrograms by a named recipe, TV-L1 flow for ucf101). See the module docstring.")
    parser.add_argument("dataset", choices=tuple(DATASET_DEFAULTS), help="which layout to write")
    parser.add_argument("--videos", required=True, help="folder of the raw videos (searched recursively; for ks "
                        "without --lists: <split>/<class name>/<clip>.mp4)")
    parser.add_argument("--out", required=True, help="root folder to write (train.py's --data-root)")
    parser.add_argument("--lists", default=None, help="folder of split lists: ks: the authors' "
                        "<split>_1fps_path.txt or OGM-GE's my_<split>.txt (and ks_classes.txt); cremad: "
                        "train.csv, val.csv, test.csv; ucf101: classInd.txt, trainlist0k.txt, testlist0k.txt")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--workers", type=int, default=cpus, help=f"processes (default: the {cpus} CPUs available)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                        help="spectrogram recipe (default: fbank for ks, stft-ogm for cremad; ucf101 has none)")
    parser.add_argument("--audio", default=None, help="cremad: folder of the data set's own audio, "
                        "AudioWAV/<clip>.wav, which OGM-GE's and PMR's recipes read (default: the videos' audio track)")
    parser.add_argument("--min-frames", type=int, default=1, help="top a clip's frames up to this many with frames "
                        "drawn at random among the others (PMR's CREMA-D script uses 3; default 1: one per second "
                        "only, as OGM-GE's)")
    parser.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE,
                        help=f"downscale frames whose shorter side exceeds this (default {DEFAULT_SHORT_SIDE}); "
                             f"0 keeps the decoded size")
    return parser


def check_args(args):
    for flag, folder in (("--videos", args.videos), ("--lists", args.lists)):
        if folder is not None and not os.path.isdir(folder):
            raise PreprocessError(f"{flag} {folder}: folder not found")
    if args.audio is not None and not os.path.isdir(args.audio):
        raise PreprocessError(f"--audio {args.audio}: folder not found")
    if args.audio is not None and args.dataset != "cremad":
        raise PreprocessError("--audio applies to cremad only (CREMA-D's AudioWAV folder)")
    if args.min_frames < 1:
        raise PreprocessError(f"--min-frames must be at least 1, got {args.min_frames}")
    if args.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {args.workers}")
    if args.short_side < 0:
        raise PreprocessError(f"--short-side must be 0 (keep the size) or positive, got {args.short_side}")
    if args.dataset == "ucf101" and args.recipe is not None:
        raise PreprocessError("--recipe does not apply to ucf101 (RGB and flow, no audio)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise PreprocessError(f"--out {args.out}: exists and is not a folder")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        check_args(args)
        require_av()
        if (args.recipe or DATASET_DEFAULTS[args.dataset][0]) == "stft-ogm":
            require_soxr()
        check_writable(args.out)
        failures, class_names, split_files = [], None, None  # failures: (clip, video, reason)
        index = index_videos(args.videos)
        flow = args.dataset == "ucf101" and tvl1_available()
        if args.dataset == "ucf101" and not flow:
            print("note: OpenCV's contrib module (cv2.optflow) is not installed, so no TV-L1 flow is written, only "
                  "rgb/; pip install -r requirements-flow.txt (opencv-contrib-python-headless) and rerun to add "
                  "flow/", file=sys.stderr)
        if args.dataset == "ks":
            entries, class_names = plan_ks(args.videos, args.lists)
        elif args.dataset == "cremad":
            entries = plan_cremad(args.videos, args.lists, failures)
        else:
            class_names, split_files = plan_ucf101(args.videos, args.lists, index, failures)
            entries = [(None, clip, None, None) for lines in split_files.values() for clip, _ in lines]
        jobs = make_jobs(args.dataset, entries, index, args, flow, failures)
        results = run_jobs(jobs, min(args.workers, max(1, len(jobs))))
        done = {key: detail for key, (status, detail) in results.items() if status != "failed"}
        failures += [(job["clip"], job["video"], results[job["key"]][1]) for job in jobs
                     if results[job["key"]][0] == "failed"]
        written = write_lists(args.dataset, args.out, entries, done, class_names, split_files)
        failures_path = write_failures(args.out, failures)
    except (PreprocessError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: clips written so far are complete; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130)
    counts = {status: sum(s == status for s, _ in results.values()) for status in ("written", "skipped")}
    print(f"{args.dataset}: {counts['written']} clips written, {counts['skipped']} skipped (already on disk), "
          f"{len(failures)} failed" + (f" (listed in {failures_path})" if failures else ""))
    for path, count in written:
        print(f"  {path}: {count} clips")
    if args.dataset == "ks" and class_names is None:
        print(f"  no class names: put ks_classes.txt (line k = name of label k) beside the lists to have it "
              f"copied to {args.out}")
    print(f"train with: python train.py --dataset {args.dataset} --data-root {args.out}")


if __name__ == "__main__":
    main()
