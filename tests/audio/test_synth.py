"""nnlib.audio.synth against independent checks.

* The resonator is Klatt's difference equation: compared with
  ``scipy.signal.lfilter`` run on coefficients computed here from Klatt's
  (1980) formulas, and its response to white noise peaks at the requested
  frequency (Welch PSD in numpy/scipy).
* A sustained vowel's spectrum has a harmonic peak at each requested formant
  (Peterson & Barney's F1-F3), within one harmonic.
* Clips: same seed, same samples; other seed, other samples; 1 s at 16 kHz;
  word duration scales as 1 / rate; the SNR measured here from the returned
  speech and noise equals the requested one; nothing clips; colored noise has
  the requested spectral slope.
* espeak-ng: availability follows ``PATH``; the not-installed path raises a
  helpful error; the argument list is what espeak-ng's manual documents.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from nnlib.audio import synth as S

SR = 16_000
BATCH = 8  # one compiled program for every synthesize() call in this file


@pytest.fixture(scope="module")
def clips():
    speakers = S.sample_speakers(2, seed=3)
    utterances = S.sample_utterances(["yes", "stop"], speakers, repeats=1, snr_db=(-5.0, 20.0),
                                     seed=4)  # 4 noisy clips
    utterances += [dataclasses.replace(utterances[0], snr_db=None),
                   dataclasses.replace(utterances[0], rate=0.8, snr_db=None, position=0.0),
                   dataclasses.replace(utterances[0], rate=1.25, snr_db=None, position=0.0)]
    parts = S.synthesize(utterances, batch_size=BATCH, return_parts=True)
    return utterances, parts


def test_clip_format_determinism_and_seed_dependence(clips):
    utterances, parts = clips
    assert parts["audio"].shape == (7, SR) and parts["audio"].dtype == np.float32
    again = S.synthesize(utterances[:2], batch_size=BATCH)
    np.testing.assert_array_equal(again, parts["audio"][:2])
    other = S.synthesize([dataclasses.replace(utterances[0], seed=utterances[0].seed + 1)],
                         batch_size=BATCH)
    assert np.abs(other[0] - parts["audio"][0]).max() > 0.01
    np.testing.assert_allclose(parts["audio"], parts["speech"] + parts["noise"], atol=1e-6)
    assert np.abs(parts["audio"]).max() <= 0.99 + 1e-6  # the limiter: nothing clips
    assert not parts["noise"][4].any()  # clean utterance: no noise at all


def test_snr_is_as_requested(clips):
    utterances, parts = clips
    for i in range(4):
        speech = parts["speech"][i].astype(np.float64)
        noise = (parts["audio"][i] - parts["speech"][i]).astype(np.float64)
        snr = 10 * np.log10(np.sum(speech ** 2) / np.sum(noise ** 2))
        assert snr == pytest.approx(utterances[i].snr_db, abs=0.01)
        assert S.measure_snr(speech, noise) == pytest.approx(snr, abs=1e-9)


def test_word_duration_scales_with_rate_and_level(clips):
    utterances, parts = clips
    slow, fast = (np.diff(parts["span"][i])[0] for i in (5, 6))
    # Same seed: same per-segment jitter, so only the rate differs.
    assert slow / fast == pytest.approx(1.25 / 0.8, rel=0.03)
    assert parts["span"][5][0] == 0  # position 0: the word starts the clip
    start, stop = parts["span"][4]
    speech = parts["speech"][4].astype(np.float64)
    level = 10 * np.log10(np.mean(speech[start:stop] ** 2))
    peak_limited = np.abs(speech).max() >= 0.99 - 1e-6
    assert level == pytest.approx(utterances[4].level_db, abs=0.05) or peak_limited
    # Silence before and after the word.
    assert np.abs(speech[stop + 400:]).max() < 1e-3 * np.abs(speech).max()


def _klatt(f, bw):
    c = -np.exp(-2 * np.pi * bw / SR)
    b = 2 * np.exp(-np.pi * bw / SR) * np.cos(2 * np.pi * f / SR)
    return 1 - b - c, b, c


def test_formant_filter_is_klatts_difference_equation():
    x = np.random.default_rng(0).standard_normal(1600)
    formants, bandwidths = (500.0, 1500.0, 2500.0), (60.0, 90.0, 150.0)
    want = x.copy()
    for f, bw in zip(formants, bandwidths, strict=True):
        a, b, c = _klatt(f, bw)
        want = scipy.signal.lfilter([a], [1.0, -b, -c], want)
    frames = 100
    got = S.formant_filter(jnp.asarray(x, jnp.float32),
                           jnp.broadcast_to(jnp.asarray(formants), (frames, 3)),
                           jnp.broadcast_to(jnp.asarray(bandwidths), (frames, 3)), SR)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4 * np.abs(want).max())
    # Batched: each row filtered alone, and a resonance that jumps mid-signal.
    hz = np.full((2, frames, 1), 1000.0)
    hz[1, 50:] = 3000.0
    batch = np.asarray(S.formant_filter(jnp.asarray(np.stack([x, x]), jnp.float32),
                                        jnp.asarray(hz, jnp.float32),
                                        jnp.full((2, frames, 1), 100.0), SR))
    a, b, c = _klatt(1000.0, 100.0)
    np.testing.assert_allclose(batch[0], scipy.signal.lfilter([a], [1, -b, -c], x), atol=1e-3)
    np.testing.assert_allclose(batch[1, :800], batch[0, :800], atol=1e-6)
    assert np.abs(batch[1, 800:] - batch[0, 800:]).max() > 0.1


@pytest.mark.parametrize("centre", [700.0, 2500.0])
def test_resonator_peaks_at_its_frequency(centre):
    impulse = np.zeros(SR)
    impulse[0] = 1.0
    response = np.asarray(S.formant_filter(jnp.asarray(impulse, jnp.float32),
                                           jnp.full((100, 1), centre), jnp.full((100, 1), 80.0),
                                           SR), np.float64)
    gain = np.abs(np.fft.rfft(response))  # 1 Hz bins
    assert np.argmax(gain) == pytest.approx(centre, abs=3)
    # -3 dB bandwidth ~ 80 Hz.
    above = np.flatnonzero(gain >= gain.max() / np.sqrt(2))
    assert above[-1] - above[0] == pytest.approx(80, abs=4)
    # The unit-peak normalisation used for frication bands.
    a, b, c = _klatt(centre, 80.0)
    z = np.exp(-2j * np.pi * centre / SR)
    assert S.resonator_peak_gain(centre, 80.0, SR) == pytest.approx(
        abs(a / (1 - b * z - c * z * z)), rel=1e-9)


@pytest.mark.parametrize("vowel", ["aa", "iy", "uw", "eh", "ae"])
def test_sustained_vowel_has_spectral_peaks_at_its_formants(vowel):
    pitch = 100.0
    x = S.synthesize_vowel(vowel, pitch_hz=pitch, duration_s=1.0).astype(np.float64)[1600:]
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    harmonics = np.arange(1, int(3800 / pitch)) * pitch
    bins = np.searchsorted(freqs, harmonics)
    amplitude = np.array([spectrum[k - 2:k + 3].max() for k in bins])  # [harmonics]
    local_max = [harmonics[i] for i in range(1, len(harmonics) - 1)
                 if amplitude[i] > amplitude[i - 1] and amplitude[i] >= amplitude[i + 1]]
    for formant in S.VOWEL_FORMANTS[vowel]:
        nearest = min(local_max, key=lambda f, formant=formant: abs(f - formant))
        assert abs(nearest - formant) <= pitch, (vowel, formant, local_max)


def test_colored_noise_has_the_requested_slope():
    keys = jax.random.split(jax.random.key(0), 3)
    noise_fn = jax.jit(S.colored_noise, static_argnums=1)
    for key, color in zip(keys, (0.0, 1.0, 2.0), strict=True):
        noise = np.asarray(noise_fn(key, 32000, color), np.float64)
        assert np.sqrt(np.mean(noise ** 2)) == pytest.approx(1.0, rel=1e-4)
        freqs, psd = scipy.signal.welch(noise, SR, nperseg=1024)
        band = (freqs > 100) & (freqs < 6000)
        slope = np.polyfit(np.log(freqs[band]), np.log(psd[band]), 1)[0]
        assert slope == pytest.approx(-color, abs=0.15)


def test_mix_at_snr_and_speakers():
    rng = np.random.default_rng(0)
    speech, noise = rng.standard_normal((2, 3, 500))
    mixed, scaled = S.mix_at_snr(speech, noise, np.array([-5.0, 0.0, 12.5]))
    np.testing.assert_allclose(10 * np.log10((speech ** 2).sum(1) / (scaled ** 2).sum(1)),
                               [-5.0, 0.0, 12.5], atol=1e-4)
    speakers = S.sample_speakers(50, seed=0)
    pitches = np.array([s.pitch_hz for s in speakers])
    scales = np.array([s.formant_scale for s in speakers])
    assert 70 < pitches.min() and pitches.max() < 280 and np.corrcoef(pitches, scales)[0, 1] > 0.5
    assert S.sample_speakers(3, seed=1) == S.sample_speakers(3, seed=1)
    utterances = S.sample_utterances(S.KEYWORDS, speakers[:2], repeats=3, seed=0)
    assert len(utterances) == 60 and [u.word for u in utterances[:10]] == list(S.KEYWORDS)
    with pytest.raises(ValueError, match="no pronunciation for 'maybe'"):
        S.synthesize([S.Utterance("maybe")], batch_size=BATCH)


def test_espeak_path_when_not_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    assert not S.espeak_ng_available()
    with pytest.raises(RuntimeError, match="espeak-ng is not installed"):
        S.synthesize_espeak("yes")
    monkeypatch.setattr(S.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert S.espeak_ng_available()
    # espeak-ng(1): -v voice, -s words per minute, -p pitch 0-99, -a amplitude, -w WAV file.
    assert S.espeak_ng_command("stop", tmp_path / "a.wav", voice="en-us+f3",
                               words_per_minute=140, pitch=70) == [
        "espeak-ng", "-v", "en-us+f3", "-s", "140", "-p", "70", "-a", "100",
        "-w", str(tmp_path / "a.wav"), "stop"]
    with pytest.raises(ValueError, match="expected a word"):
        S.espeak_ng_command("--help", tmp_path / "a.wav")


def test_resample_keeps_a_tone():
    t = np.arange(22050) / 22050
    y = S._resample(np.sin(2 * np.pi * 440 * t), 22050, SR)
    assert len(y) == SR
    np.testing.assert_allclose(y[100:-100], np.sin(2 * np.pi * 440 * np.arange(SR) / SR)[100:-100],
                               atol=1e-6)
