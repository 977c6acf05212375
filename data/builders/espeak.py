"""Reproducible eSpeak NG speech synthesis through ctypes (library and voices from espeakng-loader).

eSpeak NG keeps state from one utterance to the next (its pitch-flutter phase, among others), so the
same request gives different samples depending on what was spoken before. To make every utterance a
function of its request alone, a small server process (this file run as a script) initialises the
library, speaks nothing itself, and forks a child per request: each child starts from the same
pristine state, seeds the library's random generator (initialisation seeds it from the clock), speaks
once and exits. `Synthesizer` starts the server and talks to it over pipes.
"""

import atexit
import ctypes
import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3
_EE_OK = 0
_RAND_SEED = 20170616
_HEADER = struct.Struct("<ii")  # (status: 0 ok, 1 error; payload bytes)

# int callback(short *wav, int numsamples, espeak_EVENT *events); returning 0 continues synthesis.
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
  """The eSpeak NG library is missing or refused a request."""


def _read_exactly(stream, size: int) -> bytes:
  data = stream.read(size)
  if len(data) != size:
    raise EspeakError("the eSpeak NG server stopped")
  return data


class Synthesizer:
  """Speaks text into int16 waveforms at the library's native rate (`sample_rate`, 22050 Hz).

  Each instance runs its own server process; use it as a context manager or call `close`.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._server = subprocess.Popen(  # pylint: disable=consider-using-with
        # -P: the script's folder (other builder modules) stays off sys.path.
        [sys.executable, "-P", os.path.abspath(__file__)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE)
    status, payload = self._receive()
    if status:
      self.close()
      raise EspeakError(payload.decode())
    (self.sample_rate,) = struct.unpack("<i", payload)
    atexit.register(self.close)

  def __enter__(self) -> "Synthesizer":
    return self

  def __exit__(self, *exc_info):
    self.close()

  def _receive(self) -> tuple[int, bytes]:
    status, size = _HEADER.unpack(_read_exactly(self._server.stdout, _HEADER.size))
    return status, _read_exactly(self._server.stdout, size)

  def speak(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """Returns int16 [L] samples at `sample_rate` for `text`, the same for the same request.

    Args:
      text: what to say (UTF-8).
      voice: eSpeak NG voice, optionally with a variant, e.g. "en-us+f3".
      rate: words per minute (80-450).
      pitch: base pitch, 0-100 (50 is the default).
    """
    request = json.dumps({"text": text, "voice": voice, "rate": rate, "pitch": pitch})
    with self._lock:
      try:
        self._server.stdin.write(request.encode() + b"\n")
        self._server.stdin.flush()
      except BrokenPipeError as e:
        raise EspeakError("the eSpeak NG server stopped") from e
      status, payload = self._receive()
    if status:
      raise EspeakError(payload.decode())
    return np.frombuffer(payload, dtype="<i2").astype(np.int16)

  def close(self):
    """Stops the server."""
    if self._server.poll() is None:
      self._server.stdin.close()
      self._server.wait(timeout=10)
    self._server.stdout.close()
    atexit.unregister(self.close)


# The server (this file run as a script) -----------------------------------------------------------


class _Library:
  """libespeak-ng, initialised for synchronous synthesis into a buffer."""

  def __init__(self):
    import espeakng_loader  # pylint: disable=import-outside-toplevel
    data_path = espeakng_loader.get_data_path()
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
        ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
    self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
    if self.sample_rate <= 0:
      raise EspeakError(f"espeak_Initialize failed ({self.sample_rate}) with data at {data_path}")
    self._lib = lib
    self._chunks: list[bytes] = []
    self._callback = _CALLBACK(self._collect)  # Kept referenced: the library holds the pointer.
    lib.espeak_SetSynthCallback(self._callback)
    # Loads the English dictionary once, before forking (the children's samples are unchanged).
    lib.espeak_SetVoiceByName(b"en")

  def _collect(self, wav, num_samples, events) -> int:
    del events
    if wav and num_samples > 0:
      self._chunks.append(ctypes.string_at(wav, 2 * num_samples))
    return 0

  def speak(self, text: str, voice: str, rate: int, pitch: int) -> bytes:
    lib = self._lib
    lib.espeak_ng_SetRandSeed(_RAND_SEED)  # Initialisation seeds it from the clock.
    if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
      raise EspeakError(f"unknown eSpeak NG voice {voice!r}")
    if lib.espeak_SetParameter(_RATE, rate, 0) != _EE_OK:
      raise EspeakError(f"bad rate {rate}")
    if lib.espeak_SetParameter(_PITCH, pitch, 0) != _EE_OK:
      raise EspeakError(f"bad pitch {pitch}")
    data = text.encode() + b"\0"
    err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if err != _EE_OK:
      raise EspeakError(f"espeak_Synth failed ({err}) for {text!r}")
    return b"".join(self._chunks)


def _write_all(fd: int, data: bytes):
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _write_frame(fd: int, status: int, payload: bytes):
  _write_all(fd, _HEADER.pack(status, len(payload)) + payload)


def _serve():
  """Answers one request line on stdin at a time, each in a freshly forked child."""
  out = sys.stdout.fileno()
  try:
    library = _Library()
  except Exception as e:  # pylint: disable=broad-except  # Reported to the client.
    _write_frame(out, 1, f"cannot load eSpeak NG from espeakng-loader: {e}".encode())
    return
  _write_frame(out, 0, struct.pack("<i", library.sample_rate))
  for line in sys.stdin.buffer:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # Child: speak once from the pristine state, hand the frame over, exit.
      os.close(read_fd)
      try:
        request = json.loads(line)
        frame = (0, library.speak(request["text"], request["voice"], int(request["rate"]),
                                  int(request["pitch"])))
      except Exception as e:  # pylint: disable=broad-except  # Reported to the client.
        frame = (1, str(e).encode())
      _write_frame(write_fd, *frame)
      os._exit(0)  # pylint: disable=protected-access
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
      answer = reader.read()  # Read before waiting: the child blocks while the pipe is full.
    _, status = os.waitpid(pid, 0)
    if status or len(answer) < _HEADER.size:
      message = f"eSpeak NG synthesis crashed (wait status {status})".encode()
      answer = _HEADER.pack(1, len(message)) + message
    _write_all(out, answer)


if __name__ == "__main__":
  _serve()
