"""Log-mel spectrogram of a waveform, in numpy (used by the input pipeline and by `predict`).

Kept apart from the audio modality net so that the input pipeline needs no JAX.
"""

import functools
import math

import numpy as np


def _hz_to_mel(hz):
  return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def mel_matrix(num_mel_bins: int, num_spectrogram_bins: int, sample_rate: int,
               lower_hz: float = 20.0, upper_hz: float | None = None) -> np.ndarray:
  """Triangular mel filterbank, [num_spectrogram_bins, num_mel_bins] float32 (HTK mel scale)."""
  upper_hz = upper_hz or sample_rate / 2.0
  bins_hz = np.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins)
  bins_mel = _hz_to_mel(bins_hz)[:, None]
  edges = np.linspace(_hz_to_mel(lower_hz), _hz_to_mel(upper_hz), num_mel_bins + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  up = (bins_mel - lower) / (center - lower)
  down = (upper - bins_mel) / (upper - center)
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel(waveform: np.ndarray, sample_rate: int = 16000, frame_length: int = 400,
            frame_step: int = 160, num_mel_bins: int = 80) -> np.ndarray:
  """Log-mel frames of a mono waveform.

  Args:
    waveform: [N] float in [-1, 1] (int16 input is scaled by 1/32768).
  Returns:
    [F, num_mel_bins] float32 with F = 1 + max(0, N - frame_length) // frame_step.
  """
  wave = np.asarray(waveform)
  if wave.ndim != 1:
    raise ValueError(f"log_mel expects a mono waveform [N], got shape {wave.shape}")
  if np.issubdtype(wave.dtype, np.integer):
    wave = wave.astype(np.float32) / 32768.0
  wave = wave.astype(np.float32)
  if wave.shape[0] < frame_length:
    wave = np.pad(wave, (0, frame_length - wave.shape[0]))
  num_frames = 1 + (wave.shape[0] - frame_length) // frame_step
  idx = np.arange(frame_length)[None, :] + frame_step * np.arange(num_frames)[:, None]
  frames = wave[idx] * np.hanning(frame_length).astype(np.float32)  # [F, frame_length]
  fft_length = 1 << (frame_length - 1).bit_length()
  power = np.abs(np.fft.rfft(frames, n=fft_length)) ** 2  # [F, fft_length // 2 + 1]
  # einsum without BLAS: for this small product, threaded BLAS costs ~50x more on a busy machine.
  mel = np.einsum("fk,km->fm", power, mel_matrix(num_mel_bins, fft_length // 2 + 1, sample_rate),
                  optimize=False)  # [F, M]
  return np.log(mel + 1e-6).astype(np.float32)


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
  """Polyphase resampling of [N] float from `rate` to `target_rate` Hz."""
  if rate == target_rate:
    return wave
  from scipy import signal  # pylint: disable=import-outside-toplevel
  g = math.gcd(rate, target_rate)
  return signal.resample_poly(wave, target_rate // g, rate // g).astype(np.float32)
