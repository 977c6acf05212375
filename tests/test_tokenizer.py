"""The shared SentencePiece tokenizer: special ids, round-trips of real text, determinism, bytes."""

import re

import pytest

from data import prepare
from data import preprocess
from data import sources
from data import tasks
from data import tokenizer as tokenizer_lib
from tests import tiny_data

# (task, raw feature) pairs covering every language and kind of text of the embedded tasks.
TEXTS = {
    "en": ("translate_en_fr", "en"),
    "fr": ("translate_en_fr", "fr"),
    "de": ("translate_en_de", "de"),
    "transcript": ("speech_en", "text"),
    "sentence": ("parse_en", "sentence"),
    "tree": ("parse_en", "tree"),
}


@pytest.fixture(name="tok")
def fixture_tok(monkeypatch):
  tiny_data.use(monkeypatch)
  return tokenizer_lib.Tokenizer.load()


def _real_texts(task_name: str, feature: str, split: str = "test") -> list[str]:
  source = sources.open_split(tasks.get(task_name), split)
  return [preprocess.as_text(source[i][feature]) for i in range(len(source))]


def test_special_ids(tok):
  assert (tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID, tokenizer_lib.UNK_ID) == (0, 1, 2)
  assert 300 < tok.vocab_size <= tokenizer_lib.VOCAB_SIZE
  ids = tok.encode("In the beginning")
  assert ids and all(3 <= i < tok.vocab_size for i in ids)  # No EOS, no pad, no unk.


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_round_trips_real_text_never_seen_in_training(tok, kind):
  texts = _real_texts(*TEXTS[kind])  # The test split: the tokenizer trained on train only.
  assert texts
  for text in texts:
    normalised = " ".join(text.split())
    ids = tok.encode(text)
    assert tokenizer_lib.UNK_ID not in ids, text
    assert tok.decode(ids) == normalised


def test_round_trips_unseen_characters_through_bytes(tok):
  text = "Größe: 42 € — 東京 🙂 naïve café"
  assert tok.decode(tok.encode(text)) == text


def test_decode_stops_at_eos_and_ignores_padding(tok):
  ids = tok.encode("Dieu dit: Que la lumière soit!")
  text = tok.decode(ids)
  assert tok.decode(ids + [tokenizer_lib.EOS_ID] + ids) == text
  assert tok.decode([0] + ids[:2] + [0, 0] + ids[2:] + [1, 0, 0]) == text
  assert tok.decode([tok.vocab_size + 5] + ids) == text  # Ids past the vocabulary are dropped.
  assert tok.decode([tokenizer_lib.EOS_ID]) == ""


def test_bytes_round_trip(tok, tmp_path):
  again = tokenizer_lib.Tokenizer.from_bytes(tok.to_bytes())
  assert again == tok and again.vocab_size == tok.vocab_size
  sentence = "And God said, Let there be light: and there was light."
  assert again.encode(sentence) == tok.encode(sentence)
  path = again.save(tmp_path / "spm.model")
  assert tokenizer_lib.Tokenizer.load(path) == tok


def test_training_is_deterministic(monkeypatch):
  tiny_data.use(monkeypatch)
  corpus = _real_texts("translate_en_fr", "en", "train") + _real_texts("parse_en", "tree", "train")
  first = tokenizer_lib.train(corpus, vocab_size=500)
  second = tokenizer_lib.train(list(corpus), vocab_size=500)
  assert first.to_bytes() == second.to_bytes()
  assert first.vocab_size <= 500


def test_trained_on_the_text_of_every_text_task(tok, monkeypatch):
  tiny_data.use(monkeypatch)
  text_tasks = [t for t in tasks.installed_tasks() if "text" in (t.input_modality,
                                                                t.target_modality)]
  assert {t.source for t in text_tasks} == {"translate_en_fr", "translate_en_de", "speech_en",
                                            "parse_en"}
  again = tokenizer_lib.train(prepare.tokenizer_corpus(text_tasks),
                              symbols=prepare.task_symbols(text_tasks))
  assert again == tok  # What `data.prepare` stored is this deterministic model.


def test_tree_brackets_are_pieces_of_their_own(tok, monkeypatch, tmp_path):
  """Each "(LABEL" and ")" of a tree is one piece, so a tree's brackets balance piece by piece,
  and the pieces between them are those of its words alone (its input, `tasks.TreeLeaves`)."""
  assert prepare.task_symbols([tasks.get("parse_en")]) == sorted(tasks.TREE_SYMBOLS)
  assert not tok.missing_symbols(tasks.TREE_SYMBOLS)
  deltas, starts = tok.bracket_deltas(), tok.word_starts()
  assert deltas.shape == starts.shape == (tok.vocab_size,)
  for tree in _real_texts("parse_en", "tree"):
    ids = tok.encode(tree)
    assert tok.decode(ids) == tree
    opens = [i for i in ids if deltas[i] > 0]
    assert [tok.piece(i).strip() for i in opens] == ["(" + label for label in
                                                    re.findall(r"\((\S+)", tree)]
    assert [deltas[i] for i in ids if deltas[i] < 0] == [-1] * tree.count(")")
    words = tok.encode(" ".join(tasks.tree_leaves(tree)))
    assert [i for i in ids if deltas[i] == 0] == words
    assert sum(starts[words]) == len(tasks.tree_leaves(tree))  # A piece begins each word.
  assert deltas[tokenizer_lib.PAD_ID] == deltas[tokenizer_lib.EOS_ID] == 0
  assert not starts[tokenizer_lib.PAD_ID] and not starts[tokenizer_lib.EOS_ID]
  # A tokenizer trained without them says which are missing (`data.prepare` reports it).
  tiny_data.use(monkeypatch)
  plain = tokenizer_lib.train(_real_texts("parse_en", "tree", "train"), vocab_size=500)
  assert ")" in plain.missing_symbols(tasks.TREE_SYMBOLS)
  old_path = plain.save(tmp_path / "old.model")
  monkeypatch.setattr(prepare.paths, "tokenizer_path", lambda: old_path)
  [row] = prepare.prepare([], log=lambda _: None)
  assert row.task == "tokenizer" and "trained without the tasks' symbols (ADJP" in row.status
  assert "--retrain_tokenizer" in row.status and old_path.read_bytes() == plain.to_bytes()
  assert "more than the" not in row.status
  # One larger than asked for (8192 pieces from before the default of 4096) is kept and named.
  [row] = prepare.prepare([], vocab_size=plain.vocab_size - 1, log=lambda _: None)
  assert f"{plain.vocab_size} pieces, more than the {plain.vocab_size - 1} asked for" in row.status
  assert old_path.read_bytes() == plain.to_bytes()


def test_missing_model_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.prepare"):
    tokenizer_lib.Tokenizer.load(tmp_path / "nothing.model")


def test_piece_text_and_control_or_byte_pieces(tok):
  ids = tok.encode("press one")
  assert "".join(tok.piece(i) for i in ids) == " press one"
  assert all(tok.is_control_or_byte(i) for i in (tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID,
                                                 tokenizer_lib.UNK_ID))
  assert not any(tok.is_control_or_byte(i) for i in ids)
  byte_ids = [i for i in tok.encode("東") if tok.is_control_or_byte(i)]
  assert byte_ids and all(tok.piece(i).startswith("<0x") for i in byte_ids)
