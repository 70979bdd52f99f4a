"""nano-bi: a single-file, batch-invariant inference engine for Qwen3, in Python + Triton.

Why do LLM outputs change with batch composition? Floating-point addition is not associative: (a + b) + c
and a + (b + c) can differ in the last bit, and a differing last bit can flip a near-tie argmax and send a
generation down another path. A request's bits therefore depend on the *order* of every reduction that
produced them. In a decode step three reductions take their order from the batch rather than the request:

  1. split-KV attention cuts each request's KV into chunks sized from the batch (its longest sequence, its size);
  2. a vendor GEMM picks its tiling (and split-K) from the number of rows, i.e. the batch size;
  3. the engine picks a different attention kernel (one-pass vs split) depending on the batch size;

and two more take it from the *path* that computes a token:

  4. prefill reduces a query's keys differently from decode, so a scoring pass disagrees with the sampler;
  5. chunked prefill, mixed steps and prefix-cache hits cut a prompt at places the scheduler chose.

nano-bi makes each one a visible, switchable choice (the NumericPolicy below) and proves the difference with
gates in test_nano_bi.py. Read this file top to bottom, in the order data flows: policy & constants ->
config -> weights -> tokenizer -> KV cache -> GEMM dispatch -> tensor parallelism I (a sum whose bits do not
depend on the number of GPUs) -> the model (prefill) -> decode & CUDA graphs -> the model runner -> sampling
-> requests & the page pool -> the engine -> the scheduler & LLM -> training (a trainer with the sampler's
bits, weights pushed in place) -> tensor parallelism II (worker processes) -> CLI -> appendix (synthetic
checkpoints, finding a model). The Triton kernels live in kernels.py, each beside its plain-torch reference.
"""
from __future__ import annotations

import argparse
import array
import atexit
import bisect
import dataclasses
import contextlib
import enum
import functools
import gc
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from typing import Callable, NamedTuple
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Client, Listener
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels  # sets TRITON_INTERPRET=1 before importing triton when there is no GPU

# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 1. Numeric policy and the constants it pins
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# TUNED is what a throughput-tuned engine does: every choice follows the batch and the step. PIN removes all
# five dependencies: the split-KV chunk size is keyed on the model's max context (192 tokens for Qwen3's 40960)
# and prefill reduces keys in the very same chunks, GEMMs reduce K in an order fixed by the weight, and decode
# always takes the split-KV path. PER_TOKEN is the oracle: every GEMM row is computed alone, so nothing can
# leak between rows (slow, for proofs only).


class NumericPolicy(enum.Enum):
    TUNED = "tuned"
    PIN = "pin"
    PER_TOKEN = "per-token"


class AttentionPath(enum.Enum):
    SPLIT_KV = "split-kv"
    NON_PARTITION = "non-partition"


PAGE_SIZE = 16 if kernels.INTERPRET else 128  # tokens per KV page. On the GPU each attention key block (64 or
#   128 keys) then lies in one page and is one TMA copy, pipelined ahead of the dots (H200, qwen3-4b heads, us a
#   layer, 16-key pages -> 128: 4k prefill TUNED 368 -> 338, PIN 545 -> 441; decode (8, 8k) PIN 81.5 -> 78.7,
#   (32, 8k) 274 -> 251). The interpreter's tiny models keep 16, so prefix-cache hits occur in prompts of tens.
CHUNK_FLOOR = 64  # no split-KV chunk is shorter (below ~64 keys a program does too little work), and every
#                  chunk is a whole number of these 64-key blocks, the kernels' key block: a part-filled last
#                  block per chunk cost PIN's prefill attention 20% (H100, 4k prompt: 1065 us at 160-key
#                  chunks, 889 at 192) and TUNED's decode 19% (H200, qwen3-4b, batch 32 at 8k: 17.5 ms a
#                  step with 129-key chunks, 14.7 with 192)
TUNED_MAX_CHUNKS = 64  # TUNED splits the batch's longest sequence into at most 64 chunks
TUNED_DECODE_CHUNKS = 1056  # ... and into fewer as the batch grows: about 8 chunks per SM of a 132-SM
#                            H100/H200 over the batch's requests and kv heads. H200, qwen3-4b heads, split-KV us a
#                            layer: (8, 8k) 73 with 512-key chunks, 90 with 128 (64 chunks), PIN's 192 85; (32, 8k)
#                            271 at 1664 (5 chunks), 316 at 128, PIN 300; (32, 1k) 46 at 256, 51 at 64, PIN 45
PIN_MAX_CHUNKS = 256  # PIN splits the model's max context into at most 256 chunks (40960 / 256 = 160 -> 192)
TUNED_SPLITKV_MAX_BATCH = 32  # TUNED switches to the one-pass kernel above this padded batch


@dataclass(frozen=True)
class SplitKvConstants:
    """The five constants above. Tests on tiny models scale them through the engine's constructor."""
    chunk_floor: int = CHUNK_FLOOR
    tuned_max_chunks: int = TUNED_MAX_CHUNKS
    tuned_decode_chunks: int = TUNED_DECODE_CHUNKS
    pin_max_chunks: int = PIN_MAX_CHUNKS
    tuned_splitkv_max_batch: int = TUNED_SPLITKV_MAX_BATCH


def split_chunk_size_for(basis: int, floor: int = CHUNK_FLOOR, max_chunks: int = TUNED_MAX_CHUNKS) -> int:
    """Chunk size for a split-KV decode whose longest sequence is `basis` tokens: ceil(basis / max_chunks),
    at least `floor` and rounded up to a multiple of it."""
    return -(-max(floor, -(-basis // max_chunks)) // floor) * floor


def tuned_chunk_size(longest: int, padded_batch: int, n_kv_heads: int, consts: SplitKvConstants) -> int:
    """TUNED's decode chunk: the longest sequence cut into as many chunks as give each (request, kv head)
    its share of ~tuned_decode_chunks chunks (at most tuned_max_chunks). It follows the batch twice: its
    longest sequence and its size."""
    chunks = -(-consts.tuned_decode_chunks // (padded_batch * n_kv_heads))
    return split_chunk_size_for(longest, consts.chunk_floor, max(1, min(consts.tuned_max_chunks, chunks)))


def pin_chunk_size(max_context: int, floor: int = CHUNK_FLOOR, max_chunks: int = PIN_MAX_CHUNKS) -> int:
    """PIN's chunk size: the same rule keyed on a process constant, so a request's chunk count is its own."""
    return split_chunk_size_for(max_context, floor, max_chunks)


def attention_path(padded_bs: int, policy: NumericPolicy,
                   max_splitkv_batch: int = TUNED_SPLITKV_MAX_BATCH) -> AttentionPath:
    """TUNED takes the one-pass kernel for big batches (enough parallelism without splitting); PIN never does."""
    if policy is NumericPolicy.TUNED and padded_bs > max_splitkv_batch:
        return AttentionPath.NON_PARTITION
    return AttentionPath.SPLIT_KV


def decode_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes that get a CUDA graph: 1, 2, 4, 8, 16, 24, 32, then every 16 up to max_batch."""
    small = [b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_batch]
    return small + list(range(48, max_batch, 16)) + [max_batch]


class NanoBiError(Exception):
    """A problem with the user's input: reported as one line (exit status 2 from the CLI), never a traceback."""


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 2. Config
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# config.json as HF writes it. transformers 5 stores `rope_parameters.rope_theta` and `dtype`; older files use
# top-level `rope_theta` and `torch_dtype`: both are read. Only dense Qwen3 (Qwen3ForCausalLM) is accepted:
# every shape below is checked against it, so a wrong file fails with a one-line error, never a traceback.
# Every Qwen3 shares a 151,936-token vocabulary, 40,960 positions and RoPE theta 1e6; sizes differ in the rest.

@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Qwen3Config":
        arch = d.get("architectures") or []
        if "Qwen3ForCausalLM" not in arch:
            raise NanoBiError(f"{where}: architectures is {arch}, but nano-bi runs only Qwen3ForCausalLM (dense Qwen3)")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise NanoBiError(f"{where}: missing {', '.join(missing)}; is this a Qwen3 config.json?")
        rope = (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 1_000_000.0))
        heads = d["num_attention_heads"]
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads", heads),
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   max_position_embeddings=d.get("max_position_embeddings", 40960),
                   rope_theta=float(rope), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   tie_word_embeddings=d.get("tie_word_embeddings", False))

    def shard(self, tp_size: int) -> "Qwen3Config":
        """The shapes one of tp_size tensor-parallel ranks computes: its heads, KV heads and MLP columns."""
        return dataclasses.replace(self, num_attention_heads=self.num_attention_heads // tp_size,
                                   num_key_value_heads=self.num_key_value_heads // tp_size,
                                   intermediate_size=self.intermediate_size // tp_size)

    def to_hf_dict(self) -> dict:
        """config.json in transformers-5 spelling."""
        d = dataclasses.asdict(self)
        del d["rope_theta"]
        return dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", dtype="bfloat16",
                    hidden_act="silu", attention_bias=False, attention_dropout=0.0, use_sliding_window=False,
                    sliding_window=None, initializer_range=0.02, bos_token_id=None, use_cache=True,
                    rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"}, **d)


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 3. Weights: HF safetensors in, one tensor per HF name
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# Checkpoint keys map one to one onto the fields below. Two fusions happen at load time, both free of
# numerical effect: q/k/v_proj are concatenated into one [q|k|v] matrix and gate/up_proj into one [gate|up]
# matrix, so each becomes a single GEMM (a row of the fused product is bit-for-bit a row of the separate ones
# under PIN; under TUNED nothing is promised anyway). A 4b checkpoint is 8 GB: loading prints its progress.


@dataclass
class Qwen3Layer:
    input_layernorm: torch.Tensor
    qkv_proj: torch.Tensor  # cat(q_proj, k_proj, v_proj)
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: torch.Tensor
    post_attention_layernorm: torch.Tensor
    gate_up_proj: torch.Tensor  # cat(gate_proj, up_proj)
    down_proj: torch.Tensor


@dataclass
class Qwen3Weights:
    embed_tokens: torch.Tensor
    layers: list[Qwen3Layer]
    norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when tied


def tensor_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen3 checkpoint must hold, with its shape, in HF naming."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise NanoBiError(f"{path} not found: a Qwen3 model directory needs {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoBiError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); re-download it")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "a weight map").get("weight_map", {})
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise NanoBiError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


# Under tensor parallelism (section 7) each rank reads only its slice of the weights that are split: dim 0 (whole
# heads, whole MLP columns, a slice of the vocabulary) of the column-parallel ones, dim 1 (a slice of K) of the
# row-parallel ones. Norms and the embedding are read whole by every rank.
TP_SPLIT_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "lm_head": 0,
                "o_proj": 1, "down_proj": 1}


def _read_shard(tensor_slice, shape: tuple[int, ...], dim: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    if dim is None or tp_size == 1:
        return tensor_slice[:]
    size = shape[dim] // tp_size
    part = slice(tp_rank * size, (tp_rank + 1) * size)
    return tensor_slice[part] if dim == 0 else tensor_slice[:, part].contiguous()  # kernels want row stride = K


def _read_tensors(path: Path, want: dict[str, tuple[int, ...]], device: torch.device, tp_rank: int,
                  tp_size: int) -> dict[str, torch.Tensor]:
    """Every tensor named in `want`, its shape checked, rank tp_rank's share of it moved to `device` as bf16."""
    from safetensors import safe_open

    files = _safetensors_files(path)
    show_progress = sum(f.stat().st_size for f in files if f.is_file()) > 1 << 30 and tp_rank == 0
    found: dict[str, torch.Tensor] = {}
    t0 = time.time()
    for n, f in enumerate(files):
        if not f.is_file():
            raise NanoBiError(f"{f} is listed in the index but missing; re-download the checkpoint")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in [name for name in st.keys() if name in want]:
                    tensor_slice = st.get_slice(name)
                    shape = tuple(tensor_slice.get_shape())
                    if shape != want[name]:
                        raise NanoBiError(f"{path}: tensor {name} has shape {list(shape)}, "
                                          f"config.json implies {list(want[name])}")
                    split_dim = TP_SPLIT_DIM.get(name.split(".")[-2])
                    found[name] = _read_shard(tensor_slice, shape, split_dim, tp_rank, tp_size).to(
                        device=device, dtype=torch.bfloat16)
        except (NanoBiError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # safetensors raises several exception types for a damaged file
            raise NanoBiError(f"cannot read {f.name} ({str(e).splitlines()[0][:120]}); re-download it") from None
        if show_progress:
            print(f"loading weights: shard {n + 1}/{len(files)}, {time.time() - t0:.0f} s", file=sys.stderr)
    missing = [name for name in want if name not in found]
    if missing:
        raise NanoBiError(f"{path}: tensor {missing[0]} is missing; is the checkpoint complete?")
    return found


def load_weights(path: Path, cfg: Qwen3Config, device: torch.device, tp_rank: int = 0,
                 tp_size: int = 1) -> Qwen3Weights:
    """Rank tp_rank's share of every tensor of the checkpoint, in the engine's fused layout."""
    return fuse_weights(_read_tensors(path, tensor_shapes(cfg), device, tp_rank, tp_size), cfg, tp_rank, tp_size)


def fuse_weights(named: dict[str, torch.Tensor], cfg: Qwen3Config, tp_rank: int = 0, tp_size: int = 1) -> Qwen3Weights:
    """HF-named tensors (rank tp_rank's shares) -> the engine's layout: [q|k|v] and [gate|up] fused."""
    def layer(n: int) -> Qwen3Layer:
        g = lambda key: named[f"model.layers.{n}.{key}.weight"]  # noqa: E731
        return Qwen3Layer(
            input_layernorm=g("input_layernorm"),
            qkv_proj=torch.cat([g("self_attn.q_proj"), g("self_attn.k_proj"), g("self_attn.v_proj")]),
            q_norm=g("self_attn.q_norm"), k_norm=g("self_attn.k_norm"), o_proj=g("self_attn.o_proj"),
            post_attention_layernorm=g("post_attention_layernorm"),
            gate_up_proj=torch.cat([g("mlp.gate_proj"), g("mlp.up_proj")]), down_proj=g("mlp.down_proj"))

    embed = named["model.embed_tokens.weight"]
    vocab_share = cfg.vocab_size // tp_size  # a tied lm_head is this rank's rows of the (whole) embedding
    lm_head = embed[tp_rank * vocab_share:(tp_rank + 1) * vocab_share] if cfg.tie_word_embeddings \
        else named["lm_head.weight"]
    return Qwen3Weights(embed_tokens=embed, layers=[layer(n) for n in range(cfg.num_hidden_layers)],
                        norm=named["model.norm.weight"], lm_head=lm_head)


def hf_tensors(w: Qwen3Weights, cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    """The weights under their HF names, as views into the fused tensors (cfg: the shapes this rank holds)."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    named = {"model.embed_tokens.weight": w.embed_tokens, "model.norm.weight": w.norm}
    for n, layer in enumerate(w.layers):
        q_proj, k_proj, v_proj = layer.qkv_proj.split([q, kv, kv])
        gate_proj, up_proj = layer.gate_up_proj.split(cfg.intermediate_size)
        named.update({f"model.layers.{n}.{key}.weight": t for key, t in [
            ("input_layernorm", layer.input_layernorm), ("post_attention_layernorm", layer.post_attention_layernorm),
            ("self_attn.q_proj", q_proj), ("self_attn.k_proj", k_proj), ("self_attn.v_proj", v_proj),
            ("self_attn.q_norm", layer.q_norm), ("self_attn.k_norm", layer.k_norm), ("self_attn.o_proj", layer.o_proj),
            ("mlp.gate_proj", gate_proj), ("mlp.up_proj", up_proj), ("mlp.down_proj", layer.down_proj)]})
    if not cfg.tie_word_embeddings:
        named["lm_head.weight"] = w.lm_head
    return named


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 4. Tokenizer and chat template
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# tokenizer.json through `tokenizers`. Qwen3's one-turn chat format is fixed, so it is written out here rather
# than evaluated from the Jinja template; --no-think appends the empty think block Qwen3 uses to skip reasoning.
# Generation ends at generation_config.json's end tokens (Qwen3: <|im_end|> 151645 and <|endoftext|> 151643).
# A Checkpoint bundles what one model directory holds; engines built from one Checkpoint share its weights.

class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        if not (path / "tokenizer.json").is_file():
            raise NanoBiError(f"{path / 'tokenizer.json'} not found; copy it from the model's download")
        try:
            self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise NanoBiError(f"cannot read {path / 'tokenizer.json'} ({str(e)[:100]})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, prompt: str, think: bool = True) -> list[int]:
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        return self.encode(text if think else text + "<think>\n\n</think>\n\n")


@dataclass
class Checkpoint:
    """Everything read from a model directory; engines built from one Checkpoint share its weights."""
    path: Path
    config: Qwen3Config
    weights: Qwen3Weights
    tokenizer: Tokenizer
    eos_ids: list[int]
    synthetic: bool
    tensor_parallel_size: int = 1  # `weights` is then rank 0's share (section 7)


def load_checkpoint(model: str | Path | None = None, device: str | torch.device | None = None,
                    tensor_parallel_size: int = 1) -> Checkpoint:
    path = resolve_model(None if model is None else str(model))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = Qwen3Config.from_dict(_read_json(path / "config.json", "config.json"), str(path / "config.json"))
    check_tensor_parallel_size(cfg, tensor_parallel_size, device)
    gen_cfg = path / "generation_config.json"
    eos = _read_json(gen_cfg, "generation_config.json").get("eos_token_id", []) if gen_cfg.is_file() else []
    tokenizer = Tokenizer(path)
    eos = [eos] if isinstance(eos, int) else list(eos)
    if not eos and tokenizer.tok.token_to_id("<|im_end|>") is not None:
        eos = [tokenizer.tok.token_to_id("<|im_end|>")]
    weights = load_weights(path, cfg, device, 0, tensor_parallel_size)
    return Checkpoint(path, cfg, weights, tokenizer, eos, (path / "nano_bi_synthetic.json").is_file(),
                      tensor_parallel_size)

# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 5. The KV cache
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# K and V live in pages (128 tokens on the GPU) drawn from one pool, sized from free GPU memory (90%, less a
# 4 GiB activation reserve) or a budget. This section is the GPU side: the pages' tensors (under tensor
# parallelism each GPU holds its own KV heads of every page) and the block table, one row ("slot") per admitted
# request listing its pages, written once at admission so that the decode hot path ships only slot numbers.
# Which page holds what is host bookkeeping in the engine's process: the PagePool of section 12.

class KVCache:
    """One GPU's K/V pages (of its KV heads, under tensor parallelism) and the block table: the page list of
    each slot. Which page holds what is decided by the PagePool below, in the engine's process."""
    def __init__(self, cfg: Qwen3Config, num_pages: int, max_slots: int, device: torch.device):
        shape = (cfg.num_hidden_layers, 2, num_pages * PAGE_SIZE, cfg.num_key_value_heads, cfg.head_dim)
        self.kv = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        max_pages_per_seq = -(-cfg.max_position_embeddings // PAGE_SIZE)
        self.block_table = torch.zeros(max_slots, max_pages_per_seq, dtype=torch.int32, device=device)

    @staticmethod
    def page_bytes(cfg: Qwen3Config) -> int:
        return 2 * cfg.num_hidden_layers * PAGE_SIZE * cfg.num_key_value_heads * cfg.head_dim * 2

    def k(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def set_block_table(self, slot: int, pages: list[int]):
        self.block_table[slot, :len(pages)] = torch.tensor(pages, dtype=torch.int32)


def kv_pool_pages(cfg: Qwen3Config, device: torch.device, kv_cache_bytes: int | None, max_batch: int) -> int:
    """Pages that fit in kv_cache_bytes (per GPU) - by default in what is free on the GPU now."""
    if kv_cache_bytes is None:
        if device.type == "cuda":
            kv_cache_bytes = int(torch.cuda.mem_get_info(device)[0] * 0.9) - (4 << 30)
        else:
            kv_cache_bytes = 1 << 30
    useful = max_batch * -(-cfg.max_position_embeddings // PAGE_SIZE)  # more could never be used at once
    return max(1, min(kv_cache_bytes // KVCache.page_bytes(cfg), useful))


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 6. GEMM dispatch
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# Every projection (qkv, o, gate_up, down, lm_head) goes through `linear` (gate_up in prefills and small decode
# steps through the same GEMM with SiLU*mul in its epilogue, below). TUNED calls cuBLAS, which picks its kernel (tiles,
# split-K) from M, so a row's bits can change with the batch size (the GEMM-rows gate watches a qwen3-4b row
# move with it). PIN calls one Triton kernel whose *reduction order* is the same for every row of every call:
# K from low to high and, for the row-parallel o_proj and down_proj, 4 K segments added in order
# (kernels.matmul_kernel). Tile sizes, warps, stages, how the segments are spread over programs and how tiles
# are loaded (pointers, or Hopper's tensor memory accelerator) do not touch a row's bits (the seam test proves
# it on every backend), so they follow the phase and the row count - a prefill's rows may even be split over two
# launches with different tiles, to fill the GPU's last wave (below): a token's row has the same bits in a decode
# step, a whole prefill, a prefill chunk or a mixed step. TUNED takes that Triton kernel too where it is the
# faster one: decode steps of <= 16 rows on a GPU, and gate_up_proj with SiLU*mul in prefills of >= 1k rows.

PIN_BLOCK_K = 128 if kernels.INTERPRET else 64  # the interpreter is fastest with few, fat steps
# o_proj, down_proj: the GEMMs whose K tensor parallelism splits (4 | TP <= 4). Only these are cut: restarting
# the pipeline per segment cost 25-40% of a prefill GEMM (H100, 4k rows).
ROW_PARALLEL_K_SEGMENTS = 4


def pin_gemm_config(n: int, k: int, phase: str, segments: int = 1, rows: int = 1) -> kernels.MatmulConfig:
    """The PIN GEMM's config for weight [n, k] at `rows` rows. segments - the reduction order - is the same in
    every phase; the rest is speed. block_k is speed too: a dot adds its K products in ascending order however
    many one step takes (16 a tensor-core instruction, one in the interpreter), so it may follow the rows as
    long as the segments stay whole blocks. Sweeps of the qwen3-4b shapes on an H200, us, qkv / o / gate_up /
    down (cuBLAS in brackets): 4k prefill rows, 128-row tiles 217 / 154 / 657 / 335, 256-row tiles 198 / 153 /
    615 / 335 (185 / 120 / 529 / 273); at 1 decode row, 64-row tiles 10.3 / 9.1 / 27.6 / 18.2, 16 x 64 tiles
    with 128-wide K steps 9.1 / 7.8 / 26.0 / 15.5 (8.5 / 8.8 / 27.2 / 15.0); 16 x 32 tiles took qwen3-0.6b's
    4.7 / 4.8 / 4.8 / 5.7 to 3.8 / 4.2 / 4.8 / 4.8 and qwen3-4b's 9.0 / 7.7 / 25.4 / 15.7 to 8.8 / 7.6 / 25.2 /
    15.2; 16 x 16 tiles of one warp, in a CUDA graph, qkv / o / down 9.46 / 6.36 / 14.41 -> 7.91 / 6.34 / 13.32
    (gate_up, two tiles a program, keeps 16 x 32: 26.05). Fewer, fatter K steps pay only where the N tiles fit
    on the SMs at once (qkv, o, down at 32 rows: 10.4 / 9.6 / 19.5 -> 8.5 / 8.8 / 18.2; gate_up 28.4 -> 35.4)."""
    if kernels.INTERPRET:  # its dot is order-fixed by K too (kernels.dot_in_k_order); its tensor-descriptor
        # loads cost ~25% more than pointer loads (two prefill gates 47 -> 60 s), so only the seam tests take them
        block_m = 32 if phase == "decode" else 256
        return kernels.MatmulConfig(block_m, 1024, PIN_BLOCK_K, 4, 1, segments, 1, False)
    wide_k = 128 if k % (segments * 128) == 0 else PIN_BLOCK_K  # segment ends must not move
    narrow = n <= 8192  # qkv_proj, o_proj, down_proj of qwen3-4b: <= 128 N tiles of 64
    if phase == "prefill" and rows >= 512:
        tiles = (256, 128, PIN_BLOCK_K, 8, 4)
    elif phase == "prefill":  # H100, 4k rows: 4 stages paid off only with segments
        tiles = (128, 128, PIN_BLOCK_K, 8, 4 if segments > 1 else 3)
    elif rows <= 16 and narrow:  # 16-row mma.sync tiles (a 64-row wgmma tile would compute 63 rows of
        tiles = (16, 16, wide_k, 1, 4)  # padding), 16 columns of one warp: many programs stream the weight
    elif rows <= 16 and n < 100_000:  # gate_up_proj: each program streams a gate and an up tile
        tiles = (16, 32, wide_k, 4, 3)
    elif rows <= 16:  # lm_head: 32 columns gained nothing (qwen3-0.6b, 1 row: 72.2 against 71.5 us)
        tiles = (16, 64, wide_k, 4, 3)
    elif rows <= 64 and narrow:
        tiles = (64, 64, wide_k, 4, 3)
    elif n >= 100_000:  # lm_head
        tiles = (64, 128, PIN_BLOCK_K, 4, 3) if rows <= 64 else (128, 128, PIN_BLOCK_K, 8, 3)
    elif rows <= 64:
        tiles = (64, 64, PIN_BLOCK_K, 4, 4)
    else:  # one 128-row tile reads each weight tile once (128 decode rows: gate_up 41.1 -> 34.2 with 3 stages)
        tiles = (128, 64, PIN_BLOCK_K, 4, 4) if narrow else (128, 64, PIN_BLOCK_K, 8, 3)
    block_m, block_n, block_k, warps, stages = tiles
    split = segments if phase == "decode" else 1  # decode: a program a K segment (down_proj, 1 row: 18.2 us; one: 45.9)
    return kernels.MatmulConfig(block_m, block_n, block_k, warps, stages, segments, split,
                                phase == "prefill" or rows > 64)


# A GEMM runs in waves of one tile per SM, and its last wave may be part-empty: o_proj and down_proj of a 4k
# qwen3-4b prompt are 320 tiles of 256 x 128, 2.4 waves on an H200's 132 SMs - the third runs 56 tiles and
# leaves 76 SMs idle. Tiles are speed, not bits, so a prefill GEMM may cover its last rows with 128 x 128
# tiles in a second launch: a head of whole waves of big tiles, then a tail of small ones. A small tile takes
# TAIL_TILE_COST of a big one's time; the launches go by the fewest (cost-weighted) waves. H200, qwen3-4b, us,
# one launch -> head + tail, bits equal: 4k rows o_proj 154.5 -> 137.9, down_proj 341.2 -> 313.5; 2k rows
# 100.1 -> 82.1, 212.8 -> 171.9; at 1k rows qkv_proj takes 128 x 128 tiles alone, 67.6 -> 57.1.
TAIL_TILES = dict(block_m=128, block_n=128, num_warps=4, num_stages=4)
TAIL_TILE_COST = 0.53  # H200, gate_up_proj at 4k rows: 691 us in 128 x 128 tiles, 650 in half as many 256 x 128


@functools.lru_cache(maxsize=4096)  # ~10 us of Python a call, on the host path of every prefill GEMM
def pin_prefill_launches(n: int, k: int, segments: int, rows: int) -> tuple[tuple[int, kernels.MatmulConfig], ...]:
    """(rows, config) launches that cover a PIN prefill GEMM's rows in order (kernels.matmul_row_ranges)."""
    big = pin_gemm_config(n, k, "prefill", segments, rows)
    small = big._replace(**TAIL_TILES)
    if kernels.INTERPRET or big.block_m == small.block_m:
        return ((rows, big),)
    cdiv, sms = kernels._cdiv, kernels.sm_count(torch.cuda.current_device())

    def waves(plan):  # cost-weighted
        return sum(cdiv(cdiv(r, c.block_m) * cdiv(n, c.block_n), sms) * (1 if c is big else TAIL_TILE_COST)
                   for r, c in plan)
    per_block = cdiv(n, big.block_n)  # big tiles in a row block
    whole_waves = cdiv(rows, big.block_m) * per_block // sms
    head = min(rows, whole_waves * sms // per_block * big.block_m)  # the row blocks whole waves hold
    plans = [((rows, big),), ((rows, small),)] + ([((head, big), (rows - head, small))] if 0 < head < rows else [])
    return min(plans, key=waves)


# At <= 16 decode rows the Triton GEMM beats cuBLAS (H200, graph-timed us at 1 row, cuBLAS / Triton: qwen3-0.6b
# o_proj 12.4 / 4.2, down_proj 6.4 / 4.8; qwen3-4b gate_up 28.5 / 25.2), and with its segment sums added by the
# RMSNorm (row_parallel_linear) a step has 72 launches fewer: TUNED's qwen3-4b TPOT at 1k context, b1 3.49-3.59
# -> 3.27 ms, b8 3.90-3.93 -> 3.70, the same session. In the interpreter torch's CPU matmul is the faster one.
TUNED_TRITON_MAX_ROWS = 16


def triton_gemm(policy: NumericPolicy, phase: str, rows: int) -> bool:
    """Whether a GEMM of `rows` rows runs the Triton kernel: always under PIN, and TUNED's small decode steps."""
    if policy is NumericPolicy.TUNED:
        return phase == "decode" and rows <= TUNED_TRITON_MAX_ROWS and not kernels.INTERPRET
    return policy is NumericPolicy.PIN


def linear(x: torch.Tensor, w: torch.Tensor, policy: NumericPolicy, phase: str, k_segments: int = 1,
           shares: "ColumnShares | None" = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T. shares: PER_TOKEN's cut of a column-parallel w (section 7), default w whole."""
    if triton_gemm(policy, phase, len(x)):
        if phase == "prefill":
            return kernels.matmul_row_ranges(x, w, pin_prefill_launches(*w.shape, k_segments, len(x)))
        return kernels.matmul(x, w, pin_gemm_config(*w.shape, phase, k_segments, len(x)))
    if policy is NumericPolicy.TUNED:
        return F.linear(x, w)
    if k_segments == 1:  # PER_TOKEN: one row per call, one call per share
        shares = shares or ColumnShares((w,), None)
        y = torch.cat([rows_alone(x, s) for s in shares.weights], dim=1)
        return y if shares.columns is None else y[:, shares.columns]
    return kernels.sum_segments(segment_sums(x, w, policy, phase, k_segments))


def segment_sums(x: torch.Tensor, w: torch.Tensor, policy: NumericPolicy, phase: str, segments: int) -> torch.Tensor:
    """The fp32 sums of the `segments` equal K segments of x @ w^T, unadded: [segments, M, N]. PIN (and TUNED's
    small decode steps): the Triton GEMM, one program per segment. PER_TOKEN: each row alone, each segment an
    fp32 GEMM of its own."""
    if policy is not NumericPolicy.PER_TOKEN:
        return kernels.matmul_segments(x, w, pin_gemm_config(*w.shape, phase, segments, len(x)))
    w_segments = [part.float().contiguous() for part in w.chunk(segments, dim=1)]
    return torch.stack([rows_alone(xs, ws) for xs, ws in zip(x.float().chunk(segments, dim=1), w_segments)])


# SiLU*mul in gate_up_proj's epilogue: each program reduces a gate tile and the up tile of the same columns and
# stores silu(gate) * up, so the [M, 2N] product never reaches memory and its silu_and_mul launch is gone. At
# <= 16 decode rows that is 304 programs of 16 x 32 (2.3 waves on 132 SMs) and pays (qwen3-4b at 1k context on
# an H200, alternated in one process): TPOT b1 PIN 3.38-3.53 -> 3.32-3.33 ms, TUNED 3.30-3.44 -> 3.23-3.26; at
# 128 decode rows the 128 x 64 tiles would leave 152 programs, 1.15 waves (PIN b128 9.35-9.60 -> 9.67 ms). In a
# prefill it spares the product's round trip (H200, qwen3-4b, us, GEMM then silu_and_mul -> the epilogue in
# 128 x 128 tiles, bits equal): 64 rows 108.6 -> 73.7, 1k 170.4 -> 158.7, 4k 711.9 -> 631.8 - faster than cuBLAS
# then silu_and_mul from 1k rows (169.1 / 672.2 at 1k / 4k; 84.8 against 96.5 at 512), so TUNED takes it there.
SILU_IN_EPILOGUE_MAX_ROWS = 16  # decode
TUNED_SILU_IN_EPILOGUE_MIN_ROWS = 1024  # prefill
PREFILL_SILU_TILES = dict(block_m=128, block_n=128, num_warps=8, num_stages=4)  # gate + up: a 128 x 256 tile's work


def silu_in_epilogue(policy: NumericPolicy, phase: str, rows: int) -> bool:
    """Whether gate_up_proj stores SiLU*mul from its GEMM's epilogue (above): small decode steps on the Triton
    GEMM, PIN's prefills, and TUNED's prefills of >= 1024 rows on a GPU."""
    if phase == "decode":
        return rows <= SILU_IN_EPILOGUE_MAX_ROWS and triton_gemm(policy, phase, rows)
    if policy is NumericPolicy.TUNED:
        return rows >= TUNED_SILU_IN_EPILOGUE_MIN_ROWS and not kernels.INTERPRET
    return policy is NumericPolicy.PIN


def gate_up_silu(x: torch.Tensor, w: torch.Tensor, policy: NumericPolicy, phase: str,
                 shares: "ColumnShares | None" = None) -> torch.Tensor:
    """The MLP's silu(x @ gate^T) * (x @ up^T), w = gate_up_proj: from the GEMM's epilogue where
    `silu_in_epilogue` says so (kernels.matmul_silu_and_mul: the bits of the GEMM then silu_and_mul)."""
    if silu_in_epilogue(policy, phase, len(x)):
        return kernels.matmul_silu_and_mul(x, w, silu_epilogue_config(*w.shape, phase, len(x)))
    return kernels.silu_and_mul(linear(x, w, policy, phase, shares=shares))


@functools.lru_cache(maxsize=4096)  # on the host path of every prefill's gate_up_proj, as pin_prefill_launches
def silu_epilogue_config(n: int, k: int, phase: str, rows: int) -> kernels.MatmulConfig:
    """The Triton GEMM's config for gate_up_proj [n, k] with SiLU*mul in its epilogue: the PIN GEMM's, but
    PREFILL_SILU_TILES in a prefill on a GPU. Tiles are speed, never bits (kernels.matmul_kernel)."""
    config = pin_gemm_config(n, k, phase, 1, rows)
    return config._replace(**PREFILL_SILU_TILES) if phase == "prefill" and not kernels.INTERPRET else config


def rows_alone(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """PER_TOKEN's GEMM: x [M, K] @ w [N, K]^T as M one-row cuBLAS calls, one weight's calls back to back (so
    it can stay in L2 from row to row). The oracle's price: ~10 ms per qwen3-4b prompt token on an H200."""
    return torch.cat([F.linear(row, w) for row in x.split(1)])

# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 7. Tensor parallelism I: shards, and a sum whose order does not depend on the number of GPUs
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# With tensor_parallel_size = N each GPU holds 1/N of every layer (Megatron's split): q/k/v_proj, gate/up_proj
# and lm_head by output rows ("column-parallel": whole heads and MLP columns, so attention, the KV cache and
# SiLU*mul stay on one GPU), o_proj and down_proj by input columns ("row-parallel"). A row-parallel output ends
# as N partial sums over shares of K, and the usual all-reduce (TUNED) adds them in an order NCCL picks: the
# bits follow N. PIN's GEMM already cuts K into 4 segments added in a fixed order (section 6): each GPU owns
# 4 / N whole segments, the GPUs gather each other's fp32 segment sums, and every GPU adds all 4 in that order -
# the bits of one GPU. The price: 4 fp32 partials per output element instead of one bf16 all-reduce (8x the
# bytes; 64 KB per qwen3-8b GEMM at decode batch 1). Logits are gathered, not summed.

def check_tensor_parallel_size(cfg: Qwen3Config, size: int, device: torch.device):
    if size == 1:
        return
    if size < 1 or ROW_PARALLEL_K_SEGMENTS % size:
        raise NanoBiError(f"tensor_parallel_size is {size}; it must divide {ROW_PARALLEL_K_SEGMENTS} (the K segments "
                          f"of o_proj and down_proj that the GPUs share out): use 1, 2 or 4")
    if device.type == "cuda" and (device.index or 0) != 0:
        raise NanoBiError(f"tensor parallelism puts rank r on GPU r, so the engine loads on cuda:0, not {device}; "
                          f"choose the GPUs with CUDA_VISIBLE_DEVICES")
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise NanoBiError(f"tensor_parallel_size is {size} but {torch.cuda.device_count()} GPU(s) are visible; "
                          f"lower it or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    for what, count in (("KV heads", cfg.num_key_value_heads), ("attention heads", cfg.num_attention_heads),
                        ("MLP columns", cfg.intermediate_size), ("vocabulary entries", cfg.vocab_size)):
        if count % size:
            raise NanoBiError(f"tensor_parallel_size {size} does not divide the model's {count} {what}; "
                              f"choose a size that does")
    if cfg.vocab_size % ROW_PARALLEL_K_SEGMENTS or cfg.num_key_value_heads * cfg.head_dim % ROW_PARALLEL_K_SEGMENTS:
        raise NanoBiError(f"the vocabulary ({cfg.vocab_size}) and k_proj's width must split into "
                          f"{ROW_PARALLEL_K_SEGMENTS} equal blocks for tensor parallelism; use tensor_parallel_size 1")
    for name, k in (("o_proj", cfg.num_attention_heads * cfg.head_dim), ("down_proj", cfg.intermediate_size)):
        if k % (ROW_PARALLEL_K_SEGMENTS * PIN_BLOCK_K):
            raise NanoBiError(f"{name}'s K ({k}) is not {ROW_PARALLEL_K_SEGMENTS} segments of whole "
                              f"{PIN_BLOCK_K}-wide blocks, so ranks cannot own whole segments; use tensor_parallel_size 1")

# PER_TOKEN's column-parallel GEMMs. A column-parallel output keeps its whole K order on one GPU, but cuBLAS
# (the oracle's row-by-row calls) picks its kernel, and with it the K order, from the weight's shape - and
# half the columns is another shape (an H200 gave PER_TOKEN's qwen3-8b logprob -7.531 at TP=1, -7.132 at TP=2
# with whole projections). So PER_TOKEN cuts every column-parallel weight into the same 4 output shares at every
# TP size: share j of qkv_proj is [q_j; k_j; v_j] (of gate_up_proj, [gate_j; up_j]), the j-th quarter of each
# projection, kept as a regrouped copy - 4 cuBLAS calls per row and GEMM, not 12 or 8 - and rank r of N holds
# shares 4r/N ... 4(r+1)/N - 1 with the very contents and shape they have on one GPU. The copy costs qkv_proj's
# and gate_up_proj's memory again (4.7 GB for qwen3-4b), for the oracle only.

@dataclass
class ColumnShares:
    """PER_TOKEN's cut of a column-parallel weight: `weights`, the shares (each computed by a cuBLAS call of its
    own); `columns`, the gather that puts their outputs back in the weight's column order (None: already)."""
    weights: tuple[torch.Tensor, ...]
    columns: torch.Tensor | None


def column_shares(w: torch.Tensor, widths: tuple[int, ...], tp_size: int) -> ColumnShares:
    """Cut this rank's w [sum(widths), K], the projections of these widths stacked (e.g. q, k, v), into its
    4 / tp_size shares: share j stacks the j-th block of every projection."""
    n_shares = ROW_PARALLEL_K_SEGMENTS // tp_size
    starts = [sum(widths[:p]) for p in range(len(widths))]
    share_rows = [torch.cat([torch.arange(start + width * j // n_shares, start + width * (j + 1) // n_shares)
                             for start, width in zip(starts, widths)]) for j in range(n_shares)]
    if len(widths) == 1:  # one projection: its shares are slices of w, no copy
        return ColumnShares(w.split([len(rows) for rows in share_rows]), None)
    rows = torch.cat(share_rows)
    return ColumnShares(w[rows.to(w.device)].split([len(r) for r in share_rows]), torch.argsort(rows).to(w.device))


def row_parallel_linear(x: torch.Tensor, w: torch.Tensor, policy: NumericPolicy, phase: str,
                        tp_size: int) -> torch.Tensor:
    """o_proj / down_proj: x [M, K / N] @ w [out, K / N]^T on each of the N ranks, summed over the ranks. The
    Triton GEMM's decode, a program per K segment (section 6), returns the segment sums unadded, [4, M, out]
    fp32: the RMSNorm that follows adds them in order (kernels.rms_norm), one launch fewer a projection at the
    same bits (PIN's qwen3-4b TPOT at 1k context, H200: b1 3.43-3.53 -> 3.35-3.36 ms, b128 9.31-9.45 -> 9.12-9.23)."""
    deferred = phase == "decode" and triton_gemm(policy, phase, len(x))
    if tp_size == 1 and not deferred:
        return linear(x, w, policy, phase, ROW_PARALLEL_K_SEGMENTS)
    if policy is NumericPolicy.TUNED and not deferred:
        y = F.linear(x, w)
        dist.all_reduce(y)
        return y
    mine = segment_sums(x, w, policy, phase, ROW_PARALLEL_K_SEGMENTS // tp_size)  # this rank's, in K order
    if tp_size == 1:
        return mine
    every = torch.empty((ROW_PARALLEL_K_SEGMENTS, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
    dist.all_gather(list(every.chunk(tp_size)), mine)  # rank r's segments land at r * 4/N ...: K order
    return every if deferred else kernels.sum_segments(every)


def vocab_parallel_logits(h: torch.Tensor, lm_head: torch.Tensor, policy: NumericPolicy, phase: str,
                          tp_size: int, shares: ColumnShares) -> torch.Tensor:
    logits = linear(h, lm_head, policy, phase, shares=shares)
    if tp_size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp_size)]
    dist.all_gather(parts, logits)
    return torch.cat(parts, dim=-1)


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 8. The model, and prefill: whole prompts, prompt chunks and mixed steps
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# One forward pass serves every path; only the attention call differs. Everything outside GEMMs and attention
# is row-local - RMSNorm fused with the residual add (at decode also with the adding of o_proj's and
# down_proj's K segments, section 6), q/k-norm + RoPE fused with the KV-cache write, SiLU*mul (in gate_up_proj's
# epilogue in prefills and small decode steps, section 6), the embedding - so invariant by construction. Prefill
# attention takes "sequences" of new queries that attend their own cached keys plus themselves: a whole prompt,
# the next chunk of a long prompt, or one decode row of a mixed step. Each query reduces its keys in chunks
# aligned at position 0 with the same fold as split-KV decode; under PIN the chunk is PIN's 192 keys, so a
# token's bits do not depend on the path that computes it.
# TUNED, like a prefix-prefill kernel, keeps the cached context as one chunk and the new keys as another (chunk =
# the step's start position), so its bits move with the step structure.

class ModelOps(NamedTuple):
    """The operations a layer is made of. The engine's are its kernels; the trainer's run the very same kernels
    forward and differentiate their plain-torch references (section 15)."""
    rms_norm: Callable  # (x, weight, eps[, residual]) -> normed (or (normed, x + residual))
    linear: Callable  # (x, w, policy, phase, k_segments=1, shares=None) -> x @ w^T
    row_parallel_linear: Callable  # (x, w, policy, phase, tp_size) -> x @ w^T, summed over the ranks
    gate_up_silu: Callable  # (x, gate_up_proj, policy, phase, shares=None) -> silu(x @ gate^T) * (x @ up^T)
    attention: Callable  # (model, qkv, q_norm, k_norm, layer index, positions, kv_slots, attend) -> [T, Hq * D]


def kernel_attention(model: "Qwen3Model", qkv, q_norm, k_norm, n: int, positions, kv_slots, attend) -> torch.Tensor:
    """q/k norm + RoPE and the K/V write into the cache (one kernel), then `attend` over the cache."""
    cfg = model.cfg
    q = kernels.qk_norm_rope_store(qkv, q_norm, k_norm, model.cos, model.sin, positions, kv_slots, model.kv.k(n),
                                   model.kv.v(n), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   cfg.rms_norm_eps)
    return attend(q, n).view(q.shape[0], -1)


KERNEL_OPS = ModelOps(kernels.rms_norm, linear, row_parallel_linear, gate_up_silu, kernel_attention)


class Qwen3Model:
    def __init__(self, cfg: Qwen3Config, weights: Qwen3Weights, kv: KVCache, policy: NumericPolicy,
                 device: torch.device, tp_size: int = 1):
        """cfg: the shapes this rank computes (Qwen3Config.shard)."""
        self.cfg, self.w, self.kv, self.policy, self.tp_size = cfg, weights, kv, policy, tp_size
        self.ops = KERNEL_OPS
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** exponents)  # as HF computes it, in fp32
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
        self.cos, self.sin = freqs.cos().to(device), freqs.sin().to(device)  # [max positions, head_dim / 2]
        self.shares = [self.per_token_shares(layer) for layer in weights.layers]  # per layer: (qkv, gate_up)
        self.lm_head_shares = column_shares(weights.lm_head, (weights.lm_head.shape[0],), tp_size)

    def per_token_shares(self, layer: Qwen3Layer) -> tuple[ColumnShares | None, ColumnShares | None]:
        """PER_TOKEN's share-by-share copies of qkv_proj and gate_up_proj (section 7); no copy for the others."""
        if self.policy is not NumericPolicy.PER_TOKEN:
            return None, None
        cfg, kv_width = self.cfg, self.cfg.num_key_value_heads * self.cfg.head_dim
        return (column_shares(layer.qkv_proj, (cfg.num_attention_heads * cfg.head_dim, kv_width, kv_width), self.tp_size),
                column_shares(layer.gate_up_proj, (cfg.intermediate_size, cfg.intermediate_size), self.tp_size))

    def forward(self, input_ids, positions, kv_slots, attend, phase: str, out_rows=None) -> torch.Tensor:
        """input_ids/positions/kv_slots: [T] int32. attend(q [T, Hq, D], layer) -> [T, Hq, D].
        Returns the final-normed hidden states of `out_rows` (default: all rows), bf16 [R, hidden]."""
        cfg, policy, tp_size, ops = self.cfg, self.policy, self.tp_size, self.ops
        x = F.embedding(input_ids, self.w.embed_tokens)
        residual = None
        for n, layer in enumerate(self.w.layers):
            qkv_shares, gate_up_shares = self.shares[n]
            if residual is None:
                h, residual = ops.rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps), x
            else:
                h, residual = ops.rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps, residual)
            qkv = ops.linear(h, layer.qkv_proj, policy, phase, shares=qkv_shares)
            attn = ops.attention(self, qkv, layer.q_norm, layer.k_norm, n, positions, kv_slots, attend)
            x = ops.row_parallel_linear(attn, layer.o_proj, policy, phase, tp_size)
            h, residual = ops.rms_norm(x, layer.post_attention_layernorm, cfg.rms_norm_eps, residual)
            act = ops.gate_up_silu(h, layer.gate_up_proj, policy, phase, shares=gate_up_shares)
            x = ops.row_parallel_linear(act, layer.down_proj, policy, phase, tp_size)
        if out_rows is not None:
            x, residual = x[out_rows].contiguous(), residual[out_rows].contiguous()
            if not len(out_rows):
                return x
        return ops.rms_norm(x, self.w.norm, cfg.rms_norm_eps, residual)[0]

    def logits(self, h: torch.Tensor, phase: str) -> torch.Tensor:
        return vocab_parallel_logits(h, self.w.lm_head, self.policy, phase, self.tp_size, self.lm_head_shares)

    def extend(self, batch: "ExtendBatch", out_rows) -> torch.Tensor:
        """Run new queries of several sequences (prompts, prompt chunks, decode rows) in one pass."""
        def attend(q, n):
            return kernels.prefill_attention(q, self.kv.k(n), self.kv.v(n), self.kv.block_table, batch.slot_idx,
                                             batch.cu_q, batch.q_start, batch.chunk_sizes, batch.max_q, PAGE_SIZE,
                                             batch.one_chunk, batch.min_q, self.policy is NumericPolicy.TUNED)
        return self.forward(batch.input_ids, batch.positions, batch.kv_slots, attend, "prefill", out_rows)


def prefill_chunk(policy: NumericPolicy, start: int, pin_chunk: int, max_context: int) -> int:
    """Key chunk of a prefill sequence whose new tokens start at `start`: PIN's constant; under TUNED the cached
    context as one chunk and the new keys as the next (a whole prompt: one chunk)."""
    if policy is NumericPolicy.TUNED:
        return start or max_context
    return pin_chunk


@dataclass
class ExtendBatch:
    """Device tensors for one prefill / mixed step: the new tokens of S sequences, concatenated."""
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    kv_slots: torch.Tensor  # [T] where each new token's K/V is written
    slot_idx: torch.Tensor  # [S] block-table row of each sequence
    cu_q: torch.Tensor  # [S + 1] offsets of each sequence's tokens
    q_start: torch.Tensor  # [S] position of each sequence's first new token
    chunk_sizes: torch.Tensor  # [S] key chunk size of each sequence's attention
    max_q: int  # the most new tokens of one sequence
    one_chunk: bool  # every sequence's keys lie in its first chunk: the attention's faster launch, same bits
    min_q: int  # the fewest new tokens of one sequence (long runs only: wider attention tiles, same bits)


def device_columns(columns: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Int lists as int32 device tensors through one host buffer and one copy, where a torch.tensor(list,
    device=) per list converts ~100 ns an int and copies each on its own (a 4k-token step's batch, on a CPU
    host: 0.78 -> 0.29 ms). Each column starts 16-byte aligned, as separate tensors would: the kernels'
    compiled variants depend on their pointers' alignment."""
    host, spans = array.array("i"), []
    for column in columns:
        spans.append((len(host), len(column)))
        host.fromlist(column)
        host.fromlist([0] * (-len(host) % 4))
    flat = torch.frombuffer(host, dtype=torch.int32)
    if device.type == "cuda":
        flat = flat.pin_memory()  # a copy that need not wait for the GPU work queued before it
    flat = flat.to(device, non_blocking=True)
    return [flat[start:start + n] for start, n in spans]


def extend_batch(ids, positions, kv_slots, slot_idx, cu_q, q_start, chunk_sizes, out_rows: list[int],
                 device: torch.device) -> tuple[ExtendBatch, torch.Tensor]:
    """An ExtendBatch and the out_rows index from host lists (ExtendRows' columns)."""
    *columns, rows = device_columns([ids, positions, kv_slots, slot_idx, cu_q, q_start, chunk_sizes, out_rows],
                                    device)
    runs = [b - a for a, b in zip(cu_q, cu_q[1:])]
    key_ends = [s + n for n, s in zip(runs, q_start)]
    return ExtendBatch(*columns, max(runs), all(end <= chunk for end, chunk in zip(key_ends, chunk_sizes)),
                       min(runs)), rows


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 9. Decode: split-KV attention and CUDA graphs
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# A decode step is ~300 small kernels for a 36-layer model: launched one by one from Python they take longer than
# the GPU needs to run them, so each (padded batch bucket, attention path) pair is captured once into a CUDA graph
# and replayed (LLM captures every bucket at startup, as vLLM does; PER_TOKEN runs eagerly). A graph freezes every
# kernel argument, so all per-step state lives in one static int32 buffer - a DecodeRow per request plus the split
# chunk size and the K/V prefetch flag (below) - refilled by one host->device copy before each replay. Padding rows
# have length 0 and KV slot -1: they read and write nothing. The split-KV kernels share their chunk partial and
# merge with the prefill kernel, which is what makes PIN's decode == prefill; how the chunks are spread over
# programs follows the batch and never changes a bit (kernels.split_kv_chunk_programs), and the program that stores
# a request's last partial folds them (a counter on the GPU, back at zero when the launch ends, so a replay finds
# it so): no merge launch. TUNED, free to move bits, merges a small batch's many chunks in one weighted sum, a
# kernel of its own, instead of the in-order fold (one request at 8k: 17.0 -> 12.7 us).

class DecodeRow(NamedTuple):
    """What a decode step needs of one request (host ints; a column of the static buffer)."""
    input_id: int  # the token fed in; ~j (negative) for row j of the step still in flight (section 14)
    position: int
    slot: int  # the request's block-table row
    seq_len: int  # keys it attends, itself included
    kv_slot: int  # where its new K/V is written; -1 writes nothing


# The meta buffer's rows: the DecodeRow fields, then (column 0 each) the chunk size and whether split-KV asks L2 for
# its K/V before q/k-norm ends (kernels.KV_PREFETCH_MAX_TOKENS): where the step's K/V a layer are at most
# KV_PREFETCH_MAX_BYTES. H200, qwen3-4b TPOT, ms, three alternations, off -> on: b1 1k TUNED 3.119-3.130 ->
# 3.059-3.088, PIN 3.157-3.259 -> 3.057-3.113; b4 1k (16 MB) even to 0.15 faster; b8 1k and b1 8k (32 MB a layer)
# 0.02-0.05 slower, so there the flag is 0.
_PADDING_ROW = torch.tensor([[0, 0, 0, 0, -1, 0, 0]], dtype=torch.int32).T  # length 0, KV slot -1: no read, no write
KV_PREFETCH_MAX_BYTES = 16 << 20


class DecodeRunner:
    def __init__(self, model: Qwen3Model, max_batch: int, consts: SplitKvConstants, cuda_graphs: bool,
                 device: torch.device):
        cfg = model.cfg
        self.model, self.consts = model, consts
        self.buckets = decode_buckets(max_batch)
        # PER_TOKEN, the slow oracle, runs eagerly: its graphs would hold a cuBLAS call per row and share
        # (~75k kernels at batch 128), which take longer to capture than the oracle's runs take
        self.use_graphs = cuda_graphs and device.type == "cuda" and model.policy is not NumericPolicy.PER_TOKEN
        tuned = model.policy is NumericPolicy.TUNED
        max_chunks = consts.tuned_max_chunks if tuned else consts.pin_max_chunks
        self.meta = torch.zeros(len(_PADDING_ROW), max_batch, dtype=torch.int32, device=device)
        self.kv_token_bytes = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V of a token in a layer
        # two host buffers, used in turn: under async scheduling a step's buffer is refilled while the copy of
        # the step before may still wait in the stream (the one before that is done: its tokens were read)
        self.meta_host = [torch.zeros(self.meta.shape, dtype=torch.int32, pin_memory=device.type == "cuda")
                          for _ in range(2)]
        self.steps = 0
        programs = [kernels.split_kv_chunk_programs(b, cfg.num_key_value_heads, max_chunks, not tuned)
                    for b in self.buckets]
        partial_rows = max([b for b, p in zip(self.buckets, programs) if p > 1], default=1)  # the rest fold
        self.workspace = kernels.SplitKvWorkspace.allocate(partial_rows, max_chunks, cfg.num_attention_heads,
                                                           cfg.num_key_value_heads, cfg.head_dim, device)
        self.graphs: dict[tuple[int, AttentionPath], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def path(self, bucket: int) -> AttentionPath:
        return attention_path(bucket, self.model.policy, self.consts.tuned_splitkv_max_batch)

    def forward(self, bucket: int, path: AttentionPath) -> torch.Tensor:
        ids, pos, slot_idx, seq_lens, kv_slots = (self.meta[r, :bucket] for r in range(5))
        chunk_size, prefetch = self.meta[5, :1], self.meta[6, :1]
        kv = self.model.kv

        def attend(q, n):
            out = torch.empty_like(q)
            if path is AttentionPath.SPLIT_KV:
                return kernels.split_kv_decode(q, kv.k(n), kv.v(n), kv.block_table, slot_idx, seq_lens, chunk_size,
                                               self.workspace.rows(bucket), out, PAGE_SIZE,
                                               in_chunk_order=self.model.policy is not NumericPolicy.TUNED,
                                               prefetch=prefetch)
            return kernels.nonpartition_decode(q, kv.k(n), kv.v(n), kv.block_table, slot_idx, seq_lens, out,
                                               PAGE_SIZE)
        return self.model.logits(self.model.forward(ids, pos, kv_slots, attend, "decode"), "decode")

    def step(self, rows: list[DecodeRow], chunk_size: int, last_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One row per request -> logits [B, V]. An input id ~j (negative) stands for last_tokens[j], a token the
        last step sampled that is still on the GPU (async scheduling, section 14)."""
        bucket = self.bucket(len(rows))
        path = self.path(bucket)
        host = self.meta_host[self.steps % 2]
        self.steps += 1
        host[:, :bucket] = _PADDING_ROW
        host[:5, :len(rows)] = torch.tensor(rows, dtype=torch.int32).T
        host[5, 0] = chunk_size
        keys = sum(row[3] for row in rows) if bucket <= kernels.KV_PREFETCH_MAX_TOKENS else 0  # row[3]: seq_len
        host[6, 0] = 0 < keys * self.kv_token_bytes <= KV_PREFETCH_MAX_BYTES
        self.meta[:, :bucket].copy_(host[:, :bucket], non_blocking=True)
        if last_tokens is not None:
            ids = self.meta[0, :len(rows)]
            ids.copy_(torch.where(ids < 0, last_tokens[(~ids).clamp(min=0).long()].to(ids.dtype), ids))
        if not self.use_graphs:
            return self.forward(bucket, path)[:len(rows)]
        if (bucket, path) not in self.graphs:
            self.graphs[(bucket, path)] = self.capture(bucket, path)
        graph, logits = self.graphs[(bucket, path)]
        graph.replay()
        return logits[:len(rows)]

    def capture_all(self):
        """Capture every bucket's graph now, as vLLM does at startup: a capture takes tens of milliseconds,
        and one taken mid-run stalls every running request (nano-vllm's offline workload shrinks through 21
        buckets). The warm-up pass runs on padding rows, which write and read no KV page."""
        if not self.use_graphs:
            return
        self.meta.copy_(_PADDING_ROW.to(self.meta.device).expand_as(self.meta))
        self.meta[5, 0] = self.consts.chunk_floor  # any valid chunk size: the kernels divide by it
        for key in [(bucket, self.path(bucket)) for bucket in self.buckets]:
            if key not in self.graphs:
                self.graphs[key] = self.capture(*key)

    def release(self):
        """Free the captured graphs. Graphs that captured NCCL collectives must go before the process group
        does: ncclCommDestroy waits for them forever otherwise."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def capture(self, bucket: int, path: AttentionPath):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the Triton kernels (rewrites the same KV values)
            self.forward(bucket, path)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(bucket, path)
        return graph, logits


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 10. The model runner: what one GPU holds and runs
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# A ModelRunner owns one GPU's KV cache, the model over it and the decode runner. The engine drives it with
# plain host data (lists of ints, DecodeRows), never tensors, so that under tensor parallelism the very same
# calls can be sent to the other GPUs' runners (section 16). The KV pool gets the pages that fit on every rank:
# at qwen3-4b shapes a page is 18 MiB (36 layers x K and V x 128 tokens x 8 heads x 128 x bf16), so the
# ~100 GiB an H200 has free after the weights hold ~5,600 pages - 720k tokens.

class ModelRunner:
    def __init__(self, cfg: Qwen3Config, weights: Qwen3Weights, config: "EngineConfig", device: torch.device,
                 tp_size: int = 1):
        """cfg: the whole model's config; weights: this rank's share. The KV pool gets the pages that fit on
        every rank (a collective under tensor parallelism)."""
        shard = cfg.shard(tp_size)
        pages = torch.tensor([kv_pool_pages(shard, device, config.kv_cache_bytes, config.max_batch)], device=device)
        if tp_size > 1:
            dist.all_reduce(pages, op=dist.ReduceOp.MIN)
        self.num_pages, self.device = int(pages), device
        self.kv = KVCache(shard, self.num_pages, config.max_batch, device)
        self.model = Qwen3Model(shard, weights, self.kv, config.policy, device, tp_size)
        self.decoder = DecodeRunner(self.model, config.max_batch, config.constants, config.cuda_graphs, device)
        self.hidden: torch.Tensor | None = None  # the last extend's output rows, for `logits`

    def set_block_table(self, slot: int, pages: list[int]):
        self.kv.set_block_table(slot, pages)

    def extend(self, ids, positions, kv_slots, slot_idx, cu_q, q_start, chunk_sizes, out_rows: list[int]):
        """A prefill / mixed step (see ExtendBatch); keeps the final hidden states of out_rows."""
        batch, rows = extend_batch(ids, positions, kv_slots, slot_idx, cu_q, q_start, chunk_sizes, out_rows,
                                   self.device)
        self.hidden = self.model.extend(batch, rows)

    def logits(self, lo: int, hi: int) -> torch.Tensor:
        """Logits of rows lo:hi of the last extend's output."""
        return self.model.logits(self.hidden[lo:hi], "prefill")

    def decode(self, rows: list[DecodeRow], chunk_size: int, last_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.step(rows, chunk_size, last_tokens)

    def capture_cuda_graphs(self):
        self.decoder.capture_all()

    def update_weights(self, named: dict[str, torch.Tensor]):
        """Copy each whole (HF name, tensor) into this rank's share of it, in place: the decode graphs hold
        pointers to these very tensors. PER_TOKEN's regrouped copies are rebuilt (it runs eagerly)."""
        model, mine = self.model, hf_tensors(self.model.w, self.model.cfg)
        rank = dist.get_rank() if model.tp_size > 1 else 0
        with torch.no_grad():
            for name, t in named.items():
                dim = TP_SPLIT_DIM.get(name.split(".")[-2]) if model.tp_size > 1 else None
                mine[name].copy_(t if dim is None else t.chunk(model.tp_size, dim)[rank])
        model.shares = [model.per_token_shares(layer) for layer in model.w.layers]

    def update_weights_from(self, blob: bytes):
        from safetensors.torch import load

        self.update_weights(load(blob))

    def weights_checksum(self) -> dict[str, str]:
        return weights_digest(hf_tensors(self.model.w, self.model.cfg))

    def close(self):
        """Free the decode graphs (and the memory they hold)."""
        self.decoder.release()

    def leave_group(self, abort: bool = False):
        """Tensor parallelism: close, then leave the process group (abort: without waiting for peers, after a
        failure)."""
        self.close()
        if abort:  # a local teardown; torch releases without one fall back to the ordinary call
            getattr(dist.distributed_c10d, "_abort_process_group", dist.destroy_process_group)()
        else:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dist.destroy_process_group()


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 11. Sampling and logprobs
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# A logprob is logit / T - logsumexp(logits / T), in fp32: one row-local kernel reduces each row's logsumexp in
# a fixed order, so no vocabulary-wide fp32 tensor is built (a log-softmax of 1,024 scored rows was 0.6 GB).
# Top-K must not depend on the batch either, and bf16 logits tie often, so ties go to the lower token id inside
# the sort key itself: (logit bits, made order-preserving) * 2^32 + (V - 1 - id), unique per token, so top-K
# and greedy are exact selections (a kernel keeps each 2,048-token chunk's best K keys, not all 151,936). An
# entry is vLLM's: the top-K (id, logprob) pairs, best first, plus the chosen token's own pair when it is not
# among them; scoring keeps a step's results as flat lists and builds an entry when it is read (section 14).
# Sampling is an exponential race (elementwise ops and an argmax, no prefix sum) for the whole batch at once,
# each row drawing from its request's own seeded generator: a fixed handful of launches a step, where one
# request at a time took ~10 per row (~2,500 a step for an RL batch of 256 samples).

SCORE_ROWS_PER_LM_HEAD = 1024  # prompt-logprob rows through lm_head at once


@dataclass
class SamplingParams:
    """vLLM's names and meanings."""
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh seed per prompt, reported as CompletionOutput.seed
    logprobs: int | None = None  # per generated token: None none, 0 the sampled token's, K the top K and it
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (0: the token's own)
    logprobs_mode: str = "raw_logprobs"  # or "processed_logprobs": of logits / T, top-k and top-p applied
    ignore_eos: bool = False
    n: int = 1  # samples per prompt; sample i draws from its own stream, seeded by (seed, i)


LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")  # 32 bits: what a torch generator keeps


def top_k_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """ids [B, k] of the k largest logits, best first, ties -> lower id (an exact selection)."""
    if k == 0:  # logprobs=0 asks for the chosen token alone: no top-K is needed
        return torch.empty(logits.shape[0], 0, dtype=torch.long, device=logits.device)
    return logits.shape[-1] - 1 - (kernels.top_k_keys(logits, k).topk(k, dim=-1).values & 0xFFFFFFFF)


class TokenLogprobs(torch.autograd.Function):
    """fp32 logprobs [B, n] of tokens ids [B, n] from bf16 logits [B, V]: logit / T - logsumexp(logits / T) over
    the kept tokens (temperature [B] or None for 1, keep [B, V] or None) - the one logprob computation of the
    sampler, the scorer and the trainer (section 15), so that their bits agree. Two row-local kernels, so no
    [B, V] fp32 tensor exists in the forward; the backward, d logprob / d logit = (onehot - softmax) / T, builds
    the softmax from the logsumexp."""
    @staticmethod
    def forward(ctx, logits, ids, temperature, keep):
        logprobs, lse = kernels.token_logprobs(logits, ids, temperature, keep)
        ctx.save_for_backward(logits, ids, temperature, lse, keep)
        return logprobs

    @staticmethod
    def backward(ctx, grad):
        logits, ids, temperature, lse, keep = ctx.saved_tensors
        t = 1.0 if temperature is None else temperature[:, None]
        softmax = torch.exp(logits.float() / t - lse[:, None])
        softmax = softmax if keep is None else softmax.masked_fill(~keep, 0.0)
        onehot = torch.zeros_like(softmax).scatter_add_(1, ids, grad)
        return ((onehot - grad.sum(1, keepdim=True) * softmax) / t).to(logits.dtype), None, None, None


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """TokenLogprobs of ids [B, n]; temperature [B, 1] (None: 1) and keep as in processed logprobs."""
    return TokenLogprobs.apply(logits, ids, None if temperature is None else temperature[:, 0], keep)


def top_k_logprobs(logits: torch.Tensor, k: int, chosen: torch.Tensor | None = None, temperature=None, keep=None):
    """(ids [B, k] best first, ties -> lower id; fp32 logprobs [B, k]) and, with `chosen` [B], their logprobs.
    temperature, keep: see token_logprobs (processed logprobs)."""
    ids = top_k_ids(logits, k)
    if chosen is None:
        return ids, token_logprobs(logits, ids, temperature, keep)
    logprobs = token_logprobs(logits, torch.cat([ids, chosen[:, None]], dim=1), temperature, keep)
    return ids, logprobs[:, :k], logprobs[:, k]


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off while a step's results become host lists: new objects a row, all
    kept, and each collection they would trigger re-scans every live object of the process (65,536 entries at
    k = 1 beside a live heap of 300,000 lists: 190 ms with it, 50 ms without, on a CI machine)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class PendingCopy:
    """Tensors whose copy to the host starts at once (into pinned memory); `lists()` waits for it alone, not
    for the GPU work queued after it."""
    def __init__(self, *tensors: torch.Tensor):
        self._host = [t.to("cpu", non_blocking=True) for t in tensors]
        self._copied = None
        if tensors and tensors[0].is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def lists(self) -> list[list]:
        if self._copied is not None:
            self._copied.synchronize()
        return [t.tolist() for t in self._host]


class ScoredRun(NamedTuple):
    """Rows row .. row + count - 1 of a step predict prompt tokens position + 1 .. position + count of request."""
    request: "Request"
    row: int
    position: int
    count: int


class PromptScores:
    """One step's prompt-logprob entries. The constructor queues their GPU work - blocks of
    SCORE_ROWS_PER_LM_HEAD rows through lm_head and the logprob kernels (a block's bf16 logits: 0.3 GB at
    Qwen3's vocabulary) - and each block's copy to the host. `finish()` hands the host lists to their requests,
    whose entries are built when read; the scheduler calls it while the next step runs on the GPU.
    logits_of(lo, hi): the logits of rows lo:hi of the step's kept rows, the scored ones from first_row on."""
    def __init__(self, logits_of: Callable[[int, int], torch.Tensor], runs: list[ScoredRun], first_row: int,
                 device: torch.device):
        self.runs, self.blocks = runs, []
        self.chosen = [t for r, _, pos, n in runs for t in r.prompt_ids[pos + 1:pos + 1 + n]]
        self.ks = [r.params.prompt_logprobs for r, *_, n in runs for _ in range(n)]
        device_chosen = _column(self.chosen, torch.int64, device)[:, 0] if runs else None
        for lo in range(0, len(self.chosen), SCORE_ROWS_PER_LM_HEAD):
            hi = min(lo + SCORE_ROWS_PER_LM_HEAD, len(self.chosen))
            logprobs = top_k_logprobs(logits_of(first_row + lo, first_row + hi), max(self.ks[lo:hi]),
                                      device_chosen[lo:hi])
            self.blocks.append((lo, hi, PendingCopy(*logprobs)))

    @gc_paused()
    def finish(self):
        """Wait for each block's copy in turn, and give each request its rows (PromptLogprobs, section 14)."""
        step = ScoredRows([], [], self.chosen, [], self.ks)
        for *_, copy in self.blocks:
            ids, lps, chosen_lps = copy.lists()
            step.ids.extend(ids)
            step.logprobs.extend(lps)
            step.chosen_logprobs.extend(chosen_lps)
        done = 0
        for r, *_, n in self.runs:
            r.prompt_logprobs.add(step, done, n)
            done += n


def entry_of(ids: list[int], lps: list[float], token: int, token_lp: float, k: int | None):
    """One row's entry from top_k_logprobs' results: its top-k pairs plus the token's own pair when not among
    them ([] where k is None)."""
    if k is None:
        return []
    top = ids[:k] if k < len(ids) else ids
    pairs = list(zip(top, lps))
    if token not in top:
        pairs.append((token, token_lp))
    return pairs


def sample_stream(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The random stream of a prompt's sample `index`, on the engine's device. torch's generators keep only
    32 bits of a seed, so (seed, index) is hashed into them; sample 0 keeps the seed itself."""
    if index:
        seed = int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=4).digest(), "little")
    return torch.Generator(device=device).manual_seed(seed)


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-row parameter as a [B, 1] device tensor, copied without waiting for the GPU (pinned memory)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)[:, None]


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]):
    """Each row's token as a [B] tensor on the logits' device: greedy where temperature is 0, else a draw by
    exponential race - argmax(prob_i / E_i) with E_i ~ Exp(1) is a draw from softmax(logits / T). (Inverse-CDF
    sampling needs a prefix sum, and CUDA's cumsum over a vocabulary-sized row is a decoupled look-back scan
    whose rounding can change from run to run: the soak caught one flipped sample in 100 trials.) top-k keeps
    the k best tokens (an exact selection, ties -> lower id); top-p keeps the fewest best tokens whose mass
    reaches top_p, summed on the CPU in float64 - deterministic, one row at a time, and the one case where
    sampling waits for the GPU. Every op is row-local, so a row's token does not depend on the other rows.
    Returns (tokens, kept tokens [B, V] or None when every row is greedy)."""
    tokens = logits.argmax(dim=-1)  # the first maximum: ties -> lowest id, as in the top-K key
    drawn = [p.temperature > 0 for p in params]
    if not any(drawn):
        return tokens, None
    device, vocab = logits.device, logits.shape[-1]
    probs = torch.softmax(logits.float() / _column([p.temperature or 1.0 for p in params], torch.float32, device), -1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    k_max = min(max(p.top_k for p in params), vocab)
    if k_max:
        ks = _column([p.top_k for p in params], torch.int64, device)  # 0: no top-k
        in_top_k = torch.arange(k_max, device=device) < ks
        keep = torch.zeros_like(keep).scatter_(1, top_k_ids(logits, k_max), in_top_k) | (ks == 0)
    for i, p in enumerate(params):
        if drawn[i] and p.top_p < 1.0:
            ranked, ids = torch.where(keep[i], probs[i], 0.0).sort(descending=True, stable=True)
            mass = ranked.double().cpu().cumsum(0)
            keep[i] = False
            keep[i, ids[:int(torch.searchsorted(mass, p.top_p * float(mass[-1]))) + 1]] = True
    noise = torch.ones_like(probs)
    for i, gen in enumerate(generators):
        if drawn[i]:
            noise[i].exponential_(generator=gen)
    race = torch.where(keep, probs / noise, -1.0)
    return torch.where(_column(drawn, torch.bool, device)[:, 0], race.argmax(dim=-1), tokens), keep


def processing(params: list[SamplingParams], keep: torch.Tensor | None, device: torch.device):
    """(temperature [B, 1], kept tokens [B, V]) for processed logprobs - rows that asked for raw ones, or are
    greedy, get temperature 1 and every token, which leaves their bits raw - or (None, None) if no row asked."""
    rows = [p.logprobs_mode == "processed_logprobs" and p.temperature > 0 for p in params]
    if not any(rows):
        return None, None
    temperature = _column([p.temperature if r else 1.0 for p, r in zip(params, rows)], torch.float32, device)
    return temperature, keep | ~_column(rows, torch.bool, device)


class SampledTokens:
    """One step's sampled tokens (and logprobs when asked for), computed on the GPU; their copy to the host is
    started at once and `host()` waits for it. Until then `tokens` can feed the next step (section 14)."""
    def __init__(self, reqs: list["Request"], logits: torch.Tensor):
        self.reqs, self.ks, params = reqs, [r.params.logprobs for r in reqs], [r.params for r in reqs]
        self.tokens, keep = sample_tokens(logits, params, [r.generator for r in reqs])
        logprobs = ()
        if any(k is not None for k in self.ks):
            logprobs = top_k_logprobs(logits, max(k or 0 for k in self.ks), self.tokens,
                                      *processing(params, keep, logits.device))
        self._copy = PendingCopy(self.tokens, *logprobs)

    @gc_paused()
    def host(self) -> tuple[list[int], list[list[tuple[int, float]]]]:
        """(token per row, logprob entry per row), once the copy is done."""
        tokens, *logprobs = self._copy.lists()
        if not logprobs:
            return tokens, [[] for _ in tokens]
        ids, lps, chosen_lps = logprobs
        return tokens, [entry_of(*row) for row in zip(ids, lps, tokens, chosen_lps, self.ks)]


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 12. Requests, the page pool and the prefix cache
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# A request reserves every page it could need (prompt + max_tokens) when it is admitted, so a running request
# can never be starved mid-generation. Prefix cache (vLLM's enable_prefix_caching): a full page is
# named by a hash chained over its tokens (the parent page's hash + its own ids), so a name stands for the whole
# prefix up to that page. A new request reuses the longest run of named pages that matches its prompt
# (reference-counted, never written again) and prefills only the rest. A page whose last user ended stays
# cached; the pool evicts the least recently released ones only when no never-used page is left. Under PIN a
# hit cannot change bits: a position's K/V depend only on the tokens up to it, whichever request computed them.

@dataclass
class StepOutput:
    token: int
    logprobs: list[tuple[int, float]]  # see entry_of; empty unless asked for


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None  # when asked for: [None, entry for token 1, ...]
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, found in the prefix cache at admission
    sample_index: int = 0  # which of the prompt's n samples this is
    parent: "Request | None" = None  # sample 0, whose prompt pages the other samples wait for and reuse
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)  # of the pages filled so far (named in the cache)
    finish_reason: str | None = None
    seed: int = 0  # the stream's seed: the request's own, or a fresh one
    generator: torch.Generator | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def prompt_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    @property
    def pages_needed(self) -> int:
        return -(-(len(self.prompt_ids) + self.params.max_tokens) // PAGE_SIZE)

    def kv_slot(self, position: int) -> int:
        """Where the K/V of this request's token at `position` lives in the cache."""
        return self.pages[position // PAGE_SIZE] * PAGE_SIZE + position % PAGE_SIZE

    def kv_slots(self, start: int, end: int) -> list[int]:
        """kv_slot of each position in [start, end): one range a page."""
        slots = []
        for page in range(start // PAGE_SIZE, -(-end // PAGE_SIZE)):
            shift = (self.pages[page] - page) * PAGE_SIZE
            slots += range(shift + max(start, page * PAGE_SIZE), shift + min(end, (page + 1) * PAGE_SIZE))
        return slots

    def append_token(self, token: int, entry: list[tuple[int, float]], eos_ids: list[int]) -> bool:
        """Append a sampled token, and set finish_reason if it ends the request. False, appending nothing, if
        the request had already ended: async scheduling ran it one step too far."""
        if self.finish_reason is not None:
            return False
        self.token_ids.append(token)
        self.logprobs.append(entry)
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
        elif self.num_generated >= self.params.max_tokens:
            self.finish_reason = "length"
        return True


class ExtendRows(NamedTuple):
    """The host side of one prefill / mixed step: the new tokens of its (request, n) entries, concatenated
    (ModelRunner.extend's arguments), and which rows go on to sampling and scoring."""
    ids: list[int]
    positions: list[int]
    kv_slots: list[int]
    slots: list[int]  # block-table row of each entry
    cu_q: list[int]  # offsets of each entry's tokens
    q_start: list[int]  # position of each entry's first new token
    chunk_sizes: list[int]  # key chunk of each entry's attention (section 8)
    out_rows: list[int]  # rows whose hidden states are kept: each sampler's last row, then the scored rows
    samplers: list[int]  # entries whose last prompt token (or decode row) is in this step: they sample a token
    scored: list[ScoredRun]  # the prompt-logprob rows of each entry that has some


def extend_rows(entries: list[tuple[Request, int]], chunk_of: Callable[[int], int]) -> ExtendRows:
    """The next n tokens of each (request, n); chunk_of(start) gives an entry's attention chunk."""
    ids, pos, kv_slots, cu, starts, scored = [], [], [], [0], [], []
    for r, n in entries:
        start = r.num_computed
        ids += r.token_ids[start:start + n]
        pos += range(start, start + n)
        kv_slots += r.kv_slots(start, start + n)
        scored_rows = min(n, len(r.prompt_ids) - 1 - start)  # row p predicts token p + 1 while it is a prompt token
        if r.params.prompt_logprobs is not None and scored_rows > 0:
            scored.append(ScoredRun(r, cu[-1], start, scored_rows))
        cu.append(cu[-1] + n)
        starts.append(start)
    samplers = [i for i, (r, n) in enumerate(entries) if r.num_computed + n == len(r.token_ids)]
    out_rows = [cu[i + 1] - 1 for i in samplers] + [row for run in scored
                                                    for row in range(run.row, run.row + run.count)]
    return ExtendRows(ids, pos, kv_slots, [r.slot for r, _ in entries], cu, starts, [chunk_of(s) for s in starts],
                      out_rows, samplers, scored)


def validate_request(prompt_ids: list[int], params: SamplingParams, cfg: Qwen3Config, max_batch: int):
    """Raise NanoBiError, naming the problem and what to do, for a request the engine cannot run."""
    limit, vocab = cfg.max_position_embeddings, cfg.vocab_size
    if not prompt_ids:
        raise NanoBiError("the prompt is empty; give at least one token of text")
    if params.max_tokens < 1:
        raise NanoBiError(f"max_tokens is {params.max_tokens}; it must be at least 1")
    if len(prompt_ids) + params.max_tokens > limit:
        raise NanoBiError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                          f"model's context of {limit} tokens; shorten the prompt or lower max_tokens")
    if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
        raise NanoBiError("sampling parameters out of range: temperature >= 0, 0 < top_p <= 1, top_k >= 0")
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(params, name) is not None and not 0 <= getattr(params, name) <= vocab:
            raise NanoBiError(f"{name} is {getattr(params, name)}; it must lie in [0, {vocab}] (or be None)")
    if params.logprobs_mode not in LOGPROBS_MODES:
        raise NanoBiError(f"logprobs_mode is {params.logprobs_mode!r}; use {' or '.join(LOGPROBS_MODES)}")
    try:
        ids = array.array("i", prompt_ids)  # integers of 32 bits, checked in C
    except (TypeError, OverflowError):
        ids = None
    if ids is None or min(ids) < 0 or max(ids) >= vocab:
        raise NanoBiError(f"prompt token ids must be integers in [0, {vocab})")
    if not 1 <= params.n <= max_batch:
        raise NanoBiError(f"n is {params.n}; it must lie in [1, {max_batch}] (the engine's max_batch)")


def page_hashes(token_ids: list[int], start: int, parent: int | None) -> list[int]:
    """Chained 128-bit hashes of the full pages of token_ids from page `start` on (parent: page start-1's), over
    the ids' bytes (repr-ing each page instead made admitting a 4k-token prompt take 1.1 ms)."""
    hashes, end = [], len(token_ids) // PAGE_SIZE
    data = array.array("i", token_ids[start * PAGE_SIZE:end * PAGE_SIZE]).tobytes()
    digest = (parent or 0).to_bytes(16, "little")
    for offset in range(0, len(data), 4 * PAGE_SIZE):
        digest = hashlib.blake2b(digest + data[offset:offset + 4 * PAGE_SIZE], digest_size=16).digest()
        hashes.append(int.from_bytes(digest, "little"))
    return hashes


class PagePool:
    """Host bookkeeping of the KV pages and batch slots: who uses which page, which pages are named."""
    def __init__(self, num_pages: int, max_slots: int, enable_prefix_caching: bool):
        self.num_pages, self.enable_prefix_caching = num_pages, enable_prefix_caching
        self.free_pages = list(range(num_pages - 1, -1, -1))  # never used, or evicted
        self.refs = [0] * num_pages  # running requests using each page
        self.cached: dict[int, None] = {}  # named pages nobody uses, least recently released first (LRU)
        self.page_by_hash: dict[int, int] = {}
        self.hash_by_page: dict[int, int] = {}
        self.free_slots = list(range(max_slots - 1, -1, -1))

    @property
    def num_unused(self) -> int:
        """Pages no running request uses: never-used ones plus cached ones (evictable)."""
        return len(self.free_pages) + len(self.cached)

    def cached_prefix(self, hashes: list[int]) -> list[int]:
        """The pages of the longest run of `hashes` that the cache holds."""
        pages = []
        for h in hashes:
            if h not in self.page_by_hash:
                break
            pages.append(self.page_by_hash[h])
        return pages

    def admit(self, r: Request) -> bool:
        """Give r a slot and every page it could need, reusing its prompt's pages found in the cache - never the
        page of its last prompt token, whose logits must be computed, and none for a scoring request, whose
        every prompt row must run to produce prompt logprobs. False, taking nothing, when they do not fit."""
        hashes, reused = [], []
        if self.enable_prefix_caching:
            hashes = page_hashes(r.prompt_ids, 0, None)
            if r.params.prompt_logprobs is None:
                reused = self.cached_prefix(hashes[:(len(r.prompt_ids) - 1) // PAGE_SIZE])
        revived = sum(1 for p in reused if p in self.cached)  # cached pages reused are not evictable any more
        new_pages = r.pages_needed - len(reused)
        if not self.free_slots or new_pages > self.num_unused - revived:
            return False
        r.slot = self.free_slots.pop()
        for p in reused:
            self.cached.pop(p, None)
            self.refs[p] += 1
        r.pages = reused + [self._take_page() for _ in range(new_pages)]
        r.num_computed = r.num_cached_tokens = len(reused) * PAGE_SIZE
        r.page_hashes = hashes[:len(reused)]
        return True

    def _take_page(self) -> int:
        if self.free_pages:
            page = self.free_pages.pop()
        else:  # evict the least recently released cached page
            page = next(iter(self.cached))
            del self.cached[page], self.page_by_hash[self.hash_by_page.pop(page)]
        self.refs[page] = 1
        return page

    def name_full_pages(self, r: Request):
        """Name the pages r has just filled, so that later requests with the same prefix can reuse them (the
        first page computed for a hash wins)."""
        if not self.enable_prefix_caching or r.num_computed // PAGE_SIZE <= len(r.page_hashes):
            return
        parent = r.page_hashes[-1] if r.page_hashes else None
        for h in page_hashes(r.token_ids[:r.num_computed], len(r.page_hashes), parent):
            page = r.pages[len(r.page_hashes)]
            if h not in self.page_by_hash and page not in self.hash_by_page:
                self.page_by_hash[h], self.hash_by_page[page] = page, h
            r.page_hashes.append(h)

    def forget_prefixes(self):
        """Unname every page (no K/V computed with other weights may be served); cached pages become free."""
        self.free_pages += list(self.cached)
        self.cached.clear()
        self.page_by_hash.clear()
        self.hash_by_page.clear()

    def release(self, r: Request):
        """r's pages and slot go back to the pool; its named pages stay cached."""
        if r.slot < 0:
            return
        for p in r.pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                if p in self.hash_by_page:
                    self.cached[p] = None
                else:
                    self.free_pages.append(p)
        self.free_slots.append(r.slot)
        r.slot, r.pages = -1, []

# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 13. The engine: the step API
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# The step API is what the invariance gates drive: add_request; prefill (whole prompts); step (any mix of
# prompt chunks and decode rows, eager); decode_step (decode rows only, under CUDA graphs); free / abort. A step
# that fails gives back the admissions it made. A decode step comes in two halves - `_launch_decode` queues it
# on the GPU and returns at once, `_accept` waits for its tokens - so that the scheduler (section 14) can build
# step t+1 while step t runs: host work of ~1 ms per decode step at batch 135, which the GPU would otherwise idle
# through.

@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs, shared by LLM and Engine, with vLLM's names where vLLM has the concept."""
    policy: NumericPolicy | str = NumericPolicy.TUNED
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (section 9)
    max_batch: int = 128  # requests running at once (vLLM's max_num_seqs); graphs are captured up to it
    kv_cache_bytes: int | None = None  # the KV pool of each GPU; None: 90% of its free memory, less 4 GiB
    constants: SplitKvConstants = SplitKvConstants()  # tests on tiny models scale them down
    max_num_batched_tokens: int = 8192  # tokens one step may carry
    prefill_chunk_tokens: int = 2048  # a long prompt is prefilled in chunks of this many tokens
    enable_prefix_caching: bool = True
    async_scheduling: bool = True  # queue decode step t+1 before step t's tokens reach the host (one GPU)

    def __post_init__(self):
        if self.policy not in [*NumericPolicy, *(p.value for p in NumericPolicy)]:
            raise NanoBiError(f"policy {self.policy!r} is not one of {', '.join(p.value for p in NumericPolicy)}")
        object.__setattr__(self, "policy", NumericPolicy(self.policy))


class StepEvent(NamedTuple):
    """What Engine.step_hook is told, three times a step: at "launch" (its GPU work is about to be queued),
    "launched" (queued) and "accepted" (its tokens reached the host and were appended). For measurement."""
    stage: str
    kind: str  # "mixed" (eager, with prompt work) or "decode" (graph-replayed)
    rows: int  # rows the step computes
    kv_tokens: int = 0  # keys its decode rows attend, summed ("launch" of a decode step)
    overlapped: bool = False  # a decode step queued while the step before was still in flight
    dropped: int = 0  # rows of requests that had ended while the step ran ("accepted")


class Engine:
    def __init__(self, ckpt: Checkpoint, policy: NumericPolicy | str = NumericPolicy.TUNED, **options):
        """options: EngineConfig's other fields (cuda_graphs, max_batch, kv_cache_bytes, ...)."""
        self.config = EngineConfig(policy, **options)
        self.ckpt, self.cfg, self.policy = ckpt, ckpt.config, self.config.policy
        self.device = ckpt.weights.embed_tokens.device
        self.tensor_parallel_size = ckpt.tensor_parallel_size
        # under tensor parallelism the workers would need the sampled tokens of rank 0's GPU: steps run serially
        self.async_scheduling = self.config.async_scheduling and self.tensor_parallel_size == 1
        if self.tensor_parallel_size == 1:
            self.runner = ModelRunner(self.cfg, ckpt.weights, self.config, self.device)
        else:
            self.runner = TensorParallelRunner(ckpt, self.config)
        self.pool = PagePool(self.runner.num_pages, self.config.max_batch, self.config.enable_prefix_caching)
        consts = self.config.constants
        self.pin_chunk = pin_chunk_size(self.cfg.max_position_embeddings, consts.chunk_floor, consts.pin_max_chunks)
        self.decode_buckets = decode_buckets(self.config.max_batch)  # TUNED's decode chunk follows the bucket
        self.step_hook: Callable[[StepEvent], None] | None = None  # e.g. the bench's timers
        self._scores: PromptScores | None = None  # the last step's prompt logprobs, until finish_scoring()

    def close(self):
        """Free the decode graphs and stop the tensor-parallel workers, if any."""
        self.runner.close()

    def capture_cuda_graphs(self):
        """Capture the decode graph of every batch bucket now (LLM does at startup; otherwise each is captured
        the first time a step needs it)."""
        self.runner.capture_cuda_graphs()

    def add_request(self, prompt_ids: list[int], params: SamplingParams, sample_index: int = 0) -> Request:
        """Validate and create a request - sample `sample_index` of the prompt (no resources are taken until
        it is admitted)."""
        validate_request(prompt_ids, params, self.cfg, self.config.max_batch)
        seed = fresh_seed() if params.seed is None else params.seed
        req = Request(list(prompt_ids), params, token_ids=list(prompt_ids), sample_index=sample_index,
                      prompt_logprobs=PromptLogprobs() if params.prompt_logprobs is not None else None, seed=seed,
                      generator=sample_stream(seed, sample_index, self.device))
        if req.pages_needed > self.pool.num_pages:
            raise NanoBiError(f"the request needs {req.pages_needed} KV pages but the pool holds "
                              f"{self.pool.num_pages}; lower max_tokens or give the cache more memory")
        return req

    def prefill(self, reqs: list[Request]) -> list[StepOutput]:
        """Admit the requests and run the rest of their prompts (after any prefix-cache hit) in one pass;
        sample each one's first token."""
        return self.step(prefill=[(r, len(r.prompt_ids)) for r in reqs])  # step cuts n to what is left

    def admit(self, reqs: list[Request]):
        """Reserve the requests' pages and batch slots, reusing cached prefix pages (num_cached_tokens)."""
        admitted = []
        try:
            for r in reqs:
                if not self.try_admit(r):
                    raise NanoBiError(f"not enough free KV pages or batch slots for {len(reqs)} request(s); free "
                                      f"running requests first")
                admitted.append(r)
        except BaseException:
            for r in admitted:
                self.free(r)
            raise

    def try_admit(self, r: Request) -> bool:
        if not self.pool.admit(r):
            return False
        self.runner.set_block_table(r.slot, r.pages)
        return True

    def step(self, prefill: list[tuple[Request, int]] = (), decode: list[Request] = (),
             defer_scoring: bool = False) -> list[StepOutput | None]:
        """One eager pass over the next n prompt tokens of each (request, n) in `prefill` and one new token for
        each request in `decode` - a mixed step when both are given. Returns one entry per prefill request,
        then per decode request: its sampled token, or None while its prompt is unfinished. A prefill request
        not yet admitted is admitted first (n then counts from after its prefix-cache hit, and is cut to what
        is left of the prompt); if the pass fails, that admission is undone. defer_scoring: leave this step's
        prompt-logprob results to finish_scoring(), so that the host takes them while the next step runs."""
        prefill, decode = list(prefill), list(decode)
        self._check_decode_rows(decode)
        new = [r for r, _ in prefill if r.slot < 0]
        self.admit(new)
        try:
            prefill = [(r, min(n, len(r.prompt_ids) - r.num_computed)) for r, n in prefill]
            for r, n in prefill:
                if r.finish_reason or n < 1:
                    raise NanoBiError(f"no prompt token left to prefill: {len(r.prompt_ids)}-token prompt, "
                                      f"{r.num_computed} computed, chunk {n}")
            outs = self._extend(prefill + [(r, 1) for r in decode])
        except BaseException:
            for r in new:
                self.free(r)
            raise
        if not defer_scoring:
            self.finish_scoring()
        return outs

    def finish_scoring(self):
        """Hand the prompt-logprob results of the steps run so far to their requests."""
        scores, self._scores = self._scores, None
        if scores is not None:
            scores.finish()

    def decode_step(self, reqs: list[Request]) -> list[StepOutput]:
        """One token for each request, under a CUDA graph: its last token goes in at position len-1."""
        self._check_decode_rows(reqs)
        return self._accept(self._launch_decode(reqs))

    def free(self, req: Request):
        self.pool.release(req)

    def abort(self, req: Request):
        """Stop a request wherever it is: its pages and slot go back to the pool."""
        self.free(req)
        req.finish_reason = req.finish_reason or "abort"

    def run(self, reqs: list[Request]):
        """Run the requests (new or already running) to completion (section 14)."""
        Scheduler(self).run(reqs)

    # -- inside a step -------------------------------------------------------------------------------------
    def _tell(self, *event):
        if self.step_hook is not None:
            self.step_hook(StepEvent(*event))

    @staticmethod
    def _check_decode_rows(reqs: list[Request]):
        if any(r.slot < 0 or not r.prompt_done or r.finish_reason for r in reqs):
            raise NanoBiError("decode rows must be running requests whose prompt is prefilled")

    def _attention_chunk(self, start: int) -> int:
        return prefill_chunk(self.policy, start, self.pin_chunk, self.cfg.max_position_embeddings)

    def _decode_chunk(self, rows: list[DecodeRow]) -> int:
        if self.policy is not NumericPolicy.TUNED:
            return self.pin_chunk
        padded = next(b for b in self.decode_buckets if b >= len(rows))
        kv_heads = self.cfg.num_key_value_heads // self.tensor_parallel_size  # one GPU's share
        return tuned_chunk_size(max(row.seq_len for row in rows), padded, kv_heads, self.config.constants)

    def _launch_decode(self, reqs: list[Request], in_flight: SampledTokens | None = None) -> SampledTokens:
        """Start a decode step on the GPU and return without waiting for it. A request of `in_flight` (the step
        before, whose tokens are not on the host yet) is fed the token sampled at its row j there: input id ~j."""
        row_in_flight = {id(r): j for j, r in enumerate(in_flight.reqs)} if in_flight is not None else {}
        rows = []
        for r in reqs:
            token = ~row_in_flight[id(r)] if id(r) in row_in_flight else r.token_ids[-1]
            rows.append(DecodeRow(token, r.num_computed, r.slot, r.num_computed + 1, r.kv_slot(r.num_computed)))
            r.num_computed += 1
        chunk = self._decode_chunk(rows)
        self._tell("launch", "decode", len(rows), sum(row.seq_len for row in rows), in_flight is not None)
        if in_flight is None:  # the tensor-parallel runner (serial steps only) takes host data alone
            logits = self.runner.decode(rows, chunk)
        else:
            logits = self.runner.decode(rows, chunk, in_flight.tokens)
        self._tell("launched", "decode", len(rows), 0, in_flight is not None)
        return SampledTokens(reqs, logits)

    def _accept_decode(self, sampled: SampledTokens) -> list[StepOutput]:
        outs = self._accept(sampled)
        self._tell("accepted", "decode", len(sampled.reqs), 0, False, len(sampled.reqs) - len(outs))
        return outs

    def _extend(self, entries: list[tuple[Request, int]]) -> list[StepOutput | None]:
        b = extend_rows(entries, self._attention_chunk)
        self._tell("launch", "mixed", len(b.ids))
        self.runner.extend(b.ids, b.positions, b.kv_slots, b.slots, b.cu_q, b.q_start, b.chunk_sizes, b.out_rows)
        self._tell("launched", "mixed", len(b.ids))
        for r, n in entries:
            r.num_computed += n
            self.pool.name_full_pages(r)
        sampled = SampledTokens([entries[i][0] for i in b.samplers], self.runner.logits(0, len(b.samplers))) \
            if b.samplers else None  # queued first: its tokens need not wait for the scoring blocks
        scores = PromptScores(self.runner.logits, b.scored, len(b.samplers), self.device)
        self.finish_scoring()  # the step before's entries, while this one runs
        self._scores = scores
        result: list[StepOutput | None] = [None] * len(entries)
        if b.samplers:
            for i, out in zip(b.samplers, self._accept(sampled)):
                result[i] = out
        self._tell("accepted", "mixed", len(b.ids))
        return result

    def _accept(self, sampled: SampledTokens) -> list[StepOutput]:
        """Wait for a step's tokens and append them to their requests (the rows of requests that had ended while
        the step ran are dropped)."""
        outs = []
        for r, token, entry in zip(sampled.reqs, *sampled.host()):
            if r.append_token(token, entry, self.ckpt.eos_ids):
                self.pool.name_full_pages(r)
                outs.append(StepOutput(token, entry))
        return outs


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 14. The scheduler, and LLM
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# `LLM.generate` hands its requests to a Scheduler. Each step carries every running request's decode row plus
# whole prompt chunks (FCFS) while it stays within max_num_batched_tokens (8192), so running requests keep
# emitting tokens while a long prompt is prefilled; a step with no prompt work is a graph-replayed decode step.
# A prompt is cut into chunks of prefill_chunk_tokens (2048) counted from its first token: where it is cut
# depends on its own length only. Async scheduling (vLLM's name): decode step t+1 is queued before step t's
# tokens reach the host - a row whose token is still on the GPU carries input id ~j, row j of step t - so the
# host's bookkeeping overlaps the GPU (nano-vllm's offline workload, H100: the GPU's idle time fell from 0.93 s to
# 0.26 s of the run); likewise a step's prompt-logprob results reach the host once the next step is queued. Whatever
# is raised inside a run, Ctrl-C too, its requests' pages and slots go back.

class Scheduler:
    """Runs requests to completion through an Engine's step API. A request that samples its end-of-sequence
    token in step t is found out too late under async scheduling: its row of t+1 runs (writing into its own
    reserved page) and is dropped. A step with prompt work is eager and reads its tokens on the host, so the
    step in flight is accepted first. The rows and kernels are those of serial steps, so PIN's bits are
    unchanged (the async test proves it)."""
    def __init__(self, engine: Engine):
        self.engine = engine

    def run(self, reqs: list[Request]):
        eng = self.engine
        waiting, running = deque(r for r in reqs if r.slot < 0), [r for r in reqs if r.slot >= 0]
        in_flight = None  # a decode step whose tokens are not on the host yet
        eng.finish_scoring()  # a step deferred before this run: only this run's entries are dropped if it fails
        try:
            while waiting or running:
                decode = [r for r in running if r.prompt_done and self._wants_token(r)]
                prefill = self._schedule_prompts(waiting, running, eng.config.max_num_batched_tokens - len(decode))
                if in_flight is not None and (prefill or not decode):  # an eager step takes its ids from the host
                    eng._accept_decode(in_flight)
                    in_flight = None
                elif prefill:
                    eng.step(prefill, decode, defer_scoring=True)
                elif decode:
                    launched = eng._launch_decode(decode, in_flight)
                    eng.finish_scoring()  # the host's work on the steps before, while the GPU runs this one
                    if in_flight is not None:
                        eng._accept_decode(in_flight)
                    in_flight = launched
                    if not eng.async_scheduling:
                        eng._accept_decode(launched)
                        in_flight = None
                else:
                    raise NanoBiError("the KV pool is held by requests outside this call; free them first")
                for r in [r for r in running if r.finish_reason is not None]:
                    eng.free(r)
                    running.remove(r)
            eng.finish_scoring()
        except BaseException:
            eng._scores = None  # a failed run's prompt-logprob results are dropped
            for r in reqs:
                eng.abort(r)
            raise

    @staticmethod
    def _wants_token(r: Request) -> bool:
        """Whether r needs another decode step, counting a token still in flight (num_computed is one ahead)."""
        return r.finish_reason is None and r.num_computed - len(r.prompt_ids) + 1 < r.params.max_tokens

    def _schedule_prompts(self, waiting: deque, running: list, budget: int) -> list[tuple[Request, int]]:
        """Whole prompt chunks, FCFS: running prompts first, then new requests while pages and slots allow. A
        sample other than a prompt's first waits until the first has filled the prompt's pages, then reuses
        them. The first chunk is always taken, so a step makes progress even when decode rows fill the budget."""
        eng, chunks = self.engine, []
        chunk_tokens = eng.config.prefill_chunk_tokens
        for r in [r for r in running if not r.prompt_done] + list(waiting):
            if r.slot < 0:
                if r.parent is not None and not r.parent.prompt_done:
                    continue
                if len(running) >= eng.config.max_batch or (chunks and min(chunk_tokens, len(r.prompt_ids))
                                                            > budget) or not eng.try_admit(r):
                    break
                waiting.remove(r)
                running.append(r)
            n = min(chunk_tokens, len(r.prompt_ids) - r.num_computed)
            if chunks and n > budget:
                break
            chunks.append((r, n))
            budget -= n
        return chunks


@dataclass
class CompletionOutput:
    """One sample (vLLM's name and fields)."""
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[list[tuple[int, float]]]
    cumulative_logprob: float | None  # sum of the sampled tokens' logprobs (when logprobs were asked for)
    finish_reason: str
    seed: int  # the prompt's seed: SamplingParams(seed=seed) with sample_index=index replays this sample alone


class ScoredRows(NamedTuple):
    """One scoring step's logprob results, as flat host lists over its scored rows (`PromptScores`)."""
    ids: list[list[int]]  # top-k ids a row, best first
    logprobs: list[list[float]]
    chosen: list[int]  # the prompt token each row predicts
    chosen_logprobs: list[float]
    ks: list[int]

    def entry(self, row: int) -> list[tuple[int, float]]:
        return entry_of(self.ids[row], self.logprobs[row], self.chosen[row], self.chosen_logprobs[row], self.ks[row])


class PromptLogprobs(Sequence):
    """vLLM's prompt_logprobs - None for the first prompt token, then one [(token id, logprob), ...] entry per
    prompt token - kept as the scoring steps' flat lists and made into pairs when read (vLLM's FlatLogprobs
    idea). Building every entry as its step ended cost ~0.7 us a row of host time on a CI core (4 x 1024 rows
    at k = 8: ~3 ms; 65,536 rows at k = 1: ~28 ms); a step's end now costs 0.04 / 1.1 ms, and a caller pays
    for the entries it reads (all of them: 4.1 / 46 ms). Indexing, slices, iteration and == behave as on the
    list; list(p) makes one (for json, say)."""
    def __init__(self):
        self._pieces: list[tuple[int, ScoredRows, int, int]] = []  # (first entry, step, its first row, rows)
        self._len = 1

    def add(self, step: ScoredRows, row: int, count: int):
        """Entries len(self) .. len(self) + count - 1 are rows row .. row + count - 1 of `step`."""
        self._pieces.append((self._len, step, row, count))
        self._len += count

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        yield None
        for _, step, row, count in self._pieces:
            yield from map(step.entry, range(row, row + count))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        i = i + self._len if i < 0 else i
        if not 0 <= i < self._len:
            raise IndexError(f"prompt_logprobs has {self._len} entries; there is no entry {i}")
        if i == 0:
            return None
        first, step, row, _ = self._pieces[bisect.bisect_right(self._pieces, i, key=lambda p: p[0]) - 1]
        return step.entry(row + i - first)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass
class RequestOutput:
    """One prompt's result: its n samples in `outputs`; token_ids / text / logprobs / finish_reason are the
    first sample's, so single-sample callers need not know about n."""
    prompt_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's: None for token 0, then one entry per prompt token
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (vLLM's name)

    token_ids = property(lambda self: self.outputs[0].token_ids)
    text = property(lambda self: self.outputs[0].text)
    logprobs = property(lambda self: self.outputs[0].logprobs)
    finish_reason = property(lambda self: self.outputs[0].finish_reason)


class LLM:
    """The user-facing API: LLM(model).generate(prompts, SamplingParams(...))."""

    def __init__(self, model: str | Path | Checkpoint | None = None, policy: NumericPolicy | str = "tuned",
                 tensor_parallel_size: int | None = None, **options):
        """model: a directory, a hub id in the local HF cache, a preset name or a loaded Checkpoint. options:
        EngineConfig's other fields. tensor_parallel_size > 1 runs the model on that many GPUs, one process each
        (section 16); close() the LLM (or use a `with` block) to stop them before making another. None: a
        Checkpoint's own size, else 1."""
        if isinstance(model, Checkpoint) and tensor_parallel_size in (None, model.tensor_parallel_size):
            self.ckpt = model
        else:
            where = model.path if isinstance(model, Checkpoint) else model
            self.ckpt = load_checkpoint(where, tensor_parallel_size=tensor_parallel_size or 1)
        self.tokenizer = self.ckpt.tokenizer
        self.engine = Engine(self.ckpt, policy, **options)
        try:
            self.engine.capture_cuda_graphs()
        except BaseException:  # e.g. Ctrl-C: stop any tensor-parallel workers before leaving
            self.engine.close()
            raise

    def close(self):
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Prompts are text (tokenized as is; use tokenizer.chat for the chat format) or token-id lists."""
        params = params or SamplingParams()
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        groups = []  # per prompt, its n samples (one seed, fresh unless given); all validated before any runs
        for prompt in ids:
            mine = params if params.seed is not None else dataclasses.replace(params, seed=fresh_seed())
            first = self.engine.add_request(prompt, mine)
            groups.append([first] + [dataclasses.replace(self.engine.add_request(prompt, mine, i), parent=first)
                                     for i in range(1, params.n)])
        self.engine.run([r for group in groups for r in group])
        return [RequestOutput(g[0].prompt_ids, [self._completion(r) for r in g],
                              g[0].prompt_logprobs,
                              g[0].num_cached_tokens) for g in groups]

    def _completion(self, r: Request) -> CompletionOutput:
        generated = r.token_ids[len(r.prompt_ids):]
        cumulative = sum(dict(e)[t] for t, e in zip(generated, r.logprobs)) if r.params.logprobs is not None else None
        return CompletionOutput(r.sample_index, generated, self.tokenizer.decode(generated), r.logprobs, cumulative,
                                r.finish_reason, r.seed)

    def update_weights(self, named_tensors) -> None:
        """Copy new weights into the engine in place: (HF name, tensor) pairs, e.g. a TrainingModel's
        named_parameters(), any subset (section 15)."""
        update_engine_weights(self.engine, named_tensors)

    def weights_checksum(self) -> dict[str, str]:
        """A digest of each weight's bf16 bits, by HF name (under tensor parallelism, of rank 0's share)."""
        return self.engine.runner.weights_checksum()

# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 15. Training: a trainable forward with the sampler's bits, and weights pushed in place
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# In RL the policy-gradient ratio exp(trainer logprob - sampler logprob) is exactly 1 on-policy only if the
# trainer's forward reproduces the sampler's bits; any other forward (HF's, plain torch) reduces in other orders
# and the ratio wanders. So TrainingModel runs the engine's own model definition and kernels forward (Qwen3Model
# with ops whose forward *is* the engine's kernel), and its backward differentiates each kernel's plain-torch
# reference, recomputed from the saved inputs: the backward only feeds the optimizer, which needs a correct
# gradient, not particular bits. Its parameters are fp32 masters under HF's names; the forward uses their bf16
# rounding, exactly what LLM.update_weights copies into the engine - in place, so every CUDA graph stays valid.

class ReferenceGrad(torch.autograd.Function):
    """Forward: kernel(*inputs), the engine's own; backward: the vector-Jacobian product of reference(*inputs),
    the kernel's plain-torch twin, recomputed from the saved inputs."""
    @staticmethod
    def forward(ctx, kernel, reference, *inputs):
        ctx.reference = reference
        ctx.save_for_backward(*inputs)
        return kernel(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]
        with torch.enable_grad():
            outputs = ctx.reference(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
        wanted = [x for x in inputs if x.requires_grad]
        found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True) if wanted else ())
        return (None, None, *(next(found) if x.requires_grad else None for x in inputs))


def reference_attention(cu_q: list[int]) -> Callable:
    """ModelOps.attention in plain torch, for whole sequences cu_q[s]:cu_q[s+1] (no cache)."""
    def attention(model, qkv, q_norm, k_norm, n, positions, kv_slots, attend):
        c = model.cfg
        return kernels.causal_attention_ref(qkv, q_norm, k_norm, model.cos, model.sin, positions, cu_q,
                                            c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps)
    return attention


def reference_ops(cu_q: list[int]) -> ModelOps:
    """The plain-torch twin of KERNEL_OPS, differentiated by torch itself: the gradient check's yardstick."""
    matmul = lambda x, w, *args, **kwargs: kernels.matmul_ref(x, w)  # noqa: E731
    gate_up_silu = lambda x, w, *args, **kwargs: kernels.silu_and_mul_ref(kernels.matmul_ref(x, w))  # noqa: E731
    return ModelOps(kernels.rms_norm_ref, matmul, matmul, gate_up_silu, reference_attention(cu_q))


def training_ops(cu_q: list[int]) -> ModelOps:
    """KERNEL_OPS with gradients: each runs the engine's kernel forward and differentiates its reference."""
    ref_attention = reference_attention(cu_q)

    def rms_norm(x, weight, eps, *residual):
        return ReferenceGrad.apply(lambda *t: kernels.rms_norm(t[0], t[1], eps, *t[2:]),
                                   lambda *t: kernels.rms_norm_ref(t[0], t[1], eps, *t[2:]), x, weight, *residual)

    def gemm(x, w, policy, phase, k_segments=1, shares=None):
        return ReferenceGrad.apply(lambda x, w: linear(x, w, policy, phase, k_segments, shares), kernels.matmul_ref,
                                   x, w)

    def row_parallel(x, w, policy, phase, tp_size):
        return ReferenceGrad.apply(lambda x, w: row_parallel_linear(x, w, policy, phase, tp_size),
                                   kernels.matmul_ref, x, w)

    def attention(model, qkv, q_norm, k_norm, n, positions, kv_slots, attend):
        return ReferenceGrad.apply(
            lambda *t: kernel_attention(model, *t, n, positions, kv_slots, attend),
            lambda *t: ref_attention(model, *t, n, positions, kv_slots, attend), qkv, q_norm, k_norm)

    def gate_up_silu(x, w, policy, phase, shares=None):  # GEMM, then SiLU*mul: the bits of the sampler's
        # epilogue (section 6), and the product that SiLU*mul's backward needs
        gate_up = gemm(x, w, policy, phase, shares=shares)
        return ReferenceGrad.apply(kernels.silu_and_mul, kernels.silu_and_mul_ref, gate_up)

    return ModelOps(rms_norm, gemm, row_parallel, gate_up_silu, attention)


class TrainingModel(torch.nn.Module):
    """The engine's model with gradients: fp32 parameters under HF's names, and token_logprobs, whose forward
    under PIN gives the sampler's bits. Built from an LLM (its weights and split-KV constants), a Checkpoint,
    or anything load_checkpoint takes."""
    def __init__(self, llm_or_checkpoint, policy: NumericPolicy | str = NumericPolicy.PIN,
                 constants: SplitKvConstants | None = None):
        super().__init__()
        source = llm_or_checkpoint
        ckpt = source.ckpt if isinstance(source, LLM) else source if isinstance(source, Checkpoint) \
            else load_checkpoint(source)
        consts = constants or (source.engine.config.constants if isinstance(source, LLM) else SplitKvConstants())
        self.policy, self.cfg = EngineConfig(policy).policy, ckpt.config
        if self.policy is NumericPolicy.PER_TOKEN or ckpt.tensor_parallel_size != 1:
            raise NanoBiError("TrainingModel runs the TUNED or PIN policy on one device; use policy 'pin' and a "
                              "checkpoint loaded with tensor_parallel_size 1")
        self.device = ckpt.weights.embed_tokens.device
        self.chunk = prefill_chunk(self.policy, 0, pin_chunk_size(self.cfg.max_position_embeddings, consts.chunk_floor,
                                                                  consts.pin_max_chunks), self.cfg.max_position_embeddings)
        for name, tensor in hf_tensors(ckpt.weights, self.cfg).items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, torch.nn.Module())
                module = module._modules[part]
            module.register_parameter(leaf, torch.nn.Parameter(tensor.detach().float().clone()))

    def engine_weights(self) -> Qwen3Weights:
        """The weights the engine computes with: the parameters rounded to bf16 (differentiably), fused."""
        return fuse_weights({name: p.to(torch.bfloat16) for name, p in self.named_parameters()}, self.cfg)

    def weights_checksum(self) -> dict[str, str]:
        """LLM.weights_checksum's digest of the bf16 weights this model would push (equal once pushed)."""
        return weights_digest(dict(self.named_parameters()))

    def token_logprobs(self, sequences: list[list[int]], temperature: float = 1.0, ops=training_ops) -> list[torch.Tensor]:
        """For each sequence, the fp32 logprob of every token after the first given those before it - of
        logits / temperature, as the sampler's processed logprobs at that temperature - differentiable with
        respect to the parameters. The sequences run packed in one prefill; pack and split them as you like.
        ops: training_ops (the engine's kernels forward), or reference_ops (plain torch throughout: the
        gradient check's yardstick)."""
        batch, kv, out_rows, targets, cu_q = self._packed(sequences)
        model = Qwen3Model(self.cfg, self.engine_weights(), kv, self.policy, self.device)
        model.ops = ops(cu_q)
        logits = model.ops.linear(model.extend(batch, out_rows), model.w.lm_head, self.policy, "prefill")
        t = torch.full((len(out_rows), 1), temperature, device=self.device)
        logprobs = token_logprobs(logits, targets[:, None], t)[:, 0]
        return list(logprobs.split([len(s) - 1 for s in sequences]))

    def _packed(self, sequences: list[list[int]]):
        """The sequences as one prefill from position 0 over a KV cache of their own."""
        lengths = [len(s) for s in sequences]
        if not sequences or min(lengths) < 2 or max(lengths) > self.cfg.max_position_embeddings:
            raise NanoBiError(f"token_logprobs takes sequences of 2..{self.cfg.max_position_embeddings} tokens")
        if any(not 0 <= t < self.cfg.vocab_size for s in sequences for t in s):
            raise NanoBiError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        pages = [-(-n // PAGE_SIZE) for n in lengths]
        kv = KVCache(self.cfg, sum(pages), len(sequences), self.device)
        cu_q, slots = [0], []
        for s, (n, first) in enumerate(zip(lengths, [sum(pages[:i]) for i in range(len(pages))])):
            kv.set_block_table(s, list(range(first, first + pages[s])))
            slots += [(first + p // PAGE_SIZE) * PAGE_SIZE + p % PAGE_SIZE for p in range(n)]
            cu_q.append(cu_q[-1] + n)
        out_rows = [a + p for a, n in zip(cu_q, lengths) for p in range(n - 1)]  # each row predicts the next token
        batch, rows = extend_batch([x for s in sequences for x in s], [p for n in lengths for p in range(n)], slots,
                                   list(range(len(sequences))), cu_q, [0] * len(sequences),
                                   [self.chunk] * len(sequences), out_rows, self.device)
        targets = torch.tensor([s[p + 1] for s in sequences for p in range(len(s) - 1)], device=self.device)
        return batch, kv, rows, targets, cu_q


def weights_digest(named: dict[str, torch.Tensor]) -> dict[str, str]:
    """A digest of each tensor's bf16 bits, by name."""
    from safetensors.torch import save

    return {name: hashlib.blake2b(save({"t": t.detach().to(torch.bfloat16).contiguous().cpu()}),
                                  digest_size=16).hexdigest() for name, t in sorted(named.items())}


def update_engine_weights(engine: "Engine", named_tensors):
    """Validate every (HF name, tensor) first, refuse while requests hold batch slots, then copy them in place,
    each rank its own share, rounded to bf16 like TrainingModel's forward; and forget the prefix cache, since
    every cached page was computed with the old weights (a flush: cheaper to reason about than a weight version
    in each page's hash, and an RL step changes every weight anyway)."""
    named = dict(named_tensors)
    running = engine.config.max_batch - len(engine.pool.free_slots)
    if running:
        raise NanoBiError(f"update_weights while {running} request(s) are running; let them finish or abort them")
    check_weight_update(named, engine.cfg)
    engine.runner.update_weights({name: t.detach() for name, t in named.items()})
    engine.pool.forget_prefixes()


def check_weight_update(named: dict[str, torch.Tensor], cfg: Qwen3Config):
    """Every (HF name, tensor) of an update is known, whole, floating point and finite - or nothing is copied."""
    want = tensor_shapes(cfg)
    for name, t in named.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            raise NanoBiError("update_weights: this model ties lm_head to model.embed_tokens.weight; update that")
        if name not in want:
            raise NanoBiError(f"update_weights: {name!r} is not a tensor of this model (use HF names, e.g. "
                              f"model.layers.0.self_attn.q_proj.weight)")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != want[name]:
            raise NanoBiError(f"update_weights: {name} must be a floating-point tensor of shape {list(want[name])}, "
                              f"got {getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
        if not torch.isfinite(t).all():
            raise NanoBiError(f"update_weights: {name} holds NaN or infinity; the engine keeps its weights")


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 16. Tensor parallelism II: one process per GPU
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# The engine's process is rank 0: it schedules, keeps the page pool, samples, and runs its own ModelRunner on
# GPU 0. It starts one worker process per other GPU (torch.distributed: NCCL between GPUs, gloo on a CPU-only
# machine, where the same code runs under the Triton interpreter). Every runner call is sent over a local
# socket to each worker (a few hundred bytes of ints), then run on rank 0; the collectives inside the forward
# pass (section 7) keep the ranks in step, and decode graphs capture them. Failure has one rule: never hang. A
# worker that dies takes the process down with a message; a worker whose parent dies exits; a call that fails on
# rank 0 leaves the workers mid-step, so the engine closes them and refuses later calls.

class WorkerSetup(NamedTuple):
    """What rank 0 tells each worker. Sent as plain values: the worker imports nano_bi, not the caller's
    __main__, so it could not unpickle the caller's classes."""
    tp_size: int
    backend: str
    port: int
    path: str
    engine_config: dict  # EngineConfig's fields, its policy as a string and its constants as a dict
    parent_pid: int

    def config(self) -> EngineConfig:
        c = self.engine_config
        return EngineConfig(**{**c, "constants": SplitKvConstants(**c["constants"])})


class TensorParallelRunner:
    def __init__(self, ckpt: Checkpoint, config: EngineConfig):
        size, device = ckpt.tensor_parallel_size, ckpt.weights.embed_tokens.device
        if dist.is_initialized():
            raise NanoBiError("tensor_parallel_size > 1 starts its own torch.distributed group, but this process "
                              "already has one; create the LLM before initializing torch.distributed")
        self.conns, self.procs, self.failed = [], [], False
        self.closing = threading.Event()
        # Workers are fresh interpreters that import nano_bi, never the caller's script (as multiprocessing's
        # spawn would), so a script needs no `if __name__ == "__main__"` guard. They call back over a socket.
        listener = Listener(("127.0.0.1", 0), authkey=(authkey := os.urandom(16)))
        env = dict(os.environ, NANO_BI_TP_AUTHKEY=authkey.hex(),
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]))
        for rank in range(1, size):
            code = f"import nano_bi; nano_bi._tp_worker({listener.address!r}, {rank})"
            self.procs.append(subprocess.Popen([sys.executable, "-c", code], env=env))
            threading.Thread(target=self._watch_worker, args=(rank, self.procs[-1]), daemon=True).start()
        atexit.register(self.close)  # a script that ends without close() stops its workers cleanly
        setup = WorkerSetup(size, "nccl" if device.type == "cuda" else "gloo", _free_port(), str(ckpt.path),
                            {**dataclasses.asdict(config), "policy": config.policy.value}, os.getpid())
        try:
            conns = {}
            for _ in self.procs:
                conn = listener.accept()
                conns[conn.recv()] = conn
            self.conns = [conns[rank] for rank in range(1, size)]
            for conn in self.conns:
                conn.send(tuple(setup))
            dist.init_process_group(setup.backend, init_method=f"tcp://127.0.0.1:{setup.port}", rank=0, world_size=size)
            self.local = ModelRunner(ckpt.config, ckpt.weights, config, device, size)
        except BaseException:  # e.g. out of memory here: no worker may outlive the engine
            self._abort()
            raise
        finally:
            listener.close()
        self.num_pages = self.local.num_pages

    def _abort(self):
        self.closing.set()
        for proc in self.procs:
            proc.kill()
        if dist.is_initialized():
            getattr(dist.distributed_c10d, "_abort_process_group", dist.destroy_process_group)()

    def _call(self, method: str, *args):
        """Send the call to every worker, then run it here."""
        if self.failed:
            raise NanoBiError("an earlier step failed partway, so the tensor-parallel workers stopped; "
                              "create a new LLM")
        for conn in self.conns:
            conn.send((method, args))
        try:
            return getattr(self.local, method)(*args)
        except BaseException:
            self.failed = True
            self.close()
            raise

    def set_block_table(self, slot, pages):
        return self._call("set_block_table", slot, pages)

    def extend(self, *args):
        return self._call("extend", *args)

    def logits(self, lo, hi):
        return self._call("logits", lo, hi)


    def decode(self, rows, chunk_size):
        return self._call("decode", [tuple(row) for row in rows], chunk_size)  # plain tuples: see WorkerSetup

    def update_weights(self, named):
        """The tensors travel as safetensors bytes: pickled tensors would be shared through file descriptors,
        which these workers (not multiprocessing's children) cannot receive."""
        from safetensors.torch import save

        return self._call("update_weights_from", save({name: t.contiguous().cpu() for name, t in named.items()}))

    def weights_checksum(self):
        return self.local.weights_checksum()

    def capture_cuda_graphs(self):
        return self._call("capture_cuda_graphs")

    def close(self):
        """Stop the workers and leave the process group (idempotent). After a failed call the workers may be
        inside a collective, so they are killed first."""
        if self.closing.is_set():
            return
        self.closing.set()
        atexit.unregister(self.close)
        for conn, proc in zip(self.conns, self.procs):
            if self.failed:
                proc.kill()
                continue
            try:
                conn.send(("leave_group", ()))
            except OSError:  # it is already gone
                proc.kill()
        self.local.leave_group(abort=self.failed)  # the workers leave it at the same time
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _watch_worker(self, rank: int, proc: subprocess.Popen):
        code = proc.wait()
        if self.closing.is_set():
            return
        print(f"nano-bi: error: tensor-parallel worker {rank} (pid {proc.pid}) exited with code {code} (its error, "
              f"if any, is above); inference cannot go on without it, so this process stops", file=sys.stderr,
              flush=True)
        for other in self.procs:
            other.kill()
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_with_parent(parent_pid: int):
    while os.getppid() == parent_pid:
        time.sleep(1)
    os._exit(1)


def _tp_worker(address, rank: int):
    """A worker's whole life: call rank 0 back, join the group, load this rank's share, run what rank 0 sends."""
    conn = Client(address, authkey=bytes.fromhex(os.environ["NANO_BI_TP_AUTHKEY"]))
    conn.send(rank)
    setup = WorkerSetup(*conn.recv())
    threading.Thread(target=_exit_with_parent, args=(setup.parent_pid,), daemon=True).start()
    try:
        device = torch.device("cuda", rank) if setup.backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(setup.backend, init_method=f"tcp://127.0.0.1:{setup.port}", rank=rank,
                                world_size=setup.tp_size)
        path = Path(setup.path)
        cfg = Qwen3Config.from_dict(_read_json(path / "config.json", "config.json"), str(path / "config.json"))
        runner = ModelRunner(cfg, load_weights(path, cfg, device, rank, setup.tp_size), setup.config(), device,
                             setup.tp_size)
        while True:
            method, args = conn.recv()
            getattr(runner, method)(*args)
            if method == "leave_group":
                break
    except EOFError:  # rank 0 is gone
        os._exit(1)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)

# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 17. CLI
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# `python nano_bi.py --prompt "..."` prints the completion. `--cobatch N` is the lesson in one command: the
# prompt is generated alone, then beside N neighbours of varied lengths, and the two runs are compared bit for
# bit - under TUNED they usually part ways; with --batch-invariant they never do. Bad input of any kind is one
# line, `nano_bi.py: error: ...`, and exit status 2.

def _neighbour_prompts(tokenizer: Tokenizer, n: int, base_len: int, long_len: int) -> list[list[int]]:
    """n prompts of varied lengths (in tokens); the first is `long_len` tokens long."""
    words = "the quick brown fox jumps over a lazy dog while batches of tokens race through tensor cores ".split()
    lengths = [long_len] + [max(4, int(base_len * f)) for f in (0.25, 3.0, 0.5, 6.0, 1.5, 0.1, 4.0, 2.0)]
    prompts = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        prompts.append(tokenizer.encode(" ".join(words[(i + j) % len(words)] for j in range(length)))[:length])
    return prompts


def _first_divergence(a: RequestOutput, b: RequestOutput) -> int | None:
    for step in range(max(len(a.token_ids), len(b.token_ids))):
        here = slice(step, step + 1)
        if a.token_ids[here] != b.token_ids[here] or a.logprobs[here] != b.logprobs[here]:
            return step
    return None


def cobatch_demo(llm: LLM, prompt_ids: list[int], params: SamplingParams, n: int) -> str:
    params = dataclasses.replace(params, logprobs=max(params.logprobs or 0, 8),
                                 seed=fresh_seed() if params.seed is None else params.seed)  # one seed, both runs
    alone = llm.generate([prompt_ids], params)[0]
    # One neighbour is longer than TUNED's chunk basis (floor x max chunks = 4096 tokens), so under TUNED the
    # batch's longest sequence (and its size) moves the prompt's split-KV chunk; batches past 32 switch kernel.
    c = llm.engine.config.constants
    limit = llm.engine.cfg.max_position_embeddings - params.max_tokens - 1
    neighbours = _neighbour_prompts(llm.tokenizer, n, len(prompt_ids),
                                    min(limit, c.chunk_floor * c.tuned_max_chunks + 200))
    together = llm.generate([prompt_ids] + neighbours, params)[0]
    lens = sorted(len(p) for p in neighbours)
    head = (f"policy {llm.engine.policy.name}: prompt ({len(prompt_ids)} tokens) alone vs co-batched with {n} "
            f"neighbours of {lens[0]}..{lens[-1]} tokens, {len(alone.token_ids)} steps")
    step = _first_divergence(alone, together)
    if step is None:
        return f"{head}: IDENTICAL - every token id and every top-8 logprob bit matches"
    lp = lambda o: f"{o.logprobs[step][0][1]:.9g}" if step < len(o.logprobs) else "-"  # noqa: E731
    tok = lambda o: o.token_ids[step] if step < len(o.token_ids) else "-"  # noqa: E731
    return (f"{head}: DIVERGED at step {step} (token {tok(alone)} vs {tok(together)}; top-1 logprob {lp(alone)} vs "
            f"{lp(together)})")


# Without a GPU the Triton interpreter makes long contexts slow (a 4000-token neighbour would take minutes), so
# the demo scales the split-KV constants down as the tests' CPU twins do: the same three effects then show with
# neighbours of ~300 tokens, in well under a minute per policy on two cores.
CPU_DEMO_CONSTANTS = SplitKvConstants(chunk_floor=16, tuned_max_chunks=8, pin_max_chunks=32, tuned_splitkv_max_batch=4)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nano_bi.py", description="Batch-invariant Qwen3 inference (Triton).")
    ap.add_argument("--prompt", required=True, help="the user message (the Qwen3 chat template is applied)")
    ap.add_argument("--model", help="model directory, a hub id in the local HF cache, or a synthetic preset: "
                    + ", ".join(PRESETS) + " (default: a cached Qwen3, else the random 'tiny')")
    pol = ap.add_mutually_exclusive_group()
    pol.add_argument("--batch-invariant", action="store_true", help="same as --policy pin")
    pol.add_argument("--policy", choices=[p.value for p in NumericPolicy], default="tuned",
                     help="tuned (fast, batch-dependent), pin (batch-invariant), per-token (slow oracle)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    ap.add_argument("--seed", type=int, help="sampling seed (default: a fresh one each run)")
    ap.add_argument("--n", type=int, default=1, help="samples to draw (use with --temperature > 0; default 1)")
    ap.add_argument("--logprobs", type=int, metavar="K",
                    help="also print each generated token's logprob and the top K (0: its own only)")
    ap.add_argument("--prompt-logprobs", type=int, metavar="K",
                    help="also print each prompt token's logprob and the top K, as a scoring pass computes them")
    ap.add_argument("--no-think", action="store_true", help="skip Qwen3's reasoning block")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                    help="run the model on N GPUs, one process each (default 1); PIN's bits do not depend on N")
    ap.add_argument("--cobatch", type=int, metavar="N", help="also run the prompt beside N neighbours and compare bits")
    return ap.parse_args(argv)


def print_output(out: RequestOutput, args: argparse.Namespace, tokenizer: Tokenizer) -> None:
    """The samples' text, then one line per token that asked for logprobs (--logprobs, --prompt-logprobs)."""
    for sample in out.outputs:
        print(sample.text if args.n == 1 else f"[sample {sample.index}] {sample.text}")
    for name, ids, entries in (("prompt", out.prompt_ids, out.prompt_logprobs or []),
                               ("generated", out.token_ids, out.logprobs)):
        k = args.prompt_logprobs if name == "prompt" else args.logprobs
        for i, (token, entry) in enumerate(zip(ids, entries)):
            if entry:
                lp = dict(entry)[token]
                top = " ".join(f"{t}:{v:.4f}" for t, v in entry[:k])
                print(f"{name} token {i}: {token} {tokenizer.decode([token])!r} logprob {lp:.6f}  top: {top}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not args.prompt.strip():
            raise NanoBiError("the prompt is empty; pass --prompt TEXT")
        if args.cobatch is not None and args.cobatch < 1:
            raise NanoBiError("--cobatch needs at least one neighbour")
        policy = NumericPolicy.PIN if args.batch_invariant else NumericPolicy(args.policy)
        constants = SplitKvConstants()
        if args.cobatch and not torch.cuda.is_available():
            constants = CPU_DEMO_CONSTANTS
            print(f"nano-bi: no GPU, so the demo scales the split-KV constants down (chunk floor {constants.chunk_floor}, "
                  f"TUNED <= {constants.tuned_max_chunks} chunks, PIN <= {constants.pin_max_chunks} chunks, one-pass "
                  f"decode above batch {constants.tuned_splitkv_max_batch}) to show at ~300 tokens what takes ~4000 "
                  f"on a GPU", file=sys.stderr)
        with LLM(args.model, policy=policy, cuda_graphs=not args.no_cuda_graphs, constants=constants,
                 tensor_parallel_size=args.tensor_parallel_size) as llm:
            params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed, logprobs=args.logprobs,
                                    prompt_logprobs=args.prompt_logprobs, n=args.n)
            prompt_ids = llm.tokenizer.chat(args.prompt, think=not args.no_think)
            if args.cobatch:
                print(cobatch_demo(llm, prompt_ids, params, args.cobatch))
                return 0
            out = llm.generate([prompt_ids], params)[0]
        print_output(out, args, llm.tokenizer)
    except NanoBiError as e:
        print(f"nano_bi.py: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"nano_bi.py: error: out of GPU memory ({str(e).splitlines()[0][:100]}); free the GPU or pass a "
              f"smaller --model", file=sys.stderr)
        return 2
    return 0


# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# 18. Appendix: synthetic checkpoints, and finding a model
# ═════════════════════════════════════════════════════════════════════════════════════════════════════════════
# No real Qwen3 weights are needed to run, test or benchmark nano-bi: a synthetic checkpoint has the real HF
# layout and the real Qwen3 shapes (the presets), with random weights at HF's init scale (normal, std 0.02;
# norms 1), deterministic per seed - decode speed depends on shapes, not values. --model points at a
# directory, a hub id already in the local HF cache, or a preset name (a synthetic checkpoint written once under
# ~/.cache/nano-bi); with no --model, the first Qwen3 in the HF cache, else `tiny`. Real checkpoints load as is.

_QWEN3 = dict(vocab_size=151936, tie_word_embeddings=False, num_key_value_heads=8, head_dim=128)
PRESETS = {
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                 tie_word_embeddings=False),  # untied: a tied random model just echoes its last input token
    "tiny-tp": dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
                    tie_word_embeddings=False),  # tiny, with o_proj/down_proj K split into whole segments (section 7)
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32),
    "qwen3-14b": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40),
}

QWEN3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]
QWEN3_FIRST_SPECIAL_ID = 151643  # <|endoftext|>; <|im_end|> is 151645, <think> 151667


def _corpus() -> list[str]:
    """A small English corpus for training the synthetic tokenizer: this file's own prose, less the lines that
    spell special tokens (trained on, they made ordinary tokens of "<|" and its kind: markup in random text)."""
    lines = [ln.strip(" #\"") for ln in Path(__file__).read_text().splitlines()]
    return [ln for ln in lines if len(ln) > 20 and "<|" not in ln] * 4


def _filler_words():
    """Pronounceable pseudo-words (" bato", " kelinu", ...) in byte-level BPE spelling ("Ġ" is a space): the
    synthetic vocabulary is padded with them, so a random model's output reads as words, not as markup."""
    onsets, vowels = "b c d f g h k l m n p r s t v z br st pl tr".split(), "a e i o u".split()
    syllables = [o + v for o in onsets for v in vowels]
    for length in (2, 3, 4):
        for n in range(len(syllables) ** length):
            word = ""
            for _ in range(length):
                n, s = divmod(n, len(syllables))
                word += syllables[s]
            yield "Ġ" + word


def _synthetic_tokenizer(vocab_size: int) -> str:
    """A byte-level BPE trained offline, padded with unreachable pseudo-word tokens so Qwen3's special tokens
    sit at their real ids (151643...) in full-size vocabularies, or at the top of a small one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    first_special = QWEN3_FIRST_SPECIAL_ID if vocab_size > QWEN3_FIRST_SPECIAL_ID else vocab_size - 32
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(first_special, 4096), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    words = _filler_words()
    for n in range(len(vocab), first_special):
        while (word := next(words)) in vocab:
            pass
        vocab[word] = n
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(QWEN3_SPECIAL_TOKENS)
    assert tok.token_to_id("<|endoftext|>") == first_special
    return tok.to_str()


def preset_shapes(preset: str) -> dict:
    if preset not in PRESETS:
        raise NanoBiError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _random_shards(cfg: Qwen3Config, seed: int, max_shard_bytes: int, what: str) -> list[dict[str, torch.Tensor]]:
    """Every tensor of the checkpoint, random (norms: ones), grouped into shards of at most max_shard_bytes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(cfg)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, t0 = 0, time.time()
    for n, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
        if total > 1 << 30 and n % 50 == 0:
            print(f"writing synthetic {what}: {n}/{len(shapes)} tensors, {time.time() - t0:.0f} s", file=sys.stderr)
    return shards


def _save_shards(path: Path, shards: list[dict[str, torch.Tensor]]):
    """model.safetensors, or numbered shards and their index (HF's layout)."""
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, sum(t.numel() * 2 for shard in shards for t in shard.values())
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_synthetic_checkpoint(path, preset: str = "tiny", seed: int = 0, config_overrides: dict | None = None,
                               max_shard_bytes: int = 2 << 30) -> Path:
    """Write a complete HF-layout Qwen3 checkpoint with random weights: config.json, generation_config.json,
    tokenizer.json and safetensors (sharded with an index above `max_shard_bytes`)."""
    cfg = Qwen3Config(**{**preset_shapes(preset), **(config_overrides or {})})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _save_shards(path, _random_shards(cfg, seed, max_shard_bytes, preset))
    tokenizer = _synthetic_tokenizer(cfg.vocab_size)
    (path / "tokenizer.json").write_text(tokenizer)
    first_special = json.loads(tokenizer)["added_tokens"][0]["id"]
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": first_special, "eos_token_id": [first_special + 2, first_special], "do_sample": False}))
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    (path / "nano_bi_synthetic.json").write_text(json.dumps({"preset": preset, "seed": seed}))
    return path


def _hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _hf_snapshot(repo_dir: Path) -> Path | None:
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (repo_dir / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return repo_dir / "snapshots" / ref.read_text().strip()
    snaps = sorted((repo_dir / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snaps[-1].parent if snaps else None


def synthetic_checkpoint(preset: str, seed: int = 0) -> Path:
    """The cached synthetic checkpoint for `preset`, written on first use."""
    root = Path(os.environ.get("NANO_BI_CACHE", Path.home() / ".cache" / "nano-bi"))
    shapes = hashlib.blake2b(repr(sorted(preset_shapes(preset).items())).encode(), digest_size=3).hexdigest()
    path = root / f"{preset}-seed{seed}-v2-{shapes}"  # v2: pseudo-word filler tokens; a changed preset is rewritten
    if not (path / "nano_bi_synthetic.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{preset}-"))
        write_synthetic_checkpoint(tmp, preset, seed)
        try:
            tmp.rename(path)
        except OSError:  # another process wrote it meanwhile (two first uses at once): keep theirs
            if not (path / "nano_bi_synthetic.json").is_file():
                raise
            shutil.rmtree(tmp)
    return path


def resolve_model(model: str | None) -> Path:
    if model is None:
        found = sorted(_hf_cache().glob("models--Qwen--Qwen3-*"))
        snaps = [s for s in (_hf_snapshot(d) for d in found) if s is not None]
        if snaps:
            print(f"nano-bi: using {snaps[0]} from the HF cache", file=sys.stderr)
            return snaps[0]
        print("nano-bi: no Qwen3 in the HF cache, so using the synthetic 'tiny' model: its weights are random "
              "and its text is noise. For real output pass --model DIR (or a hub id you have downloaded, e.g. "
              "`huggingface-cli download Qwen/Qwen3-0.6B`).", file=sys.stderr)
        return synthetic_checkpoint("tiny")
    if model in PRESETS:
        return synthetic_checkpoint(model)
    if Path(model).exists():
        if not Path(model).is_dir():
            raise NanoBiError(f"--model {model} is a file; pass the directory holding config.json")
        return Path(model)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        snap = _hf_snapshot(_hf_cache() / f"models--{model.replace('/', '--')}")
        if snap is None:
            raise NanoBiError(f"{model} is not in the local HF cache ({_hf_cache()}); download it first "
                              f"(`huggingface-cli download {model}`) or pass its directory")
        return snap
    raise NanoBiError(f"model directory {model} does not exist; pass a Qwen3 directory, a cached hub id "
                      f"or a preset ({', '.join(PRESETS)})")


if __name__ == "__main__":
    sys.exit(main())
