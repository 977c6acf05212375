"""The one SentencePiece vocabulary shared by every text task: pad=0, eos=1, unk=2, no bos.

A unigram model of 4096 pieces (`VOCAB_SIZE`; the paper used 8k), trained deterministically
on the text of all text tasks (`python -m data.prepare` does it) with byte fallback, so that any
UTF-8 string round-trips: `decode(encode(s)) == s` for every string without leading, trailing or
repeated whitespace. The serialized model proto (`to_bytes`) travels inside checkpoints and exports.

Shape legend: L any sequence length.
"""

from collections.abc import Iterable, Sequence
import io
import pathlib

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data import paths

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# Pieces of the shared tokenizer that `python -m data.prepare` trains (the paper used 8k; half that
# makes the main job's text steps 20 % cheaper, and its 9000 steps of 4096 pieces score higher
# than 7000 of 8192 in about the same time on every task but the captions: docs/results.md,
# "4096 pieces and 9000 steps").
# `config.model.vocab_size` must be >= the tokenizer's size.
VOCAB_SIZE = 4096
SEED = 0
NUM_THREADS = 2  # Fixed: the unigram E-step sums per thread, so the count is part of the result.
MAX_SENTENCES = 2_000_000  # The first this many sentences train the model (no shuffling).


class Tokenizer:
  """Encodes text into SentencePiece ids and back."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id()) != (
        PAD_ID, EOS_ID, UNK_ID, -1):
      raise ValueError("SentencePiece model must have pad=0, eos=1, unk=2 and no bos")

  @classmethod
  def from_bytes(cls, model_proto: bytes) -> "Tokenizer":
    """The tokenizer of a serialized model proto (as stored in checkpoints and exports)."""
    return cls(model_proto)

  @classmethod
  def load(cls, path: str | pathlib.Path | None = None) -> "Tokenizer":
    """Reads the model at `path` (default: `data.paths.tokenizer_path()`)."""
    path = pathlib.Path(path or paths.tokenizer_path())
    if not path.is_file():
      raise FileNotFoundError(
          f"No tokenizer at {path}: run `python -m data.prepare` (it trains one on the text tasks)")
    return cls(path.read_bytes())

  def to_bytes(self) -> bytes:
    """The serialized model proto."""
    return self._proto

  def save(self, path: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes the model proto to `path` (default: `data.paths.tokenizer_path()`); returns it."""
    path = pathlib.Path(path or paths.tokenizer_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(self._proto)
    tmp.replace(path)
    return path

  @property
  def vocab_size(self) -> int:
    """Number of pieces (ids are in [0, vocab_size))."""
    return self._sp.get_piece_size()

  def piece(self, piece_id: int) -> str:
    """The text of a piece, its word-start mark as a space ("\u2581the" -> " the")."""
    return self._sp.id_to_piece(piece_id).replace("\u2581", " ")

  def is_control_or_byte(self, piece_id: int) -> bool:
    """True for padding, EOS, unknown and the byte-fallback pieces ("<0x41>")."""
    return bool(self._sp.is_control(piece_id) or self._sp.is_unknown(piece_id)
                or self._sp.is_byte(piece_id))

  def missing_symbols(self, symbols: Sequence[str]) -> list[str]:
    """Those of `symbols` the model was not trained to keep whole (`train`'s `symbols`)."""
    model = sentencepiece_model_pb2.ModelProto.FromString(self._proto)
    kept = {p.piece for p in model.pieces if p.type == p.USER_DEFINED}
    return [s for s in symbols if s not in kept]

  def bracket_deltas(self) -> np.ndarray:
    """int32 [vocab_size]: how many "(" each piece opens minus how many ")" it closes (0 for pad,
    EOS, unknown and byte pieces), for decoding trees (`decode.keep_brackets_balanced`)."""
    return np.array([0 if self.is_control_or_byte(i)
                     else self.piece(i).count("(") - self.piece(i).count(")")
                     for i in range(self.vocab_size)], np.int32)

  def word_starts(self) -> np.ndarray:
    """bool [vocab_size]: the pieces that begin a word (those after a space, "▁the"; not pad,
    EOS, unknown or byte pieces), for decoding a tree over its input's words
    (`decode.keep_input_leaves`: no bracket goes before a piece that continues a word)."""
    return np.array([not self.is_control_or_byte(i) and self.piece(i).startswith(" ")
                     for i in range(self.vocab_size)], bool)

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without EOS."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` [L]: stops at the first EOS, ignores padding and ids outside the vocabulary."""
    pieces = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if i != PAD_ID and 0 <= i < self.vocab_size:
        pieces.append(i)
    return self._sp.decode(pieces)

  def __eq__(self, other) -> bool:
    return isinstance(other, Tokenizer) and self._proto == other._proto

  def __hash__(self) -> int:
    return hash(self._proto)


def train(sentences: Iterable[str], vocab_size: int = VOCAB_SIZE, seed: int = SEED,
          symbols: Sequence[str] = ()) -> Tokenizer:
  """Trains the shared unigram model on `sentences`, deterministically.

  The same sentences in the same order give the same model bytes: the first `MAX_SENTENCES` are
  used without shuffling, the thread count is fixed and SentencePiece's generator is seeded.
  `vocab_size` is a soft limit: a small corpus (tests, tiny builds) yields fewer pieces.
  `symbols` are strings always encoded as one piece each, alone or after a space (a task's markup,
  such as the brackets of a linearised tree: `Task.symbols`); they count toward `vocab_size`.
  """
  spm.set_random_generator_seed(seed)
  user_symbols = [s for symbol in dict.fromkeys(symbols) for s in (symbol, "\u2581" + symbol)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=(s for s in sentences if s and not s.isspace()),
      model_writer=model,
      model_type="unigram",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      byte_fallback=True,
      character_coverage=0.9999,
      normalization_rule_name="identity",
      input_sentence_size=MAX_SENTENCES,
      shuffle_input_sentence=False,
      num_threads=NUM_THREADS,
      minloglevel=2,
      user_defined_symbols=user_symbols,
  )
  return Tokenizer(model.getvalue())
