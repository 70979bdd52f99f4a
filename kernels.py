"""Triton kernels for nano-bi, each beside the plain-torch reference the tests compare it against.

Every kernel states its grid and the order of its floating-point reductions, because that order is the whole
story of batch invariance: a result's bits depend only on the operands *and the order they were summed in*.
A kernel is batch-invariant when that order is a function of the row's own data and of constants, never of
how many other rows (requests) share the launch.

Two backends run the same source:
- on a GPU, the kernels compile for sm_90 and compute bf16 dot products on tensor cores with fp32 accumulation;
- on a CPU, `TRITON_INTERPRET=1` runs them in numpy. The interpreter does bf16 arithmetic on raw bits (wrong)
  and truncates fp32 -> bf16 (the GPU rounds to nearest even), so under the interpreter every bf16 value is
  widened to fp32 right after loading and rounded by `_round_to_bf16` before storing. bf16 x bf16 products
  are exact in fp32, so both backends compute the same mathematics; only the summation order inside a dot
  differs (the CPU never reproduces GPU bits, and the tests only compare runs on one backend). The
  interpreter's tl.dot would be numpy's matmul, whose BLAS orders a row's sum by the tile's row count, so it
  is replaced by `dot_in_k_order`, whose order is fixed by K alone.
"""
import functools
import os
import sys
from typing import NamedTuple

import torch

if not torch.cuda.is_available():  # no GPU: run the Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET = tl.constexpr(INTERPRET)


def _interpret_triton_language():
    """Make triton.language's own @jit helpers (tl.sum, tl.max, tl.cdiv...) runnable by the interpreter.

    `@triton.jit` reads TRITON_INTERPRET when it decorates. Our kernels are decorated below, after the variable
    is set, but triton.language decorated its helpers when triton was first imported: if anything imported
    triton before us (a notebook that ran torch.compile, another Triton library), they are GPU functions and
    every interpreted kernel fails with "Cannot call @triton.jit'd outside of the scope of a kernel". Re-wrap
    them as interpreted functions. Only ever done without a GPU, so no GPU user is switched to the interpreter.

    Speed: a stock interpreted device function re-patches the language for its module at every call (~0.4 ms of
    introspection, a seventh of a CPU gate's time) and never undoes those patches, so patching once per module
    leaves the same language in place for every later call.
    """
    from triton.runtime.interpreter import InterpretedFunction, InterpreterError, _patch_lang
    from triton.runtime.jit import JITFunction

    class PatchOnce(InterpretedFunction):
        patched_modules = set()

        def __call__(self, *args, **kwargs):
            if self.fn.__module__ not in self.patched_modules:
                _patch_lang(self.fn)
                self.patched_modules.add(self.fn.__module__)
            try:
                return self.rewrite()(*args, **kwargs)
            except Exception as e:
                raise InterpreterError(repr(e)) from e

    rewrapped = {}

    def fix(owner):
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction) or type(value) is InterpretedFunction:
                setattr(owner, name, rewrapped.setdefault(id(value), PatchOnce(value.fn)))

    for name, module in list(sys.modules.items()):
        if name == "triton.language" or name.startswith("triton.language."):
            fix(module)
    fix(tl.core.tensor)  # tensor member functions (x.sum(), ...)


def dot_in_k_order(a, b, acc):
    """The interpreter's tl.dot: acc + a @ b (numpy, fp32), each output element reduced in K order:
    ((acc + a[:, 0] * b[0]) + a[:, 1] * b[1]) + ...

    The stock interpreter hands the tile to numpy's matmul, i.e. to the machine's BLAS, and a BLAS picks its
    kernel - and with it the order in which it adds a row's K products - from the tile's shape. Measured with
    OpenBLAS (fp32, K = N = 64, against the same rows in a 128-row tile): the rows of a 1-row tile have other
    bits on every core type (a gemv path), and those of every tile from 1 to 64 rows under
    OPENBLAS_CORETYPE=Haswell (some machines set it). A row's bits
    then follow how many rows share its tile: the GEMM-tiling source of non-invariance, inside the kernels
    that exist to remove it. Here every step is one elementwise numpy op, each element rounded once as IEEE
    prescribes whatever the SIMD width, the BLAS or the thread count, so the order is a function of K alone.
    The price: 17 ms for a 256 x 128 x 1024 tile, where the BLAS took 0.4 ms.
    """
    import numpy as np  # the interpreter's array library (a GPU run never gets here)

    if a.dtype != np.float32 or b.dtype != np.float32:
        raise TypeError(f"interpreted tl.dot takes fp32 tiles, got {a.dtype} @ {b.dtype}: widen bf16 with _mma_in")
    out = np.array(np.broadcast_to(acc, (a.shape[0], b.shape[1])), dtype=np.float32)
    product = np.empty_like(out)
    a_columns = np.ascontiguousarray(a.T)
    for k in range(a.shape[1]):
        np.multiply(a_columns[k][:, None], b[k], out=product)
        out += product
    return out


def _holds_subnormal_or_nan(bits) -> bool:
    """Whether fp32 bit patterns (a numpy uint32 array) hold a subnormal or a NaN: the values whose bf16 casts
    the interpreter's shortcuts leave to the stock path."""
    exponent = bits & 0x7F800000
    special = (exponent == 0) | (exponent == 0x7F800000)
    return bool(special.any() and (special & (bits & 0x007FFFFF != 0)).any())


def _fast_bf16_casts():
    """The interpreter's fp32 <-> bf16 casts, the same bits in one numpy step. Stock, each cast decodes sign,
    exponent and mantissa with a dozen array ops (~0.5 ms a tile; a third of a CPU gate's time went to bf16
    rounding). bf16 -> fp32 appends 16 zero bits and fp32 -> bf16 (stock: truncation) drops them - exactly the
    stock result for zeros, normal numbers and infinities; tiles holding a subnormal or a NaN take the stock
    path, whose handling of those is its own."""
    import numpy as np
    from triton.runtime import interpreter

    stock = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        pair = (input_dtype.primitive_bitwidth, output_dtype.primitive_bitwidth)
        if rounding_mode is None and pair in ((16, 32), (32, 16)) and tl.bfloat16 in (input_dtype, output_dtype):
            data = np.ascontiguousarray(data)
            bits = data.view(np.uint16).astype(np.uint32) << 16 if pair[0] == 16 else data.view(np.uint32)
            if not _holds_subnormal_or_nan(bits):
                return bits if pair[0] == 16 else (bits >> 16).astype(np.uint16)
        return stock(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


def _route_interpreted_dots_in_k_order():
    """Make every interpreted tl.dot call `dot_in_k_order` instead of numpy's matmul."""
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return interpreter.TensorHandle(dot_in_k_order(a.data, b.data, d.data), d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _lighter_interpreted_ops():
    """Costs of the stock interpreter that change no value, removed. A CPU gate spends most of its time in the
    language layer around each numpy op, not in the op (an interpreted fp32 [16, 32] add: 38 us, of which
    numpy's is ~1). With `_shorter_binary_op_checks`, these were a third of it (the tiny model's 9-prompt PIN
    generate, 6 tokens: 22.0 -> 14.1 s; every printed bit as before).
    - The overflow sanitizer: every int32 add, sub and mul done again in int64, compared with the int32 range
      and asserted - a debug check, which compiled kernels keep only in debug builds. It never alters a
      result; it only asserts.
    - The Triton -> numpy dtype table, rebuilt (19 entries) at each of ~640k lookups a gate: built once."""
    import dataclasses

    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    stock_np_dtype, np_dtypes = interpreter._get_np_dtype, {}

    def np_dtype(tt_dtype):
        scalar = tt_dtype.scalar
        if isinstance(scalar, tl.pointer_type):
            return np.dtype(np.uint64)
        if scalar not in np_dtypes:
            np_dtypes[scalar] = stock_np_dtype(scalar)
        return np_dtypes[scalar]

    interpreter._get_np_dtype = np_dtype


def _shorter_binary_op_checks():
    """The type checks before every binary op (promotion, casts, broadcast), skipped in the two cases where they
    change nothing but the broadcast - about 60% of the binary ops of a gate:
    - both operands of one type (fp32, int32, int64 or int1, the same shape): handed back as they came;
    - a tensor of fp32, int32 or int64 with a Python int in int32 range, or an fp32 tensor with a Python float:
      the scalar never outranks the tensor, so it becomes a constant of the tensor's type, broadcast to it."""
    from triton.language import semantic

    stock_checks = semantic.TritonSemantic.binary_op_type_checking_impl
    plain, numeric = (tl.float32, tl.int32, tl.int64, tl.int1), (tl.float32, tl.int32, tl.int64)

    def takes_as_is(t, x):
        return t.dtype in numeric and (type(x) is int and -2 ** 31 <= x < 2 ** 31
                                       or type(x) is float and t.dtype == tl.float32)

    def binary_op_type_checking_impl(self, lhs, rhs, *args, **kwargs):
        lhs_is_tensor, rhs_is_tensor = isinstance(lhs, tl.tensor), isinstance(rhs, tl.tensor)
        if lhs_is_tensor and rhs_is_tensor and lhs.type == rhs.type and lhs.dtype in plain:
            return lhs, rhs
        if lhs_is_tensor and not rhs_is_tensor and takes_as_is(lhs, rhs):
            return self.broadcast_impl_value(lhs, self.scalar_constant(rhs, lhs.dtype))
        if rhs_is_tensor and not lhs_is_tensor and takes_as_is(rhs, lhs):
            return self.broadcast_impl_value(self.scalar_constant(lhs, rhs.dtype), rhs)
        return stock_checks(self, lhs, rhs, *args, **kwargs)

    semantic.TritonSemantic.binary_op_type_checking_impl = binary_op_type_checking_impl


if INTERPRET:
    _interpret_triton_language()
    _route_interpreted_dots_in_k_order()
    _fast_bf16_casts()
    _lighter_interpreted_ops()
    _shorter_binary_op_checks()
# Helpers called from kernels are @triton.jit functions on the GPU. The interpreter re-patches triton.language
# on every call of a jit helper (~1 ms each), so there they stay plain Python functions: same code, same ops.
helper = (lambda fn: fn) if INTERPRET else triton.jit


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# bf16 helpers shared by all kernels
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
@helper
def _mma_in(x):
    """A bf16 tile as a tl.dot operand: bf16 on the GPU (tensor cores), widened to fp32 in the interpreter."""
    if _INTERPRET:
        x = x.to(tl.float32)
    return x


if INTERPRET:
    def _round_to_bf16(x):
        """fp32 -> bf16 rounded to nearest even. The interpreter's own cast truncates, so: add half an ulp of bf16
        (ties to even) and drop the low 16 bits - in one numpy step on the tile, where the same five ops through
        the interpreter's language layer took ~6 ms a tile (a quarter of a CPU gate's time). A tile holding a
        subnormal or a NaN takes those ops, so every bit is theirs."""
        import numpy as np
        from triton.runtime.interpreter import TensorHandle

        bits = np.ascontiguousarray(x.handle.data).view(np.uint32)
        if not x.type.is_block() or _holds_subnormal_or_nan(bits):
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return tl.tensor(TensorHandle(rounded, tl.bfloat16), tl.block_type(tl.bfloat16, x.type.shape))
else:
    @triton.jit
    def _round_to_bf16(x):
        """fp32 -> bf16 rounded to nearest even: the hardware's cast."""
        return x.to(tl.bfloat16)


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Kernel boundaries: programmatic dependent launch
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# A decode step is ~300 small kernels back to back (qwen3-4b at batch 1: 8 a layer). Each is launched with
# Hopper's programmatic dependent launch (`LAUNCH`) and first waits for the kernel before it
# (`_after_previous_kernel`), so the next launch is set up while the last programs of the one before drain; the
# data flow stays serial, and no value - so no bit - depends on it. The kernels do not signal an early launch
# (one exception, below): programs placed while the previous kernel still holds the SMs land on whatever room is
# left, and a weight-streaming GEMM then reads at a fraction of the bandwidth (H200, qwen3-4b TPOT at b1, 1k
# context: 3.18-3.31 ms without, 3.15 waiting only, 3.34-3.63 with an early signal everywhere, 3.44-4.24 with
# weight tiles prefetched to L2 too).
LAUNCH = {} if INTERPRET else dict(launch_pdl=True)


@helper
def _after_previous_kernel():
    """Wait until the previous kernel in the stream has finished and its stores are visible. The first statement
    of every kernel: no program may return, load or store before it (but split-KV's L2 prefetch, below)."""
    if not _INTERPRET:
        tl.extra.cuda.gdc_wait()


# The exception, q/k-norm + RoPE of a small decode step: that kernel lets split-KV launch at once, and split-KV's
# programs, from the step's metadata alone (lengths, block table: copied in before the step), ask L2 for their
# chunks' K and V - which HBM then delivers while q/k-norm runs - before they wait for its q and K/V writes. Both
# kernels are small, so no streaming kernel loses its SMs; a prefetch reads nothing into registers, so no value,
# and no bit, depends on it (qwen3-4b TPOT at b1, 1k context, H200: TUNED -0.04 to -0.13 ms, nano_bi.py section 9).
KV_PREFETCH_MAX_TOKENS = 16  # decode steps of one q/k-norm tile (QK_NORM_ROWS); the engine asks for the
# prefetch only where the step's K/V are small (nano_bi.py section 9)
PREFETCH_PIECE = tl.constexpr(16384)  # bytes one bulk L2 prefetch asks for at most


@helper
def _launch_next_kernel():
    """Let the next kernel in the stream launch now: its programs may start before this kernel ends."""
    if not _INTERPRET:
        tl.extra.cuda.gdc_launch_dependents()


@helper
def _prefetch_to_l2(byte_ptr, size):
    """One thread's bulk prefetch of `size` bytes (a multiple of 16) at byte_ptr into L2; nothing is waited for."""
    if not _INTERPRET:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [byte_ptr, size], dtype=tl.int32, is_pure=False, pack=1)


@functools.cache
def sm_count(device: int) -> int:
    """The GPU's SMs, asked once: torch's device-properties call costs ~14 us on the host (H200 machine)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


# Host-side launch arithmetic in plain Python: triton.next_power_of_2 and triton.cdiv unwrap constexprs on every
# call (1.5 us each, against 0.15), and a qwen3-4b prefill makes 400-700 such calls.
def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# RMSNorm, optionally fused with the residual add that precedes it
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Per-row kernels (norms, RoPE, SiLU*mul) take ROWS rows per program. On the GPU one row per program is the
# natural grid (the q/k norm's 128-value rows are too small for it: they take a fixed 16, below); the
# interpreter pays a fixed cost per executed op per program, so there up to 256 rows share each program - but
# no more than the call has: padding rows cost it too (a 1-row RMSNorm took 45 ms in a 256-row tile, 7 ms in a
# 1-row one). A row's reduction is the same tl.sum over its own values either way.
ROWS_PER_PROGRAM = 256 if INTERPRET else 1


def _tile_rows(rows: int) -> int:
    return min(ROWS_PER_PROGRAM, _next_pow2(rows))


@helper
def _segment_sums_in_order(part_ptr, offs, mask, numel, SEGMENTS: tl.constexpr):
    """fp32 ((s0 + s1) + s2) + ... of the K-segment sums [SEGMENTS, numel] at offs: the order matmul_kernel adds
    its segments in, so the result is the one-program GEMM's, bit for bit."""
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SEGMENTS):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    return acc


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, SEGMENTS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Grid: (ceil(rows / ROWS),). One program normalises ROWS rows (tokens), each on its own.

    Reduction: each row's sum of squares over its `n_cols` values, one tl.sum over a fixed power-of-two block.
    Its order depends on `n_cols` alone, so it is batch-invariant: a row never shares a reduction with another.
    With HAS_RESIDUAL the row is first `residual + x` rounded to bf16 (what HF's bf16 add produces) and that
    sum is also written back as the new residual stream. SEGMENTS > 0: x is a row-parallel GEMM's output still
    as its fp32 K-segment sums [SEGMENTS, rows, n_cols]; they are added in the GEMM's order and rounded to the
    bf16 the GEMM would have stored, then the row goes on exactly as a stored one does (the same tile shape, so
    the same tl.sum - the kernel test compares the two paths bit for bit).
    """
    _after_previous_kernel()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    if SEGMENTS > 0:
        x = _round_to_bf16(_segment_sums_in_order(x_ptr, offs, mask, n_rows * n_cols, SEGMENTS)).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_bf16 = _round_to_bf16(x)
        tl.store(res_out_ptr + offs, x_bf16, mask=mask)
        x = x_bf16.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = _round_to_bf16(x * inv_rms[:, None]).to(tl.float32)  # HF: weight * hidden.to(bf16)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _round_to_bf16(normed * w[None, :]), mask=mask)


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm over the last dim of a contiguous bf16 [rows, n] tensor - or of the rows that fp32 K-segment sums
    [segments, rows, n] add up to (the Triton GEMM's decode o_proj/down_proj, nano_bi.py section 6). With `residual`,
    returns (norm(x + residual), x + residual); otherwise norm(x)."""
    assert x.is_contiguous(), "the kernel assumes packed rows (and segments)"
    segments = x.shape[0] if x.dim() == 3 else 0
    rows, n = x.shape[-2:]
    out = torch.empty(rows, n, dtype=weight.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    tile = _tile_rows(rows)
    rms_norm_kernel[(_cdiv(rows, tile),)](
        x, residual if residual is not None else x, weight, out, res_out, rows, n, eps,
        HAS_RESIDUAL=residual is not None, SEGMENTS=segments, ROWS=tile, BLOCK=_next_pow2(n), **LAUNCH)
    return (out, res_out) if residual is not None else out


def rms_norm_ref(x, weight, eps, residual=None):
    if x.dim() == 3:
        x = sum_segments_ref(x)
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = weight * normed
    return (out, x) if residual is not None else out


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# SiLU(gate) * up: the MLP's activation, one launch instead of torch's two
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
SILU_BLOCK = 1024  # columns per program on the GPU: qwen3-4b's 9728 -> 10 programs per row


@helper
def _silu_mul(gate, up):
    """bf16(bf16(silu(gate)) * up) of fp32 gate and up that hold bf16 values: torch's two roundings. The GEMM's
    SILU_MUL epilogue calls it too, so both paths run the same instructions."""
    silu = _round_to_bf16(gate / (1.0 + tl.exp(-gate))).to(tl.float32)
    return _round_to_bf16(silu * up)


@triton.jit
def silu_and_mul_kernel(gate_up_ptr, out_ptr, n_rows, width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Grid: (ceil(rows / ROWS), ceil(width / BLOCK)). gate_up [rows, 2 * width] holds gate then up (the fused
    gate_up_proj's output); out = bf16(bf16(silu(gate)) * up), the two roundings of torch's F.silu(gate) * up.
    No reduction: every output element is its own, so it is batch-invariant by construction."""
    _after_previous_kernel()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < width)[None, :]
    gate_off = rows.to(tl.int64)[:, None] * (2 * width) + cols[None, :]
    gate = tl.load(gate_up_ptr + gate_off, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + gate_off + width, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * width + cols[None, :], _silu_mul(gate, up), mask=mask)


def silu_and_mul(gate_up):
    """[rows, 2 * width] bf16 -> silu(gate) * up, [rows, width] (vLLM's name for the same op)."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    block, tile = (_next_pow2(width) if INTERPRET else SILU_BLOCK), _tile_rows(rows)
    silu_and_mul_kernel[(_cdiv(rows, tile), _cdiv(width, block))](
        gate_up, out, rows, width, ROWS=tile, BLOCK=block, **LAUNCH)
    return out


def silu_and_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# q/k RMSNorm + RoPE, and the K/V write into the paged cache, in one launch
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
@triton.jit
def qk_norm_rope_store_kernel(qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, q_norm_ptr, k_norm_ptr,
                              cos_ptr, sin_ptr, pos_ptr, kv_slot_ptr, n_tokens, eps,
                              N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              ROWS: tl.constexpr, LAUNCH_NEXT: tl.constexpr):
    """Grid: (ceil(tokens / ROWS), q heads + kv heads). One program handles one head of ROWS tokens.
    LAUNCH_NEXT: the next kernel (split-KV) may launch at once (`KV_PREFETCH_MAX_TOKENS`).

    A q head is RMS-normalised with `q_norm`, rotated (RoPE, rotate-half layout) and written to `q_out`.
    A k head gets `k_norm` + RoPE and is written, with its v head, into the cache slot `kv_slot[token]`
    (page * PAGE_SIZE + offset; -1 marks a padding row that must not write).
    Reduction: each token-head's sum of squares (HEAD_DIM values, fixed order) - batch-invariant.
    """
    _after_previous_kernel()
    if LAUNCH_NEXT:
        _launch_next_kernel()
    tok = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    head = tl.program_id(1)
    tok_ok = tok < n_tokens
    tok = tok.to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    QKV_WIDTH: tl.constexpr = (N_Q_HEADS + 2 * N_KV_HEADS) * HEAD_DIM
    d = tl.arange(0, HALF)[None, :]
    pos = tl.load(pos_ptr + tok, mask=tok_ok, other=0).to(tl.int64)[:, None]
    cos = tl.load(cos_ptr + pos * HALF + d)
    sin = tl.load(sin_ptr + pos * HALF + d)
    row = qkv_ptr + tok[:, None] * QKV_WIDTH + head * HEAD_DIM  # q heads then k heads, side by side
    x1 = tl.load(row + d, mask=tok_ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF + d, mask=tok_ok[:, None], other=0.0).to(tl.float32)
    is_q = head < N_Q_HEADS
    if is_q:
        w1 = tl.load(q_norm_ptr + d).to(tl.float32)
        w2 = tl.load(q_norm_ptr + HALF + d).to(tl.float32)
    else:
        w1 = tl.load(k_norm_ptr + d).to(tl.float32)
        w2 = tl.load(k_norm_ptr + HALF + d).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
    x1 = _round_to_bf16(_round_to_bf16(x1 * inv_rms).to(tl.float32) * w1).to(tl.float32)
    x2 = _round_to_bf16(_round_to_bf16(x2 * inv_rms).to(tl.float32) * w2).to(tl.float32)
    y1 = _round_to_bf16(x1 * cos - x2 * sin)
    y2 = _round_to_bf16(x2 * cos + x1 * sin)
    if is_q:
        q_row = q_out_ptr + (tok[:, None] * N_Q_HEADS + head) * HEAD_DIM
        tl.store(q_row + d, y1, mask=tok_ok[:, None])
        tl.store(q_row + HALF + d, y2, mask=tok_ok[:, None])
    else:
        slot = tl.load(kv_slot_ptr + tok, mask=tok_ok, other=-1).to(tl.int64)
        write = (slot >= 0)[:, None]
        kv_head = head - N_Q_HEADS
        cache_row = (slot[:, None] * N_KV_HEADS + kv_head) * HEAD_DIM
        tl.store(k_cache_ptr + cache_row + d, y1, mask=write)
        tl.store(k_cache_ptr + cache_row + HALF + d, y2, mask=write)
        v_row = qkv_ptr + tok[:, None] * QKV_WIDTH + (N_Q_HEADS + N_KV_HEADS + kv_head) * HEAD_DIM
        v_off = tl.arange(0, HEAD_DIM)[None, :]
        tl.store(v_cache_ptr + cache_row + v_off, tl.load(v_row + v_off, mask=write, other=0.0), mask=write)


# Tokens per program on the GPU, whatever the call's token count: the tile's shape sets the layout, and so the
# order of each token-head's sum, so it must not follow the batch. One token a program left a 4k-token prefill at
# 119 us a layer (H200, qwen3-4b heads, 850 GB/s); 16 take 30 us (3,350 GB/s).
QK_NORM_ROWS = 16


def qk_norm_rope_store(qkv, q_norm, k_norm, cos, sin, positions, kv_slots, k_cache, v_cache,
                       n_q_heads, n_kv_heads, head_dim, eps):
    """qkv: [T, (Hq + 2 Hkv) * D] bf16 -> q [T, Hq, D]; writes k, v into the caches at `kv_slots`."""
    tokens = qkv.shape[0]
    q = torch.empty(tokens, n_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    tile = _tile_rows(tokens) if INTERPRET else QK_NORM_ROWS
    qk_norm_rope_store_kernel[(_cdiv(tokens, tile), n_q_heads + n_kv_heads)](
        qkv, q, k_cache, v_cache, q_norm, k_norm, cos, sin, positions, kv_slots, tokens, eps,
        N_Q_HEADS=n_q_heads, N_KV_HEADS=n_kv_heads, HEAD_DIM=head_dim, ROWS=tile,
        LAUNCH_NEXT=not INTERPRET and tokens <= KV_PREFETCH_MAX_TOKENS, **LAUNCH)
    return q


def _qk_norm_rope_ref(qkv, q_norm, k_norm, cos, sin, positions, n_q_heads, n_kv_heads, head_dim, eps):
    """(q, k, v) [T, heads, D]: q and k RMS-normed per head, then rotated (RoPE, rotate-half layout)."""
    q, k, v = qkv.view(qkv.shape[0], -1, head_dim).split([n_q_heads, n_kv_heads, n_kv_heads], dim=1)

    def norm_rope(x, w):
        x = rms_norm_ref(x.reshape(-1, head_dim), w, eps).view_as(x).float()
        c, s = cos[positions.long()][:, None, :], sin[positions.long()][:, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(qkv.dtype)

    return norm_rope(q, q_norm), norm_rope(k, k_norm), v


def qk_norm_rope_store_ref(qkv, q_norm, k_norm, cos, sin, positions, kv_slots, k_cache, v_cache,
                           n_q_heads, n_kv_heads, head_dim, eps):
    q, k, v = _qk_norm_rope_ref(qkv, q_norm, k_norm, cos, sin, positions, n_q_heads, n_kv_heads, head_dim, eps)
    real = kv_slots >= 0
    k_cache[kv_slots[real].long()] = k[real]
    v_cache[kv_slots[real].long()] = v[real]
    return q


def causal_attention_ref(qkv, q_norm, k_norm, cos, sin, positions, cu_q, n_q_heads, n_kv_heads, head_dim, eps):
    """qk_norm_rope_store + prefill_attention for whole sequences (rows cu_q[s]:cu_q[s+1], positions from 0),
    in plain differentiable torch: each sequence attends itself causally, in fp32 with P rounded to bf16. The
    trainer's backward differentiates this (nano_bi.py, section 15). -> [T, Hq * D] bf16."""
    q, k, v = _qk_norm_rope_ref(qkv, q_norm, k_norm, cos, sin, positions, n_q_heads, n_kv_heads, head_dim, eps)
    outs = [_softmax_pv(q[a:b].float(), k[a:b].float(), v[a:b].float(), causal_offset=0)[0]
            for a, b in zip(cu_q, cu_q[1:])]
    return torch.cat(outs).to(qkv.dtype).view(qkv.shape[0], -1)


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Attention over paged K/V: the shared pieces
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Every attention kernel below - prefill, split-KV decode, one-pass decode - is built from the same helpers,
# so that under PIN a query's keys are reduced in the same order, with the same roundings, whichever kernel
# computes it (the decode == prefill gate proves it):
#   _attend_block   one BLOCK_N-key block folded into a running online softmax;
#   _attend         one key range, block by block from its first key up;
#   _merge_partial  folds a range's result - a split-KV partial: its fp32 (row max, row sum, acc), not yet
#                   normalised - into a running merge (online-softmax rescale).
# Kernels that reduce many chunks walk all their key blocks in one loop (`_chunk_block`) and close a chunk on
# its last block, which keeps the load pipeline full across chunk ends.
# Two details make a row's bits independent of the tile it sits in (16 rows of GQA heads in decode, 32-128
# query rows in prefill, different warp counts - H200: the same bits at each): the row sum of P is taken by a
# tensor-core dot with a ones matrix, like P.V itself, instead of tl.sum, whose order follows the thread
# layout; and every multiply-add is an explicit tl.fma or a dot's accumulator (the kernels are compiled with
# fp fusion off), so no compiler contracts them differently. Scores are in base-2 units (`_qk_scale`).
ATTN_BLOCK_N = 128 if INTERPRET else 64  # keys per block on every path that keeps bits (the block order is part of them)


@helper
def _chunk_start(rows: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A chunk's empty online-softmax state (m_i, l_i, acc), as `_attend` starts it."""
    return (tl.full([rows], float("-inf"), tl.float32), tl.zeros([rows, 16], tl.float32),
            tl.zeros([rows, HEAD_DIM], tl.float32))


@helper
def _row_sum_ones(BLOCK_N: tl.constexpr):
    """The [BLOCK_N, 16] ones that P is multiplied by for its row sum (see `_attend_block`)."""
    return _mma_in(tl.full([BLOCK_N, 16], 1.0, tl.float32).to(tl.bfloat16))


@helper
def _attend(q, kv, block_table_row, kv_head, key_lo, key_hi, q_pos, qk_scale,
            N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
            CAUSAL: tl.constexpr):
    """Online softmax of the query tile `q` [R, D] over keys key_lo .. key_hi-1, read through the page table.

    Reduction order: key blocks of BLOCK_N in ascending position from key_lo (`_attend_block`). Nothing here
    depends on other requests or on the tile's row count. Returns (acc, row max, row sum), fp32, the max in
    base-2 units (see `_qk_scale`). Rows with no valid key keep m = -inf, l = 0 (the caller discards them).

    The blocks that every row of the tile sees whole (all their keys exist and none lies after the tile's
    first query) run without a mask; the rest take one. A mask only turns scores into -inf, and on a block
    where nothing is masked it is the identity, so where this split falls changes no bit: it only spares most
    blocks of a long causal prompt their compare-and-select.
    """
    m_i, l_i, acc = _chunk_start(q.shape[0], HEAD_DIM)  # l_i: the row sum in 16 equal columns (`_attend_block`)
    ones = _row_sum_ones(BLOCK_N)
    seen_by_all = key_hi
    if CAUSAL:
        seen_by_all = tl.minimum(key_hi, tl.min(q_pos, axis=0) + 1)
    whole_end = key_lo + tl.maximum(seen_by_all - key_lo, 0) // BLOCK_N * BLOCK_N
    for start in range(key_lo, whole_end, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, kv, block_table_row, kv_head, start, key_hi, q_pos,
                                      qk_scale, ones, m_i, l_i, acc, N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N,
                                      MASKED=False, CAUSAL=CAUSAL)
    for start in range(whole_end, key_hi, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, kv, block_table_row, kv_head, start, key_hi, q_pos,
                                      qk_scale, ones, m_i, l_i, acc, N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N,
                                      MASKED=True, CAUSAL=CAUSAL)
    return acc, m_i, tl.max(l_i, axis=1)  # 16 equal columns: max just picks one


@helper
def _attend_block(q, kv, block_table_row, kv_head, start, key_hi, q_pos, qk_scale, ones,
                  m_i, l_i, acc, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """One key block start .. start+BLOCK_N-1 folded into (m_i, l_i, acc), all by tensor-core dots of a fixed
    shape: QK^T over D, then P.V and P.ones (the row sum) over the block's keys, each accumulated onto its
    rescaled running value. P is rounded to bf16 before the dots, as every flash-attention kernel does on
    tensor cores. MASKED: keys at or past key_hi, and (CAUSAL) keys after a row's position, score -inf."""
    keys = start + tl.arange(0, BLOCK_N)
    valid = keys < key_hi
    k, v = _kv_block(kv, block_table_row, kv_head, start, valid, N_KV_HEADS, HEAD_DIM, PAGE,
                     BLOCK_N, MASKED)
    s = tl.dot(q, tl.trans(_mma_in(k)))  # raw scores; scaled inside the exponent's fma below
    if MASKED:
        keep = valid[None, :]
        if CAUSAL:
            keep = keep & (keys[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # scaling by a positive constant keeps the max
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf) = 0, no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = _mma_in(_round_to_bf16(tl.exp2(tl.fma(s, qk_scale, -m_safe[:, None]))))
    return m_new, tl.dot(p, ones, l_i * alpha[:, None]), tl.dot(p, _mma_in(v), acc * alpha[:, None])


@helper
def _kv_block(kv, block_table_row, kv_head, start, valid, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
              PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Keys start .. start+BLOCK_N-1 of one kv head: K and V [BLOCK_N, D], zero where not `valid`. kv holds
    the caches twice: (k, v) [slots, kv heads, D] as pointers, then as tensor descriptors of [BLOCK_N, D] tiles
    (`kv_tiles`). A whole block - every key valid, its start a multiple of BLOCK_N (callers run whole blocks
    only from a multiple of it) - lies in one page where PAGE is a multiple of BLOCK_N: one TMA copy each into
    shared memory, which the compiler pipelines ahead of the dots. The rest (the causal diagonal, a request's
    last block, chunks that are not whole blocks) take one page-table entry and one masked load per key. The
    same values either way, so no bit moves."""
    if PAGE % BLOCK_N == 0 and not MASKED and not _INTERPRET:
        row = tl.load(block_table_row + start // PAGE) * PAGE + start % PAGE
        k = kv[2].load([row, kv_head * HEAD_DIM])
        v = kv[3].load([row, kv_head * HEAD_DIM])
    else:
        keys = start + tl.arange(0, BLOCK_N)
        d = tl.arange(0, HEAD_DIM)
        page = tl.load(block_table_row + keys // PAGE, mask=valid, other=0).to(tl.int64)
        kv_off = ((page * PAGE + keys % PAGE)[:, None] * N_KV_HEADS + kv_head) * HEAD_DIM + d[None, :]
        k = tl.load(kv[0] + kv_off, mask=valid[:, None], other=0.0)
        v = tl.load(kv[1] + kv_off, mask=valid[:, None], other=0.0)
    return k, v


def kv_tiles(k_cache, v_cache, page_size: int, block_n: int):
    """What the attention kernels take as k_tiles, v_tiles: on the GPU, where a key block fits a page, tensor
    descriptors of one kv head's [block_n, D] tile of the caches [slots, kv heads, D] (`_kv_block`); else the
    caches again (unread)."""
    if INTERPRET or page_size % block_n:
        return k_cache, v_cache
    slots, n_kv, head_dim = k_cache.shape
    return tuple(TensorDescriptor.from_tensor(c.view(slots, n_kv * head_dim), [block_n, head_dim])
                 for c in (k_cache, v_cache))


@helper
def _merge_partial(m, denom, acc, m_c, l_c, acc_c):
    """Fold a chunk's partial - its unnormalised state (row max m_c [R], row sum l_c [R], acc_c [R, D]), as
    `_attend` leaves it - into the running (max m, denominator, acc): both rescaled to the larger max, then
    added, two operations an element. A partial normalised and rounded to bf16 first (a division, a rounding
    and a widening more an element) cost PIN's prefill 7-8% (H200, qwen3-4b heads, 192-key chunks, us a
    layer: 4k prompt 582 -> 542, 16k 8914 -> 8228); the split-KV partials in memory are fp32 for it."""
    m_new = tl.maximum(m, m_c)
    scale_old = tl.exp2(m - m_new)
    scale_new = tl.exp2(m_c - m_new)
    return m_new, tl.fma(l_c, scale_new, denom * scale_old), tl.fma(acc_c, scale_new[:, None],
                                                                    acc * scale_old[:, None])


@helper
def _merged_output(denom, acc):
    return _round_to_bf16(acc / tl.maximum(denom, 1e-30)[:, None])


@helper
def _chunk_blocks(first, stride, chunk_size, key_end, BLOCK_N: tl.constexpr):
    """(blocks per chunk, key blocks in all) of chunks first, first + stride, ... of keys 0 .. key_end-1."""
    per_chunk = tl.cdiv(chunk_size, BLOCK_N)
    mine = tl.cdiv(tl.maximum(tl.cdiv(key_end, chunk_size) - first, 0), stride)
    last_lo = (first + (mine - 1) * stride) * chunk_size
    last_blocks = tl.cdiv(tl.minimum(key_end - last_lo, chunk_size), BLOCK_N)
    return per_chunk, tl.where(mine > 0, (mine - 1) * per_chunk + last_blocks, 0)


@helper
def _chunk_block(i, first, stride, per_chunk, chunk_size, key_end, BLOCK_N: tl.constexpr):
    """Key block i of chunks first, first + stride, ...: (its chunk, its first key, its chunk's end)."""
    c = first + i // per_chunk * stride
    return c, c * chunk_size + i % per_chunk * BLOCK_N, tl.minimum(c * chunk_size + chunk_size, key_end)


@helper
def _fold_chunks(q, kv, block_table_row, kv_head, key_end, chunk_size, q_pos, qk_scale,
                 N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr):
    """Attention of the query tile `q` [R, D] over keys 0 .. key_end-1 in chunks [c * chunk, (c+1) * chunk)
    aligned at position 0: each chunk reduced as `_attend` reduces it, its state folded as a partial by
    `_merge_partial` in chunk order 0, 1, 2... Returns the bf16 output [R, D]. The split-KV
    kernels compute the same partials in separate programs and fold them in the same order: the same bits.

    All chunks' key blocks run as one loop, and a chunk's last block folds its partial and starts the next
    chunk (`_fold_block`): a loop per chunk drained the load pipeline at every chunk end (H200, PIN's 192-key
    chunks, qwen3-4b heads, us a layer: decode batch 128 at 1k 99.0 -> 89.1, batch 33 at 8k 315.1 -> 270.4; a
    4k prefill 621 -> 612, where the registers, not the pipeline, are the limit). As in `_attend`, the
    blocks every row sees whole skip the mask; past them a row skips the chunks that start after its q_pos.
    """
    m = tl.full([q.shape[0]], float("-inf"), tl.float32)
    denom = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], HEAD_DIM], tl.float32)
    m_i, l_i, acc_i = _chunk_start(q.shape[0], HEAD_DIM)
    ones = _row_sum_ones(BLOCK_N)
    per_chunk, n_blocks = _chunk_blocks(0, 1, chunk_size, key_end, BLOCK_N)
    seen_by_all = key_end
    if CAUSAL:
        seen_by_all = tl.minimum(key_end, tl.min(q_pos, axis=0) + 1)
    whole = tl.where(chunk_size % BLOCK_N == 0, seen_by_all // BLOCK_N, 0)  # (the interpreter's blocks may
    for i in range(0, whole):  # straddle a tiny model's chunk ends: there every block takes the mask)
        m, denom, acc, m_i, l_i, acc_i = _fold_block(
            i, per_chunk, chunk_size, key_end, q, kv, block_table_row, kv_head, q_pos, qk_scale,
            ones, m, denom, acc, m_i, l_i, acc_i, N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, MASKED=False, CAUSAL=CAUSAL)
    for i in range(whole, n_blocks):
        m, denom, acc, m_i, l_i, acc_i = _fold_block(
            i, per_chunk, chunk_size, key_end, q, kv, block_table_row, kv_head, q_pos, qk_scale,
            ones, m, denom, acc, m_i, l_i, acc_i, N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, MASKED=True, CAUSAL=CAUSAL)
    return _merged_output(denom, acc)


@helper
def _fold_block(i, per_chunk, chunk_size, key_end, q, kv, block_table_row, kv_head, q_pos,
                qk_scale, ones, m, denom, acc, m_i, l_i, acc_i, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Key block i of `_fold_chunks`: `_attend_block` into the chunk's (m_i, l_i, acc_i); on the chunk's last
    block, its partial folded into the running (m, denom, acc) by the rows that have a key in the chunk, and
    the chunk's state started afresh."""
    c, start, chunk_hi = _chunk_block(i, 0, 1, per_chunk, chunk_size, key_end, BLOCK_N)
    m_i, l_i, acc_i = _attend_block(q, kv, block_table_row, kv_head, start, chunk_hi, q_pos, qk_scale, ones,
                                    m_i, l_i, acc_i, N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, MASKED, CAUSAL)
    if start + BLOCK_N >= chunk_hi:
        m_new, denom_new, acc_new = _merge_partial(m, denom, acc, m_i, tl.max(l_i, axis=1), acc_i)
        if CAUSAL and MASKED:
            has_chunk = q_pos >= c * chunk_size  # queries before this chunk have no key in it
            m_new = tl.where(has_chunk, m_new, m)
            denom_new = tl.where(has_chunk, denom_new, denom)
            acc_new = tl.where(has_chunk[:, None], acc_new, acc)
        m, denom, acc = m_new, denom_new, acc_new
        m_i, l_i, acc_i = _chunk_start(q.shape[0], HEAD_DIM)
    return m, denom, acc, m_i, l_i, acc_i


def _qk_scale(head_dim: int) -> float:
    """The softmax scale times log2(e): scores come out in base-2 units, so each exponential is one exp2
    (a single hardware instruction) and the scale rides in the fma that subtracts the row max. H200, one
    layer of a 4k causal prefill: exp with a separate scale 610 us, exp2 with the scale folded 449 us."""
    return head_dim ** -0.5 * 1.4426950408889634


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Prefill (and mixed steps): causal varlen attention in chunks aligned at position 0
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
@triton.jit
def prefill_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_tiles, v_tiles, out_ptr, block_table_ptr,
                             slot_idx_ptr, cu_q_ptr, q_start_ptr, chunk_size_ptr, qk_scale, bt_stride,
                             N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                             PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             ONE_CHUNK: tl.constexpr):
    """Grid: (q heads, sequences, ceil(longest query run / BLOCK_M)). Sequence s brings queries at positions
    q_start[s] .. q_start[s] + n_s - 1 (a whole prompt, a prompt chunk whose earlier keys are already cached,
    or one decode row); each attends keys 0 .. its own position. One program: BLOCK_M queries of one sequence
    and one q head. Query blocks go out last first: under the causal mask block b reads b + 1 key blocks, so
    the long programs start first and the short ones fill the GPU's tail (which program computes a block
    does not touch its bits).

    Reduction order per query: its keys in chunks [c * chunk, (c+1) * chunk) aligned at position 0, each
    reduced by `_attend`, its state folded as a partial by `_merge_partial` in chunk order 0, 1, 2... -
    exactly what split-KV decode does for a query at the same position with the same chunk
    size. So under PIN (chunk = the process constant) a query's bits do not depend on whether it is computed in
    a whole prompt, a chunk of one, a mixed step or a decode step, nor on its neighbours in the tile.
    TUNED passes other chunk sizes (see the engine) and gets no such promise.

    ONE_CHUNK (the caller knows every sequence's keys lie in its first chunk: a whole prompt under TUNED, or a
    short one): the fold of a single partial is that partial, so the program returns it directly - the same
    bits, without the fold's second [BLOCK_M, D] fp32 accumulator held across the key loop (H200, one layer
    of a 4k prompt: 439 us with the fold, 364 us without).
    """
    _after_previous_kernel()
    head = tl.program_id(0)
    seq = tl.program_id(1)
    q_block = tl.num_programs(2) - 1 - tl.program_id(2)
    q_lo = tl.load(cu_q_ptr + seq)
    n_q = tl.load(cu_q_ptr + seq + 1) - q_lo
    if q_block * BLOCK_M >= n_q:
        return
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    first_pos = tl.load(q_start_ptr + seq)
    q_pos = first_pos + rows
    chunk_size = tl.load(chunk_size_ptr + seq)
    d = tl.arange(0, HEAD_DIM)
    q_off = ((q_lo + rows).to(tl.int64)[:, None] * N_Q_HEADS + head) * HEAD_DIM + d[None, :]
    q = _mma_in(tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0))
    bt_row = block_table_ptr + tl.load(slot_idx_ptr + seq).to(tl.int64) * bt_stride
    kv = (k_cache_ptr, v_cache_ptr, k_tiles, v_tiles)  # see `_kv_block`
    kv_head = head // (N_Q_HEADS // N_KV_HEADS)
    key_end = first_pos + tl.minimum((q_block + 1) * BLOCK_M, n_q)  # one past the tile's last query
    if ONE_CHUNK:
        acc, _, l_i = _attend(q, kv, bt_row, kv_head, 0, key_end, q_pos, qk_scale,
                              N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, CAUSAL=True)
        out = _merged_output(l_i, acc + 0.0)  # + 0.0: the fold's fma turns -0 into +0, and so does this
    else:
        out = _fold_chunks(q, kv, bt_row, kv_head, key_end, chunk_size, q_pos, qk_scale,
                           N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, CAUSAL=True)
    tl.store(out_ptr + q_off, out, mask=row_ok[:, None])


def prefill_attention(q, k_cache, v_cache, block_table, slot_idx, cu_q, q_start, chunk_sizes, max_q, page_size,
                      one_chunk=False, min_q=1, free_order=False):
    """q: [T, Hq, D], the queries of several sequences concatenated (cu_q: [S + 1] offsets); q_start [S]: each
    sequence's first query position; chunk_sizes [S]: its key chunk size; max_q / min_q: the longest / shortest
    sequence's query count; one_chunk: every sequence's keys lie in its first chunk. The last two only choose
    the launch (`_prefill_launch`), never a bit. free_order: the caller promises no bits (TUNED), so long
    one-chunk runs may take wider key blocks. Returns attention output [T, Hq, D]."""
    tokens, n_q, head_dim = q.shape
    n_kv = k_cache.shape[1]
    out = torch.empty_like(q)
    block_m, block_n, warps, stages = _prefill_launch(one_chunk, min_q, free_order)
    k_tiles, v_tiles = kv_tiles(k_cache, v_cache, page_size, block_n)
    grid = (n_q, cu_q.numel() - 1, _cdiv(max_q, block_m))
    prefill_attention_kernel[grid](q, k_cache, v_cache, k_tiles, v_tiles, out, block_table, slot_idx, cu_q, q_start,
                                   chunk_sizes, _qk_scale(head_dim), block_table.stride(0), N_Q_HEADS=n_q,
                                   N_KV_HEADS=n_kv, HEAD_DIM=head_dim, PAGE=page_size, BLOCK_M=block_m,
                                   BLOCK_N=block_n, ONE_CHUNK=one_chunk, num_warps=warps, num_stages=stages,
                                   enable_fp_fusion=False, **LAUNCH)
    return out


def _prefill_launch(one_chunk: bool, min_q: int, free_order: bool) -> tuple[int, int, int, int]:
    """(queries a program, keys a block, warps, pipeline stages). Keys a block is part of a row's bits (the
    online softmax rescales per block), so only a caller that promises no bits may widen it; the rest are
    launch knobs - a row's bits do not depend on its tile (the attention seam test compares prefill rows with
    decode's 16-row tiles). H200, qwen3-4b heads, K/V by TMA from 128-key pages, us a layer at 1k / 4k / 16k
    (torch SDPA 32 / 283 / 3875): TUNED's one-chunk launch keeps 64 queries and 64-key blocks below 2k queries
    (28 at 1k; 35 with 128 x 64 tiles) and takes 128 x 128 tiles, 8 warps, 2 stages from there (338 / 5005;
    3 stages 355 / 5193; 128 x 64 tiles 396 / 6351). PIN's fold takes 64 queries, 4 warps, 3 stages (36 / 441 /
    7017; 2 stages 36 / 451 / 7209; 128 queries and 8 warps 43 / 497 / 7772): the fold's second accumulator
    holds registers that a 128-row tile needs for its pipeline. The interpreter is fastest with few, fat programs."""
    if INTERPRET:
        return 128, ATTN_BLOCK_N, 4, 2
    if one_chunk and free_order and min_q >= 2048:
        return 128, 128, 8, 2
    return 64, ATTN_BLOCK_N, 4, (2 if one_chunk else 3)


def _gather_kv(k_cache, v_cache, pages, length, page_size):
    slots = (pages[:, None] * page_size + torch.arange(page_size, device=pages.device)).flatten()[:length]
    return k_cache[slots.long()].float(), v_cache[slots.long()].float()


def _softmax_pv(q, k, v, causal_offset=None):
    """q [R, Hq, D], k/v [L, Hkv, D] (fp32) -> (out fp32 [R, Hq, D], lse [R, Hq]); P rounded to bf16."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.einsum("rhd,lhd->hrl", q, k) * q.shape[-1] ** -0.5
    if causal_offset is not None:
        rows = torch.arange(q.shape[0], device=q.device)[:, None] + causal_offset
        s = s.masked_fill(torch.arange(k.shape[0], device=q.device)[None, :] > rows, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = torch.einsum("hrl,lhd->rhd", p.to(torch.bfloat16).float(), v) / l.permute(1, 0, 2)
    return out, (m + l.log()).squeeze(-1).T


def prefill_attention_ref(q, k_cache, v_cache, block_table, slot_idx, cu_q, q_start, chunk_sizes, max_q,
                          page_size):
    """Each query alone: its keys split into chunks aligned at 0, partials merged by softmax weights."""
    out = torch.empty_like(q)
    for r in range(cu_q.numel() - 1):
        lo, hi, start = int(cu_q[r]), int(cu_q[r + 1]), int(q_start[r])
        k, v = _gather_kv(k_cache, v_cache, block_table[int(slot_idx[r])], start + hi - lo, page_size)
        for i in range(hi - lo):
            out[lo + i] = _merge_chunks_ref(q[lo + i:lo + i + 1].float(), k[:start + i + 1], v[:start + i + 1],
                                            int(chunk_sizes[r]))[0].to(q.dtype)
    return out


def _merge_chunks_ref(q, k, v, chunk):
    """One query row [1, Hq, D] over keys k/v [n, Hkv, D] in chunks of `chunk` -> [1, Hq, D] fp32."""
    parts = [_softmax_pv(q, k[i:i + chunk], v[i:i + chunk]) for i in range(0, k.shape[0], chunk)]
    o = torch.stack([p[0][0] for p in parts])  # [chunks, Hq, D]
    w = torch.softmax(torch.stack([p[1][0] for p in parts]), dim=0)  # [chunks, Hq]
    return (o * w[..., None]).sum(0, keepdim=True)


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Decode attention, path 1: split-KV (flash-decoding) = partial kernel whose last program merges, or one fold kernel
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
@helper
def _group_rows(req, kv_head, GROUP: tl.constexpr, ROWS: tl.constexpr, N_Q_HEADS: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """Offsets [ROWS, D] of request req's GROUP q heads that share `kv_head` in a [B, Hq, D] tensor, padded to
    ROWS rows, and which rows are real."""
    g = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    return (req.to(tl.int64) * N_Q_HEADS + kv_head * GROUP + g[:, None]) * HEAD_DIM + d[None, :], g[:, None] < GROUP


@helper
def _decode_q_tile(q_ptr, req, kv_head, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, N_Q_HEADS: tl.constexpr,
                   HEAD_DIM: tl.constexpr):
    """The GROUP q heads that share `kv_head`, padded to GROUP_PAD rows (tl.dot needs >= 16 rows)."""
    off, ok = _group_rows(req, kv_head, GROUP, GROUP_PAD, N_Q_HEADS, HEAD_DIM)
    return tl.load(q_ptr + off, mask=ok, other=0.0), off, ok


@triton.jit
def split_kv_partial_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_tiles, v_tiles, block_table_ptr, slot_idx_ptr,
                            seq_lens_ptr, chunk_size_ptr, acc_part_ptr, ml_part_ptr, counts_ptr, out_ptr, qk_scale,
                            bt_stride, max_chunks, prefetch_ptr, N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr,
                            HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                            MERGE: tl.constexpr, MERGE_HEADS: tl.constexpr, PREFETCH: tl.constexpr):
    """Grid: (padded batch, P chunk programs, kv heads) - fixed per padded batch, so a CUDA graph can freeze
    it (P from `split_kv_chunk_programs`: up to one program per possible chunk). Program (b, p, h) attends
    the GROUP q heads of kv head h of request b, for each of its chunks c = p, p + P, ...: keys
    [c * chunk, min((c+1) * chunk, len_b)). It stores each chunk's partial (`SplitKvWorkspace`: the fp32
    state `_attend` ends with). Its chunks' key blocks run as one loop, a chunk's last block storing the partial
    (`_partial_block`; a loop per chunk drained the load pipeline at each: PIN, batch 32 at 8k, 292 -> 276 us).
    The chunk size is read from device memory; programs with no chunk (c >= ceil(len_b / chunk), and padding
    rows, len 0, which store zeros) exit at once. MERGE: the program that stores the last partial of its
    (request, kv head) merges them in chunk order (`_merge_when_last`) - no merge kernel; else TUNED's
    `split_kv_weighted_merge_kernel` follows.

    Reduction order: within a chunk, as `_attend`; which program computes a chunk does not matter. The chunk
    *boundaries* are the batch-dependence: they move whenever the chunk size moves, and each chunk's own
    running max and rescales (and its P, rounded to bf16 against that max) make the final bits depend on
    where they fall. Batch-invariant iff the chunk size is (PIN:
    a process constant; TUNED: it follows the longest sequence in the batch).

    PREFETCH (small decode steps): where `prefetch` (device memory) is not 0, the program asks L2 for its chunks'
    K and V before it waits for the kernel before it (`_prefetch_kv`), reading only the step's metadata.
    """
    req = tl.program_id(0)
    kv_head = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    chunk_size = tl.load(chunk_size_ptr)
    if PREFETCH and tl.load(prefetch_ptr) != 0:
        _prefetch_kv(k_cache_ptr, v_cache_ptr, block_table_ptr + tl.load(slot_idx_ptr + req).to(tl.int64) * bt_stride,
                     seq_len, chunk_size, tl.program_id(1), tl.num_programs(1), kv_head, N_KV_HEADS,
                     N_KV_HEADS * HEAD_DIM * 2, PAGE)
    _after_previous_kernel()
    per_chunk, n_blocks = _chunk_blocks(tl.program_id(1), tl.num_programs(1), chunk_size, seq_len, BLOCK_N)
    GROUP: tl.constexpr = N_Q_HEADS // N_KV_HEADS
    if n_blocks == 0:
        if MERGE:
            if (seq_len == 0) & (tl.program_id(1) == 0):
                _store_heads(out_ptr, req, kv_head, tl.zeros([MERGE_HEADS, HEAD_DIM], tl.float32), GROUP,
                             N_Q_HEADS, HEAD_DIM)
        return
    q, _, _ = _decode_q_tile(q_ptr, req, kv_head, GROUP, GROUP_PAD, N_Q_HEADS, HEAD_DIM)
    q = _mma_in(q)
    bt_row = block_table_ptr + tl.load(slot_idx_ptr + req).to(tl.int64) * bt_stride
    kv = (k_cache_ptr, v_cache_ptr, k_tiles, v_tiles)  # see `_kv_block`
    # every block but the request's very last is whole when chunks are whole blocks (see `_fold_chunks`)
    owns_last = (tl.cdiv(seq_len, chunk_size) - 1 - tl.program_id(1)) % tl.num_programs(1) == 0
    cut_short = (owns_last & (seq_len % BLOCK_N != 0)).to(tl.int32)
    whole = tl.where(chunk_size % BLOCK_N == 0, tl.maximum(n_blocks - cut_short, 0), 0)
    m_i, l_i, acc_i = _chunk_start(GROUP_PAD, HEAD_DIM)
    ones = _row_sum_ones(BLOCK_N)
    for i in range(0, whole):
        m_i, l_i, acc_i = _partial_block(i, per_chunk, chunk_size, seq_len, q, kv,
                                         bt_row, kv_head, req, max_chunks, acc_part_ptr, ml_part_ptr, qk_scale, ones,
                                         m_i, l_i, acc_i, N_Q_HEADS, N_KV_HEADS, HEAD_DIM, GROUP_PAD, PAGE, BLOCK_N,
                                         MASKED=False)
    for i in range(whole, n_blocks):
        m_i, l_i, acc_i = _partial_block(i, per_chunk, chunk_size, seq_len, q, kv,
                                         bt_row, kv_head, req, max_chunks, acc_part_ptr, ml_part_ptr, qk_scale, ones,
                                         m_i, l_i, acc_i, N_Q_HEADS, N_KV_HEADS, HEAD_DIM, GROUP_PAD, PAGE, BLOCK_N,
                                         MASKED=True)
    if MERGE:
        _merge_when_last(counts_ptr, acc_part_ptr, ml_part_ptr, out_ptr, req, kv_head, tl.cdiv(seq_len, chunk_size),
                         max_chunks, N_Q_HEADS, N_KV_HEADS, HEAD_DIM, MERGE_HEADS)


@helper
def _prefetch_kv(k_cache_ptr, v_cache_ptr, bt_row, seq_len, chunk_size, first, stride, part, parts,
                 ROW_BYTES: tl.constexpr, PAGE: tl.constexpr):
    """Ask L2 for the K and V of chunks first, first + stride, ... of a request (keys below seq_len): of each
    page's run of the chunk's keys, the part-th of `parts` equal shares of its bytes - every kv head's, so the
    programs of a chunk's kv heads split them between them."""
    k_bytes = k_cache_ptr.to(tl.pointer_type(tl.uint8))
    v_bytes = v_cache_ptr.to(tl.pointer_type(tl.uint8))
    for c in range(first, tl.cdiv(seq_len, chunk_size), stride):
        lo = c * chunk_size
        hi = tl.minimum(lo + chunk_size, seq_len)
        for page in range(lo // PAGE, tl.cdiv(hi, PAGE)):
            keys = tl.minimum(hi, page * PAGE + PAGE) - tl.maximum(lo, page * PAGE)
            share = tl.cdiv(keys * (ROW_BYTES // 16), parts) * 16
            size = tl.minimum(share, keys * ROW_BYTES - part * share)
            start = (tl.load(bt_row + page).to(tl.int64) * PAGE + tl.maximum(lo - page * PAGE, 0)) * ROW_BYTES
            for piece in range(part * share, part * share + size, PREFETCH_PIECE):
                _prefetch_to_l2(k_bytes + start + piece, tl.minimum(part * share + size - piece, PREFETCH_PIECE))
                _prefetch_to_l2(v_bytes + start + piece, tl.minimum(part * share + size - piece, PREFETCH_PIECE))


@helper
def _partial_block(i, per_chunk, chunk_size, seq_len, q, kv, bt_row, kv_head, req, max_chunks,
                   acc_part_ptr, ml_part_ptr, qk_scale, ones, m_i, l_i, acc_i, N_Q_HEADS: tl.constexpr,
                   N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Key block i of this program's chunks: `_attend_block`; on a chunk's last block, the chunk's partial
    stored and the next chunk's state started afresh."""
    c, start, chunk_hi = _chunk_block(i, tl.program_id(1), tl.num_programs(1), per_chunk, chunk_size, seq_len,
                                      BLOCK_N)
    g = tl.arange(0, GROUP_PAD)
    m_i, l_i, acc_i = _attend_block(q, kv, bt_row, kv_head, start, chunk_hi, g, qk_scale, ones,
                                    m_i, l_i, acc_i, N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, MASKED, CAUSAL=False)
    if start + BLOCK_N >= chunk_hi:
        GROUP: tl.constexpr = N_Q_HEADS // N_KV_HEADS
        row = (req.to(tl.int64) * max_chunks + c) * N_Q_HEADS + kv_head * GROUP + g
        d = tl.arange(0, HEAD_DIM)
        tl.store(acc_part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc_i, mask=g[:, None] < GROUP)
        tl.store(ml_part_ptr + 2 * row, m_i, mask=g < GROUP)
        tl.store(ml_part_ptr + 2 * row + 1, tl.max(l_i, axis=1), mask=g < GROUP)
        m_i, l_i, acc_i = _chunk_start(GROUP_PAD, HEAD_DIM)
    return m_i, l_i, acc_i


@helper
def _load_partial(acc_part_ptr, ml_part_ptr, req, c, n_chunks, heads, head_ok, max_chunks, N_Q_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """Chunk c's partial (m, l, acc) for `heads` of request req, and whether it exists (c < n_chunks). Loaded
    past L1 (.cg): other programs stored it."""
    valid = (c < n_chunks) & head_ok
    row = (req * max_chunks + c) * N_Q_HEADS + heads
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(acc_part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0,
                  cache_modifier=".cg")
    return (tl.load(ml_part_ptr + 2 * row, mask=valid, other=0.0, cache_modifier=".cg"),
            tl.load(ml_part_ptr + 2 * row + 1, mask=valid, other=0.0, cache_modifier=".cg"), acc, valid)


@helper
def _fold_if(m, denom, acc, m_c, l_c, acc_c, valid):
    """`_merge_partial`, or nothing (bit for bit) when the partial does not exist."""
    m_new, denom_new, acc_new = _merge_partial(m, denom, acc, m_c, l_c, acc_c)
    return tl.where(valid, m_new, m), tl.where(valid, denom_new, denom), tl.where(valid[:, None], acc_new, acc)


@helper
def _store_heads(out_ptr, req, kv_head, out, GROUP: tl.constexpr, N_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store out [heads, D] as the bf16 output of kv head kv_head's GROUP q heads of request req."""
    off, ok = _group_rows(req, kv_head, GROUP, out.shape[0], N_Q_HEADS, HEAD_DIM)
    tl.store(out_ptr + off, out.to(tl.bfloat16), mask=ok)


@helper
def _load_four(acc_part_ptr, ml_part_ptr, req, c, n_chunks, heads, head_ok, max_chunks, N_Q_HEADS: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Chunks c .. c + 3's partials (`_load_partial`), their loads issued together."""
    return (_load_partial(acc_part_ptr, ml_part_ptr, req, c, n_chunks, heads, head_ok, max_chunks, N_Q_HEADS,
                          HEAD_DIM),
            _load_partial(acc_part_ptr, ml_part_ptr, req, c + 1, n_chunks, heads, head_ok, max_chunks, N_Q_HEADS,
                          HEAD_DIM),
            _load_partial(acc_part_ptr, ml_part_ptr, req, c + 2, n_chunks, heads, head_ok, max_chunks, N_Q_HEADS,
                          HEAD_DIM),
            _load_partial(acc_part_ptr, ml_part_ptr, req, c + 3, n_chunks, heads, head_ok, max_chunks, N_Q_HEADS,
                          HEAD_DIM))


@helper
def _fold_four(m, denom, acc, four):
    """`_fold_if` of four loaded partials, in their order."""
    m, denom, acc = _fold_if(m, denom, acc, four[0][0], four[0][1], four[0][2], four[0][3])
    m, denom, acc = _fold_if(m, denom, acc, four[1][0], four[1][1], four[1][2], four[1][3])
    m, denom, acc = _fold_if(m, denom, acc, four[2][0], four[2][1], four[2][2], four[2][3])
    return _fold_if(m, denom, acc, four[3][0], four[3][1], four[3][2], four[3][3])


@helper
def _fold_partials(acc_part_ptr, ml_part_ptr, req, heads, head_ok, n_chunks, max_chunks, N_Q_HEADS: tl.constexpr,
                   HEAD_DIM: tl.constexpr):
    """Request req's chunk partials for `heads` folded with `_merge_partial`, strictly in chunk order 0, 1, 2...
    - the prefill kernel's fold, in its order: the output [heads, D], bf16 values in fp32. The fold is a chain,
    but its loads are not: chunks are loaded four at a time, and the next four's loads are issued before the
    four before them are folded, so the chain waits on memory once, not once a group (H100, qwen3-4b heads, 64
    chunks at batch 32: 12.9 -> 7.6 us for four loads at a time against a load-then-fold loop)."""
    m = tl.full(heads.shape, float("-inf"), tl.float32)
    denom = tl.zeros(heads.shape, tl.float32)
    acc = tl.zeros([heads.shape[0], HEAD_DIM], tl.float32)
    ahead = _load_four(acc_part_ptr, ml_part_ptr, req, 0, n_chunks, heads, head_ok, max_chunks, N_Q_HEADS, HEAD_DIM)
    for c in range(4, n_chunks + 4, 4):
        four = ahead
        ahead = _load_four(acc_part_ptr, ml_part_ptr, req, c, n_chunks, heads, head_ok, max_chunks, N_Q_HEADS,
                           HEAD_DIM)
        m, denom, acc = _fold_four(m, denom, acc, four)
    return _merged_output(denom, acc).to(tl.float32)


@triton.jit
def split_kv_weighted_merge_kernel(acc_part_ptr, ml_part_ptr, seq_lens_ptr, chunk_size_ptr, out_ptr, max_chunks,
                                   N_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNKS_PAD: tl.constexpr):
    """Grid: (padded batch, q heads). TUNED's merge: request b's chunk partials for one q head loaded at once
    and combined in one step - out = sum_c 2^(m_c - M) acc_c / sum_c 2^(m_c - M) l_c, M the largest max - with
    no chain from chunk to chunk. Reduction order: two tl.sum trees over CHUNKS_PAD slots, so the bits follow
    the chunk count, which TUNED takes from the batch: not batch-invariant (PIN folds in chunk order, as its
    prefill does). Padding rows (len 0) write zeros. A kernel of its own, with a program a q head: done by the
    last partial program, one head after another, it cost TUNED's step at (1, 8k) ~0.2 ms (H200, qwen3-4b)."""
    _after_previous_kernel()
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + req)
    c = tl.arange(0, CHUNKS_PAD)
    valid = c < tl.cdiv(seq_len, tl.load(chunk_size_ptr))
    row = (req * max_chunks + c) * N_Q_HEADS + head
    m_c = tl.load(ml_part_ptr + 2 * row, mask=valid, other=float("-inf"))
    weight = tl.exp2(m_c - tl.maximum(tl.max(m_c, axis=0), -1e30))  # 0 for the missing chunks
    denom = tl.sum(tl.load(ml_part_ptr + 2 * row + 1, mask=valid, other=0.0) * weight, axis=0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(acc_part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.maximum(denom, 1e-30)
    tl.store(out_ptr + (req * N_Q_HEADS + head) * HEAD_DIM + d, out.to(tl.bfloat16))


@helper
def _merge_when_last(counts_ptr, acc_part_ptr, ml_part_ptr, out_ptr, req, kv_head, n_chunks, max_chunks,
                     N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     MERGE_HEADS: tl.constexpr):
    """Count this program's partials in for its (request, kv head) - once all its threads have stored them, by
    one device-scope atomic add with release and acquire - and, in the program that counts last (whose acquire
    makes every other program's partials visible), fold the kv head's q heads (`_fold_partials`) and reset the
    count for the next launch. Which program folds changes no bit: the partials and their order are the same.
    The merge kernel this replaces cost a launch a layer: qwen3-4b TPOT at b1, 1k context, PIN 3.25-3.34 ->
    3.24-3.27 ms (H200, alternated in one session; 3.16-3.28 with `LAUNCH`)."""
    count = counts_ptr + req * N_KV_HEADS + kv_head
    tl.debug_barrier()
    if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == tl.minimum(tl.num_programs(1), n_chunks) - 1:
        tl.store(count, 0)
        GROUP: tl.constexpr = N_Q_HEADS // N_KV_HEADS
        g = tl.arange(0, MERGE_HEADS)
        out = _fold_partials(acc_part_ptr, ml_part_ptr, req.to(tl.int64), kv_head * GROUP + g, g < GROUP,
                             n_chunks, max_chunks, N_Q_HEADS, HEAD_DIM)
        _store_heads(out_ptr, req, kv_head, out, GROUP, N_Q_HEADS, HEAD_DIM)


@triton.jit
def split_kv_fold_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_tiles, v_tiles, block_table_ptr, slot_idx_ptr,
                         seq_lens_ptr, chunk_size_ptr, out_ptr, qk_scale, bt_stride,
                         N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         GROUP_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid: (padded batch, kv heads). Split-KV with one program per (request, kv head): the program computes
    each of its request's chunks in turn and folds them itself (`_fold_chunks`, the prefill kernel's loop), so
    no partial goes to memory and no merge kernel runs. Reduction order: exactly split-KV's - the same chunks,
    the same partials, the same fold in chunk order - so the bits equal the partial programs'; only where
    the partials live (registers, not memory) differs. Padding rows (len 0) write zeros."""
    _after_previous_kernel()
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + req)
    q, off, ok = _decode_q_tile(q_ptr, req, kv_head, N_Q_HEADS // N_KV_HEADS, GROUP_PAD, N_Q_HEADS, HEAD_DIM)
    bt_row = block_table_ptr + tl.load(slot_idx_ptr + req).to(tl.int64) * bt_stride
    kv = (k_cache_ptr, v_cache_ptr, k_tiles, v_tiles)  # see `_kv_block`
    q_pos = tl.full([GROUP_PAD], 0, tl.int32) + seq_len - 1  # a decode query sees every key of its request
    out = _fold_chunks(_mma_in(q), kv, bt_row, kv_head, seq_len, tl.load(chunk_size_ptr),
                       q_pos, qk_scale, N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, CAUSAL=False)
    tl.store(out_ptr + off, tl.where(seq_len > 0, out.to(tl.float32), 0.0).to(tl.bfloat16), mask=ok)


def _decode_group_pad(n_q, n_kv):
    return max(16, _next_pow2(n_q // n_kv))


SPLIT_KV_WAVE = 4  # split-KV partial programs an SM holds at once (H200: a grid just past 4 per SM runs a
# second, almost empty wave - qwen3-4b heads, PIN's chunks at 8k, us a layer: batch 16 with 4 programs a
# request and kv head 140.6, with 5 169.0; batch 24 with 2 205.0, with 3 264.3)
FOLD_FROM = 1.9  # (request, kv head) pairs an SM from which PIN's one program a pair folds its own chunks:
# there its many partials' round trip through memory (43 a request at 8k) costs more than a second program gains
# (H200, qwen3-4b heads, us a layer, fold / two programs: batch 32 = 1.94 pairs an SM, PIN (32, 8k) 269.6 /
# 282.1, (32, 1k) 39.9 / 43.4; batch 24 = 1.45, PIN (24, 8k) 246.7 / 213.1). TUNED's chunks are few at these
# batches (5 at batch 32) and it keeps two programs: (32, 8k) 262.1 against 269.2 folded, (32, 1k) 41.4 / 39.8.


def split_kv_chunk_programs(batch: int, n_kv: int, max_chunks: int, in_chunk_order: bool = True) -> int:
    """Programs per (request, kv head) along the split-KV grid's chunk axis; 1 means the fold kernel. Which
    program computes a chunk, and whether its partial is folded in registers or by the merge kernel, changes no
    bit, so this is free to follow the batch - but not the context: a CUDA graph freezes the grid for a padded
    batch whatever its lengths. As many programs as fill the GPU in one wave (SPLIT_KV_WAVE), at most one per
    possible chunk; programs past a request's last chunk exit at once. In chunk order (PIN), from FOLD_FROM
    (request, kv head) pairs an SM (batch 32 of Qwen3's 8 kv heads on 132 SMs) one program a pair folds its own
    chunks: no partials in memory, no merge launch; TUNED folds once a wave holds one program a pair. H200, qwen3-4b heads, us a layer, PIN / TUNED's chunks, the wave rule against 8
    programs an SM (the rule before it): (1, 8k) 17.6 / 13.1 against 18.2 / 13.1, (4, 8k) 46.2 / 40.8 against
    50.8 / 43.0, (16, 8k) 140.0 / 136.1 against 152.7 / 140.7, (8, 1k) 14.5 / 13.5 against 15.0 / 16.7; the
    worst, (2, 1k), 12.9 / 10.4 against 12.4 / 10.1. The interpreter, which pays per program, folds."""
    if INTERPRET:
        return 1
    sms = sm_count(torch.cuda.current_device())
    if in_chunk_order and batch * n_kv >= FOLD_FROM * sms:
        return 1
    return max(1, min(max_chunks, SPLIT_KV_WAVE * sms // (batch * n_kv)))


def _weighted_merge_pays(batch: int, n_kv: int) -> bool:
    """Whether TUNED merges by weighted sum: where each request gets many chunks (TUNED gives batch * kv heads
    <= 32 at least 33), whose in-order fold is a long chain. H200, qwen3-4b heads, TUNED's chunks, partials +
    merge us, in order / weighted: (1, 8k) 64 chunks 17.0 / 12.7 (partials alone 9.6; SDPA 11.0), (1, 4k) 14.9
    / 10.4, (2, 8k) 32.8 / 26.9, (4, 8k) 33 chunks 46.1 / 43.1; (8, 8k) 16 chunks 73.7 / 73.0, (16, 2k) 8
    chunks 43.4 / 44.0, (32, 8k) 5 chunks 262.3 / 264.0 - there the chain is short and the fold keeps it. (Measured
    with the in-order fold in a merge kernel of its own; against the last program folding, not re-measured.)"""
    return batch * n_kv <= 32


class SplitKvWorkspace(NamedTuple):
    """Where split-KV's chunk partials wait for the merge: acc [B, max_chunks, Hq, D] and (m, l) [B, max_chunks,
    Hq, 2], fp32 (max_chunks bounds the chunk axis), and counts [B, kv heads], int32, each (request, kv head)'s
    partials stored so far - zero between launches. Only launches with more than one program per (request, kv
    head) use it; the fold kernel keeps its partials in registers."""
    acc: torch.Tensor
    ml: torch.Tensor
    counts: torch.Tensor

    @staticmethod
    def allocate(batch: int, max_chunks: int, n_q: int, n_kv: int, head_dim: int, device) -> "SplitKvWorkspace":
        return SplitKvWorkspace(torch.empty(batch, max_chunks, n_q, head_dim, device=device),
                                torch.empty(batch, max_chunks, n_q, 2, device=device),
                                torch.zeros(batch, n_kv, dtype=torch.int32, device=device))

    def rows(self, batch: int) -> "SplitKvWorkspace":
        return SplitKvWorkspace(self.acc[:batch], self.ml[:batch], self.counts[:batch])


def split_kv_decode(q, k_cache, v_cache, block_table, slot_idx, seq_lens, chunk_size, workspace, out, page_size,
                    chunk_programs=None, in_chunk_order=True, prefetch=None):
    """q [B, Hq, D]; chunk_size a 1-element int32 device tensor; workspace a `SplitKvWorkspace` (its chunk axis
    sets max_chunks). chunk_programs: programs per (request, kv head), default `split_kv_chunk_programs`; 1
    takes the fold kernel. Every choice gives the same bits. in_chunk_order=False (TUNED): where it pays, the
    partials are merged by weighted sum (`split_kv_weighted_merge_kernel`) instead - faster, other bits.
    prefetch: a 1-element int32 device tensor, not 0 where the partial programs ask L2 for their K/V first."""
    batch, n_q, head_dim = q.shape
    n_kv = k_cache.shape[1]
    acc_part, ml_part, counts = workspace
    max_chunks = acc_part.shape[1]
    programs = chunk_programs or split_kv_chunk_programs(batch, n_kv, max_chunks, in_chunk_order)
    k_tiles, v_tiles = kv_tiles(k_cache, v_cache, page_size, ATTN_BLOCK_N)
    if programs == 1:
        split_kv_fold_kernel[(batch, n_kv)](
            q, k_cache, v_cache, k_tiles, v_tiles, block_table, slot_idx, seq_lens, chunk_size, out,
            _qk_scale(head_dim), block_table.stride(0), N_Q_HEADS=n_q, N_KV_HEADS=n_kv, HEAD_DIM=head_dim,
            GROUP_PAD=_decode_group_pad(n_q, n_kv), PAGE=page_size, BLOCK_N=ATTN_BLOCK_N, num_warps=2,
            num_stages=3, enable_fp_fusion=False, **LAUNCH)
        return out
    if acc_part.shape[0] < batch or counts.shape[1] < n_kv:
        raise ValueError(f"split-KV workspace holds {acc_part.shape[0]} rows of {counts.shape[1]} kv heads, the "
                         f"launch needs {batch} of {n_kv}")
    weighted = not in_chunk_order and _weighted_merge_pays(batch, n_kv)
    early = prefetch is not None and not INTERPRET and batch <= KV_PREFETCH_MAX_TOKENS
    split_kv_partial_kernel[(batch, programs, n_kv)](
        q, k_cache, v_cache, k_tiles, v_tiles, block_table, slot_idx, seq_lens, chunk_size, acc_part, ml_part,
        counts, out, _qk_scale(head_dim), block_table.stride(0), max_chunks, prefetch if early else chunk_size,
        N_Q_HEADS=n_q, N_KV_HEADS=n_kv,
        HEAD_DIM=head_dim, GROUP_PAD=_decode_group_pad(n_q, n_kv), PAGE=page_size, BLOCK_N=ATTN_BLOCK_N,
        MERGE=not weighted, MERGE_HEADS=_next_pow2(n_q // n_kv), PREFETCH=early,
        num_warps=2, num_stages=3, enable_fp_fusion=False, **LAUNCH)
    if weighted:
        split_kv_weighted_merge_kernel[(batch, n_q)](acc_part, ml_part, seq_lens, chunk_size, out, max_chunks,
                                                     N_Q_HEADS=n_q, HEAD_DIM=head_dim,
                                                     CHUNKS_PAD=_next_pow2(max_chunks), num_warps=2, **LAUNCH)
    return out


def split_kv_decode_ref(q, k_cache, v_cache, block_table, slot_idx, seq_lens, chunk_size, page_size):
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        if n:
            k, v = _gather_kv(k_cache, v_cache, block_table[int(slot_idx[b])], n, page_size)
            out[b] = _merge_chunks_ref(q[b:b + 1].float(), k, v, int(chunk_size))[0].to(q.dtype)
    return out


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Decode attention, path 2: NonPartition (one pass over the whole KV)
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
@triton.jit
def nonpartition_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_tiles, v_tiles, block_table_ptr, slot_idx_ptr,
                               seq_lens_ptr, out_ptr, qk_scale, bt_stride,
                               N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                               GROUP_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid: (padded batch, kv heads). One program attends all of request b's keys for the q heads of one kv
    head in a single online-softmax pass (no bf16 partials). Reduction order: key blocks in ascending order,
    a function of the request alone - invariant by itself, but *different* from split-KV's, so a request
    whose batch grows past the switch-over point changes bits. Padding rows write zeros."""
    _after_previous_kernel()
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + req)
    GROUP: tl.constexpr = N_Q_HEADS // N_KV_HEADS
    q, off, ok = _decode_q_tile(q_ptr, req, kv_head, GROUP, GROUP_PAD, N_Q_HEADS, HEAD_DIM)
    bt_row = block_table_ptr + tl.load(slot_idx_ptr + req).to(tl.int64) * bt_stride
    kv = (k_cache_ptr, v_cache_ptr, k_tiles, v_tiles)  # see `_kv_block`
    acc, m_i, l_i = _attend(_mma_in(q), kv, bt_row, kv_head, 0, seq_len, 0, qk_scale,
                            N_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, CAUSAL=False)
    out = tl.where(seq_len > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(out_ptr + off, _round_to_bf16(out), mask=ok)


def nonpartition_decode(q, k_cache, v_cache, block_table, slot_idx, seq_lens, out, page_size):
    batch, n_q, head_dim = q.shape
    n_kv = k_cache.shape[1]
    k_tiles, v_tiles = kv_tiles(k_cache, v_cache, page_size, ATTN_BLOCK_N)
    nonpartition_decode_kernel[(batch, n_kv)](
        q, k_cache, v_cache, k_tiles, v_tiles, block_table, slot_idx, seq_lens, out, _qk_scale(head_dim),
        block_table.stride(0), N_Q_HEADS=n_q, N_KV_HEADS=n_kv, HEAD_DIM=head_dim,
        GROUP_PAD=_decode_group_pad(n_q, n_kv), PAGE=page_size, BLOCK_N=ATTN_BLOCK_N, enable_fp_fusion=False, **LAUNCH)
    return out


def nonpartition_decode_ref(q, k_cache, v_cache, block_table, slot_idx, seq_lens, page_size):
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        if n:
            k, v = _gather_kv(k_cache, v_cache, block_table[int(slot_idx[b])], n, page_size)
            out[b] = _softmax_pv(q[b:b + 1].float(), k, v)[0][0].to(q.dtype)
    return out


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# The batch-invariant GEMM (PIN policy)
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
class MatmulConfig(NamedTuple):
    """How `matmul_kernel` runs for one weight. segments fixes every output's K order (the bits); the tile
    sizes (block_k too, see the kernel), warps, stages, split and how tiles are loaded only spread the work."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    segments: int  # K cut into this many equal segments, summed in order
    split: int  # 1: one program adds its segments; == segments: one program per segment + split_k_sum_kernel
    tma: bool  # load tiles with Hopper's tensor memory accelerator (tensor descriptors), not pointer loads


GEMM_GROUP_N = 8  # N tiles whose M tiles are launched together (their A rows and W tiles stay in L2)


@helper
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """(M tile, N tile) of program pid: GROUP_N N tiles at a time, each group's M tiles side by side. With one
    M tile (M <= BLOCK_M, every decode step up to 64 rows) it is N tile pid."""
    per_group = GROUP_N * tl.cdiv(M, BLOCK_M)
    first_n = pid // per_group * GROUP_N
    group = tl.minimum(tl.cdiv(N, BLOCK_N) - first_n, GROUP_N)
    return pid % per_group // group, first_n + pid % per_group % group


@helper
def _a_tile(a, m0, k, k_hi, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr):
    """A's [BLOCK_M, BLOCK_K] tile at (m0, k), zeros past M and k_hi. With TMA, a is a tensor descriptor whose copy
    fills zeros past the tensor's edge; a block never crosses k_hi inside K (segments are whole blocks), so the
    tile is the pointer path's, value for value."""
    if TMA:
        tile = a.load([m0, k])
    else:
        rm = m0 + tl.arange(0, BLOCK_M)
        rk = k + tl.arange(0, BLOCK_K)
        tile = tl.load(a + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < k_hi),
                       other=0.0)
    return tile


@helper
def _w_tile(w, n0, k, k_hi, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr):
    """W^T's [BLOCK_K, BLOCK_N] tile at (k, n0), zeros past N (W's rows) and k_hi, as `_a_tile` loads."""
    if TMA:
        tile = w.load([n0, k]).T
    else:
        rn = n0 + tl.arange(0, BLOCK_N)
        rk = k + tl.arange(0, BLOCK_K)
        tile = tl.load(w + rn.to(tl.int64)[None, :] * K + rk[:, None], mask=(rk[:, None] < k_hi) & (rn[None, :] < N),
                       other=0.0)
    return tile


@triton.jit
def matmul_kernel(a, w, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SEGMENTS: tl.constexpr, SPLIT: tl.constexpr, GROUP_N: tl.constexpr, TMA: tl.constexpr,
                  SILU_MUL: tl.constexpr):
    """C[M, N] = A[M, K] @ W[N, K]^T (W in HF's [out, in] layout), bf16 in and out, fp32 accumulation.

    Reduction order of every output element: K is cut into SEGMENTS equal segments (whole BLOCK_K blocks);
    each segment is reduced from zero, low K -> high, onto one fp32 accumulator - a tl.dot is a chain of
    tensor-core steps of 16 K each (wgmma for 64+ rows, mma.sync for 16), one K at a time in the interpreter,
    so a BLOCK_K of 128 adds exactly what two of 64 add; then the segment sums are added in order:
    ((s0 + s1) + s2) + ... The caller takes SEGMENTS from the weight alone (never from M or the phase), so this
    order is the same whatever M is, wherever the row sits, and in every phase (prefill, decode, mixed):
    batch- and path-invariant; the GEMM seam test compares every tile config the engine uses, 16 to 256 rows,
    64- and 128-wide K steps. (A split-K whose count followed M - as cuBLAS's does - would not be.) Under
    tensor parallelism each rank owns whole segments of K and the ranks' segment sums are added in this same
    order, so the bits do not depend on the number of GPUs either (nano_bi.py, section 7).

    Grid: (ceil(M / BLOCK_M) * ceil(N / BLOCK_N), SPLIT), tiles in `_grouped_tile` order. SPLIT == 1: each
    program reduces all segments and adds them itself. SPLIT == SEGMENTS (for narrow outputs, where N tiles
    alone give too few programs): program (t, s) reduces segment s and stores it in fp32, and
    `split_k_sum_kernel` adds them in the same order - the same bits, more programs. a, w: pointers, or with
    TMA tensor descriptors of [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K] blocks - the same tiles either way.

    SILU_MUL (the MLP's gate_up_proj, SEGMENTS == 1): W is [2N, K], gate rows then up rows, and each program
    reduces the gate tile and the up tile at the same columns side by side, each in the order above, then stores
    C = silu(gate) * up through `_silu_mul` - the bits of storing both halves and running silu_and_mul_kernel,
    without the [M, 2N] round trip and its launch.
    """
    _after_previous_kernel()
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_N)
    seg_len = tl.cdiv(tl.cdiv(K, BLOCK_K), SEGMENTS) * BLOCK_K
    first = 0 if SPLIT == 1 else tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = 2 * N if SILU_MUL else N
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    total_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for seg in range(first, first + SEGMENTS // SPLIT):
        k_lo = seg * seg_len
        k_hi = tl.minimum(k_lo + seg_len, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            a_tile = _mma_in(_a_tile(a, pid_m * BLOCK_M, k, k_hi, M, K, BLOCK_M, BLOCK_K, TMA))
            acc = tl.dot(a_tile, _mma_in(_w_tile(w, pid_n * BLOCK_N, k, k_hi, w_rows, K, BLOCK_N, BLOCK_K, TMA)), acc)
            if SILU_MUL:
                up = tl.dot(a_tile, _mma_in(_w_tile(w, N + pid_n * BLOCK_N, k, k_hi, w_rows, K, BLOCK_N, BLOCK_K,
                                                    TMA)), up)
        total += acc
        total_up += up
    out = rm.to(tl.int64)[:, None] * N + rn[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    if SILU_MUL:
        tl.store(c_ptr + out, _silu_mul(_round_to_bf16(total).to(tl.float32), _round_to_bf16(total_up).to(tl.float32)),
                 mask=ok)
    elif SPLIT == 1:
        tl.store(c_ptr + out, _round_to_bf16(total), mask=ok)
    else:
        tl.store(c_ptr + tl.program_id(1).to(tl.int64) * M * N + out, total, mask=ok)


@triton.jit
def split_k_sum_kernel(part_ptr, c_ptr, numel, SEGMENTS: tl.constexpr, BLOCK: tl.constexpr):
    """Grid: (ceil(M * N / BLOCK),). C = bf16(((s0 + s1) + s2) + ...): the segment sums in a fixed order."""
    _after_previous_kernel()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    tl.store(c_ptr + offs, _round_to_bf16(_segment_sums_in_order(part_ptr, offs, ok, numel, SEGMENTS)), mask=ok)


def matmul(a, w, config: MatmulConfig):
    """a [M, K] @ w[N, K]^T, bf16."""
    if config.split > 1:
        return sum_segments(matmul_segments(a, w, config))
    return _launch_matmul(a, w, torch.empty(a.shape[0], w.shape[0], dtype=a.dtype, device=a.device), config)


def matmul_row_ranges(a, w, launches: tuple[tuple[int, MatmulConfig], ...]):
    """a [M, K] @ w[N, K]^T, bf16, its rows cut into consecutive ranges of (rows, config) - one launch each, into
    one output. Tiles are speed, never bits (`matmul_kernel`), so a row's bits are the same in every range."""
    if len(launches) == 1:  # no slicing: a launch's host time is what a short prefill waits for
        return matmul(a, w, launches[0][1])
    out = torch.empty(a.shape[0], w.shape[0], dtype=a.dtype, device=a.device)
    lo = 0
    for rows, config in launches:
        if rows:
            _launch_matmul(a[lo:lo + rows], w, out[lo:lo + rows], config)
        lo += rows
    return out


def matmul_segments(a, w, config: MatmulConfig):
    """The fp32 sum of each K segment, unadded: [segments, M, N], one program per segment (whatever
    config.split says). Tensor parallelism gathers these from the ranks that own the segments; `sum_segments`
    or the RMSNorm that follows (`rms_norm`) adds them."""
    config = config._replace(split=config.segments)
    parts = torch.empty(config.segments, a.shape[0], w.shape[0], dtype=torch.float32, device=a.device)
    return _launch_matmul(a, w, parts, config)


def matmul_silu_and_mul(a, gate_up, config: MatmulConfig):
    """silu(a @ gate^T) * (a @ up^T) for gate_up = [gate; up] [2N, K]: bf16 [M, N], the bits of `matmul` then
    `silu_and_mul`, in one launch."""
    assert config.segments == config.split == 1, "the epilogue needs each program's whole K"
    out = torch.empty(a.shape[0], gate_up.shape[0] // 2, dtype=a.dtype, device=a.device)
    return _launch_matmul(a, gate_up, out, config, silu_mul=True)


def _launch_matmul(a, w, out, c: MatmulConfig, silu_mul: bool = False):
    assert a.is_contiguous() and w.is_contiguous(), "the kernel assumes row stride = K"
    m, k = a.shape
    n = out.shape[-1]
    grid = (_cdiv(m, c.block_m) * _cdiv(n, c.block_n), c.split)
    tma = c.tma and (k * a.element_size()) % 16 == 0 and a.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    if tma:  # the copy engine needs 16-byte aligned rows; other shapes take the pointer loads (the same tiles)
        a = TensorDescriptor.from_tensor(a, [c.block_m, c.block_k])
        w = TensorDescriptor.from_tensor(w, [c.block_n, c.block_k])
    matmul_kernel[grid](a, w, out, m, n, k, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                        SEGMENTS=c.segments, SPLIT=c.split, GROUP_N=GEMM_GROUP_N, TMA=tma, SILU_MUL=silu_mul,
                        num_warps=c.num_warps, num_stages=c.num_stages, **LAUNCH)
    return out


def sum_segments(parts):
    """[S, M, N] fp32 -> bf16 [M, N]: ((s0 + s1) + s2) + ..., the order matmul_kernel adds segments in."""
    segments, m, n = parts.shape
    c = torch.empty(m, n, dtype=torch.bfloat16, device=parts.device)
    split_k_sum_kernel[(_cdiv(m * n, 1024),)](parts, c, m * n, SEGMENTS=segments, BLOCK=1024, **LAUNCH)
    return c


def sum_segments_ref(parts):
    total = parts[0]
    for s in range(1, parts.shape[0]):
        total = total + parts[s]
    return total.to(torch.bfloat16)


def matmul_ref(a, w):
    return (a.float() @ w.float().T).to(a.dtype)


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Logprobs: each row's logsumexp over the vocabulary, and its top-K tokens
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# A token's logprob is logit / T - logsumexp(logits / T). Scoring asks for it at every prompt row, and a
# vocabulary-wide fp32 log-softmax is 0.6 GB per 1,024 rows of Qwen3's 151,936 tokens (an int64 top-K sort key
# per token another 1.2 GB): these kernels read the bf16 logits once or twice and keep a row's logsumexp and the
# logprobs asked for, plus K keys per chunk of the row for the top-K. All are row-local: a row's programs never
# read another row.
LSE_BLOCK = 1024  # columns per step on the GPU (8 per thread at 4 warps)
LSE_SPLITS = 16  # programs per row on the GPU, whatever the batch (H200, us at 1 / 1,024 rows: 16 -> 25 / 333,
# 32 -> 21 / 337, 64 -> 57 / 497, 128 -> 36 / 828; one program a row took 171 at batch 1)
TOP_K_CHUNK = 4096  # columns per top-K program on the GPU up to K = 8 (38 programs a row at Qwen3's vocabulary;
# H200, 1,024 rows, us with the torch.topk over the keys, K = 8 / 2: 2,048 columns 376 / 144, 4,096 320 / 124,
# 1,024 455 / 194), and 2,048 for a wider K (`_top_k_chunk`)
TOP_K_MAX = 256  # the widest per-chunk top-K; a larger k takes every token's key (the same selection)
TOP_K_BY_MAX = 32  # up to this K a chunk's top-K is K max-reductions, not a bitonic network (H200, us at 1,024
# rows, bitonic -> by max: K = 2: 190 -> 127, 8: 833 -> 293, 16: 1,117 -> 518, 32: 1,342 -> 964)
LOGPROB_IDS = 64  # tokens per step when a row's logprobs are gathered


@triton.jit
def logsumexp_partial_kernel(logits_ptr, temperature_ptr, keep_ptr, part_max_ptr, part_sum_ptr, n_rows, vocab,
                             split_len, HAS_TEMPERATURE: tl.constexpr, HAS_KEEP: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK: tl.constexpr):
    """Grid: (ceil(rows / ROWS), splits). Split s of row r - columns [s * split_len, (s + 1) * split_len) - gives
    its max m and sum of exp(x - m), x = fp32(logits[r, j]) / temperature[r] (or 1) over the kept j (keep
    [rows, vocab] bool, or every j); an all-masked split gives (-inf, 0).

    Reduction: two passes over the split in BLOCK-wide column steps, the same steps for every row: each lane's
    running max, then each lane's running sum; tl.max / tl.sum fold the BLOCK lanes at the end. The order
    depends on `vocab`, the split count and BLOCK alone, so it is batch-invariant."""
    _after_previous_kernel()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    lo = tl.program_id(1) * split_len
    end = tl.minimum(lo + split_len, vocab)
    cols = tl.arange(0, BLOCK)
    t = _temperature(temperature_ptr, rows, n_rows, HAS_TEMPERATURE)
    top = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    for start in range(lo, end, BLOCK):
        offs, mask = _row_tile(rows, start + cols, n_rows, vocab, end)
        top = tl.maximum(top, _scaled_logits(logits_ptr, keep_ptr, offs, mask, t, HAS_KEEP))
    split_max = tl.max(top, axis=1)
    shift = tl.where(split_max == float("-inf"), 0.0, split_max)  # exp(-inf - 0) = 0, never -inf - -inf
    total = tl.zeros([ROWS, BLOCK], tl.float32)
    for start in range(lo, end, BLOCK):
        offs, mask = _row_tile(rows, start + cols, n_rows, vocab, end)
        total += tl.exp(_scaled_logits(logits_ptr, keep_ptr, offs, mask, t, HAS_KEEP) - shift[:, None])
    out = rows * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_max_ptr + out, split_max, mask=rows < n_rows)
    tl.store(part_sum_ptr + out, tl.sum(total, axis=1), mask=rows < n_rows)


@triton.jit
def token_logprobs_kernel(part_max_ptr, part_sum_ptr, logits_ptr, ids_ptr, temperature_ptr, keep_ptr, lse_ptr,
                          out_ptr, n_rows, vocab, n_ids, HAS_TEMPERATURE: tl.constexpr, HAS_KEEP: tl.constexpr,
                          ROWS: tl.constexpr, SPLITS: tl.constexpr, IDS: tl.constexpr):
    """Grid: (ceil(rows / ROWS),). Merges each row's SPLITS partials - lse = M + log(sum_s sum_s * exp(m_s - M)),
    M = max_s m_s: one tl.sum in a fixed order - then gives each of the row's n_ids tokens its logprob
    fp32(logit) / T - lse (-inf where not kept), IDS tokens at a time. Row-local, no reduction across rows."""
    _after_previous_kernel()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * SPLITS + tl.arange(0, SPLITS)[None, :]
    m = tl.load(part_max_ptr + offs, mask=(rows < n_rows)[:, None], other=0.0)
    total = tl.load(part_sum_ptr + offs, mask=(rows < n_rows)[:, None], other=1.0)
    row_max = tl.max(m, axis=1)
    lse = row_max + tl.log(tl.sum(total * tl.exp(m - row_max[:, None]), axis=1))
    tl.store(lse_ptr + rows, lse, mask=rows < n_rows)
    t = _temperature(temperature_ptr, rows, n_rows, HAS_TEMPERATURE)
    for first in range(0, n_ids, IDS):
        id_offs, id_mask = _row_tile(rows, first + tl.arange(0, IDS), n_rows, n_ids, n_ids)
        ids = tl.load(ids_ptr + id_offs, mask=id_mask, other=0)
        logit_offs = rows.to(tl.int64)[:, None] * vocab + ids
        tl.store(out_ptr + id_offs, _scaled_logits(logits_ptr, keep_ptr, logit_offs, id_mask, t, HAS_KEEP)
                 - lse[:, None], mask=id_mask)


@helper
def _row_tile(rows, cols, n_rows, width, end):
    """Offsets into a [rows, width] row-major tensor of a [ROWS, len(cols)] tile, and its mask: real rows,
    columns below `end`."""
    return rows.to(tl.int64)[:, None] * width + cols[None, :], (rows < n_rows)[:, None] & (cols < end)[None, :]


@helper
def _temperature(temperature_ptr, rows, n_rows, HAS_TEMPERATURE: tl.constexpr):
    """Each row's temperature as a [ROWS, 1] fp32 tile (1 without a temperature tensor)."""
    if HAS_TEMPERATURE:
        return tl.load(temperature_ptr + rows, mask=rows < n_rows, other=1.0)[:, None]
    return tl.full([rows.shape[0], 1], 1.0, tl.float32)


@helper
def _scaled_logits(logits_ptr, keep_ptr, offs, mask, t, HAS_KEEP: tl.constexpr):
    """fp32 logits / T at offs (a tile of the [rows, vocab] logits): -inf where masked or where keep says no."""
    x = tl.div_rn(tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32), t)
    if HAS_KEEP:
        mask &= tl.load(keep_ptr + offs, mask=mask, other=0) != 0
    return tl.where(mask, x, float("-inf"))


def token_logprobs(logits, ids, temperature=None, keep=None):
    """(fp32 logprobs [rows, n] of tokens ids [rows, n], fp32 logsumexp [rows]) of contiguous bf16 logits
    [rows, vocab], divided by temperature (fp32 [rows]) and restricted to the kept tokens (bool [rows, vocab])
    when given: two launches, whatever n."""
    (rows, vocab), n_ids = logits.shape, ids.shape[1]
    splits, block = (1, _next_pow2(vocab)) if INTERPRET else (LSE_SPLITS, LSE_BLOCK)
    part_max, part_sum = torch.empty(2, rows, splits, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    out = torch.empty(rows, n_ids, dtype=torch.float32, device=logits.device)
    tile, flags = _tile_rows(rows), dict(HAS_TEMPERATURE=temperature is not None, HAS_KEEP=keep is not None)
    temperature, keep = (logits if x is None else x for x in (temperature, keep))
    logsumexp_partial_kernel[(_cdiv(rows, tile), splits)](
        logits, temperature, keep, part_max, part_sum, rows, vocab, _cdiv(vocab, splits), **flags,
        ROWS=tile, BLOCK=block, **LAUNCH)
    token_logprobs_kernel[(_cdiv(rows, tile),)](
        part_max, part_sum, logits, ids.contiguous(), temperature, keep, lse, out, rows, vocab, n_ids, **flags,
        ROWS=tile, SPLITS=splits, IDS=min(_next_pow2(max(n_ids, 1)), LOGPROB_IDS), **LAUNCH)
    return out, lse


def token_logprobs_ref(logits, ids, temperature=None, keep=None):
    x = logits.float() / (1.0 if temperature is None else temperature[:, None])
    x = x if keep is None else x.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(x, dim=-1)
    return x.gather(-1, ids) - lse[:, None], lse


if INTERPRET:
    def _top_k_of(keys, K, BY_MAX):
        """The K largest of each row of an integer tile, best first: one numpy sort, where tl.topk's bitonic
        network through the interpreter took ~0.2 s a tile. The keys are unique, so both select the same K."""
        import numpy as np
        from triton.runtime.interpreter import TensorHandle

        best = np.ascontiguousarray(np.sort(keys.handle.data, axis=-1)[:, ::-1][:, :K])
        return tl.tensor(TensorHandle(best, keys.dtype), tl.block_type(keys.dtype, [keys.shape[0], K]))
else:
    @triton.jit
    def _top_k_of(keys, K: tl.constexpr, BY_MAX: tl.constexpr):
        """The K largest of each row of an int32 tile of unique keys, best first: BY_MAX, K rounds of taking the
        row's max and striking it out; else a bitonic top-K."""
        if not BY_MAX:
            return tl.topk(keys, K)
        slot = tl.arange(0, K)[None, :]
        best = tl.full([keys.shape[0], K], -2147483648, tl.int32)
        for i in tl.static_range(K):
            top = tl.max(keys, axis=1)
            best = tl.where(slot == i, top[:, None], best)
            keys = tl.where(keys == top[:, None], -2147483648, keys)
        return best


@triton.jit
def top_k_keys_kernel(logits_bits_ptr, keys_ptr, n_rows, vocab, n_chunks,
                      K: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr,
                      BY_MAX: tl.constexpr):
    """Grid: (ceil(rows / ROWS), ceil(vocab / CHUNK)). Each program ranks its CHUNK of each row's bf16 logits
    (read as int16 bits) and writes the K best as the row's int64 sort keys - the bits made order-preserving,
    times 2^32, plus vocab-1-id, so that equal logits rank the lower id first - best first.

    Inside a chunk the same order fits in int32 (ordered bits * CHUNK + CHUNK-1-offset: 28 bits at 4,096), which
    halves the registers and the compares of the bitonic top-K. No arithmetic, only a selection among unique
    keys: whatever the order of comparisons, a row's top-K is the same set, so this is batch-invariant by
    construction; the row's best K are among its chunks' best K."""
    _after_previous_kernel()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, CHUNK)
    start = tl.program_id(1) * CHUNK
    mask = (rows < n_rows)[:, None] & (start + offs < vocab)[None, :]
    bits = tl.load(logits_bits_ptr + rows.to(tl.int64)[:, None] * vocab + (start + offs)[None, :], mask=mask, other=0)
    bits = bits.to(tl.int32)
    local = tl.where(bits < 0, -(bits & 0x7FFF), bits) * CHUNK + (CHUNK - 1 - offs)[None, :]
    best = _top_k_of(tl.where(mask, local, -2147483647), K, BY_MAX)  # a padding key ranks below every logit
    token = start + CHUNK - 1 - (best & (CHUNK - 1))
    keys = (best >> LOG2_CHUNK).to(tl.int64) * 4294967296 + (vocab - 1 - token)
    out = (rows.to(tl.int64)[:, None] * n_chunks + tl.program_id(1)) * K + tl.arange(0, K)[None, :]
    tl.store(keys_ptr + out, keys, mask=(rows < n_rows)[:, None])


def top_k_keys(logits, k):
    """int64 sort keys of each row of contiguous bf16 logits [rows, vocab] among which its k best lie: every
    chunk's K best (K = k rounded up to a power of two, >= 2), or beyond TOP_K_MAX (a bitonic network that wide
    would not fit in registers) every token's key. The row's k best are an ordinary topk of either; a key's
    token id is vocab - 1 - (key & 0xFFFFFFFF)."""
    rows, vocab = logits.shape
    padded_k = max(2, _next_pow2(k))  # tl.topk keeps a dimension only from K = 2
    if padded_k > TOP_K_MAX:
        return sort_keys(logits)
    chunk = _next_pow2(vocab) if INTERPRET else _top_k_chunk(padded_k)  # >= padded_k: k <= vocab, <= TOP_K_MAX
    tile, n_chunks = _tile_rows(rows), _cdiv(vocab, chunk)
    keys = torch.empty(rows, n_chunks * padded_k, dtype=torch.int64, device=logits.device)
    top_k_keys_kernel[(_cdiv(rows, tile), n_chunks)](logits.view(torch.int16), keys, rows, vocab, n_chunks,
                                                           K=padded_k, ROWS=tile, CHUNK=chunk,
                                                           LOG2_CHUNK=chunk.bit_length() - 1,
                                                           BY_MAX=padded_k <= TOP_K_BY_MAX, **LAUNCH)
    return keys


def _top_k_chunk(padded_k: int) -> int:
    """Columns per top-K program on the GPU: TOP_K_CHUNK up to K = 8, where it was measured faster; half of it
    beyond (a wider K at 4,096 columns was not measured). A launch knob: the selection is exact either way."""
    return TOP_K_CHUNK if padded_k <= 8 else TOP_K_CHUNK // 2


def sort_keys(logits):
    """Every token's sort key, as top_k_keys_kernel builds them: [rows, vocab] int64 (the reference)."""
    bits = logits.contiguous().view(torch.int16).to(torch.int64)
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits) * (1 << 32) + (logits.shape[-1] - 1 - ids)
