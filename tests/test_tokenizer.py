"""Tests for xmr_jax.tokenizer: CLIP BPE ids vs transformers, cleaning, IRRA mask variant, MLM rule."""

import gzip
import json
import re

import numpy as np
import pytest

from xmr_jax import tokenizer as T
from xmr_jax.tokenizer import (CONTEXT_LENGTH, EOT_ID, MASK_ID, SOT_ID, VOCAB_SIZE, ClipTokenizer,
                               TokenizerFileError, apply_mlm_rule, clean_text, default_tokenizer, mlm_mask)

CAPTIONS = [
    "A man in a red shirt, carrying a bag.",
    "The woman is wearing a white T-shirt and blue jeans; she carries a black backpack.",
    "a photo of a dog",
    "He's wearing black pants and they're walking to the left.",
    "I'm sure we'll see what you've done; it'd be fine, wouldn't it?",
    "A girl with long, dark hair wears a pink dress (knee-length) & white sneakers!",
    "Two people: one in a grey coat, the other in a yellow jacket.",
    "Born in 1987, she is 5'6\" tall and weighs 120lbs.",
    "Price: $19.99 -- 50% off!!! Call 555-0199 now...",
    "A man wearing glasses, a watch on his left wrist and a cap.",
    "email me at someone@example.com or visit https://example.org/path?q=1&x=2",
    "The boy's shoes are red/white/blue striped; his socks are #1 quality.",
    "CAPITAL LETTERS SHOULD BE LOWERCASED",
    "MiXeD CaSe WoRdS aNd 12345 DiGiTs",
    "Tabs\tand\nnewlines   and    multiple spaces",
    "   leading and trailing spaces   ",
    "",
    "!!!",
    "...,,,;;;:::",
    "a",
    "x1y2z3",
    "3.14159 is pi and e is 2.71828",
    "C++ and C# are programming languages; so is Python 3.11.",
    "The year 2024 was 366 days long.",
    "under_score and hyphen-ated and slash/ed words",
    "'quoted' \"double quoted\" `back ticked`",
    "{braces} [brackets] <angles> (parens)",
    "The woman has a ponytail and wears a sleeveless top with floral print.",
    "A person riding a bicycle down a busy street next to a bus.",
    "A pedestrian in a navy blue windbreaker holding an umbrella.",
    "Café owner in a naïve pose near the façade.",
    "Müller and Schröder walked through the Straße.",
    "Señor García wears a sombrero in España.",
    "Ελληνικά γράμματα και λέξεις",
    "Русский текст: мужчина в красной куртке.",
    "日本語のテキストと漢字",
    "中文描述 一个穿红色衬衫的男人。",
    "한국어 문장입니다",
    "Emoji test 👍 with a smile 😀 and a heart ❤",
    "Arabic العربية and Hebrew עברית",
    "Numbers in other scripts: ١٢٣ and ४५६",
    "snake_case_identifier_with_many_parts_here",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "She's got a bag; it's hers. We'd've gone.",
    "The quick brown fox jumps over the lazy dog.",
    "A man in black walking with a woman in white, both carrying shopping bags.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "The young man is wearing a dark jacket over a light shirt, dark trousers and brown shoes. He is "
    "holding a phone in his right hand and a paper cup in his left hand, walking quickly towards the "
    "entrance of the building while looking at the screen, and a small dog follows him on a leash.",
    "word " * 80,
    "1234567890" * 12,
    "!?" * 200,
    "Ünïcödé " * 40,
    "A woman with shoulder-length hair, wearing a beige trench coat, black leggings, and white "
    "sneakers; she carries a brown leather handbag over her right shoulder and holds a coffee cup "
    "in her left hand while she waits at the crossing next to a red car.",
]


def _pad_rule(ids, context_length=CONTEXT_LENGTH):
    """docs/semantics.md, section 'Tokenizer', on a [SOT] + bpe + [EOT] list: cut to length with
    last = EOT, zero pad."""
    ids = list(ids)
    if len(ids) > context_length:
        ids = ids[:context_length - 1] + [EOT_ID]
    return ids + [0] * (context_length - len(ids))


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def mtok():
    return default_tokenizer(mask_token=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """HF-format vocab.json + merges.txt written from the packaged .gz with transformers' byte map."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(T.DEFAULT_BPE_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:48895]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    d = tmp_path_factory.mktemp("hf_clip")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer(vocab=str(hf_dir / "vocab.json"), merges=str(hf_dir / "merges.txt"))
    assert len(hf) == VOCAB_SIZE and hf.bos_token_id == SOT_ID and hf.eos_token_id == EOT_ID
    return hf


# ----------------------------------------------------------------------------- vocabulary / ids

def test_constants_and_vocab_layout(tok):
    assert (SOT_ID, EOT_ID, MASK_ID, VOCAB_SIZE, CONTEXT_LENGTH) == (49406, 49407, 49405, 49408, 77)
    assert tok.vocab_size == VOCAB_SIZE and tok.sot_id == SOT_ID and tok.eot_id == EOT_ID
    assert tok.mask_id is None
    assert tok.id_to_token(0) == "!" and tok.id_to_token(255) == chr(256 + 67)  # last non-printable byte
    assert tok.id_to_token(256) == "!</w>" and tok.id_to_token(511) == chr(256 + 67) + "</w>"
    assert tok.id_to_token(512) == "in" and tok.id_to_token(49405) == "jekyll</w>"
    assert tok.id_to_token(SOT_ID) == "<|startoftext|>" and tok.id_to_token(EOT_ID) == "<|endoftext|>"
    # well-known OpenAI CLIP ids
    np.testing.assert_array_equal(tok.encode_one("a photo of a dog")[:8],
                                  [49406, 320, 1125, 539, 320, 1929, 49407, 0])


def test_ids_match_transformers(tok, hf_tok):
    assert len(CAPTIONS) >= 50
    ours = tok.encode(CAPTIONS)
    assert ours.dtype == np.int32 and ours.shape == (len(CAPTIONS), CONTEXT_LENGTH)
    hf_ids = hf_tok(CAPTIONS)["input_ids"]
    n_long = 0
    for k, (caption, row) in enumerate(zip(CAPTIONS, hf_ids)):
        n_long += len(row) > CONTEXT_LENGTH
        np.testing.assert_array_equal(ours[k], _pad_rule(row), err_msg=f"caption {k}: {caption!r:.60}")
    assert n_long >= 4  # the truncation path was exercised


def test_cleaning_differs_from_transformers_on_purpose(tok, hf_tok):
    cases = {  # raw -> hand-cleaned text (what OpenAI/IRRA feed to BPE)
        "\u201cHello\u201d said the \ufb01rst man": '"hello" said the first man',
        "it\u2019s a dog": "it's a dog",
        "rock &amp;amp; roll &lt;3": "rock & roll <3",
        "\uff21\uff22\uff23 full width \uff11\uff12": "abc full width 12",
        "  A\tman \n\n walks \u00a0 fast  ": "a man walks fast",
    }
    for raw, expected in cases.items():
        assert clean_text(raw) == expected, raw
        ref = _pad_rule(hf_tok(expected)["input_ids"])
        np.testing.assert_array_equal(tok.encode_one(raw), ref, err_msg=raw)
        np.testing.assert_array_equal(tok.encode_one(expected), ref)
    for raw in list(cases)[:4]:  # transformers' plain NFC+lowercase gives different ids there
        assert _pad_rule(hf_tok(raw)["input_ids"]) != tok.encode_one(raw).tolist(), raw
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode(["ok", None])


def test_truncation_and_padding(tok):
    word = tok.token_to_id("word</w>")
    for n in (74, 75, 76, 200):
        row = tok.encode_one("word " * n)
        n_kept = min(n, CONTEXT_LENGTH - 2)
        assert row[0] == SOT_ID and row[n_kept + 1] == EOT_ID
        assert np.all(row[1:n_kept + 1] == word)
        assert np.all(row[n_kept + 2:] == 0)
    out = tok.encode(["", "a dog", "word " * 300])
    np.testing.assert_array_equal(out[0, :3], [SOT_ID, EOT_ID, 0])
    assert np.count_nonzero(out[0]) == 2 and np.count_nonzero(out[1]) == 4
    assert out[2, -1] == EOT_ID and np.count_nonzero(out[2]) == CONTEXT_LENGTH
    assert tok.encode([]).shape == (0, CONTEXT_LENGTH)
    assert tok.encode("a dog").shape == (1, CONTEXT_LENGTH)
    short = ClipTokenizer(context_length=8)
    np.testing.assert_array_equal(short.encode_one("one two three four five six seven"),
                                  _pad_rule(tok.encode_one("one two three four five six")[:7].tolist()
                                            + [EOT_ID], 8))
    assert short.encode_one("one two three four five six seven")[-1] == EOT_ID


def test_decode_round_trip(tok):
    for caption in CAPTIONS[:45]:
        ids = tok.encode_one(caption)
        if ids[-1] == EOT_ID:
            continue  # truncated
        text = tok.decode(ids)
        assert re.sub(r"\s+", "", text) == re.sub(r"\s+", "", clean_text(caption)), caption
    assert tok.decode(tok.encode(["a dog", "two cats"])) == ["a dog", "two cats"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([SOT_ID, VOCAB_SIZE])


def test_literal_special_tokens_follow_openai(tok, mtok):
    row = tok.encode_one("a <|endoftext|> b")
    np.testing.assert_array_equal(row[:5], [SOT_ID, tok.token_to_id("a</w>"), EOT_ID,
                                            tok.token_to_id("b</w>"), EOT_ID])
    assert MASK_ID not in mtok.encode_one("a <|mask|> b")  # literal mask text is ordinary text


def test_mask_variant(tok, mtok):
    assert mtok.vocab_size == VOCAB_SIZE and mtok.mask_id == MASK_ID
    assert mtok.sot_id == SOT_ID and mtok.eot_id == EOT_ID
    assert mtok.id_to_token(MASK_ID) == "<|mask|>" and mtok.token_to_id("jekyll</w>") is None
    assert tok.encode_one("jekyll")[1] == 49405  # the full vocab has jekyll</w> there
    row = mtok.encode_one("Dr. Jekyll and Mr. Hyde")
    assert MASK_ID not in row and row[0] == SOT_ID and np.count_nonzero(row) > 7
    assert mtok.decode(row) == "dr . jekyll and mr . hyde"
    np.testing.assert_array_equal(mtok.encode(CAPTIONS), tok.encode(CAPTIONS))  # no jekyll inside
    assert mtok.decode([SOT_ID, 320, MASK_ID, 1929, EOT_ID]) == "a <|mask|> dog"
    assert default_tokenizer(mask_token=True) is mtok and default_tokenizer() is tok


def test_hf_folder_equals_gz(tok, mtok, hf_dir):
    from_hf = ClipTokenizer(hf_dir=hf_dir)
    np.testing.assert_array_equal(from_hf.encode(CAPTIONS), tok.encode(CAPTIONS))
    from_hf_mask = ClipTokenizer(hf_dir=hf_dir, mask_token=True)
    assert from_hf_mask.mask_id == MASK_ID and from_hf_mask.token_to_id("jekyll</w>") is None
    texts = CAPTIONS[:10] + ["jekyll island"]
    np.testing.assert_array_equal(from_hf_mask.encode(texts), mtok.encode(texts))


def test_bad_vocab_paths(tmp_path, hf_dir):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ClipTokenizer(vocab_path=missing)
    not_gz = tmp_path / "plain.txt.gz"
    not_gz.write_text("hello")
    with pytest.raises(TokenizerFileError, match=re.escape(str(not_gz)) + ".*gzip"):
        ClipTokenizer(vocab_path=not_gz)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as f:
        f.write("#version\ni n\nt h\n")
    with pytest.raises(TokenizerFileError, match="only 3 merge lines"):
        ClipTokenizer(vocab_path=short)
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        ClipTokenizer(hf_dir=tmp_path / "no_dir")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "vocab.json").write_text((hf_dir / "vocab.json").read_text())
    with pytest.raises(FileNotFoundError, match="missing merges.txt"):
        ClipTokenizer(hf_dir=partial)
    (partial / "merges.txt").write_text("#version: 0.2\nqq zz\n")
    with pytest.raises(TokenizerFileError, match="'qqzz' is not in"):
        ClipTokenizer(hf_dir=partial)
    (partial / "vocab.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match="not valid JSON"):
        ClipTokenizer(hf_dir=partial)
    with pytest.raises(ValueError, match="not both"):
        ClipTokenizer(vocab_path=missing, hf_dir=partial)


# ----------------------------------------------------------------------------- MLM masking

@pytest.fixture(scope="module")
def caption_rows(tok):
    """20000 realistic rows: [SOT] + 15..60 real caption tokens (a few pre-existing masks) + [EOT] + 0s."""
    rng = np.random.default_rng(0)
    pool = tok.encode(CAPTIONS)
    pool = pool[(pool > 0) & (pool < MASK_ID)]
    n = 20000
    lengths = rng.integers(15, 61, size=n)
    rows = np.zeros((n, CONTEXT_LENGTH), np.int32)
    words = rng.choice(pool, size=(n, 60))
    words[rng.random((n, 60)) < 0.01] = MASK_ID
    words[:, 0] = rng.choice(pool, size=n)  # position 1 is always a real word
    pos = np.arange(CONTEXT_LENGTH)[None]
    rows[:, 0] = SOT_ID
    rows[:, 1:61] = np.where(pos[:, :60] < lengths[:, None], words, 0)
    rows[np.arange(n), lengths + 1] = EOT_ID
    return rows, lengths


def test_mlm_statistics(caption_rows):
    rows, lengths = caption_rows
    masked, labels = mlm_mask(rows, rng=123)
    assert masked.dtype == np.int32 and labels.dtype == np.int32 and masked.shape == rows.shape
    eligible = (rows > 0) & (rows < MASK_ID)
    selected = labels != 0
    assert not np.any(selected & ~eligible)  # SOT, EOT, mask, padding never selected
    np.testing.assert_array_equal(masked[~eligible], rows[~eligible])
    np.testing.assert_array_equal(labels[selected], rows[selected])
    assert not np.any((masked != rows) & ~selected)
    assert np.all(selected.sum(1) >= 1)
    # selection rate, including the "nothing selected -> position 1" fallback (exact expectation)
    n_eligible = eligible.sum(1)
    rate = selected.sum() / n_eligible.sum()
    expected = (0.15 * n_eligible + 0.85 ** n_eligible).sum() / n_eligible.sum()
    sigma = np.sqrt(0.15 * 0.85 / n_eligible.sum())
    assert abs(rate - 0.15) < 0.005 and abs(rate - expected) < 5 * sigma, (rate, expected)
    # 80 / 10 / 10 among selected positions
    to_mask = masked[selected] == MASK_ID
    unchanged = masked[selected] == rows[selected]
    random = ~to_mask & ~unchanged
    n_sel = selected.sum()
    assert abs(to_mask.sum() / n_sel - 0.8) < 0.006
    assert abs(random.sum() / n_sel - 0.1) < 0.006
    assert abs(unchanged.sum() / n_sel - 0.1) < 0.006
    replaced = masked[selected][random]
    assert replaced.min() >= 1 and replaced.max() < MASK_ID
    assert abs(replaced.mean() / (MASK_ID / 2) - 1) < 0.02  # uniform over [1, 49405)


def test_mlm_fallback_determinism_and_shapes(caption_rows):
    rows = caption_rows[0][:500]
    masked, labels = mlm_mask(rows, rng=0, mask_prob=0.0)
    np.testing.assert_array_equal(masked[:, 1], MASK_ID)
    np.testing.assert_array_equal(labels[:, 1], rows[:, 1])
    np.testing.assert_array_equal(np.delete(masked, 1, axis=1), np.delete(rows, 1, axis=1))
    assert np.count_nonzero(labels) == len(rows)
    a = mlm_mask(rows, rng=7)
    b = mlm_mask(rows, rng=np.random.default_rng(7))
    c = mlm_mask(rows, rng=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    m1, l1 = mlm_mask(rows[3], rng=7)
    assert m1.shape == (CONTEXT_LENGTH,) and l1.shape == (CONTEXT_LENGTH,)
    m_all, l_all = mlm_mask(rows, rng=1, mask_prob=1.0)  # every eligible word selected
    eligible = (rows > 0) & (rows < MASK_ID)
    np.testing.assert_array_equal(l_all, np.where(eligible, rows, 0))
    # documented draw order reproduces mlm_mask through apply_mlm_rule
    g = np.random.default_rng(5)
    u1, u2 = g.random(rows.shape, dtype=np.float32), g.random(rows.shape, dtype=np.float32)
    r = g.integers(1, MASK_ID, size=rows.shape, dtype=np.int32)
    ref = apply_mlm_rule(rows, u1, u2, r)
    got = mlm_mask(rows, rng=5)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    with pytest.raises(ValueError, match="mask_prob"):
        mlm_mask(rows, rng=0, mask_prob=1.5)
    with pytest.raises(ValueError, match="integer array"):
        mlm_mask(rows.astype(np.float32), rng=0)
    with pytest.raises(TypeError, match="rng"):
        mlm_mask(rows, rng="seed")


def test_mlm_numpy_and_tensorflow_agree(caption_rows):
    tf = pytest.importorskip("tensorflow")
    tf.config.set_visible_devices([], "GPU")
    import tensorflow.experimental.numpy as tnp

    rows = caption_rows[0][:2000]
    g = np.random.default_rng(3)
    u1, u2 = g.random(rows.shape, dtype=np.float32), g.random(rows.shape, dtype=np.float32)
    u1[:, 2], u1[:, 3] = np.float32(0.15), np.nextafter(np.float32(0.15), np.float32(0))  # thresholds
    u2[:, 2], u2[:, 3] = np.float32(0.8), np.float32(0.9)
    u1[:50] = 0.99  # rows with nothing selected -> fallback
    r = g.integers(1, MASK_ID, size=rows.shape, dtype=np.int32)
    ref = apply_mlm_rule(rows, u1, u2, r)
    got = apply_mlm_rule(tf.constant(rows), tf.constant(u1), tf.constant(u2), tf.constant(r), xp=tnp)
    assert got[0].dtype == tf.int32
    np.testing.assert_array_equal(np.asarray(got[0]), ref[0])
    np.testing.assert_array_equal(np.asarray(got[1]), ref[1])

    # inside tf.data (graph mode) with stateless draws, as the input pipeline uses it
    def draws(seed, shape):
        s = tf.random.experimental.stateless_split(seed, 3)
        return (tf.random.stateless_uniform(shape, s[0]), tf.random.stateless_uniform(shape, s[1]),
                tf.random.stateless_uniform(shape, s[2], minval=1, maxval=MASK_ID, dtype=tf.int32))

    def corrupt(ids, seed):
        return apply_mlm_rule(ids, *draws(seed, tf.shape(ids)), xp=tnp)

    seeds = np.stack([np.arange(64), np.full(64, 11)], 1).astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices((rows[:64], seeds)).map(corrupt).batch(64)
    m_tf, l_tf = next(iter(ds))
    for k in (0, 17, 63):
        ref_k = apply_mlm_rule(rows[k], *[np.asarray(d) for d in draws(seeds[k], (CONTEXT_LENGTH,))])
        np.testing.assert_array_equal(m_tf[k].numpy(), ref_k[0])
        np.testing.assert_array_equal(l_tf[k].numpy(), ref_k[1])
    assert np.all((l_tf.numpy() != 0).sum(1) >= 1)
