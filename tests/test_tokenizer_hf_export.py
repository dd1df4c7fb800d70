"""Export to transformers' tokenizer.json: AutoTokenizer must give exactly our ids."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tegaki.errors import TegakiError
from tegaki.tokenizer import export_hf_tokenizer, load
from tegaki.tokenizer.trainer import train_bpe

transformers = pytest.importorskip("transformers")

CORPUS = (
    "吾輩は猫である。名前はまだ無い。 The cat's name? It isn't known; 1234567 cats.\n"
    "絵文字も🤖👍🏽使います。HE'LL   say\n\n"
) * 30
CASES = [
    "Hello, I am",
    "日本語のテキストと絵文字🤖👍🏽👨‍👩‍👧",
    "  spaces   and\n\nnewlines\t\r\n",
    "it's HE'LL 12345678 e\u0301",
    "x<|endoftext|>y<|endoftext|>",
    "ｶﾀｶﾅ　全角",
]


@pytest.fixture(scope="module", params=["gpt2", "trained-gpt4"])
def exported(request, tmp_path_factory):
    if request.param == "gpt2":
        tok = load("gpt2")
    else:
        tok = train_bpe(CORPUS, 256 + 200 + 1, pattern="gpt4", name="small")
    folder = export_hf_tokenizer(tok, tmp_path_factory.mktemp(request.param))
    return tok, transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("text", CASES)
def test_autotokenizer_encodes_and_decodes_identically(exported, text):
    tok, hf = exported
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_autotokenizer_agrees_on_any_text(exported, text):
    tok, hf = exported
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_special_tokens_are_known_to_transformers(exported):
    tok, hf = exported
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == tok.eot_id
    assert len(hf) == tok.vocab_size


def test_sentencepiece_export_says_why_not(tmp_path):
    pytest.importorskip("sentencepiece")
    from tegaki.tokenizer.spm import train_sentencepiece

    tok = train_sentencepiece(CORPUS, 400)
    with pytest.raises(TegakiError, match="byte-level BPE only"):
        export_hf_tokenizer(tok, tmp_path)


def test_load_reads_a_gpt2_style_tokenizer_json(tmp_path):
    """The hub's GPT-2 tokenizer.json form: ByteLevel with its built-in regex, no Split step."""
    tokenizers = pytest.importorskip("tokenizers")
    from tegaki.tokenizer import gpt2_files_dir

    folder = gpt2_files_dir()
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(folder / "encoder.json"), str(folder / "vocab.bpe")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load(tmp_path)
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    for text in CASES:
        assert tok.encode(text) == hf.encode(text).ids == load("gpt2").encode(text)


def test_export_then_load_round_trips(exported, tmp_path):
    tok, _ = exported
    export_hf_tokenizer(tok, tmp_path)
    again = load(tmp_path)
    assert again.merges == tok.merges and again.special_tokens == tok.special_tokens
    assert again.pattern == tok.pattern
    for text in CASES:
        assert again.encode(text) == tok.encode(text)


def test_unsupported_tokenizer_json_is_refused_clearly(tmp_path):
    (tmp_path / "tokenizer.json").write_text(
        '{"model": {"type": "WordPiece", "vocab": {}}, "normalizer": null, "pre_tokenizer": null}'
    )
    with pytest.raises(TegakiError, match="'WordPiece', not BPE"):
        load(tmp_path)
