"""Audio on the device: WAV reading (bad files are one-line errors, memory bounded by one clip) and log-mel
features equal to torch.stft through a torch filterbank on the same waves."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from edgepeft.errors import DataError
from edgepeft.runtime.audio import LOG_FLOOR, AudioSpec, log_mel, read_wav
from tiny_kws import SPEC, tone, write_wav


def torch_log_mel(waves: np.ndarray, spec: AudioSpec) -> np.ndarray:
    """The workstation reference: torch.stft (periodic Hann, no centering) and an HTK mel filterbank built from
    torchaudio's recipe (slopes between the mel points), in float64."""
    x = torch.from_numpy(waves.astype(np.float64))
    stft = torch.stft(x, spec.n_fft, spec.hop, window=torch.hann_window(spec.n_fft, periodic=True, dtype=torch.float64),
                      center=False, return_complex=True)  # (N, bins, frames)
    power = stft.abs() ** 2
    m_min, m_max = (2595.0 * torch.log10(torch.tensor(1.0 + f / 700.0, dtype=torch.float64)) for f in (spec.fmin, spec.fmax))
    f_pts = 700.0 * (10 ** (torch.linspace(m_min, m_max, spec.mels + 2, dtype=torch.float64) / 2595.0) - 1.0)
    all_freqs = torch.linspace(0, spec.sample_rate // 2, spec.n_fft // 2 + 1, dtype=torch.float64)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # (bins, mels + 2)
    down, up = -slopes[:, :-2] / f_diff[:-1], slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.min(down, up), min=0)  # (bins, mels)
    mel = torch.einsum("nbt,bm->nmt", power, fb)
    return ((torch.log(mel + LOG_FLOOR) - spec.mean) / spec.std).unsqueeze(1).float().numpy()


@pytest.mark.parametrize("spec", [SPEC, AudioSpec()], ids=["tiny", "default-16k-40mel"])
def test_log_mel_features_equal_torch_stft_through_the_same_filterbank(spec):
    rng = np.random.default_rng(0)
    waves = np.stack([tone(w, rng, spec.samples) for w in ("low", "high")] + [np.zeros(spec.samples, np.int16)]) / 32768.0
    ours = log_mel(waves, spec)
    theirs = torch_log_mel(waves, spec)
    assert ours.shape == (3, 1, spec.mels, spec.frames)
    np.testing.assert_allclose(ours, theirs, atol=2e-5 * max(1.0, np.abs(theirs).max()), rtol=0)


def test_a_clip_is_cut_or_padded_to_the_bundles_length(tmp_path):
    rng = np.random.default_rng(1)
    long, short = tone("mid", rng, SPEC.samples * 3), tone("mid", rng, SPEC.samples // 2)
    np.testing.assert_array_equal(read_wav(write_wav(tmp_path / "l.wav", long), SPEC), long[:SPEC.samples] / 32768.0)
    x = read_wav(write_wav(tmp_path / "s.wav", short), SPEC)
    np.testing.assert_array_equal(x[:len(short)], short / 32768.0)
    assert not x[len(short):].any()


@pytest.mark.parametrize("rate,channels", [(22050, 1), (16000, 2)])
def test_a_wav_at_another_rate_or_with_other_channels_is_refused_naming_the_file_and_the_fix(tmp_path, rate, channels):
    path = write_wav(tmp_path / "clip.wav", np.zeros(1000 * channels, np.int16), rate=rate, channels=channels)
    with pytest.raises(DataError) as e:
        read_wav(path, SPEC)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: {rate} Hz with {channels} channel") and "sox" in msg


def test_a_truncated_wav_is_a_one_line_data_error(tmp_path):
    path = write_wav(tmp_path / "cut.wav", tone("low", np.random.default_rng(2)))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"cut\.wav: truncated; its header says 4000 samples, the file holds 478$"):
        read_wav(path, SPEC)


def test_a_header_that_claims_a_huge_clip_reads_no_more_than_one_clip(tmp_path, monkeypatch):
    import wave

    header = (b"RIFF" + struct.pack("<I", 0xFFFFFFF0) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
              + b"data" + struct.pack("<I", 0xFFFFFFF0))
    path = tmp_path / "huge.wav"
    path.write_bytes(header + b"\0" * 200)
    asked = []
    real = wave.Wave_read.readframes
    monkeypatch.setattr(wave.Wave_read, "readframes", lambda self, n: asked.append(n) or real(self, n))
    with pytest.raises(DataError, match=r"huge\.wav: truncated; its header says 2147483640 samples, the file holds 100$"):
        read_wav(path, SPEC)
    assert asked == [SPEC.samples]


@pytest.mark.parametrize("content", [b"", b"RIFF\x10\0\0\0WAVE", b"not a wav file at all, just text", b"\0" * 64])
def test_a_file_that_is_not_a_wav_is_a_one_line_data_error_naming_it(tmp_path, content):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_wav(path, SPEC)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
