"""nnlib.audio.features against independent references.

* STFT: numpy's ``rfft`` of frames cut and windowed here by hand, and
  ``torch.stft`` (the reference implementation most speech code uses).
* Mel scale and filterbank: the published formulas re-implemented here in
  plain numpy, bin by bin (Slaney's Auditory Toolbox scale with known anchor
  points, HTK's ``2595 log10(1 + f/700)``, triangles from their edge
  frequencies, Slaney's area normalisation).
* A pure tone's energy lands in the mel band whose centre is nearest to it.
* DCT-II against ``scipy.fft.dct(norm="ortho")``; MFCC = DCT of log-mel.
* Gradients of the log-mel against finite differences (``check_grads``), and
  the same numbers eagerly, under ``jit`` and under ``vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
import torch
from jax.test_util import check_grads

from nnlib.audio import features as F

SR = 16_000


def _signal(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(n)).astype(np.float32)


def test_frame_matches_slicing_and_rejects_short_signals():
    x = np.arange(23, dtype=np.float32)
    frames = np.asarray(F.frame(jnp.asarray(x), 8, 5))
    assert frames.shape == (4, 8)  # 1 + (23 - 8) // 5
    for t in range(4):
        np.testing.assert_array_equal(frames[t], x[5 * t:5 * t + 8])
    with pytest.raises(ValueError, match="shorter than frame_length=8"):
        F.frame(jnp.zeros(5), 8, 2)


@pytest.mark.parametrize("window", ["hann", "hamming", None])
def test_stft_matches_numpy_rfft_of_windowed_frames(window):
    x = _signal(3000)
    n_fft, hop = 256, 100
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    n = np.arange(n_fft)
    w = {"hann": 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft),
         "hamming": 0.54 - 0.46 * np.cos(2 * np.pi * n / n_fft),
         None: np.ones(n_fft)}[window]
    num_frames = 1 + len(x) // hop
    want = np.stack([np.fft.rfft(padded[t * hop:t * hop + n_fft] * w)
                     for t in range(num_frames)])  # [frames, bins]
    got = np.asarray(F.stft(jnp.asarray(x), n_fft, hop, window))
    assert got.shape == want.shape == (31, 129)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())


def test_stft_and_power_match_torch():
    x = _signal(4000, seed=1)
    xt = torch.from_numpy(x.astype(np.float64))
    for n_fft, hop in ((512, 160), (400, 128)):
        ref = torch.stft(xt, n_fft, hop, window=torch.hann_window(n_fft, dtype=torch.float64),
                         center=True, pad_mode="reflect", return_complex=True).numpy().T
        got = np.asarray(F.stft(jnp.asarray(x), n_fft, hop))
        np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())
        power = np.asarray(F.power_spectrogram(jnp.asarray(x), n_fft, hop))
        np.testing.assert_allclose(power, np.abs(ref) ** 2, rtol=1e-3,
                                   atol=1e-6 * (np.abs(ref) ** 2).max())
    ref = torch.stft(xt, 512, 160, window=torch.hann_window(512, dtype=torch.float64),
                     return_complex=True).numpy().T
    magnitude = np.asarray(F.power_spectrogram(jnp.asarray(x), 512, 160, power=1.0))
    np.testing.assert_allclose(magnitude, np.abs(ref), rtol=1e-3, atol=1e-4 * np.abs(ref).max())


# --- the mel scale, written from the published formulas ---------------------------


def _slaney_mel(f):
    """Slaney (1998), Auditory Toolbox: 3 mels per 200 Hz below 1 kHz, then
    27 mels per factor 6.4 (so 1 kHz = 15 mels, 6.4 kHz = 42 mels)."""
    return 3.0 * f / 200.0 if f < 1000.0 else 15.0 + 27.0 * np.log(f / 1000.0) / np.log(6.4)


def _slaney_hz(m):
    return 200.0 * m / 3.0 if m < 15.0 else 1000.0 * 6.4 ** ((m - 15.0) / 27.0)


def _htk_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _htk_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def _reference_filterbank(n_mels, n_fft, sr, fmin, fmax, htk, norm):
    to_mel, to_hz = (_htk_mel, _htk_hz) if htk else (_slaney_mel, _slaney_hz)
    step = (to_mel(fmax) - to_mel(fmin)) / (n_mels + 1)
    edges = [to_hz(to_mel(fmin) + i * step) for i in range(n_mels + 2)]
    out = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if left <= f <= centre:
                value = (f - left) / (centre - left)
            elif centre < f <= right:
                value = (right - f) / (right - centre)
            else:
                value = 0.0
            # Slaney: each triangle has unit area: height 2 / (right - left).
            out[k, m] = value * (2.0 / (right - left) if norm == "slaney" else 1.0)
    return out


def test_mel_scale_anchor_points_and_inverse():
    np.testing.assert_allclose(F.hz_to_mel(np.array([0.0, 200.0, 1000.0, 6400.0])),
                               [0.0, 3.0, 15.0, 42.0], atol=1e-9)
    assert F.hz_to_mel(1000.0, htk=True) == pytest.approx(1000.0, abs=0.1)  # by design of HTK
    f = np.array([0.0, 50.0, 700.0, 999.0, 1000.0, 1001.0, 4000.0, 8000.0])
    for htk, ref in ((False, _slaney_mel), (True, _htk_mel)):
        np.testing.assert_allclose(F.hz_to_mel(f, htk), [ref(v) for v in f], rtol=1e-12)
        np.testing.assert_allclose(F.mel_to_hz(F.hz_to_mel(f, htk), htk), f, atol=1e-9)


@pytest.mark.parametrize("n_mels,n_fft,fmin,fmax,htk,norm", [
    (40, 512, 20.0, 8000.0, False, "slaney"),
    (64, 400, 0.0, 7600.0, False, None),
    (23, 256, 50.0, 4000.0, True, "slaney"),
    (80, 1024, 0.0, 8000.0, True, None),
])
def test_mel_filterbank_matches_published_formulas(n_mels, n_fft, fmin, fmax, htk, norm):
    got = np.asarray(F.mel_filterbank(n_mels, n_fft, SR, fmin, fmax, htk, norm=norm))
    want = _reference_filterbank(n_mels, n_fft, SR, fmin, fmax, htk, norm)
    assert got.shape == (n_fft // 2 + 1, n_mels)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * want.max())
    assert (got.max(axis=0) > 0).all()  # no empty band at these sizes


def test_mel_filterbank_rejects_bad_ranges():
    with pytest.raises(ValueError, match="fmax <= sample_rate / 2 = 8000"):
        F.mel_filterbank(40, 512, SR, 0.0, 9000.0)
    with pytest.raises(ValueError, match="norm="):
        F.mel_filterbank(40, 512, SR, norm="area")


@pytest.mark.parametrize("tone_hz", [300.0, 1000.0, 3150.0])
def test_pure_tone_peaks_in_the_nearest_mel_band(tone_hz):
    n_mels = 40
    t = np.arange(SR // 2) / SR
    x = jnp.asarray(0.3 * np.sin(2 * np.pi * tone_hz * t), jnp.float32)
    log_mel = np.asarray(F.log_mel_spectrogram(x, SR, n_mels=n_mels, fmin=0.0))
    centres = _slaney_hz_array(n_mels)
    assert np.argmax(log_mel[5:-5].mean(0)) == np.argmin(np.abs(centres - tone_hz))


def _slaney_hz_array(n_mels):
    step = _slaney_mel(SR / 2) / (n_mels + 1)
    return np.array([_slaney_hz(step * (m + 1)) for m in range(n_mels)])


def test_dct_and_mfcc_match_scipy():
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(F.dct(jnp.asarray(x), 13)),
                               scipy.fft.dct(x, type=2, norm="ortho")[:, :13], atol=1e-5)
    signal = jnp.asarray(_signal(4000))
    log_mel = np.asarray(F.log_mel_spectrogram(signal, SR), np.float64)
    np.testing.assert_allclose(np.asarray(F.mfcc(signal, SR, n_mfcc=13)),
                               scipy.fft.dct(log_mel, type=2, norm="ortho")[:, :13],
                               rtol=1e-4, atol=1e-3)


def test_log_mel_shapes_jit_vmap_agree():
    batch = jnp.asarray(np.stack([_signal(3200, seed=s) for s in range(3)]))
    eager = F.log_mel_spectrogram(batch, SR)
    assert eager.shape == (3, 1 + 3200 // 160, 40)
    fn = jax.jit(lambda x: F.log_mel_spectrogram(x, SR))
    np.testing.assert_allclose(fn(batch), eager, atol=1e-4)
    np.testing.assert_allclose(jax.vmap(fn)(batch), eager, atol=1e-4)


def test_log_mel_gradient_matches_finite_differences():
    x = jnp.asarray(_signal(640, seed=3), jnp.float32)

    @jax.jit
    def summary(signal):
        # Zero-silence floor is differentiable; a weighted sum keeps every
        # band and frame in the gradient.
        log_mel = F.log_mel_spectrogram(signal, SR, n_fft=128, hop_length=64, n_mels=8,
                                        log_offset=1e-2)
        weights = jnp.linspace(-1.0, 1.0, log_mel.size).reshape(log_mel.shape)
        return jnp.sum(weights * log_mel)

    with jax.enable_x64(True):
        x64 = x.astype(jnp.float64)
        check_grads(summary, (x64,), order=1, modes=["rev"], eps=1e-6, rtol=1e-5)
    grad = jax.grad(summary)(x)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
