"""bench.py: nano-bi's speed against the hardware limit, against its peers, and the cost of batch invariance.

    python bench.py --quick                 # ~3-4 minutes on one H100/H200: the core points (--no-hf: ~1 less)
    python bench.py                         # the full sweep (batch 1..128 x ctx 1k/8k, 32k, 16k prefill, HF static)
    python bench.py --model qwen3-0.6b      # another synthetic shape (default qwen3-4b)
    python bench.py --report bench_results/bench.json # reprint the tables, redraw the PNG from a saved run
    python bench.py --rl                    # one RL step by phase (qwen3-0.6b), and rollouts with the cache on/off
    python bench.py --tp                    # qwen3-8b at tensor_parallel_size 1 vs 2 (2 GPUs)

Everything runs on synthetic checkpoints built on the GPU machine (random weights decode exactly as fast as
real ones: a decode step is bound by bytes read, not by their values). Figures are ratios inside one run on
one GPU, whose name is printed beside every table:
  - decode TPOT (CUDA graphs) per policy, batch x context, and TPOT / floor, where the floor is the bytes one
    step must read (weights + the batch's KV) divided by the device copy bandwidth measured in the same run;
  - where a batch-1 decode step's time goes: GPU time per kernel class (GEMM, attention, elementwise, sampling)
    from a profiler trace, and the rest of the graphed step as host work and launch gaps;
  - prefill time, tokens/s and model FLOP utilisation against the dense bf16 peak (989 TFLOP/s, H100/H200 SXM);
  - where each prefill's GPU time goes, per policy: kernel classes and the six costliest kernels (the PIN / TUNED
    targets show the wall's ratio beside the GPU kernels' - a 1k prefill's wall is as much the host's launches);
  - peers: HF transformers `generate` on the same checkpoint, and torch SDPA decode vs nano-bi's split-KV kernel
    on the same KV contents;
  - offline throughput on nano-vllm's workload (qwen3-0.6b), per policy, and where its time goes (prefill
    steps, decode steps on the GPU beside their bytes-at-copy-bandwidth floor, the GPU's idle time), with the
    engine's async scheduling and without;
  - scoring through prompt_logprobs against the plain prefill, and the logprob head alone (decode batches and a
    1,024-row scoring block);
  - the cost of invariance: PIN / TUNED for every decode and prefill point;
  - the speed targets, each beside what the run measured.
Outputs: a markdown table on stdout, bench_results/bench.json, and bench_results/bench.png when matplotlib exists.
"""
import argparse
import dataclasses
import functools
import gc
import json
import statistics
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

import kernels
import nano_bi as nb

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16, datasheet
TUNED, PIN = nb.NumericPolicy.TUNED, nb.NumericPolicy.PIN


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def frees_gpu_memory(bench):
    """Run a bench function, then give back the GPU memory its engines held (they are gone once it returns)."""
    @functools.wraps(bench)
    def run(*args, **kwargs):
        try:
            return bench(*args, **kwargs)
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    return run


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (the floor's denominator). A kernel
    copy (torch.neg), not cudaMemcpy, which on an H200 moves only ~2.7 TB/s against the kernel's ~4.3."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB, far beyond L2
    dst = torch.empty_like(src)
    return 4 * src.numel() / (do_bench_cudagraph(lambda: torch.neg(src, out=dst), rep=100) / 1e3)


def weight_bytes(ckpt: nb.Checkpoint) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm and lm_head (not the embedding
    table, of which a step reads only its batch's rows - unless it is tied to lm_head)."""
    w = ckpt.weights
    layer = sum(t.numel() * 2 for l in w.layers for t in vars(l).values())
    return layer + w.norm.numel() * 2 + w.lm_head.numel() * 2


def gpu_memory_used(n_gpus: int) -> list[float]:
    """GiB in use on GPUs 0..n-1, as the driver sees it (the tensor-parallel workers' memory included)."""
    used = []
    for d in range(n_gpus):
        free, total = torch.cuda.mem_get_info(d)
        used.append((total - free) / 2**30)
    return used


def make_requests(eng: nb.Engine, batch: int, ctx: int, steps: int, seed: int = 0) -> list[nb.Request]:
    g = torch.Generator().manual_seed(seed)
    reqs = [eng.add_request(torch.randint(0, eng.cfg.vocab_size, (ctx,), generator=g).tolist(),
                            nb.SamplingParams(max_tokens=steps, ignore_eos=True)) for _ in range(batch)]
    per_call = max(1, eng.config.max_num_batched_tokens // ctx)
    for i in range(0, batch, per_call):
        eng.prefill(reqs[i:i + per_call])
    return reqs


def pool_bytes(cfg, batch: int, tokens: int) -> int:
    """KV pool bytes for `batch` requests of `tokens` tokens each, in whole pages."""
    return batch * -(-tokens // nb.PAGE_SIZE) * nb.KVCache.page_bytes(cfg)


SERIAL_STEPS = 120  # decode steps a point's serial timing may take: 3 untimed, then do_bench(warmup=10,
#                    rep=100) takes <= 118 at >= 1 ms a step
RUN_STEPS = 40  # decode steps a point's requests take in Engine.run


@frees_gpu_memory
def bench_decode(ckpt, policy, batches, contexts, extra, kv_bytes) -> list[dict]:
    """TPOT per (batch, ctx) point, two ways: `tpot_ms`, the median of `decode_step`s timed one after another
    (the host's work between two steps is on the clock), and `run_tpot_ms`, the median wait between two steps'
    tokens while `Engine.run` decodes the same prompts anew - LLM.generate's loop, whose async scheduling queues
    step t+1 before step t's tokens reach the host. Each timing has requests of its own; the prefix cache
    serves the prompts prefilled before (the points share their first prompts)."""
    per_token = nb.KVCache.page_bytes(ckpt.config) // nb.PAGE_SIZE
    points = [(b, c) for c in contexts for b in batches] + list(extra)
    rows = []
    with closing(nb.Engine(ckpt, policy, cuda_graphs=True, max_batch=max(batches), kv_cache_bytes=kv_bytes)) as eng:
        for b, ctx in sorted(points, key=lambda p: (p[1], p[0])):
            if b * -(-(ctx + SERIAL_STEPS) // nb.PAGE_SIZE) > eng.pool.num_pages:
                log(f"{policy.name} batch {b} ctx {ctx}: KV needs {b * ctx * per_token / 2**30:.1f} GiB, pool has "
                    f"{eng.pool.num_pages * nb.PAGE_SIZE * per_token / 2**30:.1f} GiB - skipped")
                continue
            reqs = make_requests(eng, b, ctx, SERIAL_STEPS)
            serial = serial_tpot_ms(eng, reqs)
            for r in reqs:
                eng.free(r)
            rows.append(dict(policy=policy.name, batch=b, ctx=ctx, kv_bytes=b * ctx * per_token, tpot_ms=serial,
                             run_tpot_ms=run_tpot_ms(eng, make_requests(eng, b, ctx, RUN_STEPS))))
            log(f"{policy.name} decode batch {b} ctx {ctx}: {serial:.3f} ms a step serially, "
                f"{rows[-1]['run_tpot_ms']:.3f} in Engine.run")
        for row in rows:
            row["gpu_used_gib"] = gpu_memory_used(eng.tensor_parallel_size)
    return rows


def serial_tpot_ms(eng: nb.Engine, reqs: list[nb.Request]) -> float:
    """The median of decode_steps timed one after another (do_bench; one slow step - a page allocation, the
    host - cannot move a median as it moves a mean)."""
    for _ in range(3):  # a first-use graph capture must not enter do_bench's estimate of a step
        eng.decode_step(reqs)
    return statistics.median(do_bench(lambda: eng.decode_step(reqs), warmup=10, rep=100, return_mode="all"))


def run_tpot_ms(eng: nb.Engine, reqs: list[nb.Request]) -> float:
    """The median wait between two decode steps' tokens reaching the host while Engine.run takes the requests
    to their last token (the first two waits, the pipeline filling, left out)."""
    ends = []
    eng.step_hook = lambda event: event.stage == "accepted" and ends.append(time.perf_counter())
    try:
        eng.run(reqs)
    finally:
        eng.step_hook = None
    return statistics.median(b - a for a, b in zip(ends[2:], ends[3:])) * 1e3


def warm_up(ckpt, kv_bytes) -> list[dict]:
    """One untimed decode engine before the timed ones: the first engine a process builds read its TPOT 2-10%
    high in every A/B of one H200 (TUNED b1 1k 3.45 / 3.20 ms against 3.09-3.16 for the engines after it), and
    the timed sweep starts with TUNED b1. Its row is kept (as decode_warm_up), not compared."""
    log("warm-up engine (untimed: the first engine in a process reads high)")
    return bench_decode(ckpt, TUNED, [1], [1024], [], kv_bytes)


KERNEL_CLASSES = (("GEMM", ("matmul", "gemm", "gemv", "cutlass", "xmma", "nvjet", "splitkreduce", "split_k_sum")),
                  ("attention", ("split_kv", "nonpartition", "attention", "flash", "merge")),
                  ("sampling", ("argmax", "sort", "softmax", "topk", "multinomial", "exponential")))


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in low for k in keys)), "elementwise")


def is_kernel(event, name: str) -> bool:
    """A profiler event (or aggregate) that is a GPU kernel, not a copy or a memset."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not name.startswith(("Memcpy", "Memset"))


def gpu_kernels(prof) -> list:
    """The profiler's per-kernel aggregates on the GPU, copies and memsets left out."""
    return [e for e in prof.key_averages() if is_kernel(e, e.key)]


def ms_by_class(kernels_run: list, steps: int = 1) -> dict:
    """GPU ms a step per kernel class ("GEMM_ms", ...)."""
    return {f"{cls}_ms": sum(e.self_device_time_total for e in kernels_run if kernel_class(e.key) == cls) / steps / 1e3
            for cls in [c for c, _ in KERNEL_CLASSES] + ["elementwise"]}


@frees_gpu_memory
def bench_kernel_classes(ckpt, policy, tpot_ms: float, batch=1, ctx=1024, steps=5) -> dict:
    """Where a decode step's time goes, from a profile of the graphed steps themselves: GPU time per kernel
    class, the gaps between one step's kernels (the graph's launch latency, ~0.5 us a kernel on an H200, and
    the sampler's launches), and what is left of the TPOT - the host's work between steps - as "host"."""
    with closing(nb.Engine(ckpt, policy, cuda_graphs=True, max_batch=batch,
                           kv_cache_bytes=pool_bytes(ckpt.config, batch, ctx + steps + 20) + (1 << 30))) as eng:
        reqs = make_requests(eng, batch, ctx, steps=steps + 4)
        for _ in range(3):
            eng.decode_step(reqs)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eng.decode_step(reqs)
            torch.cuda.synchronize()
    kernels_run = gpu_kernels(prof)
    row = dict(policy=policy.name, batch=batch, ctx=ctx, tpot_ms=tpot_ms,
               kernels_per_step=sum(e.count for e in kernels_run) / steps, **ms_by_class(kernels_run, steps))
    row["gaps_ms"] = in_step_gaps_ms(prof, steps)
    row["host_ms"] = (tpot_ms - sum(row[f"{c}_ms"] for c, _ in KERNEL_CLASSES) - row["elementwise_ms"]
                      - row["gaps_ms"])
    row["gemms_alone_ms"] = gemms_alone_ms(ckpt, policy, batch)
    row["cublas_alone_ms"] = gemms_alone_ms(ckpt, None, batch)
    log(f"{policy.name} batch {batch} decode by kernel class: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                                     if k.endswith("_ms")))
    return row


def in_step_gaps_ms(prof, steps: int) -> float:
    """GPU idle time inside the profiled steps, a step: the gaps between consecutive kernels, less the
    steps - 1 largest (the host's work between steps)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if is_kernel(e, e.name))
    gaps = sorted(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))
    return sum(gaps[:len(gaps) - (steps - 1)]) / steps / 1e3


def gemms_alone_ms(ckpt, policy, batch: int) -> float:
    """The step's GEMMs alone - every layer's qkv, o, gate_up and down projections and lm_head at M = batch,
    through the policy's GEMM (policy None: cuBLAS) - captured in one CUDA graph: what a step's GEMMs cost with
    nothing between them, so that everything else in a step (the TPOT minus this) is visible."""
    w = ckpt.weights
    column = lambda x, wt: nb.linear(x, wt, policy, "decode") if policy else F.linear(x, wt)  # noqa: E731
    row = lambda x, wt: nb.row_parallel_linear(x, wt, policy, "decode", 1) if policy else F.linear(x, wt)  # noqa: E731
    calls = [(gemm, wt) for layer in w.layers for gemm, wt in ((column, layer.qkv_proj), (row, layer.o_proj),
                                                               (column, layer.gate_up_proj), (row, layer.down_proj))]
    calls.append((column, w.lm_head))
    inputs = [torch.randn(batch, wt.shape[1], device="cuda", dtype=torch.bfloat16) for _, wt in calls]

    def step():
        for x, (gemm, wt) in zip(inputs, calls):
            gemm(x, wt)
    return do_bench_cudagraph(step)


def model_flops(cfg: nb.Qwen3Config, n: int) -> float:
    """FLOPs of a prefill of n tokens (lm_head on the last token only; causal attention counts half)."""
    h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    per_layer = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h \
        + 3 * h * cfg.intermediate_size
    attention = 2 * 2 * (n * n / 2) * cfg.num_attention_heads * d * L
    return 2 * n * per_layer * L + attention + 2 * h * cfg.vocab_size


def prefill_once(eng: nb.Engine, n: int):
    """Prefill one random n-token prompt and free it."""
    r = eng.add_request(torch.randint(0, 150000, (n,)).tolist(), nb.SamplingParams(max_tokens=1))
    eng.prefill([r])
    eng.free(r)


@frees_gpu_memory
def bench_prefill(ckpt, policy, lengths, kv_bytes) -> list[dict]:
    rows = []
    with closing(nb.Engine(ckpt, policy, cuda_graphs=False, max_batch=4, kv_cache_bytes=kv_bytes)) as eng:
        for n in lengths:  # the median of ~1 s of repeats, as decode takes its median: a 4k prefill's repeats
            # spread 62-71 ms on an H200, and the mean of the 3 that 200 ms allowed moved 63 -> 69 ms between runs
            reps = do_bench(lambda: prefill_once(eng, n), warmup=1, rep=1000, return_mode="all")
            t = statistics.median(reps) / 1e3
            rows.append(dict(policy=policy.name, tokens=n, seconds=t, tokens_per_s=n / t, repeats=len(reps),
                             mfu=model_flops(ckpt.config, n) / t / PEAK_BF16_FLOPS))
            log(f"{policy.name} prefill {n}: {t * 1e3:.1f} ms (median of {len(reps)}; min {min(reps):.1f}, max "
                f"{max(reps):.1f}), {n / t:.0f} tok/s")
    return rows


@frees_gpu_memory
def bench_scoring(ckpt, policy, n_seqs, length, kv_bytes, k=8) -> dict:
    """Scoring throughput: n_seqs sequences of `length` tokens through generate(max_tokens=1, prompt_logprobs=k)
    (one prefill pass, lm_head + logsumexp and top-k on every row) against the same prefill without prompt
    logprobs; each one's peak memory; and scoring with every entry read (entries are built when read).
    The prefix cache is off: with it, every repeat of the plain prefill would be served from the cache."""
    seqs = [torch.randint(0, 150000, (length,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(n_seqs)]
    row = dict(policy=policy.name, seqs=n_seqs, length=length, k=k)
    with nb.LLM(ckpt, policy, cuda_graphs=False, max_batch=n_seqs, kv_cache_bytes=kv_bytes,
                max_num_batched_tokens=n_seqs * length, prefill_chunk_tokens=length, enable_prefix_caching=False) as llm:
        scoring = nb.SamplingParams(max_tokens=1, prompt_logprobs=k)
        runs = {"prefill": lambda: llm.generate(seqs, nb.SamplingParams(max_tokens=1)),
                "scoring": lambda: llm.generate(seqs, scoring),
                "scoring_read": lambda: [list(o.prompt_logprobs) for o in llm.generate(seqs, scoring)]}
        for name, run in runs.items():
            torch.cuda.reset_peak_memory_stats()
            t = do_bench(run, warmup=1, rep=500, return_mode="median") / 1e3  # as prefill: the median
            row[f"{name}_tok_s"] = n_seqs * length / t
            row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            log(f"{policy.name} {name} {n_seqs} x {length}: {n_seqs * length / t:.0f} tok/s")
    return row


def bench_logprob_head(vocab: int) -> list[dict]:
    """The logprob head alone - top-K ids, then the logprobs of those and of a chosen token - on random bf16
    logits: what a decode step with `logprobs=k` adds after sampling (batch 1 .. 256), and what scoring adds to
    each 1,024-row block besides lm_head. Small batches are bound by kernel launches, not by the GPU."""
    rows = []
    for batch in (1, 64, 256, 1024):
        logits = torch.randn(batch, vocab, device="cuda").to(torch.bfloat16)
        chosen = torch.randint(0, vocab, (batch,), device="cuda")
        for k in (0, 1, 8):
            us = do_bench(lambda: nb.top_k_logprobs(logits, k, chosen), warmup=10, rep=100) * 1e3
            rows.append(dict(batch=batch, k=k, us=us))
        log(f"logprob head, {batch} rows: " + ", ".join(f"k={r['k']} {r['us']:.0f} us" for r in rows[-3:]))
    return rows


def bench_gap(ckpt, policy, kv_bytes, decoders=32, ctx=1024, long_prompt=16384) -> list[dict]:
    """A long prompt arrives while `decoders` requests decode: the worst wait between two tokens of a decoding
    request, with the prompt prefilled in one step (no chunking) and in chunks inside mixed steps (defaults)."""
    return [gap_run(ckpt, policy, kv_bytes, name, kw, decoders, ctx, long_prompt) for name, kw in (
        ("whole prompt in one step", dict(max_num_batched_tokens=long_prompt + decoders, prefill_chunk_tokens=long_prompt)),
        ("chunked prefill (defaults)", {}))]


@frees_gpu_memory
def gap_run(ckpt, policy, kv_bytes, name, options, decoders, ctx, long_prompt) -> dict:
    with closing(nb.Engine(ckpt, policy, cuda_graphs=True, max_batch=decoders + 1, kv_cache_bytes=kv_bytes,
                           **options)) as eng:
        running = make_requests(eng, decoders, ctx, steps=256)
        for _ in range(3):
            eng.decode_step(running)
        long = eng.add_request(torch.randint(0, 150000, (long_prompt,)).tolist(), nb.SamplingParams(max_tokens=1))
        step_ends = []  # when each step's tokens reached the host
        eng.step_hook = lambda event: event.stage == "accepted" and step_ends.append(time.perf_counter())
        torch.cuda.synchronize()
        start = time.perf_counter()
        eng.run(running + [long])
    gaps = [b - a for a, b in zip([start] + step_ends, step_ends)]
    row = dict(policy=policy.name, mode=name, worst_gap_ms=max(gaps) * 1e3,
               median_gap_ms=sorted(gaps)[len(gaps) // 2] * 1e3, steps=len(gaps))
    log(f"{policy.name} gap, {name}: worst {max(gaps) * 1e3:.1f} ms, median {row['median_gap_ms']:.1f} ms")
    return row


@frees_gpu_memory
def bench_rl_rollout(ckpt, policy, cache: bool, kv_bytes, prompts=32, length=1024, n=8, new=256) -> dict:
    """An RL step: `prompts` prompts x n samples of `new` tokens (T = 1), then every prompt + completion scored
    through prompt_logprobs. Generated and scored tokens per second, prefix cache on or off."""
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 150000, (length,), generator=g).tolist() for _ in range(prompts)]
    params = nb.SamplingParams(max_tokens=new, temperature=1.0, seed=1, n=n, logprobs=1, ignore_eos=True)
    with nb.LLM(ckpt, policy, cuda_graphs=True, max_batch=128, kv_cache_bytes=kv_bytes,
                enable_prefix_caching=cache) as llm:
        llm.generate(batch[:2], dataclasses.replace(params, max_tokens=4))  # warm up graphs and kernels
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(batch, params)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        scored = [o.prompt_ids + s.token_ids for o in outs for s in o.outputs]
        llm.generate(scored, nb.SamplingParams(max_tokens=1, prompt_logprobs=1))
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    row = dict(policy=policy.name, cache=cache, rollout_tok_s=prompts * n * new / (t1 - t0),
               scoring_tok_s=sum(map(len, scored)) / (t2 - t1), step_s=t2 - t0)
    log(f"{policy.name} RL rollout, cache {'on' if cache else 'off'}: {row['rollout_tok_s']:.0f} generated tok/s, "
        f"{row['scoring_tok_s']:.0f} scored tok/s, {row['step_s']:.1f} s")
    return row


@frees_gpu_memory
def bench_offline(ckpt, policy, kv_bytes, async_scheduling: bool, requests=256) -> dict:
    """nano-vllm's offline workload: 256 requests, random input and output lengths 100-1024, ignore_eos. Besides
    tok/s, where the run's time goes, measured through the engine's step hook without adding a sync: mixed
    (prefill) steps (eager; each ends with its tokens on the host anyway), decode steps on the GPU (CUDA events
    around each step's copy and replay: this also counts the step's own launch when the GPU was idle), their
    floor (the weight and KV bytes each reads, at copy bandwidth), and the rest: the GPU idle, waiting for host
    work."""
    t0 = time.perf_counter()
    with nb.LLM(ckpt, policy, cuda_graphs=True, max_batch=256, kv_cache_bytes=kv_bytes,
                async_scheduling=async_scheduling) as llm:
        startup = time.perf_counter() - t0  # KV pool + capturing every decode bucket's graph (excluded, as vLLM's)
        rng = torch.Generator().manual_seed(0)
        lens = torch.randint(100, 1025, (requests, 2), generator=rng).tolist()
        reqs = [(torch.randint(0, 150000, (i,), generator=rng).tolist(), o) for i, o in lens]
        llm.generate([r[0] for r in reqs[:4]], nb.SamplingParams(max_tokens=4))  # warm up
        timer = StepTimer(copy_bandwidth(), weight_bytes(ckpt), nb.KVCache.page_bytes(ckpt.config) // nb.PAGE_SIZE)
        llm.engine.step_hook = timer
        batch = [llm.engine.add_request(p, nb.SamplingParams(max_tokens=o, ignore_eos=True)) for p, o in reqs]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.engine.run(batch)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    spent = timer.totals()
    out_tokens = sum(o for _, o in reqs)
    row = dict(policy=policy.name, async_scheduling=async_scheduling, requests=requests, output_tokens=out_tokens,
               seconds=seconds, tok_s=out_tokens / seconds, startup_s=startup, **spent,
               gpu_idle_s=seconds - spent["mixed_s"] - spent["decode_gpu_s"])
    log(f"{policy.name} offline throughput, {'async' if async_scheduling else 'serial'} scheduling: "
        f"{row['tok_s']:.0f} output tok/s ({seconds:.2f} s; startup with graph capture {startup:.1f} s, not "
        f"counted): {spent['mixed_steps']} mixed steps {spent['mixed_s']:.2f} s, {spent['decode_steps']} decode "
        f"steps (mean batch {spent['decode_rows'] / max(1, spent['decode_steps']):.0f}) {spent['decode_gpu_s']:.2f} s "
        f"on the GPU (their bytes at copy bandwidth {spent['decode_floor_s']:.2f} s), GPU idle waiting for the host "
        f"{row['gpu_idle_s']:.2f} s")
    return row


class StepTimer:
    """An Engine.step_hook: wall time of mixed steps, GPU time (CUDA events) and floor of decode steps."""
    def __init__(self, bandwidth: float, weights: int, kv_bytes_per_token: int):
        self.bandwidth, self.weights, self.per_token = bandwidth, weights, kv_bytes_per_token
        self.mixed, self.decode, self.decode_rows, self.decode_floor_s = [], [], 0, 0.0

    def __call__(self, event: nb.StepEvent):
        if event.kind == "mixed" and event.stage != "launched":
            self.mixed.append(time.perf_counter())  # launch, accepted, launch, accepted ...
        elif event.kind == "decode" and event.stage in ("launch", "launched"):
            self.decode.append(torch.cuda.Event(enable_timing=True))
            self.decode[-1].record()
            if event.stage == "launch":
                self.decode_rows += event.rows
                self.decode_floor_s += (self.weights + event.kv_tokens * self.per_token) / self.bandwidth

    def totals(self) -> dict:
        mixed = sum(b - a for a, b in zip(self.mixed[::2], self.mixed[1::2]))
        decode = sum(a.elapsed_time(b) for a, b in zip(self.decode[::2], self.decode[1::2])) / 1e3
        return dict(mixed_steps=len(self.mixed) // 2, mixed_s=mixed, decode_steps=len(self.decode) // 2,
                    decode_rows=self.decode_rows, decode_floor_s=self.decode_floor_s, decode_gpu_s=decode)


@frees_gpu_memory
def bench_hf(path: Path, static_too: bool) -> dict:
    """HF transformers generate, batch 1, 128-token prompt: per-token time from 33 vs 1 new tokens."""
    from transformers import Qwen3ForCausalLM
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 150000, (1, 128), device="cuda")
    out = {}
    # "static cache": transformers' StaticCache, which its generate() compiles on its own where it supports it
    # (an explicit torch.compile(mode="reduce-overhead") crashed in transformers' cache update on 2026-11-26).
    modes = [("eager", {})] + ([("static cache", {"cache_implementation": "static"})] if static_too else [])
    for name, kw in modes:
        try:
            def gen(n):
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
            t33, t1 = (do_bench(lambda: gen(n), warmup=1, rep=1) / 1e3 for n in (33, 1))
            out[name] = (t33 - t1) / 32 * 1e3
            log(f"HF {name}: {out[name]:.2f} ms/token")
        except Exception as e:  # a peer's optional mode failing must not sink the run
            out[name] = None
            log(f"HF {name} failed: {str(e).splitlines()[0][:200]}")
    return out


def bench_attention(cfg: nb.Qwen3Config, points) -> list[dict]:
    """torch SDPA decode vs nano-bi split-KV (partials and their merge) on the same K/V, both timed in CUDA graphs."""
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rows = []
    for batch, ctx in points:
        g = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(batch, hkv, ctx, d, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(batch, hq, 1, d, device="cuda", generator=g, dtype=torch.bfloat16)
        sdpa = do_bench_cudagraph(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)) / 1e3
        pages = -(-ctx // nb.PAGE_SIZE)
        k_cache = k.permute(0, 2, 1, 3).reshape(batch * ctx, hkv, d).contiguous()  # request b: pages b*pages..
        v_cache = v.permute(0, 2, 1, 3).reshape(batch * ctx, hkv, d).contiguous()
        table = torch.arange(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
        slot_idx = torch.arange(batch, device="cuda", dtype=torch.int32)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        qd = q[:, :, 0].contiguous()
        row = dict(batch=batch, ctx=ctx, sdpa_us=sdpa * 1e6)
        for name, chunk, max_chunks in (("tuned", nb.tuned_chunk_size(ctx, batch, hkv, nb.SplitKvConstants()), nb.TUNED_MAX_CHUNKS),
                                        ("pin", nb.pin_chunk_size(cfg.max_position_embeddings), nb.PIN_MAX_CHUNKS)):
            in_order = name == "pin"  # TUNED's merge may take any order, as in the engine
            cs = torch.tensor([chunk], device="cuda", dtype=torch.int32)
            workspace = kernels.SplitKvWorkspace.allocate(batch, max_chunks, hq, hkv, d, "cuda")
            out = torch.empty_like(qd)
            t = do_bench_cudagraph(lambda: kernels.split_kv_decode(qd, k_cache, v_cache, table, slot_idx, lens, cs,
                                                                   workspace, out, nb.PAGE_SIZE,
                                                                   in_chunk_order=in_order)) / 1e3
            row[f"splitkv_{name}_us"] = t * 1e6
        log(f"attention batch {batch} ctx {ctx}: SDPA {row['sdpa_us']:.1f} us, split-KV TUNED "
            f"{row['splitkv_tuned_us']:.1f} us, PIN {row['splitkv_pin_us']:.1f} us")
        rows.append(row)
    return rows


def bench_prefill_attention(cfg: nb.Qwen3Config, lengths) -> list[dict]:
    """One layer's causal prefill attention of one n-token prompt: torch SDPA (flash, K/V expanded to every q
    head) against nano-bi's kernel with TUNED's one chunk and PIN's 192-key chunks, all timed in CUDA graphs."""
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rows = []
    for n in lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(n, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        qs, ks, vs = (x.transpose(0, 1)[None].repeat_interleave(hq // x.shape[1], dim=1) for x in (q, k, v))
        sdpa = do_bench_cudagraph(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        table = torch.arange(-(-n // nb.PAGE_SIZE), device="cuda", dtype=torch.int32)[None]
        zero, cu_q = (torch.tensor(x, device="cuda", dtype=torch.int32) for x in ([0], [0, n]))
        row = dict(tokens=n, sdpa_us=sdpa * 1e3)
        limit = cfg.max_position_embeddings
        for policy in (TUNED, PIN):  # a whole prompt's key chunk, as the engine picks it
            chunk = nb.prefill_chunk(policy, 0, nb.pin_chunk_size(limit), limit)
            chunks = torch.tensor([chunk], device="cuda", dtype=torch.int32)
            row[f"{policy.name.lower()}_us"] = do_bench_cudagraph(lambda: kernels.prefill_attention(
                q, k, v, table, zero, cu_q, zero, chunks, n, nb.PAGE_SIZE, n <= chunk, n, policy is TUNED)) * 1e3
        log(f"prefill attention {n} tokens, one layer: SDPA {row['sdpa_us']:.0f} us, TUNED {row['tuned_us']:.0f} us, "
            f"PIN {row['pin_us']:.0f} us")
        rows.append(row)
    return rows


@frees_gpu_memory
def bench_tensor_parallel(kv_bytes: int) -> dict:
    """qwen3-8b at tensor_parallel_size 1 and 2: decode TPOT (batch 1 and 32, ctx 1k), a 4k prefill, per policy,
    and the memory each GPU holds (weights + a KV pool of kv_bytes per GPU + activations)."""
    path = nb.synthetic_checkpoint("qwen3-8b")
    res = dict(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(), rows=[])
    for tp in (1, 2):
        ckpt = nb.load_checkpoint(path, tensor_parallel_size=tp)
        for policy in (TUNED, PIN):
            decode = bench_decode(ckpt, policy, [1, 32], [1024], [], kv_bytes)
            prefill = bench_prefill(ckpt, policy, [4096], 4 << 30)[0]
            res["rows"].append(dict(tp=tp, policy=policy.name, tpot_ms={r["batch"]: r["tpot_ms"] for r in decode},
                                    prefill_ms=prefill["seconds"] * 1e3, gpu_used_gib=decode[0]["gpu_used_gib"]))
        del ckpt
    return res


def tp_markdown(res: dict) -> str:
    by = {(r["tp"], r["policy"]): r for r in res["rows"]}
    lines = [f"### Tensor parallelism, qwen3-8b on {res['gpus']} x {res['gpu']}", "",
             "| TP | policy | TPOT b1 ms | TPOT b32 ms | prefill 4k ms | GiB used per GPU | PIN/TUNED b1, b32, prefill |",
             "|---:|---|---:|---:|---:|---|---|"]
    for r in res["rows"]:
        tuned = by[(r["tp"], "TUNED")]
        ratio = "" if r["policy"] == "TUNED" else ", ".join(
            f"{a / b:.3f}" for a, b in ((r["tpot_ms"][1], tuned["tpot_ms"][1]), (r["tpot_ms"][32], tuned["tpot_ms"][32]),
                                        (r["prefill_ms"], tuned["prefill_ms"])))
        lines.append(f"| {r['tp']} | {r['policy']} | {r['tpot_ms'][1]:.2f} | {r['tpot_ms'][32]:.2f} | "
                     f"{r['prefill_ms']:.1f} | {', '.join(f'{g:.1f}' for g in r['gpu_used_gib'])} | {ratio} |")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    by = {(r["policy"], r["batch"], r["ctx"]): r for r in res["decode"]}
    pre = {(r["policy"], r["tokens"]): r for r in res.get("prefill", [])}
    return "\n".join(decode_markdown(res, by) + tuned_losses(by, pre) + prefill_markdown(res, pre) + [
        "", offline_markdown(res.get("offline", [])),
        "", classes_markdown("qwen3-0.6b, batch 128, ctx 1k (the offline workload's decode step)",
                             res.get("offline_step_classes", [])),
        "", scoreboard(res, by, pre), ""] + hf_markdown(res, by.get(("TUNED", 1, 1024))))


def decode_markdown(res: dict, by: dict) -> list[str]:
    gpu, bw = res["gpu"], res["copy_bandwidth_gbs"]
    floor_ms = lambda r: (res["weight_bytes"] + r["kv_bytes"]) / (bw * 1e9) * 1e3  # noqa: E731
    lines = [f"### nano-bi bench - {res['model']} on {gpu} (copy bandwidth {bw:.0f} GB/s r+w, weights "
             f"{res['weight_bytes'] / 1e9:.2f} GB)", "",
             "Serial: `decode_step`s one after another. Run: the same prompts in `Engine.run` (LLM.generate's loop, "
             "async scheduling).", "",
             "| batch | ctx | floor ms | TUNED ms | TUNED / floor | PIN ms | PIN / floor | PIN / TUNED | "
             "TUNED run ms | TUNED run / floor | PIN run ms | PIN / TUNED run |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (pol, b, c), r in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if pol != "TUNED":
            continue
        p = by.get(("PIN", b, c))
        f = floor_ms(r)
        pin = (f"{p['tpot_ms']:.3f} | {p['tpot_ms'] / f:.2f} | {p['tpot_ms'] / r['tpot_ms']:.3f}" if p else "- | - | -")
        run = "- | - | - | -"
        if "run_tpot_ms" in r:
            pin_run = f"{p['run_tpot_ms']:.3f} | {p['run_tpot_ms'] / r['run_tpot_ms']:.3f}" if p else "- | -"
            run = f"{r['run_tpot_ms']:.3f} | {r['run_tpot_ms'] / f:.2f} | {pin_run}"
        lines.append(f"| {b} | {c} | {f:.3f} | {r['tpot_ms']:.3f} | {r['tpot_ms'] / f:.2f} | {pin} | {run} |")
    for w in res.get("decode_warm_up", []):
        lines += ["", f"The untimed warm-up engine first (not compared): {w['policy']} batch {w['batch']} ctx "
                      f"{w['ctx']} {w['tpot_ms']:.3f} ms" + (f", {w['run_tpot_ms']:.3f} in Engine.run"
                                                            if "run_tpot_ms" in w else "")]
    one = by.get(("TUNED", 1, 1024))
    title = f"{res['model']}, ctx 1k (batch 1 floor {floor_ms(one):.3f})" if one else f"{res['model']}, ctx 1k"
    return lines + ["", classes_markdown(title, res.get("kernel_classes", []))]


TUNED_LOSS_MARGIN = 1.03  # TUNED, the fast default, must not be slower than PIN by more than this


def tuned_losses(decode: dict, prefill: dict) -> list[str]:
    """One line for every decode or prefill point where TUNED is slower than PIN by more than 3%."""
    points = [(f"decode batch {b} ctx {c}", t["tpot_ms"], decode[("PIN", b, c)]["tpot_ms"])
              for (pol, b, c), t in decode.items() if pol == "TUNED" and ("PIN", b, c) in decode]
    points += [(f"prefill {n} tokens", t["seconds"] * 1e3, prefill[("PIN", n)]["seconds"] * 1e3)
               for (pol, n), t in prefill.items() if pol == "TUNED" and ("PIN", n) in prefill]
    lines = [f"- TUNED slower than PIN, {name}: {tuned:.3f} vs {pin:.3f} ms (TUNED / PIN {tuned / pin:.3f})"
             for name, tuned, pin in points if tuned > TUNED_LOSS_MARGIN * pin]
    return ["", *(lines or [f"- TUNED is within {TUNED_LOSS_MARGIN} x PIN at every decode and prefill point"])]


def prefill_markdown(res: dict, pre: dict) -> list[str]:
    """Prefill, attention, scoring and the inter-token gap tables."""
    lines = ["", "| prefill tokens | TUNED ms | TUNED tok/s | TUNED MFU | PIN ms | PIN MFU | PIN / TUNED |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for (pol, n), r in sorted(pre.items(), key=lambda kv: kv[0][1]):
        if pol == "TUNED" and ("PIN", n) in pre:
            p = pre[("PIN", n)]
            lines.append(f"| {n} | {r['seconds'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | "
                         f"{p['seconds'] * 1e3:.1f} | {p['mfu']:.1%} | {p['seconds'] / r['seconds']:.3f} |")
    lines += prefill_classes_markdown(res.get("prefill_classes", []))
    lines += ["", "| attention decode (batch, ctx) | SDPA us | split-KV TUNED us | split-KV PIN us | TUNED / SDPA | PIN / SDPA |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in res.get("attention", []):
        lines.append(f"| ({r['batch']}, {r['ctx']}) | {r['sdpa_us']:.1f} | {r['splitkv_tuned_us']:.1f} | "
                     f"{r['splitkv_pin_us']:.1f} | {r['splitkv_tuned_us'] / r['sdpa_us']:.2f} | "
                     f"{r['splitkv_pin_us'] / r['sdpa_us']:.2f} |")
    lines += ["", "| prefill attention, one layer, causal | SDPA (flash) us | TUNED us | PIN us | TUNED / SDPA | "
              "PIN / SDPA |", "|---:|---:|---:|---:|---:|---:|"]
    for r in res.get("prefill_attention", []):
        lines.append(f"| {r['tokens']} | {r['sdpa_us']:.0f} | {r['tuned_us']:.0f} | {r['pin_us']:.0f} | "
                     f"{r['tuned_us'] / r['sdpa_us']:.2f} | {r['pin_us'] / r['sdpa_us']:.2f} |")
    lines += ["", "| scoring (prompt_logprobs=k) | plain prefill tok/s | scoring tok/s | scoring / prefill | "
              "... every entry read | scoring's peak memory beyond the prefill's GiB |", "|---|---:|---:|---:|---:|---:|"]
    for r in res.get("scoring", []):
        extra = r.get("scoring_peak_gib", float("nan")) - r.get("prefill_peak_gib", float("nan"))
        read = r.get("scoring_read_tok_s", float("nan")) / r["prefill_tok_s"]
        lines.append(f"| {r['policy']}, {r['seqs']} x {r['length']} tokens, k = {r.get('k', 8)} | {r['prefill_tok_s']:.0f} | "
                     f"{r['scoring_tok_s']:.0f} | {r['scoring_tok_s'] / r['prefill_tok_s']:.2f} | {read:.2f} | {extra:.2f} |")
    head = {(r["batch"], r["k"]): r["us"] for r in res.get("logprob_head", [])}
    if head:
        lines += ["", "| logprob head (top_k_logprobs), rows | k = 0 us | k = 1 us | k = 8 us |", "|---:|---:|---:|---:|"]
    for batch in sorted({b for b, _ in head}):
        lines.append(f"| {batch} | " + " | ".join(f"{head.get((batch, k), float('nan')):.0f}" for k in (0, 1, 8)) + " |")
    lines += ["", "| a 16k prompt arrives among 32 decoding requests | worst inter-token gap ms | median ms | steps |",
              "|---|---:|---:|---:|"]
    for r in res.get("gap", []):
        lines.append(f"| {r['policy']}, {r['mode']} | {r['worst_gap_ms']:.1f} | {r['median_gap_ms']:.1f} | "
                     f"{r['steps']} |")
    return lines


def prefill_classes_markdown(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        lines += ["", f"| {r['policy']} {r['tokens']}-token prefill, GPU ms | GEMM | attention | elementwise | "
                  f"kernels |", "|---|---:|---:|---:|---:|",
                  f"| by class | {r['GEMM_ms']:.2f} | {r['attention_ms']:.2f} | {r['elementwise_ms']:.2f} | "
                  f"{r['kernels']} |"] + [f"| {t['kernel']} (x{t['calls']}) | {t['ms']:.2f} | | | |" for t in r["top"]]
    return lines


def hf_markdown(res: dict, one: dict | None) -> list[str]:
    lines = []
    for mode, ms in res.get("hf", {}).items():
        ratio = f"{ms / one['tpot_ms']:.1f}x nano-bi TUNED (batch 1, ctx 1k)" if ms and one else "n/a"
        lines.append(f"- HF transformers generate ({mode}), batch 1: {ms if ms is None else f'{ms:.2f}'} ms/token = {ratio}")
    return lines


def classes_markdown(title: str, rows: list[dict]) -> str:
    lines = [f"| {title}: ms per step | TPOT | GEMM | attention | elementwise | sampling | gaps between kernels | "
             "host | kernels | the GEMMs alone, one graph (cuBLAS's) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for r in rows:  # runs before the graphed profile reported one "host and gaps" figure
        host = r.get("host_ms", r.get("host_and_gaps_ms", nan))
        lines.append(f"| {r['policy']}, batch {r['batch']} | {r['tpot_ms']:.3f} | {r['GEMM_ms']:.3f} | "
                     f"{r['attention_ms']:.3f} | {r['elementwise_ms']:.3f} | {r['sampling_ms']:.3f} | "
                     f"{r.get('gaps_ms', nan):.3f} | {host:.3f} | {r['kernels_per_step']:.0f} | "
                     f"{r.get('gemms_alone_ms', nan):.3f} ({r.get('cublas_alone_ms', nan):.3f}) |")
    return "\n".join(lines)


def scoreboard(res: dict, decode: dict, prefill: dict) -> str:
    """The speed targets of this build (docs/performance.md says where each comes from), beside this run."""
    bw = res["copy_bandwidth_gbs"] * 1e9
    rows = []
    one = decode.get(("TUNED", 1, 1024))
    if one:
        floor = (res["weight_bytes"] + one["kv_bytes"]) / bw * 1e3
        run = f"; in Engine.run {one['run_tpot_ms'] / floor:.2f}" if "run_tpot_ms" in one else ""
        rows.append(("TUNED TPOT b1 ctx 1k / floor", f"serial {one['tpot_ms'] / floor:.2f}{run}", "<= 1.55"))
    for key, name in (("tpot_ms", "serial"), ("run_tpot_ms", "in Engine.run")):
        ratios = [(p[key] / t[key], b, c) for (pol, b, c), t in decode.items()
                  if pol == "TUNED" and (p := decode.get(("PIN", b, c))) and key in t]
        if ratios:
            worst, b, c = max(ratios)
            rows.append((f"PIN / TUNED decode, worst point, {name}", f"{worst:.3f} (batch {b}, ctx {c})", "<= 1.05"))
    attn = {(r["batch"], r["ctx"]): r["splitkv_tuned_us"] / r["sdpa_us"] for r in res.get("attention", [])}
    if (1, 8192) in attn and (32, 8192) in attn:
        rows.append(("split-KV / SDPA at (1, 8k) / (32, 8k)", f"{attn[1, 8192]:.2f} / {attn[32, 8192]:.2f}",
                     "<= 1.15 / <= 1.10"))
    offline = {r["policy"]: r["tok_s"] for r in res.get("offline", []) if r["async_scheduling"]}  # the default
    if len(offline) == 2:
        rows.append(("offline throughput TUNED, PIN (output tok/s)",
                     f"{offline['TUNED']:.0f}, {offline['PIN']:.0f} (PIN / TUNED {offline['PIN'] / offline['TUNED']:.3f})",
                     "PIN / TUNED >= 0.95"))
    rows += prefill_targets(res, prefill)
    return "\n".join([f"| speed targets on {res['gpu']} | measured | target |", "|---|---|---|"]
                     + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def prefill_targets(res: dict, prefill: dict) -> list[tuple[str, str, str]]:
    """The scoreboard's prefill and scoring rows."""
    rows = []
    scoring = [(r["scoring_tok_s"] / r["prefill_tok_s"], r) for r in res.get("scoring", [])]
    if scoring:
        worst, r = min(scoring, key=lambda x: x[0])
        rows.append(("scoring / plain prefill, worst point", f"{worst:.2f} ({r['policy']}, {r['seqs']} x {r['length']}, "
                     f"k = {r.get('k', 8)})", ">= 0.85"))
    if ("TUNED", 4096) in prefill:
        rows.append(("TUNED prefill MFU 4k", f"{prefill['TUNED', 4096]['mfu']:.1%}", ">= 55%"))
    busy = {(r["policy"], r["tokens"]): sum(v for k, v in r.items() if k.endswith("_ms"))
            for r in res.get("prefill_classes", [])}
    for n in (1024, 4096):  # a short prefill's wall is the host's launches as much as the GPU's work
        if ("TUNED", n) in prefill and ("PIN", n) in prefill:
            gpu = (f"; {busy['PIN', n] / busy['TUNED', n]:.3f} by the GPU's kernel time"
                   if ("PIN", n) in busy and ("TUNED", n) in busy else "")
            rows.append((f"PIN / TUNED prefill {n // 1024}k", f"{prefill['PIN', n]['seconds'] / prefill['TUNED', n]['seconds']:.3f}"
                         f"{gpu}", "<= 1.10"))
    attn = {r["tokens"]: r for r in res.get("prefill_attention", [])}
    if 4096 in attn:
        r = attn[4096]
        rows.append(("prefill attention / SDPA 4k, TUNED / PIN",
                     f"{r['tuned_us'] / r['sdpa_us']:.2f} / {r['pin_us'] / r['sdpa_us']:.2f}", "<= 1.3 / <= 1.5"))
    return rows


def rl_markdown(res: dict) -> str:
    phases = ["rollout", "scoring", "trainer forward", "trainer forward + backward", "update_weights"]
    steps = {r["policy"]: r for r in res["rl_step"]}
    lines = [f"### One RL step on qwen3-0.6b: 64 prompts of 256 tokens x n=8 x 256 new tokens, on {res['gpu']}", "",
             "| phase | TUNED s | PIN s | PIN / TUNED |", "|---|---:|---:|---:|"]
    for name in phases:
        t, p = steps["TUNED"][f"{name}_s"], steps["PIN"][f"{name}_s"]
        lines.append(f"| {name} | {t:.2f} | {p:.2f} | {p / t:.2f} |")
    lines += ["", "trainer logprob == sampler logprob: " + ", ".join(
        f"{k} {r['equal']}/{r['sampled']}" for k, r in steps.items()), ""]
    lines += [f"### RL rollout (32 prompts of 1024 tokens x n=8 x 256 new tokens at T=1, then scoring) on {res['gpu']}",
             "", "| policy | prefix cache | generated tok/s | scored tok/s | whole step s |",
             "|---|---|---:|---:|---:|"]
    for r in res["rl"]:
        lines.append(f"| {r['policy']} | {'on' if r['cache'] else 'off'} | {r['rollout_tok_s']:.0f} | "
                     f"{r['scoring_tok_s']:.0f} | {r['step_s']:.1f} |")
    return "\n".join(lines)


def offline_step_classes(small, policy, batch=128, ctx=1024) -> dict:
    """The offline workload's typical decode step (qwen3-0.6b, ~135 rows at ~1k context) by kernel class."""
    tpot = bench_decode(small, policy, [batch], [ctx], [], pool_bytes(small.config, batch, ctx + 100) + (1 << 30))
    tpot = tpot[0]["tpot_ms"]
    return bench_kernel_classes(small, policy, tpot, batch=batch, ctx=ctx)


def offline_markdown(rows: list[dict]) -> str:
    lines = ["| offline throughput (256 requests, in/out 100-1024, qwen3-0.6b, prefix cache on) | scheduling | "
             "output tok/s | run s | mixed steps s (n) | decode steps on the GPU s (n, mean batch) | decode floor s | "
             "GPU idle, waiting for the host s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {'async' if r['async_scheduling'] else 'serial'} | {r['tok_s']:.0f} | "
                     f"{r['seconds']:.2f} | {r['mixed_s']:.2f} ({r['mixed_steps']}) | {r['decode_gpu_s']:.2f} "
                     f"({r['decode_steps']}, {r['decode_rows'] / max(1, r['decode_steps']):.0f}) | "
                     f"{r['decode_floor_s']:.2f} | {r['gpu_idle_s']:.2f} |")
    return "\n".join(lines)


def plot(res: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no PNG (run `python bench.py --report FILE.json` where it is)")
        return
    bw = res["copy_bandwidth_gbs"] * 1e9
    ctxs = sorted({r["ctx"] for r in res["decode"]})
    fig, axes = plt.subplots(1, len(ctxs), figsize=(5 * len(ctxs), 4), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        for pol, style in (("TUNED", "o-"), ("PIN", "s--")):
            pts = sorted((r["batch"], r["tpot_ms"]) for r in res["decode"] if r["policy"] == pol and r["ctx"] == ctx)
            if pts:
                ax.plot(*zip(*pts), style, label=pol)
        pts = sorted((r["batch"], (res["weight_bytes"] + r["kv_bytes"]) / bw * 1e3) for r in res["decode"]
                     if r["policy"] == "TUNED" and r["ctx"] == ctx)
        ax.plot(*zip(*pts), "k:", label="floor (bytes / bandwidth)")
        ax.set(xscale="log", xlabel="batch", ylabel="TPOT ms", title=f"{res['model']}, ctx {ctx}, {res['gpu']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the core points only (~3-5 min on one H100/H200)")
    ap.add_argument("--model", default="qwen3-4b", choices=["qwen3-4b", "qwen3-0.6b"], help="synthetic shape")
    ap.add_argument("--out", default="bench_results", help="folder for bench.json / bench.png")
    ap.add_argument("--report", metavar="JSON", help="only reprint the tables and redraw the plot from a saved "
                    "bench.json (also one that a cut-short run left)")
    ap.add_argument("--rl", action="store_true", help="only the RL points: one RL step by phase, rollouts + scoring")
    ap.add_argument("--tp", action="store_true", help="only tensor parallelism: qwen3-8b at TP 1 vs 2 (needs 2 GPUs)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison (~1 min of loading)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        res = json.loads(Path(args.report).read_text())
        print(markdown(res))
        plot(res, out / "bench.png")
        return
    if not torch.cuda.is_available():
        sys.exit("bench.py: error: needs a CUDA GPU (the CPU interpreter measures nothing useful)")
    if args.tp:
        if torch.cuda.device_count() < 2:
            sys.exit("bench.py: error: --tp needs 2 GPUs")
        res = bench_tensor_parallel(16 << 30)
        (out / "bench_tp.json").write_text(json.dumps(res, indent=2))
        print(tp_markdown(res))
    elif args.rl:
        res = bench_rl(args.model)
        (out / "bench_rl.json").write_text(json.dumps(res, indent=2))
        print(rl_markdown(res))
    else:
        save = lambda res: (out / "bench.json").write_text(json.dumps(res, indent=2))  # noqa: E731
        res = bench_sweep(args.model, args.quick, save)
        res["hf"] = {} if args.no_hf else bench_hf(nb.synthetic_checkpoint(args.model), static_too=not args.quick)
        save(res)
        print(markdown(res))
        plot(res, out / "bench.png")


def offline_rows(small) -> list[dict]:
    return [bench_offline(small, policy, int(torch.cuda.mem_get_info()[0] * 0.8) - (4 << 30), overlap)
            for policy in (TUNED, PIN) for overlap in (False, True)]


def bench_rl(model: str) -> dict:
    res = dict(gpu=torch.cuda.get_device_name())
    small = nb.load_checkpoint(nb.synthetic_checkpoint("qwen3-0.6b"))
    res["rl_step"] = [bench_rl_step(small, policy, 48 << 30) for policy in (TUNED, PIN)]
    del small
    ckpt = nb.load_checkpoint(nb.synthetic_checkpoint(model))
    kv_bytes = int(torch.cuda.mem_get_info()[0] * 0.8) - (8 << 30)
    res["rl"] = [bench_rl_rollout(ckpt, policy, cache, kv_bytes) for policy in (TUNED, PIN) for cache in (True, False)]
    return res


@contextmanager
def phase(seconds: dict, name: str):
    """Time a phase of GPU work, synchronised at both ends."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    yield
    torch.cuda.synchronize()
    seconds[name] = time.perf_counter() - t0


@frees_gpu_memory
def bench_rl_step(ckpt, policy, kv_bytes, prompts=64, n=8, prompt_len=256, new=256, micro_batch=16) -> dict:
    """One RL step, timed by phase: rollout (n samples of each prompt at T = 1), scoring the rollouts through
    prompt_logprobs, the trainer's forward alone and with its backward (micro-batches of sequences), and
    update_weights. Also counts the sampled tokens whose trainer logprob equals the sampler's."""
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 150000, (prompt_len,), generator=g).tolist() for _ in range(prompts)]
    seconds = {}
    with nb.LLM(ckpt, policy, max_batch=256, kv_cache_bytes=kv_bytes) as llm:
        trainer = nb.TrainingModel(llm, policy)
        llm.generate(batch[:2], nb.SamplingParams(max_tokens=4))  # warm up
        with phase(seconds, "rollout"):
            outs = llm.generate(batch, nb.SamplingParams(max_tokens=new, temperature=1.0, n=n, logprobs=0,
                                                         ignore_eos=True))
        seqs = [(o.prompt_ids, s) for o in outs for s in o.outputs]
        with phase(seconds, "scoring"):
            llm.generate([p + s.token_ids for p, s in seqs], nb.SamplingParams(max_tokens=1, prompt_logprobs=0))
        micro = [seqs[i:i + micro_batch] for i in range(0, len(seqs), micro_batch)]
        with phase(seconds, "trainer forward"), torch.no_grad():
            found = [lp for mb in micro for lp in trainer.token_logprobs([p + s.token_ids for p, s in mb])]
        with phase(seconds, "trainer forward + backward"):
            for mb in micro:
                lps = trainer.token_logprobs([p + s.token_ids for p, s in mb])
                (-sum(lp[len(p) - 1:].sum() for (p, _), lp in zip(mb, lps)) / len(seqs)).backward()
        with phase(seconds, "update_weights"):
            llm.update_weights(trainer.named_parameters())
    pairs = [(dict(e)[t], lp) for (p, s), found_lp in zip(seqs, found)
             for t, e, lp in zip(s.token_ids, s.logprobs, found_lp[len(p) - 1:].tolist())]
    row = dict(policy=policy.name, sequences=len(seqs), tokens=sum(len(p) + len(s.token_ids) for p, s in seqs),
               equal=sum(a == b for a, b in pairs), sampled=len(pairs), **{f"{k}_s": v for k, v in seconds.items()})
    log(f"{policy.name} RL step: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
        + f"; trainer == sampler on {row['equal']}/{row['sampled']} sampled tokens")
    return row


@frees_gpu_memory
def bench_prefill_classes(ckpt, policy, n=4096, top=6) -> dict:
    """Where a prefill's time goes: GPU ms per kernel class (profiler, one eager n-token prefill after a warm
    one), and the `top` kernels by GPU time - the profile that PIN's prefill cost is judged by."""
    with closing(nb.Engine(ckpt, policy, cuda_graphs=False, max_batch=1, kv_cache_bytes=4 << 30)) as eng:
        prefill_once(eng, n)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            prefill_once(eng, n)
            torch.cuda.synchronize()
    run = gpu_kernels(prof)
    row = dict(policy=policy.name, tokens=n, kernels=sum(e.count for e in run), **ms_by_class(run))
    row["top"] = [dict(kernel=e.key[:60], calls=e.count, ms=e.self_device_time_total / 1e3)
                  for e in sorted(run, key=lambda e: -e.self_device_time_total)[:top]]
    log(f"{policy.name} {n}-token prefill by kernel class: " + ", ".join(
        f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_ms")) + "; top: " + ", ".join(
        f"{t['kernel']} x{t['calls']} {t['ms']:.2f} ms" for t in row["top"]))
    return row


def run_phases(res: dict, phases: dict, save):
    """Run each phase into res[name], saving after each: a run cut short keeps every table it finished."""
    for name, run in phases.items():
        res[name] = run()
        save(res)


def bench_sweep(model: str, quick: bool, save) -> dict:
    ckpt = nb.load_checkpoint(nb.synthetic_checkpoint(model))
    if quick:
        batches, contexts, extra = [1, 8, 32, 128], [1024], [(1, 8192), (8, 8192), (32, 8192)]
        prefill_lens, attn_points = [1024, 4096], [(1, 8192), (32, 8192)]
    else:
        batches, contexts, extra = [1, 8, 32, 64, 128], [1024, 8192], [(1, 32768)]
        prefill_lens, attn_points = [1024, 4096, 16384], [(1, 8192), (1, 32768), (32, 8192), (32, 1024)]
    res = dict(model=model, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, quick=quick, weight_bytes=weight_bytes(ckpt))
    res["copy_bandwidth_gbs"] = copy_bandwidth() / 1e9
    log(f"{res['gpu']}: copy bandwidth {res['copy_bandwidth_gbs']:.0f} GB/s (read+write)")
    kv_bytes = int(torch.cuda.mem_get_info()[0] * 0.85) - (6 << 30)
    tpot = lambda b: {r["policy"]: r["tpot_ms"] for r in res["decode"] if r["batch"] == b and r["ctx"] == 1024}  # noqa: E731
    phases = {"decode_warm_up": lambda: warm_up(ckpt, kv_bytes),
              "decode": lambda: [row for policy in (TUNED, PIN) for row in
                                 bench_decode(ckpt, policy, batches, contexts, extra, kv_bytes)],
              "kernel_classes": lambda: [bench_kernel_classes(ckpt, policy, tpot(b)[policy.name], batch=b)
                                         for b in (1, 128) for policy in (TUNED, PIN)],
              "prefill": lambda: [row for policy in (TUNED, PIN) for row in
                                  bench_prefill(ckpt, policy, prefill_lens, 4 << 30)],
              "prefill_classes": lambda: [bench_prefill_classes(ckpt, policy, n) for n in prefill_lens
                                          for policy in (TUNED, PIN)],
              "scoring": lambda: [bench_scoring(ckpt, policy, n, length, 16 << 30, k) for policy in (TUNED, PIN)
                                  for n, length, k in ((4, 1024, 8), (64, 1024, 1), (1, 32768, 1))],
              "logprob_head": lambda: bench_logprob_head(ckpt.config.vocab_size),
              "gap": lambda: [row for policy in (TUNED, PIN) for row in bench_gap(ckpt, policy, 12 << 30)],
              "attention": lambda: bench_attention(ckpt.config, attn_points),
              "prefill_attention": lambda: bench_prefill_attention(ckpt.config, [1024, 4096, 16384])}
    run_phases(res, phases, save)
    ckpt = phases = None  # the 4b weights go before the 0.6b runs
    gc.collect()
    torch.cuda.empty_cache()
    small = nb.load_checkpoint(nb.synthetic_checkpoint("qwen3-0.6b"))
    run_phases(res, {"offline": lambda: offline_rows(small),
                     "offline_step_classes": lambda: [offline_step_classes(small, p) for p in (TUNED, PIN)]}, save)
    return res


if __name__ == "__main__":
    main()
