"""xmr_jax.wordpiece against transformers' BertTokenizerFast built from the same vocab file."""

from __future__ import annotations

import numpy as np
import pytest

from tests.teran_fixtures import write_bert_vocab
from xmr_jax.wordpiece import WordPieceTokenizer, WordPieceVocabError

TEXTS = [
    "A man in a red shirt is running on the grass.",
    "Two   people riding a BIKE\tdown the street!",
    "Café: the girl's teddy-bear (unbelievable) 2010",
    "snowboarding boys jumped, unbelievably; 中 water",
    "zzzz qqq xylophone",                     # letters only through ## pieces
    "",                                         # empty -> [CLS] [SEP]
    "a " * 70 + "dog",                         # long
    "naïve ÉLAN über \u00adsoft\u200bhyphen \x00ctrl",
    "a" * 120,                                  # longer than 100 chars -> [UNK]
    "#hash ##tag ✓ emoji 🙂",
]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_bert_vocab(tmp_path_factory.mktemp("bert") / "vocab.txt")


@pytest.fixture(scope="module")
def reference(vocab):
    from transformers import BertTokenizerFast

    # transformers 5: a local folder holding vocab.txt (no hub access); uncased as bert-base-uncased
    ref = BertTokenizerFast.from_pretrained(str(vocab.parent), do_lower_case=True)
    assert len(ref) == len(vocab.read_text().splitlines())
    return ref


def test_ids_equal_transformers(vocab, reference):
    tok = WordPieceTokenizer(vocab)
    enc = tok.encode_batch(TEXTS, max_length=None)
    ref = reference(TEXTS, padding="longest", return_tensors="np")
    np.testing.assert_array_equal(enc.ids, ref["input_ids"])
    np.testing.assert_array_equal(enc.ids != 0, ref["attention_mask"].astype(bool))
    np.testing.assert_array_equal(enc.lengths, ref["attention_mask"].sum(1))
    assert not enc.truncated.any()
    # something non-trivial was exercised: ## pieces, [UNK], the CJK character
    assert tok.token_to_id("##s") in enc.ids and tok.unk_id in enc.ids and tok.token_to_id("中") in enc.ids
    for text in TEXTS:
        assert tok.wordpieces(text) == reference.tokenize(text)


def test_truncation_reported_and_sep_kept(vocab, reference):
    tok = WordPieceTokenizer(vocab, max_length=12)
    enc = tok.encode_batch(TEXTS)
    assert enc.ids.shape == (len(TEXTS), 12) and enc.ids.dtype == np.int32
    ref = reference(TEXTS, padding="max_length", truncation=True, max_length=12, return_tensors="np")
    np.testing.assert_array_equal(enc.ids, ref["input_ids"])
    full = reference(TEXTS)["input_ids"]
    np.testing.assert_array_equal(enc.truncated, [len(r) > 12 for r in full])
    assert enc.num_truncated == sum(len(r) > 12 for r in full) > 0
    assert (enc.ids[enc.truncated, -1] == tok.sep_id).all()
    assert (enc.ids[:, 0] == tok.cls_id).all()
    np.testing.assert_array_equal(tok(TEXTS[:2]), enc.ids[:2])


def test_uncased_and_decode(vocab):
    tok = WordPieceTokenizer(vocab)
    assert tok.encode("THE DOGS", None).tolist() == tok.encode("the dogs", None).tolist()
    assert tok.wordpieces("dogs running") == ["dogs", "running"]
    assert tok.wordpieces("playing") == ["play", "##ing"]
    assert tok.decode(tok.encode("the dog is running", 10)[0]) == "the dog is running"
    cased = WordPieceTokenizer(vocab, lowercase=False)
    assert cased.wordpieces("Dog")[0] == "[UNK]"


def test_vocab_errors(tmp_path, vocab):
    with pytest.raises(WordPieceVocabError, match="missing.txt not found"):
        WordPieceTokenizer(tmp_path / "missing.txt")
    lines = vocab.read_text().splitlines()
    bad = tmp_path / "pad_not_zero.txt"
    bad.write_text("\n".join(lines[1:] + [lines[0]]) + "\n")
    with pytest.raises(WordPieceVocabError, match=r"\[PAD\] must be id 0"):
        WordPieceTokenizer(bad)
    bad.write_text("\n".join([l for l in lines if l != "[SEP]"]) + "\n")
    with pytest.raises(WordPieceVocabError, match=r"lacks the special token\(s\) \['\[SEP\]'\]"):
        WordPieceTokenizer(bad)
    bad.write_text("\n".join(lines + ["dog"]) + "\n")
    with pytest.raises(WordPieceVocabError, match="token 'dog' on line"):
        WordPieceTokenizer(bad)
    with pytest.raises(ValueError, match="max_length"):
        WordPieceTokenizer(vocab, max_length=1)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        WordPieceTokenizer(vocab).encode(["a", 3])
