"""nnlib.audio: speech features and synthetic spoken words.

* :mod:`~nnlib.audio.features`: framing, windows, STFT, power spectrogram,
  mel filterbank (Slaney or HTK scale), log-mel spectrogram and MFCC, in pure
  JAX (``jit``, ``vmap`` and ``grad`` work), laid out ``[..., frames, bins]``.
* :mod:`~nnlib.audio.synth`: a source-filter formant synthesizer (Klatt
  1980) that speaks ten keywords ("yes", "no", "up", ...) with random
  voices, speaking rates, time shifts, loudness and background noise at a
  chosen SNR: keyword-spotting data made locally, no download, no TTS engine.
  Uses espeak-ng instead where it is installed.
"""

from nnlib.audio.features import (
    dct,
    frame,
    get_window,
    hz_to_mel,
    log_mel_spectrogram,
    mel_filterbank,
    mel_frequencies,
    mel_to_hz,
    mfcc,
    power_spectrogram,
    stft,
)
from nnlib.audio.synth import (
    KEYWORDS,
    LEXICON,
    PHONES,
    SAMPLE_RATE,
    VOWEL_FORMANTS,
    Segment,
    Speaker,
    Utterance,
    colored_noise,
    espeak_ng_available,
    espeak_ng_command,
    formant_filter,
    measure_snr,
    mix_at_snr,
    resonator_coefficients,
    rosenberg_pulse,
    sample_speakers,
    sample_utterances,
    synthesize,
    synthesize_espeak,
    synthesize_vowel,
)

__all__ = [
    "KEYWORDS",
    "LEXICON",
    "PHONES",
    "SAMPLE_RATE",
    "VOWEL_FORMANTS",
    "Segment",
    "Speaker",
    "Utterance",
    "colored_noise",
    "dct",
    "espeak_ng_available",
    "espeak_ng_command",
    "formant_filter",
    "frame",
    "get_window",
    "hz_to_mel",
    "log_mel_spectrogram",
    "measure_snr",
    "mel_filterbank",
    "mel_frequencies",
    "mel_to_hz",
    "mfcc",
    "mix_at_snr",
    "power_spectrogram",
    "resonator_coefficients",
    "rosenberg_pulse",
    "sample_speakers",
    "sample_utterances",
    "stft",
    "synthesize",
    "synthesize_espeak",
    "synthesize_vowel",
]
