"""Speech features in pure JAX: frames, STFT, power spectrogram, log-mel, MFCC.

The front end of almost every speech model (Davis & Mermelstein 1980;
keyword spotting: Sainath & Parada 2015) turns a waveform into a picture a
network can read:

1. **Frames.** Cut the signal into overlapping frames of ``n_fft`` samples
   every ``hop_length`` samples (25-32 ms every 10 ms for speech: short
   enough that the vocal tract is roughly still within one frame).
2. **Window and FFT.** Taper each frame with a window (Hann by default) so
   its ends do not leak energy across frequencies, and take the real FFT:
   the short-time Fourier transform, ``n_fft // 2 + 1`` bins from 0 Hz to
   the Nyquist frequency ``sample_rate / 2``.
3. **Power.** ``|X|^2``: energy per frequency bin and frame.
4. **Mel filterbank.** Pool the bins with ``n_mels`` overlapping triangles
   spaced evenly on the *mel* scale, a model of pitch perception that is
   roughly linear below 1 kHz and logarithmic above, so low frequencies
   (where vowels' formants live) get fine resolution and high ones coarse.
5. **Log.** Compress the dynamic range (loudness perception is roughly
   logarithmic; a gain change becomes an additive shift).
6. **MFCC (optional).** A DCT-II of the log-mel frame decorrelates the
   bands; the first ~13 coefficients describe the spectral envelope.

Conventions (those of librosa and ``torch.stft``): ``center=True`` pads
``n_fft // 2`` samples on both sides by reflection, so frame ``t`` is centred
on sample ``t * hop_length`` and a signal of ``n`` samples gives
``1 + n // hop_length`` frames; windows are *periodic* (``torch.hann_window``,
``scipy.signal.get_window``); the mel scale is Slaney's (Auditory Toolbox,
librosa's default) unless ``htk=True`` (``2595 log10(1 + f / 700)``,
O'Shaughnessy 1987), and each triangle is area-normalised (Slaney, librosa's
``norm="slaney"``) so every band measures energy *density*.

Layout: time-major, ``[..., frames, bins]`` (the transpose of librosa's and
torch's ``[bins, frames]``), so a batch of spectrograms is
``[batch, time, mel]``: an RNN's ``[batch, time, features]`` or, with a
trailing channel axis, a CNN's image. Every function works on any leading
batch axes and under ``jit``, ``vmap`` and ``grad``; sizes (``n_fft``,
``hop_length``, ``n_mels``, ...) are static Python ints.

Shapes glossary: ``samples`` waveform length, ``frames`` STFT frames,
``bins = n_fft // 2 + 1``, ``mel`` mel bands.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex, Float

WINDOWS = ("hann", "hamming", "rectangular")


def _check_positive_int(fn: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{fn} expected a positive integer {name}, got {value!r}")


def frame(
    x: Float[Array, "*batch samples"], frame_length: int, hop_length: int
) -> Float[Array, "*batch frames frame_length"]:
    """Overlapping frames of a signal (no padding: frames that would run past the end
    are dropped).

    Args:
      x: ``[..., samples]`` with ``samples >= frame_length``.
      frame_length: samples per frame.
      hop_length: samples between the starts of consecutive frames.

    Returns:
      ``[..., frames, frame_length]`` with ``frames = 1 + (samples -
      frame_length) // hop_length``; frame ``t`` is ``x[..., t * hop_length :
      t * hop_length + frame_length]``.
    """
    _check_positive_int("frame", frame_length=frame_length, hop_length=hop_length)
    n = x.shape[-1]
    if n < frame_length:
        raise ValueError(f"frame got a signal of {n} samples (shape {tuple(x.shape)}), "
                         f"shorter than frame_length={frame_length}")
    num_frames = 1 + (n - frame_length) // hop_length
    # A static [frames, frame_length] gather: one XLA op, batch axes untouched.
    index = (np.arange(num_frames)[:, None] * hop_length
             + np.arange(frame_length)[None, :])  # [frames, frame_length]
    return x[..., index]


@functools.lru_cache(maxsize=32)
def _window_np(name: str, length: int) -> np.ndarray:
    n = np.arange(length)
    if name == "hann":
        return 0.5 - 0.5 * np.cos(2 * np.pi * n / length)
    if name == "hamming":
        return 0.54 - 0.46 * np.cos(2 * np.pi * n / length)
    return np.ones(length)


def get_window(name: str | None, length: int) -> Float[Array, " length"]:
    """A periodic window of ``length`` samples: ``"hann"``, ``"hamming"`` or
    ``"rectangular"`` (also ``None``).

    Periodic (the DFT-even form, denominator ``length`` rather than
    ``length - 1``), as ``torch.hann_window`` and ``scipy.signal.get_window``
    return by default: consecutive windows at 50% overlap sum to a constant.
    """
    name = "rectangular" if name is None else name
    if name not in WINDOWS:
        raise ValueError(f"get_window got window={name!r}; expected one of {WINDOWS} or None")
    _check_positive_int("get_window", length=length)
    return jnp.asarray(_window_np(name, int(length)), jnp.float32)


def stft(
    x: Float[Array, "*batch samples"],
    n_fft: int,
    hop_length: int,
    window: str | None = "hann",
    *,
    center: bool = True,
    pad_mode: str = "reflect",
) -> Complex[Array, "*batch frames bins"]:
    """Short-time Fourier transform.

    Args:
      x: ``[..., samples]`` real waveform.
      n_fft: frame and FFT length (the window is ``n_fft`` long too).
      hop_length: samples between frames.
      window: window name (see :func:`get_window`).
      center: pad ``n_fft // 2`` samples on both sides (``pad_mode``) so
        frame ``t`` is centred on sample ``t * hop_length``.
      pad_mode: ``"reflect"`` (librosa/torch default) or ``"constant"`` (zeros).

    Returns:
      ``[..., frames, n_fft // 2 + 1]`` complex: ``frames = 1 + samples //
      hop_length`` with ``center=True`` and an even ``n_fft`` (``1 + (samples -
      1) // hop_length`` for an odd one, as in torch). Matches ``torch.stft(x, n_fft,
      hop_length, window=torch.hann_window(n_fft), center=True,
      return_complex=True)`` transposed to ``[frames, bins]``.
    """
    _check_positive_int("stft", n_fft=n_fft, hop_length=hop_length)
    if center:
        if pad_mode not in ("reflect", "constant"):
            raise ValueError(f"stft got pad_mode={pad_mode!r}; expected 'reflect' or 'constant'")
        pad = n_fft // 2
        if pad_mode == "reflect" and x.shape[-1] <= pad:
            raise ValueError(f"stft with center=True and reflect padding needs more than "
                             f"n_fft // 2 = {pad} samples, got {x.shape[-1]}")
        widths = [(0, 0)] * (x.ndim - 1) + [(pad, pad)]
        x = jnp.pad(x, widths, mode=pad_mode)
    frames = frame(x, n_fft, hop_length) * get_window(window, n_fft)  # [..., frames, n_fft]
    return jnp.fft.rfft(frames, n=n_fft, axis=-1)  # [..., frames, bins]


def power_spectrogram(
    x: Float[Array, "*batch samples"],
    n_fft: int,
    hop_length: int,
    window: str | None = "hann",
    *,
    power: float = 2.0,
    center: bool = True,
) -> Float[Array, "*batch frames bins"]:
    """``|STFT(x)|^power``: ``power=2`` energy (default), ``power=1`` magnitude.

    Computed as ``(re^2 + im^2)^(power / 2)``, which, unlike ``abs`` of a
    complex number, has a finite gradient at an all-zero frame for
    ``power=2``.

    Returns:
      ``[..., frames, n_fft // 2 + 1]``.
    """
    spectrum = stft(x, n_fft, hop_length, window, center=center)
    energy = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2  # [..., frames, bins]
    return energy if power == 2.0 else energy ** (power / 2.0)


# --- the mel scale -----------------------------------------------------------------

# Slaney's scale (Auditory Toolbox): linear at 3 mels per 200 Hz up to 1 kHz
# (= mel 15), logarithmic above with 27 mels per factor 6.4 in frequency.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(frequencies: Float[Array, "*shape"] | float, htk: bool = False) -> np.ndarray:
    """Frequency in Hz to mels: Slaney's scale (default) or HTK's.

    Slaney: ``f / (200/3)`` below 1 kHz, ``15 + 27 ln(f / 1000) / ln(6.4)``
    above. HTK: ``2595 log10(1 + f / 700)``. Works on numpy arrays and scalars
    (the filterbank is a constant, built on the host in float64).
    """
    f = np.asarray(frequencies, np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    linear = f / _F_SP
    logarithmic = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(f >= _MIN_LOG_HZ, logarithmic, linear)


def mel_to_hz(mels: Float[Array, "*shape"] | float, htk: bool = False) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    m = np.asarray(mels, np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    linear = _F_SP * m
    logarithmic = _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, logarithmic, linear)


def mel_frequencies(n_mels: int, fmin: float, fmax: float, htk: bool = False) -> np.ndarray:
    """``n_mels`` frequencies (Hz) evenly spaced on the mel scale from ``fmin`` to ``fmax``."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels), htk)


@functools.lru_cache(maxsize=32)
def _mel_filterbank_np(n_mels, n_fft, sample_rate, fmin, fmax, htk, norm) -> np.ndarray:
    bin_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)  # [bins]
    # n_mels + 2 edges: triangle m rises from edge m to its peak at edge m + 1
    # and falls to zero at edge m + 2.
    edges = mel_frequencies(n_mels + 2, fmin, fmax, htk)  # [mel + 2]
    widths = np.diff(edges)  # [mel + 1]
    rising = (bin_hz[:, None] - edges[None, :-2]) / widths[None, :-1]  # [bins, mel]
    falling = (edges[None, 2:] - bin_hz[:, None]) / widths[None, 1:]  # [bins, mel]
    weights = np.maximum(0.0, np.minimum(rising, falling))  # [bins, mel]
    if norm == "slaney":
        weights *= 2.0 / (edges[2:] - edges[:-2])[None, :]  # unit area in Hz per triangle
    return weights


def mel_filterbank(
    n_mels: int,
    n_fft: int,
    sample_rate: float,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    *,
    norm: str | None = "slaney",
) -> Float[Array, "bins mel"]:
    """Triangular mel filterbank, ``power_spectrogram(...) @ mel_filterbank(...)``.

    Args:
      n_mels: number of bands.
      n_fft: FFT length of the spectrogram it will multiply.
      sample_rate: in Hz.
      fmin, fmax: lowest and highest band edge in Hz (``fmax`` defaults to
        the Nyquist frequency ``sample_rate / 2``).
      htk: HTK's mel scale instead of Slaney's.
      norm: ``"slaney"`` divides each triangle by half its width in Hz (equal
        area, librosa's default); ``None`` leaves peaks at 1 (HTK, torchaudio's
        default).

    Returns:
      ``[n_fft // 2 + 1, n_mels]`` float32 weights; column ``m`` is librosa's
      ``mel(sr, n_fft, n_mels, fmin, fmax, htk, norm)[m]``.
    """
    _check_positive_int("mel_filterbank", n_mels=n_mels, n_fft=n_fft)
    fmax = sample_rate / 2.0 if fmax is None else fmax
    if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
        raise ValueError(f"mel_filterbank expected 0 <= fmin < fmax <= sample_rate / 2 = "
                         f"{sample_rate / 2:g} Hz, got fmin={fmin}, fmax={fmax}")
    if norm not in ("slaney", None):
        raise ValueError(f"mel_filterbank got norm={norm!r}; expected 'slaney' or None")
    weights = _mel_filterbank_np(int(n_mels), int(n_fft), float(sample_rate), float(fmin),
                                 float(fmax), bool(htk), norm)
    return jnp.asarray(weights, jnp.float32)


def log_mel_spectrogram(
    x: Float[Array, "*batch samples"],
    sample_rate: float,
    *,
    n_fft: int = 512,
    hop_length: int = 160,
    n_mels: int = 40,
    fmin: float = 20.0,
    fmax: float | None = None,
    window: str | None = "hann",
    htk: bool = False,
    log_offset: float = 1e-6,
) -> Float[Array, "*batch frames mel"]:
    """``log(mel power + log_offset)``: the standard keyword-spotting input.

    Defaults for 16 kHz speech: 32 ms frames every 10 ms, 40 bands from
    20 Hz to 8 kHz. ``log_offset`` keeps silence finite (``log 0``) and sets
    the floor of the dynamic range: with float32 waveforms in [-1, 1],
    ``1e-6`` is 60 dB below a full-scale band.

    Returns:
      ``[..., 1 + samples // hop_length, n_mels]``.
    """
    power = power_spectrogram(x, n_fft, hop_length, window)  # [..., frames, bins]
    mel = power @ mel_filterbank(n_mels, n_fft, sample_rate, fmin, fmax, htk)  # [..., frames, mel]
    return jnp.log(mel + log_offset)


@functools.lru_cache(maxsize=32)
def _dct_matrix_np(n_in: int, n_out: int) -> np.ndarray:
    n = np.arange(n_in)[:, None]
    k = np.arange(n_out)[None, :]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in))  # [n_in, n_out]
    scale = np.where(k == 0, np.sqrt(1.0 / n_in), np.sqrt(2.0 / n_in))
    return basis * scale


def dct(x: Float[Array, "*batch n"], n_out: int | None = None) -> Float[Array, "*batch n_out"]:
    """Orthonormal DCT-II along the last axis, first ``n_out`` coefficients
    (``scipy.fft.dct(x, type=2, norm="ortho")[..., :n_out]``).

    A matrix product: for the 20-128 bands of a mel spectrogram it is as fast
    as an FFT-based DCT and trivially batched and differentiable.
    """
    n_in = x.shape[-1]
    n_out = n_in if n_out is None else n_out
    _check_positive_int("dct", n_out=n_out)
    if n_out > n_in:
        raise ValueError(f"dct asked for n_out={n_out} coefficients of {n_in} inputs")
    return x @ jnp.asarray(_dct_matrix_np(n_in, n_out), x.dtype)


def mfcc(
    x: Float[Array, "*batch samples"],
    sample_rate: float,
    *,
    n_mfcc: int = 13,
    n_fft: int = 512,
    hop_length: int = 160,
    n_mels: int = 40,
    fmin: float = 20.0,
    fmax: float | None = None,
    window: str | None = "hann",
    htk: bool = False,
    log_offset: float = 1e-6,
) -> Float[Array, "*batch frames n_mfcc"]:
    """Mel-frequency cepstral coefficients: the DCT-II (orthonormal) of each
    log-mel frame, first ``n_mfcc`` coefficients (Davis & Mermelstein 1980).

    Uses the natural-log mel spectrum of :func:`log_mel_spectrogram`; librosa
    takes the DCT of decibels (``10 log10``), i.e. its MFCCs are these times
    ``10 / ln 10`` (up to the floor: librosa clips at ``top_db``).

    Returns:
      ``[..., 1 + samples // hop_length, n_mfcc]``.
    """
    log_mel = log_mel_spectrogram(x, sample_rate, n_fft=n_fft, hop_length=hop_length,
                                  n_mels=n_mels, fmin=fmin, fmax=fmax, window=window, htk=htk,
                                  log_offset=log_offset)  # [..., frames, mel]
    return dct(log_mel, n_mfcc)
