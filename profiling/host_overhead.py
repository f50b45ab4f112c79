"""Host time against GPU time of the small stages (router, permute, combine), ours and eager PyTorch's.

At a few thousand tokens these stages take tens of microseconds on the GPU, less than Python and the launches
take on the host, so the suites' do_bench medians (bench/bench_router.py, bench_permute.py) time the host.
This prints, per stage and implementation: host microseconds per call (calls enqueued back to back, no
sync), the do_bench median, the GPU time of its kernels from torch.profiler, with their count, and the do_bench
median of the stage captured in a CUDA graph and replayed ("-": it cannot be captured).

    PYTHONPATH=. python profiling/host_overhead.py [--shapes olmoe-1b-7b,qwen1.5-moe-a2.7b] [--tokens 4096,16384]
"""

import argparse
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import csrc_triton as ct
from bench.peers import eager_permute, eager_route, eager_unpermute, ours_permute, ours_route, ours_unpermute
from bench.shapes import SHAPES, router_logits


def graphed_us(fn) -> float | None:
    """do_bench median of ``fn`` captured in a CUDA graph and replayed (one launch for all its kernels); None if
    it cannot be captured (something in it waits for the device)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median") * 1e3


def host_do_bench_gpu(fn, calls: int = 200, profiled: int = 20) -> tuple[float, float, float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    median_us = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return host_us, median_us, sum(e.device_time for e in kernels) / profiled, len(kernels) / profiled


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="olmoe-1b-7b,qwen1.5-moe-a2.7b")
    parser.add_argument("--tokens", default="4096,16384")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"{'shape':18} {'tokens':>6} {'stage':8} {'impl':6} {'host us':>8} {'do_bench us':>11} {'GPU us':>7} "
          f"{'kernels':>7} {'graph us':>8}")
    for name in args.shapes.split(","):
        s = SHAPES[name]
        for tokens in map(int, args.tokens.split(",")):
            logits = router_logits(tokens, s.experts, "balanced", gen).to("cuda", torch.bfloat16)
            x = torch.randn(tokens, s.hidden, device="cuda", dtype=torch.bfloat16)
            routing = ct.route(logits, s.top_k)
            ids, weights = routing.expert_ids, routing.weights.bfloat16()
            plan = ct.plan_routing(ids, s.experts)
            y_sorted = torch.randn(ids.numel(), s.hidden, device="cuda", dtype=torch.bfloat16)
            cases = {
                ("router", "pcmoe"): lambda: ours_route(logits, s),
                ("router", "eager"): lambda: eager_route(logits, s),
                ("permute", "pcmoe"): lambda: ours_permute(x, ids, s.experts),
                ("permute", "eager"): lambda: eager_permute(x, ids.long(), s.experts),
                ("combine", "pcmoe"): lambda: ours_unpermute(y_sorted, plan, weights),
                ("combine", "eager"): lambda: eager_unpermute(y_sorted, plan, weights),
            }
            for (stage, impl), fn in cases.items():
                host, median, gpu, kernels = host_do_bench_gpu(fn)
                graphed = graphed_us(fn)
                print(f"{name:18} {tokens:6} {stage:8} {impl:6} {host:8.1f} {median:11.1f} {gpu:7.1f} "
                      f"{kernels:7.0f} {'-' if graphed is None else f'{graphed:.1f}':>8}", flush=True)


if __name__ == "__main__":
    main()
