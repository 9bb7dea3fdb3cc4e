import pytest

from ctxc import TokenizerError, get_tokenizer


def test_cl100k_is_offline_and_matches_known_ids():
    tok = get_tokenizer("cl100k")
    # cl100k_base ids for "hello world" (the same as tiktoken's online cl100k_base)
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.count("") == 0
    assert tok.decode(tok.encode("déjà vu — 東京")) == "déjà vu — 東京"


def test_special_token_text_is_counted_as_text():
    tok = get_tokenizer("cl100k")
    assert tok.count("<|endoftext|>") > 1


@pytest.mark.parametrize("name", ["p50k_base", "gpt2", "nonsense", "hf:/no/such/dir"])
def test_unavailable_tokenizers_name_the_alternatives(name):
    with pytest.raises(TokenizerError) as err:
        get_tokenizer(name)
    assert "cl100k" in err.value.one_line()


def test_hf_tokenizer_from_embedder_dir():
    from ctxc.retrievers.embed import default_embedder_path

    tok = get_tokenizer("hf:" + default_embedder_path())
    assert tok.count("hello world") == 2
    assert tok.fingerprint.startswith("hf:")


@pytest.mark.parametrize("text", ["a b c d e f g h", "naïve café " * 40, "x" * 500, "東京タワー" * 30, "🙂🙃" * 25])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_truncate_is_a_verbatim_prefix_or_suffix_within_budget(text, n):
    tok = get_tokenizer("cl100k")
    head = tok.truncate(text, n)
    tail = tok.truncate(text, n, from_end=True)
    assert text.startswith(head) and tok.count(head) <= n
    assert text.endswith(tail) and tok.count(tail) <= n
    if tok.count(text) > n and tok.count(text[0]) <= n:  # something fits, so something must be kept
        assert head and len(head) < len(text)
