"""Spoken-word clips from a formant synthesizer: keyword-spotting data made locally.

No speech corpus ships with the installed packages and no text-to-speech
engine is installed here, so nnlib *synthesises* speech the way the first
speech synthesizers did: a source-filter model (Fant 1960, "Acoustic Theory
of Speech Production"; Klatt 1980, "Software for a cascade/parallel formant
synthesizer"):

* **Source.** Voiced sounds are a glottal pulse train: Rosenberg's (1971)
  glottal-flow pulse repeated at the speaker's pitch ``f0(t)`` (a falling
  declination contour with slow wobble). Aspiration (h-like breath, stop
  releases) is white noise fed through the same vocal tract; frication
  (``s``, ``f``, stop bursts) is noise through its own band-pass resonance.
* **Filter.** The vocal tract is a cascade of three second-order
  resonators at the formant frequencies ``F1-F3`` (Klatt's difference
  equation, :func:`resonator_coefficients`), whose centre frequencies move
  sample by sample (:func:`formant_filter`, a ``jax.lax.scan``).
* **Radiation.** The lips turn volume velocity into pressure, a +6 dB/octave
  tilt: the first difference of the output.

A word is a sequence of phones (:data:`LEXICON`), each one or more
:class:`Segment` targets: vowels use the average adult-male formants
measured by Peterson & Barney (1952, "Control methods used in a study of the
vowels", Table II); diphthongs glide between two vowels; ``y``, ``l``, ``r``
and nasals are weaker voiced segments with their own formants; fricatives
are band-passed noise; stops are a closure (silence, or a low "voice bar"
for ``d``/``g``), a short burst whose band marks the place of articulation
and, for voiceless ``p``/``t``, aspiration. Formant tracks are smoothed over
~30 ms so neighbouring phones blend (coarticulation, formant transitions
toward each stop's *locus*).

Variation, so a classifier must generalise (:func:`sample_speakers`,
:func:`sample_utterances`):

* per speaker: pitch (85-220 Hz), vocal-tract length (all formants scaled
  by 0.85-1.25, low for a large adult male, high for a child), an
  idiosyncratic +-4% offset of each phone's formants, the glottal open
  quotient, breathiness;
* per clip: speaking rate (0.8-1.25x, plus +-12% per segment), position of
  the word in the 1 s clip (time shift), loudness (RMS level of the word in
  dBFS), intonation, and background noise of random colour (white to brown)
  at a requested signal-to-noise ratio.

SNR convention: over the whole clip, ``10 log10(sum speech^2 / sum
noise^2)`` (torchaudio's ``add_noise``); the word fills about half of the
clip, so its local SNR is ~3 dB higher.

Everything is a pure function of its arguments: each utterance's ``seed``
draws its control tracks (numpy ``default_rng``) and its noise (a
``jax.random`` key); JAX renders sources and filters, a batch at a time.

The clips are speech-*like*, not speech: a model trained on them will not
transcribe real voices. :func:`synthesize_espeak` uses the espeak-ng
engine instead when it is installed (it is not on this machine).

Shapes: ``samples = sample_rate * duration_s`` (16,000 by default), ``n``
formants, ``batch`` clips.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

SAMPLE_RATE = 16_000

# --- phones -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
    """One steady (or linearly gliding) target of the synthesizer, adult-male values.

    Attributes:
      duration_ms: nominal duration at speaking rate 1.
      formants: ``(F1, F2, F3)`` in Hz at the segment's start.
      formants_end: ``(F1, F2, F3)`` at its end (diphthongs, glides); ``None``:
        steady.
      bandwidths: ``(B1, B2, B3)`` in Hz; wider damps a formant (nasals).
      voicing: amplitude of the glottal source.
      aspiration: amplitude of noise through the vocal tract.
      frication: amplitude of noise through the frication resonance
        (unit gain at its peak).
      frication_hz, frication_bw: that resonance's centre and bandwidth.
    """

    duration_ms: float
    formants: tuple[float, float, float]
    formants_end: tuple[float, float, float] | None = None
    bandwidths: tuple[float, float, float] = (80.0, 100.0, 140.0)
    voicing: float = 0.0
    aspiration: float = 0.0
    frication: float = 0.0
    frication_hz: float = 4000.0
    frication_bw: float = 2000.0


# Peterson & Barney (1952), Table II: average formants of 33 adult men (Hz).
VOWEL_FORMANTS: dict[str, tuple[float, float, float]] = {
    "iy": (270.0, 2290.0, 3010.0),  # heed
    "ih": (390.0, 1990.0, 2550.0),  # hid
    "eh": (530.0, 1840.0, 2480.0),  # head
    "ae": (660.0, 1720.0, 2410.0),  # had
    "ah": (520.0, 1190.0, 2390.0),  # hud
    "aa": (730.0, 1090.0, 2440.0),  # hod (father)
    "ao": (570.0, 840.0, 2410.0),   # hawed
    "uh": (440.0, 1020.0, 2240.0),  # hood
    "uw": (300.0, 870.0, 2240.0),   # who'd
    "er": (490.0, 1350.0, 1690.0),  # heard
}

# Formant loci of the stops' places of articulation (Delattre et al. 1955):
# the vowel's formants bend toward these at a closure.
_LABIAL = (300.0, 800.0, 2200.0)
_ALVEOLAR = (300.0, 1800.0, 2700.0)
_VELAR = (300.0, 1900.0, 2300.0)


def _vowel(name: str, ms: float = 150.0, end: str | None = None) -> tuple[Segment, ...]:
    return (Segment(ms, VOWEL_FORMANTS[name], None if end is None else VOWEL_FORMANTS[end],
                    voicing=1.0),)


def _stop(locus, burst_hz, burst_bw, *, voiced: bool, aspirated: bool) -> tuple[Segment, ...]:
    closure = Segment(50.0 if voiced else 65.0, locus, voicing=0.1 if voiced else 0.0,
                      bandwidths=(150.0, 200.0, 250.0))
    burst = Segment(12.0, locus, frication=0.15, frication_hz=burst_hz, frication_bw=burst_bw)
    if not aspirated:
        return closure, burst
    return closure, burst, Segment(40.0, locus, aspiration=0.25)


PHONES: dict[str, tuple[Segment, ...]] = {
    **{v: _vowel(v) for v in VOWEL_FORMANTS},
    # Diphthongs glide from the first vowel's formants to the second's.
    "ow": (Segment(240.0, (540.0, 950.0, 2400.0), VOWEL_FORMANTS["uw"], voicing=1.0),),
    "ay": _vowel("aa", 220.0, end="ih"),
    "aw": _vowel("aa", 230.0, end="uh"),
    # Glides and liquids: voiced, weaker, with their own formants (low F3: r).
    "y": (Segment(60.0, VOWEL_FORMANTS["iy"], voicing=0.6),),
    "l": (Segment(70.0, (360.0, 1100.0, 2700.0), voicing=0.6),),
    "r": (Segment(80.0, (420.0, 1100.0, 1600.0), voicing=0.6),),
    # Nasal murmur: low F1, strongly damped upper formants.
    "n": (Segment(80.0, (250.0, 1700.0, 2600.0), bandwidths=(100.0, 300.0, 400.0),
                  voicing=0.35),),
    # Fricatives: s is strong and high (4-8 kHz, ~6 dB under a vowel), f weak and
    # broad (~20 dB under).
    "s": (Segment(130.0, _ALVEOLAR, frication=0.1, frication_hz=5500.0, frication_bw=2500.0),),
    "f": (Segment(120.0, _LABIAL, frication=0.01, frication_hz=4000.0, frication_bw=6000.0),),
    # Stops: closure, burst (its band marks the place), aspiration if voiceless.
    "p": _stop(_LABIAL, 800.0, 1500.0, voiced=False, aspirated=True),
    "t": _stop(_ALVEOLAR, 4500.0, 3000.0, voiced=False, aspirated=True),
    "t0": _stop(_ALVEOLAR, 4500.0, 3000.0, voiced=False, aspirated=False),  # after s: "stop"
    "d": _stop(_ALVEOLAR, 4000.0, 3000.0, voiced=True, aspirated=False),
    "g": _stop(_VELAR, 2000.0, 1000.0, voiced=True, aspirated=False),
}

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")

# ARPAbet-like transcriptions (General American).
LEXICON: dict[str, tuple[str, ...]] = {
    "yes": ("y", "eh", "s"),
    "no": ("n", "ow"),
    "up": ("ah", "p"),
    "down": ("d", "aw", "n"),
    "left": ("l", "eh", "f", "t"),
    "right": ("r", "ay", "t"),
    "on": ("aa", "n"),
    "off": ("ao", "f"),
    "stop": ("s", "t0", "aa", "p"),
    "go": ("g", "ow"),
}

# --- who speaks, and how ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Speaker:
    """A synthetic voice.

    Attributes:
      pitch_hz: mean fundamental frequency f0.
      formant_scale: every formant times this (vocal-tract length: formants
        scale as 1 / length; ~1.17 for adult women, ~1.3 for children).
      open_quotient: fraction of each glottal period the folds are open.
      breathiness: aspiration noise mixed into voicing.
      idiolect_seed: seeds this speaker's own +-4% offset of each phone's formants.
    """

    pitch_hz: float = 110.0
    formant_scale: float = 1.0
    open_quotient: float = 0.6
    breathiness: float = 0.1
    idiolect_seed: int = 0


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One clip: a word, a voice, and how it is said and recorded.

    Attributes:
      word: a key of :data:`LEXICON`.
      speaker: the voice.
      rate: speaking rate (durations divided by it).
      position: where the word sits in the clip's free time, 0 (start) to 1
        (end): the time shift.
      level_db: loudness, RMS of the word in dB re full scale.
      snr_db: background-noise SNR over the clip; ``None``: clean.
      noise_color: the noise's spectral slope ``1 / f^noise_color``: 0 white,
        1 pink, 2 brown.
      seed: segment durations, intonation and noise samples.
    """

    word: str
    speaker: Speaker = Speaker()
    rate: float = 1.0
    position: float = 0.5
    level_db: float = -20.0
    snr_db: float | None = None
    noise_color: float = 1.0
    seed: int = 0


def sample_speakers(num_speakers: int, seed: int = 0) -> list[Speaker]:
    """Draws voices from large adult male to child: one "size" draw sets both
    pitch and formant scale (they correlate in real voices), plus independent
    spread."""
    rng = np.random.default_rng(seed)
    speakers = []
    for _ in range(num_speakers):
        size = rng.uniform()  # 0: large adult male, 1: child
        speakers.append(Speaker(
            pitch_hz=float(85.0 * 2.6 ** size * np.exp(rng.normal(0.0, 0.08))),
            formant_scale=float(np.clip(0.9 + 0.3 * size + rng.normal(0.0, 0.03), 0.85, 1.25)),
            open_quotient=float(rng.uniform(0.5, 0.7)),
            breathiness=float(rng.uniform(0.0, 0.3)),
            idiolect_seed=int(rng.integers(2**31)),
        ))
    return speakers


def sample_utterances(
    words: Sequence[str],
    speakers: Sequence[Speaker],
    repeats: int = 1,
    *,
    snr_db: tuple[float, float] | None = (0.0, 30.0),
    rate: tuple[float, float] = (0.8, 1.25),
    level_db: tuple[float, float] = (-32.0, -12.0),
    seed: int = 0,
) -> list[Utterance]:
    """Every speaker says every word ``repeats`` times, each with its own rate,
    position, loudness, noise colour and SNR (uniform in ``snr_db``;
    ``None``: clean). Order: speaker-major, then repeat, then word."""
    rng = np.random.default_rng(seed)
    utterances = []
    for speaker in speakers:
        for _ in range(repeats):
            for word in words:
                utterances.append(Utterance(
                    word=word, speaker=speaker,
                    rate=float(np.exp(rng.uniform(np.log(rate[0]), np.log(rate[1])))),
                    position=float(rng.uniform()),
                    level_db=float(rng.uniform(*level_db)),
                    snr_db=None if snr_db is None else float(rng.uniform(*snr_db)),
                    noise_color=float(rng.uniform(0.0, 2.0)),
                    seed=int(rng.integers(2**31))))
    return utterances


# --- the filter --------------------------------------------------------------------------


def resonator_coefficients(
    frequency: Float[Array, "*shape"], bandwidth: Float[Array, "*shape"], sample_rate: float
) -> tuple[Array, Array, Array]:
    """Klatt's (1980) digital resonator ``y[t] = A x[t] + B y[t-1] + C y[t-2]``.

    ``C = -exp(-2 pi bw / sr)``, ``B = 2 exp(-pi bw / sr) cos(2 pi f / sr)``,
    ``A = 1 - B - C``: a two-pole resonance at ``f`` Hz with -3 dB bandwidth
    ``bw`` Hz and unit gain at 0 Hz (so a cascade of them reproduces the
    relative formant amplitudes of a vocal tract without further gains).

    Returns:
      ``(A, B, C)``, each the broadcast shape of the inputs.
    """
    decay = jnp.exp(-jnp.pi * bandwidth / sample_rate)
    c = -decay * decay
    b = 2.0 * decay * jnp.cos(2.0 * jnp.pi * frequency / sample_rate)
    return 1.0 - b - c, b, c


@functools.lru_cache(maxsize=1024)
def resonator_peak_gain(frequency: float, bandwidth: float, sample_rate: float) -> float:
    """``|H(f)|`` of :func:`resonator_coefficients` at its own centre frequency:
    divide by it for a unit-peak band-pass."""
    decay = np.exp(-np.pi * bandwidth / sample_rate)
    c = -decay * decay
    b = 2.0 * decay * np.cos(2.0 * np.pi * frequency / sample_rate)
    z = np.exp(-2j * np.pi * frequency / sample_rate)
    return float(np.abs((1.0 - b - c) / (1.0 - b * z - c * z * z)))


def control_hop(sample_rate: int) -> int:
    """Samples per control frame: the filter's parameters change every ~1 ms
    (Klatt's synthesizer updates them every 5 ms), 16 samples at 16 kHz."""
    return max(1, int(sample_rate) // 1000)


@functools.partial(jax.jit, static_argnames=("sample_rate", "unroll"))
def formant_filter(
    source: Float[Array, "*batch samples"],
    frequencies: Float[Array, "*batch frames n"],
    bandwidths: Float[Array, "*batch frames n"],
    sample_rate: float = SAMPLE_RATE,
    unroll: int = 1,
) -> Float[Array, "*batch samples"]:
    """A cascade of ``n`` time-varying resonators: the vocal-tract filter.

    The resonances may move every control frame of ``hop = samples /
    frames`` samples: frame ``f``'s samples pass resonator ``k`` with
    Klatt's coefficients for ``frequencies[..., f, k]`` and
    ``bandwidths[..., f, k]``; the filter state carries across frames, so
    smooth tracks glide without clicks. One ``jax.lax.scan`` over samples
    (``unroll`` of them per loop trip), ``vmap``-ed over the leading batch axes.

    Args:
      source: ``[..., samples]`` excitation, ``samples = frames * hop``.
      frequencies, bandwidths: ``[..., frames, n]`` in Hz.
      sample_rate: in Hz (static).
      unroll: samples per scan iteration (speed only).

    Returns:
      ``[..., samples]``: ``R_{n-1}(... R_1(R_0(source)))``.
    """
    frames, n = frequencies.shape[-2:]
    if (frequencies.shape != bandwidths.shape or frequencies.shape[:-2] != source.shape[:-1]
            or frames == 0 or source.shape[-1] % frames):
        raise ValueError(
            f"formant_filter expected source [..., samples] and frequencies, bandwidths "
            f"[..., frames, n] with samples a multiple of frames, got {tuple(source.shape)}, "
            f"{tuple(frequencies.shape)}, {tuple(bandwidths.shape)}")
    hop = source.shape[-1] // frames
    coefficients = resonator_coefficients(frequencies, bandwidths, sample_rate)  # [..., F, n]
    # Held for each frame's hop samples, then flattened to one batch axis.
    a, b, c = (jnp.repeat(v, hop, axis=-2).reshape(-1, source.shape[-1], n)
               for v in coefficients)  # [B, T, n]

    def filter_one(x, a, b, c):  # x: [T]; a, b, c: [T, n]
        def step(carry, inputs):
            y1, y2 = carry  # [n]: each resonator's last two outputs
            y, a_t, b_t, c_t = inputs
            outputs = []
            for k in range(n):  # a cascade: each resonator filters the previous one
                y = a_t[k] * y + b_t[k] * y1[k] + c_t[k] * y2[k]
                outputs.append(y)
            return (jnp.stack(outputs), y1), y

        zeros = jnp.zeros(n, x.dtype)
        return jax.lax.scan(step, (zeros, zeros), (x, a, b, c), unroll=unroll)[1]

    out = jax.vmap(filter_one)(source.reshape(-1, source.shape[-1]), a, b, c)  # [B, T]
    return out.reshape(source.shape)


def rosenberg_pulse(
    phase: Float[Array, "*shape"], open_quotient: float | Float[Array, "*shape"] = 0.6
) -> Float[Array, "*shape"]:
    """Rosenberg's (1971) glottal flow at ``phase`` in [0, 1) of each period:
    a raised-cosine opening over 70% of the open phase, a quarter-cosine
    closing over the rest, then closed (zero flow)."""
    t_open = 0.7 * open_quotient
    t_close = open_quotient - t_open
    rising = 0.5 * (1.0 - jnp.cos(jnp.pi * phase / t_open))
    falling = jnp.cos(0.5 * jnp.pi * (phase - t_open) / t_close)
    return jnp.where(phase < t_open, rising, jnp.where(phase < open_quotient, falling, 0.0))


def colored_noise(key: Array, num_samples: int, color: float | Array) -> Float[Array, " samples"]:
    """Gaussian noise with power spectrum ``1 / f^color`` (0 white, 1 pink,
    2 brown), zero mean, unit RMS; shaped in the frequency domain. Pure JAX
    (``vmap`` it over keys and colours for a batch)."""
    spectrum = jnp.fft.rfft(jax.random.normal(key, (num_samples,)))
    freqs = jnp.fft.rfftfreq(num_samples)
    freqs = freqs.at[0].set(freqs[1])  # no infinite gain at 0 Hz
    noise = jnp.fft.irfft(spectrum * freqs ** (-color / 2.0), n=num_samples)
    noise = noise - jnp.mean(noise)
    return noise / jnp.sqrt(jnp.mean(noise ** 2))


# The per-frame control tracks, in the order _render reads them.
_CONTROLS = ("f1", "f2", "f3", "b1", "b2", "b3", "voicing", "aspiration", "frication",
             "frication_hz", "frication_bw", "f0")


@functools.partial(jax.jit, static_argnames=("sample_rate",))
def _render(controls, seeds, open_quotient, noise_color, sample_rate):
    """Sources, filters, radiation; plus each clip's unit-RMS background noise.

    controls: [B, frames, 12] as _CONTROLS orders them; seeds: [B] int32;
    open_quotient, noise_color: [B]. Returns (speech, noise), [B, samples] each.
    """
    hop = control_hop(sample_rate)
    samples = controls.shape[-2] * hop

    def upsample(i):  # per-frame value held for the frame's hop samples
        return jnp.repeat(controls[..., i], hop, axis=-1)  # [B, samples]

    keys = jax.vmap(jax.random.key)(seeds)  # [B]
    breath, fric_noise = (jax.vmap(lambda k, i=i: jax.random.normal(
        jax.random.fold_in(k, i), (samples,)))(keys) for i in (0, 1))  # [B, samples]
    background = jax.vmap(lambda k, c: colored_noise(jax.random.fold_in(k, 2), samples, c))(
        keys, noise_color)
    phase = jnp.cumsum(upsample(11) / sample_rate, axis=-1) % 1.0  # f0 -> glottal cycles
    glottal = rosenberg_pulse(phase, open_quotient[:, None])
    cascade_source = upsample(6) * glottal + upsample(7) * breath
    voiced = formant_filter(cascade_source, controls[..., 0:3], controls[..., 3:6], sample_rate)
    fricated = formant_filter(upsample(8) * fric_noise, controls[..., 9:10],
                              controls[..., 10:11], sample_rate)
    pressure = voiced + fricated  # volume velocity at the lips
    # Radiation: +6 dB/octave, the first difference.
    speech = jnp.diff(pressure, axis=-1, prepend=jnp.zeros_like(pressure[..., :1]))
    return speech, background


# --- controls: from an utterance to per-frame tracks -------------------------------------


def _smooth(track: np.ndarray, width: int) -> np.ndarray:
    """Moving average over ``width`` frames along axis 0, edges held."""
    if width <= 1:
        return track
    pad = [(width // 2, width - 1 - width // 2)] + [(0, 0)] * (track.ndim - 1)
    cumulative = np.cumsum(np.pad(track, pad, mode="edge"), axis=0)
    cumulative = np.concatenate([np.zeros_like(cumulative[:1]), cumulative])
    return (cumulative[width:] - cumulative[:-width]) / width


@functools.lru_cache(maxsize=4096)
def _idiolect(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: np.exp(rng.normal(0.0, 0.04, size=3)) for name in sorted(PHONES)}


def _controls(u: Utterance, sample_rate: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """One utterance's control tracks ``[frames, 12]`` and its word span
    (``[start, end)`` in frames)."""
    if u.word not in LEXICON:
        raise ValueError(f"no pronunciation for {u.word!r}; known words: {', '.join(LEXICON)}")
    per_ms = sample_rate / control_hop(sample_rate) / 1000.0  # frames per ms (1 at 16 kHz)
    rng = np.random.default_rng(u.seed)
    idiolect = _idiolect(u.speaker.idiolect_seed)
    segments = [(phone, seg) for phone in LEXICON[u.word] for seg in PHONES[phone]]
    jitter = np.exp(rng.normal(0.0, 0.12, size=len(segments)))
    lengths = np.maximum(1, np.round(np.array([s.duration_ms for _, s in segments]) * jitter
                                     / u.rate * per_ms)).astype(int)
    total = min(int(lengths.sum()), frames - 1)
    start = int(round(np.clip(u.position, 0.0, 1.0) * (frames - total)))

    tracks = np.zeros((frames, len(_CONTROLS)))
    t = start
    for (phone, seg), length in zip(segments, lengths, strict=True):
        stop = min(t + length, frames)
        if stop <= t:
            break
        end = seg.formants if seg.formants_end is None else seg.formants_end
        ramp = np.linspace(0.0, 1.0, length)[: stop - t, None]  # [len, 1]
        scale = u.speaker.formant_scale * idiolect[phone]  # [3]
        tracks[t:stop, 0:3] = scale * ((1 - ramp) * np.array(seg.formants)
                                       + ramp * np.array(end))
        fric_hz = seg.frication_hz * u.speaker.formant_scale
        # Frication noise through a unit-peak band-pass: `frication` is its level.
        gain = seg.frication / resonator_peak_gain(fric_hz, seg.frication_bw, sample_rate)
        tracks[t:stop, 3:11] = (*seg.bandwidths, seg.voicing, seg.aspiration, gain, fric_hz,
                                seg.frication_bw)
        t = stop
    # Outside the word the tract holds its first and last shape (silent anyway).
    shape = [0, 1, 2, 3, 4, 5, 9, 10]
    tracks[:start, shape], tracks[t:, shape] = tracks[start, shape], tracks[t - 1, shape]

    def ms(x):
        return max(1, int(round(x * per_ms)))

    tracks[:, 0:3] = _smooth(tracks[:, 0:3], ms(30))  # coarticulation: ~30 ms transitions
    tracks[:, 3:6] = _smooth(tracks[:, 3:6], ms(20))
    tracks[:, 6] = _smooth(tracks[:, 6], ms(8))  # no clicks at voice onsets
    tracks[:, 7] = _smooth(tracks[:, 7], ms(5))
    tracks[:, 8:11] = _smooth(tracks[:, 8:11], ms(3))  # bursts stay abrupt
    tracks[:, 7] += u.speaker.breathiness * 0.05 * tracks[:, 6]  # breath during voicing

    # Intonation: a declining f0 over the word, a slow wobble, a little jitter.
    time_s = np.arange(frames) / (per_ms * 1000.0)
    progress = np.clip((np.arange(frames) - start) / max(total, 1), 0.0, 1.0)
    rise, fall = rng.uniform(0.0, 0.1), rng.uniform(0.0, 0.15)
    wobble = 1.0 + 0.015 * np.sin(2 * np.pi * rng.uniform(2.0, 6.0) * time_s
                                  + rng.uniform(0, 2 * np.pi))
    tracks[:, 11] = (u.speaker.pitch_hz * (1.0 + rise - (rise + fall) * progress) * wobble
                     * np.exp(rng.normal(0.0, 0.01, frames)))
    return tracks, np.array([start, start + total])


# --- noise ------------------------------------------------------------------------------


def mix_at_snr(
    speech: Float[np.ndarray, "*batch samples"],
    noise: Float[np.ndarray, "*batch samples"],
    snr_db: float | Float[np.ndarray, "*batch"],
) -> tuple[np.ndarray, np.ndarray]:
    """Scales ``noise`` so ``10 log10(sum speech^2 / sum noise^2) = snr_db`` per clip.

    Returns:
      ``(speech + scaled_noise, scaled_noise)``, both ``[..., samples]`` float32.
    """
    speech_power = np.mean(np.square(speech, dtype=np.float64), axis=-1, keepdims=True)
    noise_power = np.mean(np.square(noise, dtype=np.float64), axis=-1, keepdims=True)
    target = speech_power / 10.0 ** (np.asarray(snr_db, np.float64)[..., None] / 10.0)
    scaled = noise * np.sqrt(target / np.maximum(noise_power, 1e-30))
    return (speech + scaled).astype(np.float32), scaled.astype(np.float32)


def measure_snr(speech: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``10 log10(sum speech^2 / sum noise^2)`` over the last axis, in dB."""
    return 10.0 * np.log10(np.sum(np.square(speech, dtype=np.float64), axis=-1)
                           / np.sum(np.square(noise, dtype=np.float64), axis=-1))


# --- putting it together ------------------------------------------------------------------


def synthesize(
    utterances: Sequence[Utterance],
    *,
    sample_rate: int = SAMPLE_RATE,
    duration_s: float = 1.0,
    batch_size: int = 64,
    return_parts: bool = False,
) -> np.ndarray | dict[str, np.ndarray]:
    """Renders each utterance to a clip.

    Control tracks are drawn in numpy from each utterance's seed; sources,
    noise (``jax.random`` keys from the same seed) and filters run in JAX,
    ``batch_size`` clips at a time (the last batch is padded, so one program
    is compiled). The speech is scaled to the utterance's ``level_db``, then
    noise is added at its ``snr_db``; a clip whose peak would exceed 0.99 is
    scaled down as a whole (speech and noise together: the SNR holds, the
    level drops), so nothing clips.

    Args:
      utterances: what to say (see :func:`sample_utterances`).
      sample_rate, duration_s: the clips' format (16 kHz, 1 s by default).
      batch_size: clips rendered together.
      return_parts: also return the clean speech and the noise.

    Returns:
      ``audio: [len(utterances), samples]`` float32; with ``return_parts``,
      a dict with ``audio``, ``speech``, ``noise`` (``audio = speech +
      noise``, zeros for a clean utterance) and ``span: [n, 2]``, each
      word's ``[start, end)`` in samples.
    """
    num_samples = int(round(sample_rate * duration_s))
    hop = control_hop(sample_rate)
    frames = -(-num_samples // hop)
    n = len(utterances)
    speech = np.zeros((n, num_samples), np.float32)
    noise = np.zeros((n, num_samples), np.float32)
    spans = np.zeros((n, 2), np.int64)
    for first in range(0, n, batch_size):
        chunk = list(utterances[first:first + batch_size])
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # one static shape
        tracks, span = zip(*(_controls(u, sample_rate, frames) for u in chunk), strict=True)
        rendered, background = _render(
            jnp.asarray(np.stack(tracks), jnp.float32),
            jnp.asarray([u.seed % 2**31 for u in chunk], jnp.int32),
            jnp.asarray([u.speaker.open_quotient for u in chunk], jnp.float32),
            jnp.asarray([u.noise_color for u in chunk], jnp.float32), sample_rate=sample_rate)
        x = np.asarray(rendered, np.float64)[:, :num_samples]  # [B, T]
        span = np.minimum(np.stack(span) * hop, num_samples)  # [B, 2] samples
        inside = ((np.arange(num_samples) >= span[:, :1])
                  & (np.arange(num_samples) < span[:, 1:]))  # [B, T]
        word_rms = np.sqrt(np.sum(x * x * inside, 1) / np.maximum(inside.sum(1), 1)) + 1e-12
        level = np.array([u.level_db for u in chunk])
        x *= (10.0 ** (level / 20.0) / word_rms)[:, None]
        snr = np.array([np.inf if u.snr_db is None else u.snr_db for u in chunk])
        _, z = mix_at_snr(x, np.asarray(background, np.float64)[:, :num_samples], snr)
        limit = np.minimum(1.0, 0.99 / np.maximum(np.abs(x + z).max(1), 1e-12))[:, None]
        keep = slice(0, min(batch_size, n - first))
        speech[first:first + batch_size] = (x * limit)[keep]
        noise[first:first + batch_size] = (z * limit)[keep]
        spans[first:first + batch_size] = span[keep]
    audio = speech + noise
    if return_parts:
        return {"audio": audio, "speech": speech, "noise": noise, "span": spans}
    return audio


def synthesize_vowel(
    formants: str | tuple[float, float, float],
    *,
    pitch_hz: float = 110.0,
    duration_s: float = 0.5,
    sample_rate: int = SAMPLE_RATE,
    bandwidths: tuple[float, float, float] = (80.0, 100.0, 140.0),
    open_quotient: float = 0.6,
) -> np.ndarray:
    """A steady vowel (constant pitch and formants, no noise), peak-normalised.

    Args:
      formants: a key of :data:`VOWEL_FORMANTS` or ``(F1, F2, F3)`` in Hz.

    Returns:
      ``[samples]`` float32.
    """
    f = VOWEL_FORMANTS[formants] if isinstance(formants, str) else formants
    num_samples = int(round(duration_s * sample_rate))
    frames = -(-num_samples // control_hop(sample_rate))
    controls = np.zeros((1, frames, len(_CONTROLS)))
    controls[:] = (*f, *bandwidths, 1.0, 0.0, 0.0, 4000.0, 2000.0, pitch_hz)
    out, _ = _render(jnp.asarray(controls, jnp.float32), jnp.zeros(1, jnp.int32),
                     jnp.full(1, open_quotient, jnp.float32), jnp.zeros(1, jnp.float32),
                     sample_rate=sample_rate)
    out = np.asarray(out)[0, :num_samples]
    return (out / np.abs(out).max()).astype(np.float32)


# --- espeak-ng, where it is installed -------------------------------------------------------


def espeak_ng_available() -> bool:
    """Whether the ``espeak-ng`` text-to-speech program is on ``PATH``."""
    return shutil.which("espeak-ng") is not None


def espeak_ng_command(
    word: str,
    output_path: str | Path,
    *,
    voice: str = "en-us",
    words_per_minute: int = 160,
    pitch: int = 50,
    amplitude: int = 100,
) -> list[str]:
    """The ``espeak-ng`` argument list that writes ``word`` to a WAV file.

    ``voice`` may carry a variant (``"en-us+f3"``, ``"en+m4"``) for different
    speakers; ``pitch`` and ``amplitude`` are espeak's 0-99 / 0-200 scales.
    """
    if not word or word.startswith("-"):
        raise ValueError(f"espeak_ng_command expected a word, got {word!r}")
    return ["espeak-ng", "-v", voice, "-s", str(int(words_per_minute)), "-p", str(int(pitch)),
            "-a", str(int(amplitude)), "-w", str(output_path), word]


def _resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by zero-padding or truncating the spectrum."""
    if rate_in == rate_out:
        return x
    n_out = int(round(len(x) * rate_out / rate_in))
    spectrum = np.fft.rfft(x)
    keep = min(len(spectrum), n_out // 2 + 1)
    resized = np.zeros(n_out // 2 + 1, complex)
    resized[:keep] = spectrum[:keep]
    return np.fft.irfft(resized, n=n_out) * n_out / len(x)


def synthesize_espeak(
    word: str,
    *,
    sample_rate: int = SAMPLE_RATE,
    duration_s: float = 1.0,
    **options,
) -> np.ndarray:
    """Speaks ``word`` with espeak-ng (``options`` as :func:`espeak_ng_command`),
    resampled to ``sample_rate`` and centred in a ``duration_s`` clip.

    Returns:
      ``[samples]`` float32 in [-1, 1].

    Raises:
      RuntimeError: espeak-ng is not installed (use :func:`synthesize`).
    """
    if not espeak_ng_available():
        raise RuntimeError("espeak-ng is not installed (e.g. `apt-get install espeak-ng`); "
                           "nnlib.audio.synthesize renders formant-synthesised words instead")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "word.wav"
        subprocess.run(espeak_ng_command(word, path, **options), check=True,
                       capture_output=True, timeout=30)
        with wave.open(io.BytesIO(path.read_bytes())) as f:
            rate, width = f.getframerate(), f.getsampwidth()
            frames = f.readframes(f.getnframes())
    if width != 2:
        raise RuntimeError(f"espeak-ng wrote {8 * width}-bit audio; expected 16-bit PCM")
    x = _resample(np.frombuffer(frames, np.int16).astype(np.float64) / 32768.0, rate,
                  sample_rate)
    n = int(round(sample_rate * duration_s))
    x = x[:n]
    out = np.zeros(n, np.float32)
    start = (n - len(x)) // 2
    out[start:start + len(x)] = x
    return out
