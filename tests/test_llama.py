"""The native Llama-family scorer (`ctxc.lm.llama`) against transformers: hidden states (fp32 to 1e-4, bf16 within
transformers' own bf16 error), early layers, batching, token surprisal, the raw-tokenizers shim, the fallback for
unsupported architectures and one-line errors for damaged weights."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ctxc import lm as M
from ctxc.lm import loader as L
from ctxc.errors import ModelError
from ctxc.lm.llama import FastTokenizer, NativeLM, UnsupportedModel


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """One torch thread when other processes hold the cores (2 threads then stall each other at every op)."""
    from ctxc.lm.hw import lm_threads

    with lm_threads():
        yield


@pytest.fixture(scope="module")
def weights_dir(lm):
    """The directory `lm` (bf16) was loaded from: both sides of every comparison use exactly these weights."""
    return L._weights_dir(lm.source, lm.path, lm.dtype)


@pytest.fixture(scope="module")
def hf32(lm):
    return copy.deepcopy(lm.model).float().eval()


@pytest.fixture(scope="module")
def nat32(weights_dir):
    return NativeLM.load(weights_dir, torch.float32)


@pytest.fixture(scope="module")
def scorer(lm):
    s = M.load_scorer()
    assert s.native and s.dtype == lm.dtype
    return s


def _hf_hidden(model, ids, k=None):
    with torch.inference_mode(), M.first_layers(model, k):
        return model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state.float()


@pytest.mark.parametrize("shape,k", [((1, 1), None), ((2, 37), None), ((1, 301), 3)])  # 301: several query blocks
@pytest.mark.parametrize("attn", ["sdpa", "blocked"])
def test_fp32_hidden_matches_transformers(hf32, nat32, shape, k, attn):
    ids = torch.randint(0, 49152, shape, generator=torch.Generator().manual_seed(sum(shape)))
    nat32.attn = attn
    try:
        got = nat32.hidden(ids, layers=k)
    finally:
        nat32.attn = "auto"
    torch.testing.assert_close(got, _hf_hidden(hf32, ids, k), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 5, 99])
def test_fp32_first_k_layers_match_truncated_transformers(hf32, nat32, k):
    ids = torch.randint(0, 49152, (2, 23), generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(nat32.hidden(ids, layers=k), _hf_hidden(hf32, ids, k), rtol=1e-4, atol=1e-4)


def test_bf16_error_no_worse_than_transformers_bf16(lm, scorer, nat32, sample_text):
    """bf16 rounding makes both bf16 forwards drift from the fp32 one; the native drift must be of the same size
    (stated tolerance: relative hidden-state error <= 1.3x transformers' + 0.002, NLL mean error <= 1.3x + 0.01)."""
    from ctxc.kernels.token_nll import token_nll

    ids = torch.tensor([lm.tokenizer.encode(sample_text)[:160]])
    ref = nat32.hidden(ids)
    ref_nll = token_nll(ref[0, :-1], nat32.lm_head_weight, ids[0, 1:])
    errs = {}
    for name, h, w in [("native", scorer.model.hidden(ids).float(), scorer.model.lm_head_weight),
                       ("hf", _hf_hidden(lm.model, ids), lm.model.lm_head.weight)]:
        nll = token_nll(h[0, :-1].to(w.dtype), w, ids[0, 1:])
        errs[name] = (float((h - ref).norm() / ref.norm()), float((nll - ref_nll).abs().mean()))
    assert errs["native"][0] <= 1.3 * errs["hf"][0] + 0.002, errs
    assert errs["native"][1] <= 1.3 * errs["hf"][1] + 0.01, errs
    assert errs["native"][0] > 0  # really bf16


def test_token_surprisal_native_vs_transformers(lm, scorer):
    texts = ["The capital of France is Paris.", "Numbers: 1 2 3 4 5 6 7 8 9", "x", "",
             "Déjà vu — naïve café, 東京 and emoji 🎉 in one\tline.\n\nNext paragraph."]
    seqs = [lm.tokenizer.encode(t) for t in texts]
    nat = M.token_surprisal(scorer, seqs, batch_tokens=24)  # several batches, right padding
    ref = M.token_surprisal(lm, seqs, batch_tokens=24)
    for a, b, s in zip(nat, ref, seqs):
        assert len(a) == len(b) == len(s)
        if len(s) > 1:
            assert np.isnan(a[0]) and np.isfinite(a[1:]).all()
            np.testing.assert_allclose(a[1:], b[1:], atol=0.6)  # two bf16 forwards
    diffs = np.concatenate([np.abs(a[1:] - b[1:]) for a, b in zip(nat, ref) if len(a) > 1])
    assert diffs.mean() < 0.08, diffs.mean()
    early_n = M.token_surprisal(scorer, seqs[:1], layers=4)[0]
    early_t = M.token_surprisal(lm, seqs[:1], layers=4)[0]
    np.testing.assert_allclose(early_n[1:], early_t[1:], atol=0.3)
    assert not np.allclose(early_n[1:], nat[0][1:], atol=0.3)


def test_batching_does_not_change_scores(nat32, lm, weights_dir):
    """fp32 native scorer: a sequence scored alone or right-padded in a batch gets the same NLLs."""
    s32 = M.LoadedModel(nat32, lm.tokenizer, lm.path, lm.source, "cpu", torch.float32, "x", 0.0, native=True)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (5, 140, 77, 2)]
    together = M.token_surprisal(s32, seqs, layers=3, batch_tokens=10_000)
    for s, t in zip(seqs, together):
        np.testing.assert_allclose(M.token_surprisal(s32, [s], layers=3)[0][1:], t[1:], atol=1e-4)


def test_load_scorer_is_cached_and_needs_no_transformers(scorer):
    assert M.load_scorer() is scorer and scorer.max_context == 8192 and scorer.load_seconds > 0
    assert M.load_scorer(backend="transformers") is M.load_model()
    with pytest.raises(ModelError, match="unknown scorer backend"):
        M.load_scorer(backend="onnx")
    code = ("import sys; from ctxc.lm import load_scorer, token_surprisal; lm = load_scorer(); "
            "n = token_surprisal(lm, [lm.tokenizer.encode('hello world, again')])[0]; "
            "assert lm.native and len(n) == 4 and 'transformers' not in sys.modules, sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------- tokenizer
TEXTS = ["", " ", "  leading and trailing  ", "Hello, world!", "tabs\tand\nnewlines\r\n\n\nend",
         "Déjà vu — naïve café, Ærøskøbing; 東京タワー; 🎉🎉 emoji; ∑ x² ≤ ∞", "<|endoftext|>special<|im_start|>",
         "def f(x):\n    return x ** 2  # comment", "1234567890 3.14159 $1,000.00", "a" * 300,
         "mixed   spaces \u00a0nbsp\u2009thin \u200bzwsp", "Ünïcödé ÇÀPS and ﬁ ligature"]


def test_fast_tokenizer_matches_transformers(lm, scorer, sample_text):
    fast, slow = scorer.tokenizer.hf, lm.tokenizer.hf
    assert isinstance(fast, FastTokenizer)
    texts = TEXTS + [sample_text[:5000]]
    for t in texts:
        a = fast(t, add_special_tokens=False, return_offsets_mapping=True)
        b = slow(t, add_special_tokens=False, return_offsets_mapping=True)
        assert list(a["input_ids"]) == list(b["input_ids"]), t
        assert [tuple(o) for o in a["offset_mapping"]] == [tuple(o) for o in b["offset_mapping"]], t
        assert fast.encode(t, add_special_tokens=True) == slow.encode(t, add_special_tokens=True), t
        assert fast.decode(a["input_ids"]) == slow.decode(b["input_ids"], skip_special_tokens=False,
                                                           clean_up_tokenization_spaces=False)
    assert [list(x) for x in fast(texts, add_special_tokens=False)["input_ids"]] == \
        [list(x) for x in slow(texts, add_special_tokens=False)["input_ids"]]
    assert scorer.tokenizer.count_many(texts) == lm.tokenizer.count_many(texts)
    assert fast.get_vocab() == slow.get_vocab()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(fast, name) == getattr(slow, name), name
    for t in ("<|endoftext|>", "<|im_start|>", "Ġthe", "no-such-token-xyz"):
        assert fast.convert_tokens_to_ids(t) == slow.convert_tokens_to_ids(t), t
    assert scorer.tokenizer.fingerprint == lm.tokenizer.fingerprint


def test_fast_tokenizer_refuses_rebuilt_classes(tmp_path, weights_dir, lm):
    shutil.copy(lm.path / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast"}))
    with pytest.raises(UnsupportedModel):
        FastTokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    (tmp_path / "tokenizer.json").write_text("{garbage")
    with pytest.raises(ModelError, match="cannot read") as e:
        FastTokenizer(tmp_path)
    assert not isinstance(e.value, UnsupportedModel)


# ------------------------------------------------------------------------ other architectures, fallback, errors
def _tiny(tmp_path, lm, arch: str, **cfg_kw):
    """A small random-weight model saved by transformers itself, with the default model's tokenizer files."""
    import transformers

    torch.manual_seed(0)
    kw = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    kw.update(cfg_kw)
    cfg = getattr(transformers, f"{arch}Config")(**kw)
    m = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a missing one would show
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    d = tmp_path / arch.lower()
    m.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lm.path / f, d / f)
    return d, m


@pytest.mark.parametrize("arch,kw", [
    ("Llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}, attention_bias=True)),
    ("Qwen2", dict()),
    ("Mistral", dict(sliding_window=256, tie_word_embeddings=True)),
])
def test_other_llama_family_models_match(tmp_path, lm, arch, kw):
    d, ref = _tiny(tmp_path, lm, arch, **kw)
    nat = NativeLM.load(d, torch.float32)
    ids = torch.randint(0, 1000, (2, 150), generator=torch.Generator().manual_seed(1))
    for mode in ("sdpa", "blocked"):
        nat.attn = mode
        torch.testing.assert_close(nat.hidden(ids), _hf_hidden(ref, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nat.lm_head_weight, ref.get_output_embeddings().weight)
    if arch == "Mistral":
        assert nat.max_context == 256


def test_unsupported_architecture_falls_back(tmp_path, lm):
    d, ref = _tiny(tmp_path, lm, "Llama", rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                                           "original_max_position_embeddings": 256})
    with pytest.raises(UnsupportedModel, match="yarn"):
        NativeLM.load(d, torch.float32)
    s = M.load_scorer(str(d), dtype="fp32")
    assert not s.native and type(s.model) is type(ref)
    got = M.token_surprisal(s, [[5, 6, 7, 8]])[0]
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, :-1]
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([6, 7, 8]), reduction="none").numpy()
    np.testing.assert_allclose(got[1:], want, atol=1e-4)
    with pytest.raises(UnsupportedModel):
        M.load_scorer(str(d), dtype="fp32", backend="native")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        NativeLM.load(d)


def test_damaged_or_missing_weights_are_one_line_errors(tmp_path, lm, monkeypatch):
    from typer.testing import CliRunner

    from ctxc.cli import app

    d, _ = _tiny(tmp_path, lm, "Llama")
    w = d / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match="cannot read the weights") as e:
        NativeLM.load(d)
    assert not isinstance(e.value, UnsupportedModel)
    with pytest.raises(ModelError, match="cannot read the weights"):
        M.load_scorer(str(d), dtype="fp32")  # a real error, not a silent fallback to transformers
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text to compress with a broken model. " * 20)
    monkeypatch.setenv("CTXC_MODEL", "")  # the CLI's --model exports CTXC_MODEL: monkeypatch puts it back after
    r = CliRunner().invoke(app, ["--model", str(d), "compress", str(doc), "-m", "tokens", "-b", "20"])
    assert r.exit_code != 0 and "cannot read the weights" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    w.unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        NativeLM.load(d)
    from safetensors.torch import load_file, save_file

    w.write_bytes(good)
    t = load_file(str(w))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(w))
    with pytest.raises(ModelError, match="up_proj.weight is missing"):
        NativeLM.load(d)


def test_bf16_lse_trick_matches_fp32_logsumexp():
    """kernels.token_nll._lse on bf16 logits (max - log max-softmax-prob) vs fp32 logsumexp of the same logits:
    within 0.005 nats (the one rounded probability), over flat and peaked rows and a vocab of odd size."""
    from ctxc.kernels.token_nll import _lse

    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 3.0, 30.0):
        logits = (torch.randn(64, 49157, generator=g) * scale).bfloat16()
        err = (_lse(logits) - torch.logsumexp(logits.float(), -1)).abs().max().item()
        assert err < 0.005, (scale, err)
    assert _lse(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(np.log(2), abs=1e-6)  # fp32: exact path
