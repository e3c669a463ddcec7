"""A benchmark on the AVX2 path where the CPU has AVX-512: `--avx2` on its command line.

Users' machines differ (some Xeons have AVX-512, some AMD EPYCs AVX2 only), so the benchmarks that time mumoe's
kernels measure both on one machine: torch's own kernels held to AVX2 (ATEN_CPU_CAPABILITY, read when torch loads,
so the process runs itself again with it set) and mumoe's library built with -mno-avx512f, as the tests build it."""

import os
import sys

FLAG = "--avx2"
HELP = "time the AVX2 path: torch held to AVX2, mumoe's kernel built with -mno-avx512f (this CPU has AVX-512)"


def hold_to_avx2() -> str:
    """With --avx2 in sys.argv: this process again with torch held to AVX2 (once), and packed_experts' kernel built
    with -mno-avx512f from here on. -> the instruction set the benchmark runs on, for its results."""
    if FLAG not in sys.argv:
        return "native"
    if os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import packed_experts

    packed_experts.compiled_kernel = lambda: packed_experts.build(("-mno-avx512f",))
    return "avx2 (-mno-avx512f, ATEN_CPU_CAPABILITY=avx2)"
