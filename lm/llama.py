"""A lean pure-torch forward for Llama-family causal LMs, for scoring (no generation, no KV cache).

`ctxc compress --method tokens` only needs final hidden states for whole sequences. Going through transformers costs
~4 s of imports per process and a generic forward; this module builds the same network straight from `config.json`
and `*.safetensors` (via `safetensors`, never importing transformers) with the weights laid out for CPU speed:

- q/k/v fused into one `[(nq + 2 nkv) * head_dim, hidden]` weight and gate/up into one `[2 * inter, hidden]` weight
  at load, so each layer runs 4 matmuls instead of 7 (bigger GEMMs run closer to the bf16 peak on 2 cores);
- rotary cos/sin precomputed once per sequence length and applied to q and k in one pass;
- RMSNorm through `F.rms_norm` (one fused kernel; the fp32 upcast happens inside);
- attention: for bf16 on CPUs, query blocks of plain `bmm` + softmax with the query heads of one kv group stacked,
  skipping the masked upper triangle (`_blocked`); else `F.scaled_dot_product_attention` (causal, GQA without
  repeat_kv). See `_pick_attn`; the `native_attn` setting (`CTXC_NATIVE_ATTN=sdpa|blocked`) forces one.

Supported: `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` (q/k/v bias), silu MLP without bias,
rope scaling none/default or `llama3`, tied or untied lm_head. Anything else raises `UnsupportedModel` (a
`ModelError`) so `ctxc.lm.load_scorer` falls back to transformers; damaged or missing weight files raise a plain
one-line `ModelError`. Agreement with transformers (tests/test_llama.py): fp32 hidden states to ~1e-4, bf16 within
bf16 rounding.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..errors import ModelError

_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


class UnsupportedModel(ModelError):
    """The model's architecture or config is outside what `NativeLM` implements: use transformers instead."""


@dataclass
class _Layer:
    ln1: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ln2: torch.Tensor
    wgu: torch.Tensor
    wd: torch.Tensor


def _rope_inv_freq(cfg: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (fp32) for `rope_theta` and the supported `rope_scaling` types."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    rtype = (scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rtype == "default":
        return inv
    if rtype == "llama3":
        s = scaling or params
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedModel(f"rope scaling {rtype!r} is not implemented natively", "falls back to transformers")


def _check_config(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else ""
    mtype = cfg.get("model_type", "")
    if arch not in SUPPORTED or SUPPORTED[arch] != mtype:
        raise UnsupportedModel(f"architecture {arch or mtype or '?'} is not implemented natively",
                               "falls back to transformers")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise UnsupportedModel("only silu MLPs without bias are implemented natively", "falls back to transformers")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise UnsupportedModel("pretraining_tp > 1 is not implemented natively", "falls back to transformers")
    if cfg.get("quantization_config"):
        raise UnsupportedModel("quantized checkpoints are not implemented natively", "falls back to transformers")
    return mtype


def _load_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (the index's list when sharded)."""
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors weights in {d}", "pass a model directory with safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise ModelError(f"weight file {f} is missing", "re-download or re-convert the model")
        out.update(load_file(str(f)))
    return out


class NativeLM:
    """Llama-family decoder with fused weights; `hidden(ids, layers)` returns final-normed hidden states.

    Attributes: `config` (the config.json as a namespace), `num_layers`, `max_context`, `lm_head_weight`
    (`[vocab, hidden]`, the embedding when tied), `lm_head_bias` (None), `dtype`, `device`.
    """

    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device):
        mtype = _check_config(cfg)
        self.config = SimpleNamespace(**cfg)
        self.dtype, self.device = dtype, torch.device(device)
        H = int(cfg["hidden_size"])
        self.nq = int(cfg["num_attention_heads"])
        self.nkv = int(cfg.get("num_key_value_heads") or self.nq)
        self.hd = int(cfg.get("head_dim") or H // self.nq)
        self.inter = int(cfg["intermediate_size"])
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.hidden_size = H
        n = int(cfg["num_hidden_layers"])
        ctx = int(cfg.get("max_position_embeddings") or 2048)
        sw = cfg.get("sliding_window")
        if sw and (mtype == "mistral" or cfg.get("use_sliding_window")):
            ctx = min(ctx, int(sw))  # within the window, windowed attention is plain causal attention
        self.max_context = ctx
        qkv_bias = mtype == "qwen2" or bool(cfg.get("attention_bias"))
        o_bias = mtype == "llama" and bool(cfg.get("attention_bias"))

        def take(name: str) -> torch.Tensor:
            t = tensors.pop(name, None)
            if t is None:
                raise ModelError(f"weight {name} is missing from the checkpoint", "re-download or re-convert the model")
            return t.to(device=self.device, dtype=dtype)

        self.embed = take("model.embed_tokens.weight")
        self.layers: list[_Layer] = []
        for i in range(n):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            wqkv = torch.cat([take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")])
            bqkv = torch.cat([take(a + f"{x}_proj.bias") for x in "qkv"]) if qkv_bias else None
            wgu = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            self.layers.append(_Layer(
                ln1=take(p + "input_layernorm.weight"), wqkv=wqkv, bqkv=bqkv, wo=take(a + "o_proj.weight"),
                bo=take(a + "o_proj.bias") if o_bias else None, ln2=take(p + "post_attention_layernorm.weight"),
                wgu=wgu, wd=take(p + "mlp.down_proj.weight")))
            expect = ((self.nq + 2 * self.nkv) * self.hd, H)
            if tuple(wqkv.shape) != expect or tuple(wgu.shape) != (2 * self.inter, H):
                raise ModelError(f"layer {i} weights have shapes {tuple(wqkv.shape)}/{tuple(wgu.shape)}, config "
                                 f"says {expect}/{(2 * self.inter, H)}", "the checkpoint does not match config.json")
        self.norm = take("model.norm.weight")
        if "lm_head.weight" in tensors:
            self.lm_head_weight = take("lm_head.weight")
        elif cfg.get("tie_word_embeddings", True):  # tied checkpoints store the matrix once
            self.lm_head_weight = self.embed
        else:
            raise ModelError("weight lm_head.weight is missing from the checkpoint (tie_word_embeddings is false)",
                             "re-download or re-convert the model")
        self.lm_head_bias = None
        self.num_layers = n
        self.inv_freq = _rope_inv_freq(cfg, self.hd).to(self.device)
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attn = "auto"  # the `native_attn` setting (see `load` and `_pick_attn`)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", attn: str = "auto") -> "NativeLM":
        """Build from an HF directory (config.json + safetensors). Raises `UnsupportedModel` before reading any
        weights when the config is not supported, `ModelError` on missing/damaged files."""
        d = Path(path)
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot read {d / 'config.json'}: {err}", "pass a transformers model directory") from None
        if not isinstance(cfg, dict):
            raise ModelError(f"{d / 'config.json'} is not a JSON object", "pass a transformers model directory")
        _check_config(cfg)
        try:  # the rope check raises UnsupportedModel for unknown scaling before any weight is read
            _rope_inv_freq(cfg, int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]))
        except (KeyError, ValueError, TypeError, ZeroDivisionError) as err:
            raise ModelError(f"config.json in {d} is incomplete: {type(err).__name__}: {err}",
                             "pass a complete transformers model directory") from None
        try:
            tensors = _load_tensors(d)
        except ModelError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated/garbled files
            raise ModelError(f"cannot read the weights in {d}: {type(err).__name__}: {str(err).splitlines()[0][:160]}",
                             "the file is damaged: re-download or re-convert the model") from None
        try:
            lm = cls(cfg, tensors, dtype, device)
            lm.attn = attn
            return lm
        except (KeyError, ValueError, TypeError) as err:
            raise ModelError(f"config.json in {d} is incomplete: {type(err).__name__}: {err}",
                             "pass a complete transformers model directory") from None

    # ------------------------------------------------------------------------------------------------ forward
    def _rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[n, head_dim]` in the model dtype (computed in fp32, cast like transformers does)."""
        cs = self._rope_cache.get(n)
        if cs is None:
            t = torch.arange(n, device=self.device, dtype=torch.float32)
            f = torch.outer(t, self.inv_freq)
            emb = torch.cat([f, f], -1)
            cs = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
            if len(self._rope_cache) > 16:
                self._rope_cache.clear()
            self._rope_cache[n] = cs
        return cs

    def _pick_attn(self, length: int) -> str:
        if self.attn != "auto":
            return self.attn
        # Measured on the 2-core AVX512-BF16 box, [8 x 576] bf16, per layer: sdpa (flash-attention-for-cpu)
        # 76 ms, manual full-mask bmm 94 ms, query-blocked bmm 37 ms (it skips the masked upper triangle).
        # In fp32 or on GPUs the fused sdpa kernels are the better choice.
        return "blocked" if self.device.type == "cpu" and self.dtype == torch.bfloat16 else "sdpa"

    def _sdpa(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary as transformers writes it, then fused `scaled_dot_product_attention` (causal, GQA)."""
        B, L = qkv.shape[:2]
        nq, nkv, half = self.nq, self.nkv, self.hd // 2
        qk = qkv[:, :, : nq + nkv]
        qk = qk * cos[:, None] + torch.cat([-qk[..., half:], qk[..., :half]], -1) * sin[:, None]
        q, k, v = (t.transpose(1, 2) for t in (qk[:, :, :nq], qk[:, :, nq:], qkv[:, :, nq + nkv :]))
        if nq != nkv and not _SDPA_GQA:  # torch < 2.5: no enable_gqa
            k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **({"enable_gqa": nq != nkv} if _SDPA_GQA else {}))
        return o.transpose(1, 2).reshape(B, L, nq * self.hd)

    @staticmethod
    def _rotate_into(dst: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """`dst = src * cos + rotate_half(src) * sin` written straight into `dst` (any strides), two passes per
        half instead of neg + cat + mul + mul + add and a layout copy afterwards."""
        half = src.shape[-1] // 2
        x1, x2 = src[..., :half], src[..., half:]
        d1, d2 = dst[..., :half], dst[..., half:]
        torch.mul(x2, sin, out=d1).neg_().addcmul_(x1, cos)  # x1 cos - x2 sin
        torch.mul(x1, sin, out=d2).addcmul_(x2, cos)  # x2 cos + x1 sin

    def _blocked(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal GQA attention as query blocks of plain bmm + softmax (the fast path for bf16 on CPUs).

        Layouts are chosen so every block is a view: q is written (rotated) as `[B, nkv, L, g, hd]`, so the rows of
        one kv group in a block of positions are contiguous `[B*nkv, rows*g, hd]` (the g query heads sharing a kv
        head, without repeating k/v); k and v as `[B*nkv, L, hd]`. A block of `bs` query positions only meets the
        keys up to its own end, so about half of the causal score matrix (the masked part) is never computed.
        """
        B, L = qkv.shape[:2]
        nq, nkv, hd = self.nq, self.nkv, self.hd
        g = nq // nkv
        half = hd // 2
        c, s_ = cos[:, :half], sin[:, :half]
        q = torch.empty(B, nkv, L, g, hd, dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(B, nkv, L, hd, dtype=qkv.dtype, device=qkv.device)
        self._rotate_into(q.permute(0, 2, 1, 3, 4), qkv[:, :, :nq].view(B, L, nkv, g, hd), c[:, None, None],
                          s_[:, None, None])
        self._rotate_into(k.permute(0, 2, 1, 3), qkv[:, :, nq : nq + nkv], c[:, None], s_[:, None])
        v = qkv[:, :, nq + nkv :].transpose(1, 2).reshape(B * nkv, L, hd)
        q = q.view(B * nkv, L * g, hd)
        k = k.view(B * nkv, L, hd)
        out = torch.empty(B, L, nkv, g, hd, dtype=qkv.dtype, device=qkv.device)
        scale = 1.0 / math.sqrt(hd)
        for a, e, mask in self._blocks(L, g):
            sc = torch.baddbmm(mask, q[:, a * g : e * g], k[:, :e].transpose(1, 2), alpha=scale)
            o = torch.bmm(torch.softmax(sc, -1), v[:, :e])  # [B*nkv, rows*g, hd]
            out[:, a:e] = o.view(B, nkv, e - a, g, hd).transpose(1, 2)
        return out.view(B, L, nq * hd)

    def _blocks(self, L: int, g: int, bs: int = 128) -> list[tuple[int, int, torch.Tensor]]:
        """Query blocks `(start, end, additive causal mask [rows*g, end])` for length L, cached per L."""
        cache = self.__dict__.setdefault("_block_cache", {})
        if L not in cache:
            if len(cache) > 64:
                cache.clear()
            full = torch.full((L, L), float("-inf"), dtype=self.dtype, device=self.device).triu(1)
            cache[L] = [(a, min(L, a + bs), full[a : min(L, a + bs), : min(L, a + bs)].repeat_interleave(g, 0))
                        for a in range(0, L, bs)]
        return cache[L]

    def hidden(self, ids: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Final-normed hidden states `[B, L, hidden]` of `ids` `[B, L]` (no padding mask: causal attention means
        right padding never changes a real token's state). `layers=K` runs only the first K decoder layers and then
        the final norm (a logit-lens reading of layer K)."""
        if layers is not None and layers < 0:
            raise ModelError(f"--layers {layers} is not a layer count", f"use 1..{self.num_layers}")
        n = self.num_layers if not layers or layers >= self.num_layers else int(layers)
        B, L = ids.shape
        if L > self.max_context:
            raise ModelError(f"a sequence of {L} tokens exceeds the model context of {self.max_context}",
                             "score it in windows (ctxc.lm.scoring.windows)")
        nq, nkv, hd, H, eps, inter = self.nq, self.nkv, self.hd, self.hidden_size, self.eps, self.inter
        cos, sin = self._rope(L)
        mode = self._pick_attn(L)
        if mode not in ("blocked", "sdpa"):
            raise ModelError(f"unknown attention mode {mode!r}", "use CTXC_NATIVE_ATTN=auto, sdpa or blocked")
        attend = self._blocked if mode == "blocked" else self._sdpa
        with torch.inference_mode():
            x = F.embedding(ids.to(self.device), self.embed)
            for ly in self.layers[:n]:
                h = F.rms_norm(x, (H,), ly.ln1, eps)
                qkv = F.linear(h, ly.wqkv, ly.bqkv).view(B, L, nq + 2 * nkv, hd)
                x = x + F.linear(attend(qkv, cos, sin), ly.wo, ly.bo)
                h = F.rms_norm(x, (H,), ly.ln2, eps)
                gu = F.linear(h, ly.wgu)
                gate = F.silu(gu[..., :inter]).mul_(gu[..., inter:])
                x = x + F.linear(gate, ly.wd)
            return F.rms_norm(x, (H,), self.norm, eps)


# ---------------------------------------------------------------------------------------------------- tokenizer
# tokenizer_config classes that transformers builds straight from tokenizer.json without changing it, so the raw
# `tokenizers` object encodes identically. Others (Llama/Gemma/... classes with legacy or prefix-space options)
# may be rebuilt by transformers: `load_scorer` keeps the transformers tokenizer for those.
PASS_THROUGH_TOKENIZERS = {"PreTrainedTokenizerFast", "TokenizersBackend"}


class FastTokenizer:
    """The subset of a transformers tokenizer the scorer path uses, over `tokenizers.Tokenizer.from_file`
    (~0.1 s to load instead of 3-7 s for importing and building AutoTokenizer).

    `__call__(text | list, add_special_tokens, return_offsets_mapping)`, `encode`, `decode`, `get_vocab`,
    `convert_tokens_to_ids`, `bos/eos/pad/unk_token_id` (from tokenizer_config.json). Raises `UnsupportedModel`
    when the directory's tokenizer is not one transformers would load unchanged.
    """

    def __init__(self, d: str | os.PathLike):
        from tokenizers import Tokenizer

        d = Path(d)
        f = d / "tokenizer.json"
        try:
            cfg = json.loads((d / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            raise UnsupportedModel(f"{d} has no readable tokenizer_config.json", "falls back to transformers") from None
        if not f.is_file() or cfg.get("tokenizer_class") not in PASS_THROUGH_TOKENIZERS or "add_prefix_space" in cfg:
            raise UnsupportedModel(f"tokenizer class {cfg.get('tokenizer_class')!r} needs transformers",
                                   "falls back to transformers")
        try:
            self._tok = Tokenizer.from_file(str(f))
        except Exception as err:
            raise ModelError(f"cannot read {f}: {type(err).__name__}: {str(err).splitlines()[0][:160]}",
                             "the tokenizer file is damaged: re-download or re-convert the model") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self._vocab: dict[str, int] | None = None

        def special(name: str) -> int | None:
            t = cfg.get(name)
            t = t.get("content") if isinstance(t, dict) else t
            return self._tok.token_to_id(t) if isinstance(t, str) else None

        self.bos_token_id, self.eos_token_id = special("bos_token"), special("eos_token")
        self.pad_token_id, self.unk_token_id = special("pad_token"), special("unk_token")

    def __call__(self, text, add_special_tokens: bool = True, return_offsets_mapping: bool = False, **_):
        batch = not isinstance(text, str)
        encs = self._tok.encode_batch(list(text), add_special_tokens=add_special_tokens) if batch else \
            [self._tok.encode(text, add_special_tokens=add_special_tokens)]
        out = {"input_ids": [e.ids for e in encs]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encs]
        return out if batch else {k: v[0] for k, v in out.items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self._tok.get_vocab(with_added_tokens=True)
        return dict(self._vocab)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return self.unk_token_id if i is None else i

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
