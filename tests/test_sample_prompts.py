"""A1111 prompt syntax: prompt editing / alternation schedules, emphasis, BREAK, extra networks, chunks, token counts.

Expected values are A1111's: the doctest examples of modules/prompt_parser.py, plus cases whose expected output was
recorded from A1111's lark grammar (lark 1.1.2, the version A1111 pins) during development.
"""
import pytest

from ldm.tokenizer import BOS, EOS, CLIPTokenizer
from sample.prompts import (CHUNK_LENGTH, ExtraNetwork, chunk_prompt, extract_extra_networks, parse_prompt_attention,
                            prompt_schedule, token_count)


def schedule(prompt, steps=10, hires_steps=None):
    return [list(entry) for entry in prompt_schedule(prompt, steps, hires_steps)]


# A1111's get_learned_conditioning_prompt_schedules doctests (steps = 10).
A1111_SCHEDULE_DOCTESTS = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]),
    ("[fe|]male", [[s, "female" if s % 2 else "male"] for s in range(1, 11)]),
    ("[fe|||]male", [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_SCHEDULE_DOCTESTS)
def test_prompt_schedule_matches_a1111_doctests(prompt, expected):
    assert schedule(prompt) == expected


def test_hires_schedule_offsets_integers_by_the_first_pass_and_fractions_by_one():
    # A1111's doctests with base_steps = 10, hires_steps = 10.
    assert schedule("a [b:.5] c", 10, 10) == [[10, "a b c"]]
    assert schedule("a [b:1.5] c", 10, 10) == [[5, "a  c"], [10, "a b c"]]
    assert schedule("[a:b:15]", 10, 10) == [[5, "a"], [10, "b"]]


def test_prompt_with_a_pipe_outside_alternation_stays_literal():
    # A1111's doctest claims [[5, 'a  c'], [10, 'a {b|d{ c']] for this prompt, but its grammar rejects the `|` (no
    # rule takes it outside [a|b]), so A1111 actually uses the text as is; that is what is reproduced.
    assert schedule("a [{b|d{:.5] c") == [[10, "a [{b|d{:.5] c"]]
    assert schedule("a | b [c:2]") == [[10, "a | b [c:2]"]]
    assert schedule("a [b:2] \\") == [[10, "a [b:2] \\"]]


def test_a1111_example_of_many_edits_over_100_steps():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
              "[ in background:0.25] [shoddy:masterful:0.5]")
    assert schedule(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"]]


# Recorded from A1111's grammar: `when` forms, nesting, escapes, and its Earley parser's tie-breaking when stray
# brackets follow an edit (an even run of them makes the edit literal).
RECORDED = [
    ("[a:b:1e1]", [[10, "a"]]),
    ("[a:b:-1]", [[10, "b"]]),
    ("[a:b: 2 ]", [[2, "a"], [10, "b"]]),
    ("[a:b:1.5]", [[10, "a"]]),
    ("(x [a:b:2]:1.2)", [[2, "(x a:1.2)"], [10, "(x b:1.2)"]]),
    ("a \\[b:2\\] [c:2]", [[2, "a \\[b:2\\] "], [10, "a \\[b:2\\] c"]]),
    ("[[a|b]:c:3]", [[1, "a"], [2, "b"], [3, "a"]] + [[s, "c"] for s in range(4, 11)]),
    ("[a|b] [c:d:0.5]", [[s, ("a" if s % 2 else "b") + (" c" if s <= 5 else " d")] for s in range(1, 11)]),
    ("[a:1]]", [[1, "]"], [10, "a]"]]),
    ("[a:1]]]", [[10, "[a:1]]]"]]),
    ("[a:1]]]]", [[1, "]]]"], [10, "a]]]"]]),
    ("([a:1])]", [[10, "([a:1])]"]]),
    ("([a:1]):]", [[1, "():]"], [10, "(a):]"]]),
    ("[[a:1]:2]]]", [[1, "[:2]]]"], [10, "[a:2]]]"]]),
    ("x [a:1]:) y", [[10, "x [a:1]:) y"]]),
]


@pytest.mark.parametrize("prompt, expected", RECORDED)
def test_prompt_schedule_matches_recorded_a1111_behaviour(prompt, expected):
    assert schedule(prompt) == expected


def test_parse_prompt_attention_matches_a1111_doctests():
    assert parse_prompt_attention("normal text") == [["normal text", 1.0]]
    assert parse_prompt_attention("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert parse_prompt_attention("(unbalanced") == [["unbalanced", 1.1]]
    assert parse_prompt_attention("\\(literal\\]") == [["(literal]", 1.0]]
    assert parse_prompt_attention("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]


def test_emphasis_details_square_brackets_spaces_and_stray_closers():
    assert parse_prompt_attention("[x]") == [["x", 1 / 1.1]]
    assert parse_prompt_attention("((x))") == [["x", 1.1 * 1.1]]
    assert parse_prompt_attention("(x: 1.5 )") == [["x", 1.5]]
    assert parse_prompt_attention("a) b] c:1.2)") == [["a) b] c:1.2)", 1.0]]
    assert parse_prompt_attention("\\\\ and \\") == [["\\ and ", 1.0]]
    assert parse_prompt_attention("") == [["", 1.0]]


def test_break_splits_only_outside_emphasis():
    assert parse_prompt_attention("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    # Inside a group BREAK is weighted like text (-1.1), so A1111's chunker does not see it as a break.
    assert parse_prompt_attention("(c BREAK d)") == [["c", 1.1], ["BREAK", -1.1], ["d", 1.1]]
    assert parse_prompt_attention("aBREAKb break") == [["aBREAKb break", 1.0]]


def test_bad_emphasis_weight_is_reported():
    with pytest.raises(ValueError, match="1.2.3"):
        parse_prompt_attention("(x:1.2.3)")


def test_extra_networks_are_removed_and_parsed():
    text, networks = extract_extra_networks("a <lora:style:0.8>, b <lora:other> <lora:x:0.5:0.25> <hypernet:h:1>")
    assert text == "a , b   "
    assert networks == [ExtraNetwork("lora", "style", 0.8, 0.8), ExtraNetwork("lora", "other", 1.0, 1.0),
                        ExtraNetwork("lora", "x", 0.5, 0.25), ExtraNetwork("hypernet", "h", 1.0, 1.0)]
    with pytest.raises(ValueError, match="not a number"):
        extract_extra_networks("<lora:x:strong>")


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_token_count_of_the_reference_prompt_is_13_of_75(tokenizer):
    assert token_count("a dog in manipal university jaipur hostel on a rainy day", tokenizer=tokenizer) == (13, 75)


def test_token_count_ignores_lora_tags_and_counts_breaks_and_long_prompts(tokenizer):
    assert token_count("a red circle <lora:x:1>", tokenizer=tokenizer) == (3, 75)
    assert token_count("a BREAK b", tokenizer=tokenizer) == (76, 150)
    assert token_count("", tokenizer=tokenizer) == (0, 75)
    assert token_count(" ".join(["cat"] * 80), tokenizer=tokenizer) == (80, 150)
    # Prompt editing: the longest scheduled prompt counts.
    assert token_count("[a:a red circle on a white background:5]", tokenizer=tokenizer) == (7, 75)


def test_chunks_are_bos_75_tokens_eos_with_weights(tokenizer):
    chunks, count = chunk_prompt("a (red:1.5) circle", tokenizer)
    (chunk,) = chunks
    ids = tokenizer.encode("a") + tokenizer.encode("red") + tokenizer.encode(" circle")
    assert count == 3 and len(chunk.tokens) == len(chunk.weights) == CHUNK_LENGTH + 2
    assert chunk.tokens == [BOS, *ids] + [EOS] * (CHUNK_LENGTH - 3) + [EOS]
    assert chunk.weights == [1.0, 1.0, 1.5, 1.0] + [1.0] * (CHUNK_LENGTH - 2)


def test_long_prompt_breaks_after_the_last_comma_within_20_tokens(tokenizer):
    words = ["cat"] * 70 + [","] + ["dog"] * 10
    chunks, count = chunk_prompt(" ".join(words), tokenizer)
    assert len(chunks) == 2 and count == CHUNK_LENGTH + 10
    first = chunks[0].tokens[1:-1]
    comma = tokenizer.encode(",")[0]
    # The first chunk ends with the comma and is padded; the dogs after it all moved to the second chunk.
    assert first[:71] == tokenizer.encode("cat") * 70 + [comma] and set(first[71:]) == {EOS}
    assert chunks[1].tokens[1:11] == tokenizer.encode("dog") * 10


def test_break_starts_a_new_chunk(tokenizer):
    chunks, count = chunk_prompt("a BREAK b", tokenizer)
    assert [c.tokens[1] for c in chunks] == tokenizer.encode("a") + tokenizer.encode("b")
    assert count == CHUNK_LENGTH + 1
