"""Group-wise asymmetric quantization of KV tensors: int8 codes or packed int4, per-group scale and zero point.

The last dimension of `x` is split into groups of `group_size` consecutive values. Each group stores

    zero  = fp16(min(group)), rounded down     # the value code 0 stands for
    scale = fp16((max(group) - zero) / qmax), rounded up; 1 where that is 0 (a constant group)
    code  = clamp(floor((x - zero) / scale + 0.5), 0, qmax)     qmax = 255 (int8) or 15 (int4)

and dequantizes as `code * scale + zero`. Scale and zero are rounded to fp16 *before* the codes are computed (zero
down, scale up, so the grid still spans the group), and quantize and dequantize agree on the same numbers: per element
the error is at most `scale / 2` plus fp32 rounding (`error_bound` returns it). int4 packs two codes per byte: the
even element in the low nibble, the odd one in the high nibble. With group 64 and fp16 scale/zero an int4 value costs
4.5 bits (0.28 of fp16) and an int8 value 8.5 bits (0.53 of fp16).

The op groups along the last dimension only; the cartridge code (`ctxc.cache_store.engine.quantize_kv`) transposes
keys first so that their groups run over tokens of one channel, as KIVI does (https://arxiv.org/abs/2402.02750). Each op has `*_torch` (CPU path and test oracle) and `*_triton`; `quantize` / `dequantize` dispatch through
`ctxc.kernels._triton.use_triton`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CtxcError
from ._triton import triton_device_ok, use_triton

BITS = (8, 4)


@dataclass
class QuantizedTensor:
    """Codes plus per-group parameters. `codes`: uint8 [..., D] (int8) or [..., D // 2] (int4);
    `scale`, `zero`: fp16 [..., D // group_size]; `shape`: the original shape; `dtype`: the original dtype."""

    codes: object
    scale: object
    zero: object
    bits: int
    group_size: int
    shape: tuple
    dtype: object

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


def _check(x, bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise CtxcError(f"cannot quantize to {bits} bits", "use 8 (int8) or 4 (int4)")
    if group_size < 2 or group_size & (group_size - 1):
        raise CtxcError(f"quantization group size {group_size} is not a power of two >= 2", "use 32, 64 or 128")
    if x.shape[-1] % group_size:
        raise CtxcError(f"last dimension {x.shape[-1]} is not a multiple of the group size {group_size}",
                        f"pick a group size that divides {x.shape[-1]}")


def _fp16_down_torch(v):
    """The largest fp16 value <= v (v fp32): round to nearest, then step one ulp down where that went up."""
    import torch

    h = v.to(torch.float16)
    bits = h.view(torch.int16).to(torch.int32) & 0xFFFF
    down = torch.where(h > 0, bits - 1, torch.where(h == 0, torch.full_like(bits, 0x8001), bits + 1))
    down = torch.where(down > 0x7FFF, down - 0x10000, down).to(torch.int16).view(torch.float16)
    return torch.where(h.to(torch.float32) > v, down, h).to(torch.float32)


def _fp16_up_torch(v):
    """The smallest fp16 value >= v for v >= 0 (fp32)."""
    import torch

    h = v.to(torch.float16)
    up = ((h.view(torch.int16).to(torch.int32) & 0xFFFF) + 1).to(torch.int16).view(torch.float16)
    return torch.where(h.to(torch.float32) < v, up, h).to(torch.float32)


def _params_torch(groups, qmax: int):
    """fp32 scale and zero of [M, G] groups, already fp16 values (what gets stored). The zero is rounded down and the
    scale up, so the grid zero + k * scale (k = 0..qmax) still spans [min, max] and the error stays <= scale / 2."""
    import torch

    mn = groups.amin(dim=-1)
    mx = groups.amax(dim=-1)
    zero = _fp16_down_torch(mn)
    scale = _fp16_up_torch((mx - zero) / qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def quantize_torch(x, bits: int = 8, group_size: int = 64) -> QuantizedTensor:
    """Reference quantizer (see the module docstring). `x`: float tensor [..., D], D a multiple of `group_size`."""
    import torch

    _check(x, bits, group_size)
    qmax = (1 << bits) - 1
    shape, D = tuple(x.shape), x.shape[-1]
    groups = x.detach().reshape(-1, group_size).to(torch.float32)
    scale, zero = _params_torch(groups, qmax)
    codes = torch.floor((groups - zero[:, None]) / scale[:, None] + 0.5).clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    lead = shape[:-1]
    return QuantizedTensor(
        codes=codes.reshape(*lead, D if bits == 8 else D // 2),
        scale=scale.to(torch.float16).reshape(*lead, D // group_size),
        zero=zero.to(torch.float16).reshape(*lead, D // group_size),
        bits=bits, group_size=group_size, shape=shape, dtype=x.dtype,
    )


def dequantize_torch(q: QuantizedTensor, dtype=None):
    """Reference dequantizer: `codes * scale + zero` in fp32, cast to `dtype` (default: the original dtype)."""
    import torch

    G = q.group_size
    codes = q.codes.reshape(-1, G if q.bits == 8 else G // 2)
    if q.bits == 4:
        lo, hi = codes & 0x0F, codes >> 4
        codes = torch.stack((lo, hi), dim=-1).reshape(-1, G)
    scale = q.scale.reshape(-1, 1).to(torch.float32)
    zero = q.zero.reshape(-1, 1).to(torch.float32)
    out = codes.to(torch.float32) * scale + zero
    return out.reshape(q.shape).to(dtype or q.dtype)


def error_bound(x, bits: int = 8, group_size: int = 64):
    """Per-element upper bound of |x - dequantize(quantize(x))| in fp32 (same shape as `x`): half a step of the
    stored (fp16, rounded-up) scale, plus fp32 rounding slack."""
    import torch

    qmax = (1 << bits) - 1
    groups = x.detach().reshape(-1, group_size).to(torch.float32)
    scale, _ = _params_torch(groups, qmax)
    mag = groups.abs().amax(dim=-1)
    bound = 0.5 * scale * (1 + 1e-5) + 2.0 ** -21 * (mag + scale * qmax)
    return bound[:, None].expand(-1, group_size).reshape(x.shape)


# ---------------------------------------------------------------- Triton

_KERNELS: dict = {}


def _triton_kernels():
    """Build the jitted kernels on first use: importing triton costs a second, and `import ctxc` must not need it."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, M,
                      G: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr):
        QMAX: tl.constexpr = (1 << BITS) - 1
        HALF: tl.constexpr = G // 2
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        # Even and odd elements load separately so int4 can pack them pairwise without a reshape.
        cols = tl.arange(0, HALF) * 2
        base = rows[:, None] * G + cols[None, :]
        m2 = rmask[:, None]
        xe = tl.load(x_ptr + base, mask=m2, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + base + 1, mask=m2, other=0.0).to(tl.float32)
        mn = tl.minimum(tl.min(xe, axis=1), tl.min(xo, axis=1))
        mx = tl.maximum(tl.max(xe, axis=1), tl.max(xo, axis=1))
        # fp16 zero rounded down and scale rounded up (bit steps, as in _params_torch): the grid spans [min, max].
        z16 = mn.to(tl.float16)
        zb = z16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        zdown = tl.where(z16 > 0, zb - 1, tl.where(z16 == 0, 0x8001, zb + 1))
        zdown = tl.where(zdown > 0x7FFF, zdown - 0x10000, zdown).to(tl.int16).to(tl.float16, bitcast=True)
        zero = tl.where(z16.to(tl.float32) > mn, zdown.to(tl.float32), z16.to(tl.float32))
        s32 = (mx - zero) / QMAX
        s16 = s32.to(tl.float16)
        sb = (s16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) + 1
        sup = tl.where(sb > 0x7FFF, sb - 0x10000, sb).to(tl.int16).to(tl.float16, bitcast=True)
        scale = tl.where(s16.to(tl.float32) < s32, sup.to(tl.float32), s16.to(tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        qe = tl.floor((xe - zero[:, None]) / scale[:, None] + 0.5)
        qo = tl.floor((xo - zero[:, None]) / scale[:, None] + 0.5)
        qe = tl.minimum(tl.maximum(qe, 0.0), QMAX).to(tl.int32)
        qo = tl.minimum(tl.maximum(qo, 0.0), QMAX).to(tl.int32)
        if BITS == 8:
            tl.store(codes_ptr + base, qe.to(tl.uint8), mask=m2)
            tl.store(codes_ptr + base + 1, qo.to(tl.uint8), mask=m2)
        else:
            packed = (qe | (qo << 4)).to(tl.uint8)
            tl.store(codes_ptr + rows[:, None] * HALF + tl.arange(0, HALF)[None, :], packed, mask=m2)
        tl.store(scale_ptr + rows, scale.to(tl.float16), mask=rmask)
        tl.store(zero_ptr + rows, zero.to(tl.float16), mask=rmask)

    @triton.jit
    def _dequant_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, M,
                        G: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr):
        HALF: tl.constexpr = G // 2
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        m2 = rmask[:, None]
        cols = tl.arange(0, HALF) * 2
        base = rows[:, None] * G + cols[None, :]
        if BITS == 8:
            qe = tl.load(codes_ptr + base, mask=m2, other=0).to(tl.float32)
            qo = tl.load(codes_ptr + base + 1, mask=m2, other=0).to(tl.float32)
        else:
            packed = tl.load(codes_ptr + rows[:, None] * HALF + tl.arange(0, HALF)[None, :], mask=m2, other=0)
            packed = packed.to(tl.int32)
            qe = (packed & 0x0F).to(tl.float32)
            qo = ((packed >> 4) & 0x0F).to(tl.float32)
        scale = tl.load(scale_ptr + rows, mask=rmask, other=1.0).to(tl.float32)
        zero = tl.load(zero_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        xe = qe * scale[:, None] + zero[:, None]
        xo = qo * scale[:, None] + zero[:, None]
        tl.store(out_ptr + base, xe.to(out_ptr.dtype.element_ty), mask=m2)
        tl.store(out_ptr + base + 1, xo.to(out_ptr.dtype.element_ty), mask=m2)

    _KERNELS.update(quant=_quant_kernel, dequant=_dequant_kernel, cdiv=triton.cdiv)
    return _KERNELS


def _require_device(t) -> None:
    if not triton_device_ok(t.device):
        raise CtxcError(f"the Triton KV quantizer cannot run on {t.device} tensors",
                        "use a CUDA device, set TRITON_INTERPRET=1 (tests), or CTXC_KERNELS=torch")


def _block_m(group_size: int) -> int:
    # About 4k elements per program: enough work per block, small enough for registers on any GPU.
    return max(1, min(64, 4096 // group_size))


def quantize_triton(x, bits: int = 8, group_size: int = 64) -> QuantizedTensor:
    """Triton quantizer: same codes as `quantize_torch` (one program per BLOCK_M groups)."""
    import torch

    _check(x, bits, group_size)
    _require_device(x)
    k = _triton_kernels()
    shape, D = tuple(x.shape), x.shape[-1]
    flat = x.detach().contiguous().reshape(-1)
    M = flat.numel() // group_size
    lead = shape[:-1]
    codes = torch.empty((*lead, D if bits == 8 else D // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((*lead, D // group_size), dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    if M:
        bm = _block_m(group_size)
        k["quant"][(k["cdiv"](M, bm),)](flat, codes, scale, zero, M, G=group_size, BITS=bits, BLOCK_M=bm)
    return QuantizedTensor(codes, scale, zero, bits, group_size, shape, x.dtype)


def dequantize_triton(q: QuantizedTensor, dtype=None):
    """Triton dequantizer: `codes * scale + zero`, written straight in the target dtype."""
    import torch

    _require_device(q.codes)
    k = _triton_kernels()
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.codes.device)
    M = out.numel() // q.group_size
    if M:
        bm = _block_m(q.group_size)
        k["dequant"][(k["cdiv"](M, bm),)](q.codes.contiguous(), q.scale.contiguous(), q.zero.contiguous(), out, M,
                                          G=q.group_size, BITS=q.bits, BLOCK_M=bm)
    return out


def quantize(x, bits: int = 8, group_size: int = 64, backend: str | None = None) -> QuantizedTensor:
    """Quantize with Triton on CUDA (or when the `kernels` setting / `backend` forces triton), else with torch."""
    if use_triton(x.device, backend):
        return quantize_triton(x, bits, group_size)
    return quantize_torch(x, bits, group_size)


def dequantize(q: QuantizedTensor, dtype=None, backend: str | None = None):
    """Dequantize with Triton on CUDA (or when the `kernels` setting / `backend` forces triton), else with torch."""
    return dequantize_triton(q, dtype) if use_triton(q.codes.device, backend) else dequantize_torch(q, dtype)
