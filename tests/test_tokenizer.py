"""CLIP tokenizer: exact parity with open_clip's SimpleTokenizer (the oracle), padding, truncation and decoding."""

import string

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ldm.tokenizer import _WORD_PATTERN, BOS, EOS, VOCAB_SIZE, CLIPTokenizer, clean_text
from tokenizer_oracles import hf_clip_tokenizer, open_clip_tokenizer

REFERENCE_PROMPT = "a dog in manipal university jaipur hostel on a rainy day"


@pytest.fixture(scope="module")
def oracle():
    return open_clip_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


HARD_CASES = [
    "",
    " ",
    " \t\n\r\u3000\xa0 ",
    "&amp;amp; &lt;b&gt; &#39;quoted&#39; &quot;x&quot; &nbsp;",
    "<b>&amp;amp;</b> &amp;lt;i&amp;gt;",  # ftfy leaves entities alone in text that has HTML tags
    "a" * 150,
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 4,
    "x" + "é" * 120,
    "12345 3.14159 1,000,000 ٣٤٥ ½ ²",
    "don't DON'T i'll we've they're she'd I'M it's 'S",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows, schÃ¶n",
    "東京タワー、夜景 한국어 Ελληνικά русский עברית العربية हिन्दी",
    "🐶🐱 👩‍🚀 🏳️‍🌈 ❤️ 👍🏽",
    "(masterpiece:1.2), best quality, [lowres], ((detailed)), \\(escaped\\), BREAK <lora:name:0.8>",
    "<start_of_text>cat<end_of_text> <START_OF_TEXT> <|startoftext|> <|endoftext|> </w>",
    "A   Photo\tOF\n\nA CAT!!!  ...  ?!",
    "İstanbul ẞ Kelvin\u212a ſ ﬁ",
    "it'ſ <ſtart_of_text> '\u0345",  # the regex's IGNORECASE matters for these even after lower-casing
    "\x00\x01\x1c\x1f\x7f\u200b\u200d\ufeff",
    "\U0001d400\U0001d401 \U00020000 \U0010ffff",
]

# Pieces a generated text is glued from: arbitrary unicode plus the classes the tokenizer treats specially.
_TEXT_PIECES = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=string.ascii_letters + "'", max_size=12),
    st.text(alphabet=string.digits + ".,", min_size=1, max_size=8),
    st.text(alphabet=string.punctuation, min_size=1, max_size=5),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=6),  # CJK
    st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), min_size=1, max_size=4),  # emoji
    st.text(alphabet=" \t\n\r\x0b\x0c\xa0\u2003\u3000\x85", min_size=1, max_size=4),  # whitespace runs
    st.sampled_from(["&amp;", "&amp;amp;", "&lt;", "&gt;", "&#39;", "&quot;", "&nbsp;", "&#x1F600;", "Ã©", "â€™",
                     "'s", "'LL", "'re", "(", ":1.2)", "[", "]", "\\(", "BREAK", "\u200d", "\ufe0f"]),
)
_TEXTS = st.lists(_TEXT_PIECES, max_size=10).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_TEXTS)
def test_encode_matches_open_clip_on_generated_text(text, tokenizer, oracle):
    assert tokenizer.encode(text) == oracle._tokenizer.encode(text)


@pytest.mark.parametrize("text", HARD_CASES)
def test_encode_matches_open_clip_on_hard_cases(text, tokenizer, oracle):
    assert tokenizer.encode(text) == oracle._tokenizer.encode(text)


def test_special_ids_are_the_last_two_vocabulary_entries(tokenizer, oracle):
    vocab = tokenizer.vocab
    assert len(vocab) == VOCAB_SIZE == tokenizer.vocab_size == oracle._tokenizer.vocab_size == 49408
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (BOS, EOS) == (49406, 49407)
    assert (oracle._tokenizer.sot_token_id, oracle._tokenizer.eot_token_id) == (BOS, EOS)
    # Every other entry has the oracle's id (the oracle names the special tokens `<start_of_text>` / `<end_of_text>`).
    ours = {symbol: token_id for symbol, token_id in vocab.items() if token_id < BOS}
    theirs = {symbol: token_id for symbol, token_id in oracle._tokenizer.encoder.items() if token_id < BOS}
    assert ours == theirs


def test_known_clip_ids():
    # Published CLIP ids: "a photo of a cat" is the example of the CLIP paper's zero-shot prompt.
    assert CLIPTokenizer().encode("A photo of a cat.") == [320, 1125, 539, 320, 2368, 269]


def test_reference_prompt_is_13_tokens():
    assert CLIPTokenizer().count_tokens(REFERENCE_PROMPT) == 13


def test_literal_special_strings_become_special_ids():
    # As in open_clip; OpenAI's spelling `<|endoftext|>` stays ordinary text.
    tokenizer = CLIPTokenizer()
    assert tokenizer.encode("<START_OF_TEXT>cat<end_of_text>") == [BOS, 2368, EOS]
    assert EOS not in tokenizer.encode("<|endoftext|>")


def test_cleaning_repairs_mojibake_and_double_escaped_html():
    assert clean_text("  The Mona Lisa doesnÃ¢â‚¬â„¢t\n\nhave  EYEBROWS &amp;amp; ") == \
        "the mona lisa doesn't have eyebrows &"


TEXT_BATCH = [REFERENCE_PROMPT, "", "&amp;amp; 東京 🐶 (masterpiece:1.2)", "word " * 100, "x" * 300]


@pytest.mark.parametrize("context_length", [77, 10, 2])
def test_batch_with_zero_padding_matches_open_clip_tokenize(context_length, oracle):
    ours = CLIPTokenizer(pad_token_id=0)(TEXT_BATCH, context_length=context_length)
    theirs = oracle.tokenize(TEXT_BATCH, context_length=context_length)
    assert ours.dtype == torch.long
    assert torch.equal(ours, theirs)


def test_batch_with_eos_padding_is_bos_tokens_then_eos_to_the_end(oracle):
    rows = CLIPTokenizer()(TEXT_BATCH[:3])
    for row, text in zip(rows, TEXT_BATCH[:3]):
        ids = oracle._tokenizer.encode(text)
        expected = [BOS, *ids] + [EOS] * (77 - 1 - len(ids))
        assert row.tolist() == expected


def test_batch_with_eos_padding_matches_transformers_on_plain_prompts(oracle):
    # Plain prompts only: transformers normalises text without ftfy, so exotic input may differ there.
    prompts = [REFERENCE_PROMPT, "A photo of an astronaut riding a horse, 8k, trending on artstation",
               "(masterpiece:1.2), best quality, don't", "", "castle " * 90]
    hf = hf_clip_tokenizer(oracle)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS, EOS, EOS)
    theirs = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(CLIPTokenizer()(prompts), theirs)


@pytest.mark.parametrize("num_tokens, truncated", [(75, False), (76, True), (200, True)])
def test_long_text_is_cut_to_75_tokens_with_eos_last(num_tokens, truncated):
    tokenizer = CLIPTokenizer()
    text = " ".join(["dog"] * num_tokens)  # "dog" is a single token
    assert tokenizer.count_tokens(text) == num_tokens
    row = tokenizer(text)[0]
    assert row.shape == (77,)
    assert row[0] == BOS and row[-1] == EOS
    assert row[1:76].tolist() == tokenizer.encode(text)[:75]
    assert (tokenizer.decode(row) != tokenizer.decode(tokenizer.encode(text))) == truncated


@settings(max_examples=100, deadline=None)
@given(text=_TEXTS)
@example(text="a\u0345b")
def test_decode_gives_back_the_cleaned_text_up_to_whitespace(text, tokenizer, oracle):
    ids = tokenizer.encode(text)
    decoded = tokenizer.decode(ids)
    # Up to whitespace and the characters CLIP's pre-tokenizer skips: under IGNORECASE a combining mark whose case
    # folding is a letter (U+0345 folds to ι) matches none of its classes, so open_clip drops it too (asserted below).
    kept = "".join(_WORD_PATTERN.findall(clean_text(text)))
    assert "".join(decoded.split()) == "".join(kept.split())
    # Same text as open_clip's decode, without its trailing word-end space.
    assert decoded == oracle._tokenizer.decode(ids).rstrip(" ")


@pytest.mark.parametrize("pad_token_id", [EOS, 0])
def test_decoding_a_padded_row_ignores_bos_eos_and_padding(pad_token_id):
    tokenizer = CLIPTokenizer(pad_token_id=pad_token_id)
    assert tokenizer.decode(tokenizer(REFERENCE_PROMPT)[0]) == REFERENCE_PROMPT
    assert tokenizer.decode(tokenizer("")[0]) == ""


def test_decode_of_a_partial_multibyte_character_is_a_replacement_character():
    tokenizer = CLIPTokenizer()
    ids = tokenizer.encode("\U0002a6d6")  # a rare CJK ideograph: four bytes, split over several tokens
    assert len(ids) > 1
    assert tokenizer.decode(ids[:1]) == "\ufffd"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="pad_token_id"):
        CLIPTokenizer(pad_token_id=VOCAB_SIZE)
    with pytest.raises(ValueError, match="context_length"):
        CLIPTokenizer()("cat", context_length=1)
    with pytest.raises(ValueError, match="not a CLIP text token"):
        CLIPTokenizer().decode([320, -1])
    with pytest.raises(ValueError, match="one sequence"):
        CLIPTokenizer().decode(torch.zeros(2, 77, dtype=torch.long))
