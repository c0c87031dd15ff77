"""Compile our Pallas-Triton kernels to a CUDA binary on a machine without a GPU.

`jax.export(..., platforms=["cuda"])` stops at Triton IR inside a custom call; XLA compiles it only
on the device. This module goes further: it captures each kernel's Triton IR while exporting,
prints it as text, and runs the open-source Triton compiler (the `triton` wheel, which bundles
LLVM and ptxas) for a given compute capability: TTIR -> TTGIR -> LLVM -> PTX -> cubin. That
proves the IR is accepted by a real Triton and gives the shared memory each kernel needs, which
we check against the device's per-block limit. Both compilers are pinned by what is installed:
jaxlib's Triton dialect and the wheel's must be close enough to agree on the textual IR.
"""
import dataclasses
import tempfile

import jax

TRITON_TARGET = "__gpu$xla.gpu.triton"
# Max dynamic shared memory per block (opt-in), bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclasses.dataclass
class CompiledKernel:
    name: str
    capability: int
    shared_bytes: int
    cubin_bytes: int
    num_warps: int
    num_stages: int


def triton_ir(fn, *args, **kwargs):
    """[(name, Triton IR text, num_warps, num_stages)] of every Triton kernel in jit(fn)(*args)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import pallas_call_registration as registration
    from jaxlib.triton import dialect as tt_dialect

    captured = []
    original = registration.mlir.custom_call

    def spy(call_target_name, **kwargs):
        if call_target_name == TRITON_TARGET:
            cfg = kwargs["backend_config"]
            captured.append((cfg["name"].value, cfg["ir"].value_bytes, cfg["num_warps"].value,
                             cfg["num_stages"].value))
        return original(call_target_name, **kwargs)

    registration.mlir.custom_call = spy
    jax.clear_caches()  # a cached lowering would not pass through the spy
    try:
        jax.export.export(jax.jit(lambda *a: fn(*a, **kwargs)), platforms=["cuda"],
                          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)])(*args)
    finally:
        registration.mlir.custom_call = original
    ctx = mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    out = []
    with ctx:
        for name, bytecode, warps, stages in captured:
            out.append((name, ir.Module.parse(bytecode).operation.get_asm(), warps, stages))
    return out


def compile_for_cuda(fn, *args, capability=90, **kwargs):
    """Compile every Triton kernel of jit(fn(*args, **kwargs)) to a cubin for sm_<capability>.
    Raises triton's CompilationError (or ValueError past the shared-memory limit)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    results = []
    for name, text, warps, stages in triton_ir(fn, *args, **kwargs):
        with tempfile.NamedTemporaryFile("w", suffix=".ttir") as f:
            f.write(text)
            f.flush()
            kernel = triton_compile(f.name, target=GPUTarget("cuda", capability, 32),
                                    options={"num_warps": warps, "num_stages": stages})
        res = CompiledKernel(name, capability, kernel.metadata.shared, len(kernel.asm["cubin"]),
                             warps, stages)
        if res.shared_bytes > SHARED_LIMIT.get(capability, 48 * 1024):
            raise ValueError(f"{name} needs {res.shared_bytes} B shared memory on sm_{capability}")
        results.append(res)
    return results
