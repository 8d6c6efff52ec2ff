import pytest
import torch

from fastblip.data.tokenizer import ASSET_VOCAB, load_tokenizer

SENTENCES = [
    "A picture of a dog.",
    "Café déjà-vu: naïve résumé, 3.14 km/h & 1,000,000 people!!",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "  Two   red circles\ton the left\n",
    "日本語 テキスト 東京",
    "don't stop (believing) #hashtag @user, it's 5 o'clock?! we're here",
    "ÀÉÎÕÜ straße 1990s COVID-19 3x3 e-mail",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def hf():
    # transformers 5: BertTokenizerLegacy is the pure-Python BertTokenizer (an independent oracle);
    # BertTokenizer is now the tokenizers-backed one and is checked too.
    from transformers.models.bert import BertTokenizerLegacy

    return BertTokenizerLegacy(vocab_file=str(ASSET_VOCAB))


def test_ids_equal_hf_bert_tokenizer(tok, hf):
    for s in SENTENCES:
        assert tok.encode(s) == hf.encode(s), s
        assert tok.encode(s, add_special_tokens=False) == hf.encode(s, add_special_tokens=False)
        assert tok.decode(tok.encode(s)) == hf.decode(hf.encode(s), skip_special_tokens=True)


def test_ids_equal_transformers_bert_tokenizer(tok):
    import transformers

    try:
        fast = transformers.BertTokenizer(vocab=str(ASSET_VOCAB))  # transformers >= 5
    except TypeError:
        fast = transformers.BertTokenizer(vocab_file=str(ASSET_VOCAB))
    for s in SENTENCES:
        assert tok.encode(s) == fast.encode(s), s


def test_special_tokens_and_attributes(tok):
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 101, 102)
    assert (tok.bos_token_id, tok.enc_token_id, tok.vocab_size) == (30522, 30523, 30524)
    assert tok.encode("[DEC] a [ENC]") == [101, 30522, 1037, 30523, 102]
    assert tok.decode([101, 30522, 1037, 3899, 102, 0, 0]) == "a dog"


def test_call_padding_truncation(tok):
    out = tok(["a picture of a dog", "a cat"], max_length=35)
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (2, 7)
    assert out["attention_mask"].tolist()[1] == [1, 1, 1, 1, 0, 0, 0]
    out = tok("one two three four five six", max_length=5, padding="max_length")
    assert out["input_ids"].tolist() == [[101, 2028, 2048, 2093, 102]]
    out = tok(["a"], max_length=10, padding="max_length")
    assert out["input_ids"].shape == (1, 10) and out["attention_mask"].sum() == 3


def test_decode_round_trip_and_batch_decode(tok):
    texts = ["a picture of a dog", "two red circles on the left and a blue star", "it's raining, isn't it?"]
    ids = tok(texts)["input_ids"]
    assert tok.batch_decode(ids) == texts


def test_save_and_load_sources(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "vocab.txt").is_file()
    for src in (tmp_path, tmp_path / "tokenizer.json", tmp_path / "vocab.txt", ASSET_VOCAB):
        t = load_tokenizer(src)
        assert t.vocab_size == 30524 and t.encode(SENTENCES[1]) == tok.encode(SENTENCES[1])
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.txt")
