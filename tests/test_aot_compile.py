"""Every Triton kernel under kernels/ compiles for an A100 (sm_80) and an H100/H200 (sm_90), without a GPU.

kernels/aot.py compiles each kernel's cases (`aot_cases()` in its module: every autotuning or launch config
x every dtype it accepts, plus the other constexpr values) with `triton.compile` and a GPUTarget, through the
ptxas the triton wheel ships. A compile error, a register spill or shared memory beyond the target's
per-block limit fails here. The first run on a fresh clone compiles everything (a few minutes on 2 cores,
in a process pool); later runs read build/aot-cache/, keyed by each kernel's source hash, and recompile only
kernels that changed. benchmarks/kernels_static.py writes the same reports as a table.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from minift.kernels import aot  # noqa: E402


@pytest.fixture(scope="module")
def reports():
    return aot.compile_all(aot.all_cases())


def test_every_kernel_has_compile_cases():
    kernels = aot.entry_kernels()
    assert "nf4_matmul_kernel._nf4_matmul_kernel" in kernels  # discovery finds the known kernels ...
    assert "nf4_dequantize_kernel.nf4_decode_tile" not in kernels  # ... and not their device functions
    covered = {f"{case.module}.{case.kernel}" for case in aot.all_cases()}
    missing = sorted(set(kernels) - covered)
    assert not missing, (f"@triton.jit kernels without ahead-of-time compile cases: {missing}; give their module an "
                         "aot_cases() (see kernels/aot.py)")


def test_cases_cover_every_autotuning_config_in_every_dtype():
    import importlib

    cases = aot.all_cases()
    checked = 0
    for module_name in aot.kernel_module_names():
        module = importlib.import_module(f"minift.kernels.{module_name}")
        for obj in vars(module).values():
            if type(obj).__name__ != "Autotuner":
                continue
            kernel = obj.fn.fn.__name__
            dtypes = {case.dtype for case in cases if case.kernel == kernel}
            assert {"fp32", "fp16", "bf16"} <= dtypes, (kernel, dtypes)
            for config in obj.configs:
                label = aot.config_label(config.kwargs, config.num_warps, config.num_stages)
                have = {case.dtype for case in cases if case.kernel == kernel and case.config == label}
                assert have == dtypes, f"{kernel} config {label} compiled only for {sorted(have)} of {sorted(dtypes)}"
                checked += 1
    assert checked >= 30  # the GEMV, GEMM and backward autotuners were all found


def test_blocksizes_are_the_quantizers():
    from minift.kernels.nf4_dequantize_kernel import BLOCKSIZES
    from minift.quant.nf4 import VALID_BLOCKSIZES

    assert BLOCKSIZES == VALID_BLOCKSIZES


def test_ptxas_log_parsing_and_defects():
    log = ("ptxas info    : Function properties for k\n    48 bytes stack frame, 60 bytes spill stores, 48 bytes "
           "spill loads\nptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size\n")
    parsed = aot.parse_ptxas_log(log)
    assert parsed == dict(registers=255, stack=48, spill_stores=60, spill_loads=48)
    report = dict(ok=True, target="sm_80", shared=170_000, **parsed)
    assert len(aot.defects(report)) == 2  # spills, and 170,000 B > the A100's 166,912 B per block
    assert aot.defects(dict(report, target="sm_90", spill_stores=0, spill_loads=0)) == []


def test_a_case_that_cannot_compile_is_reported_not_raised():
    case = aot.all_cases()[0]
    broken = aot.CompileCase(**{**case.__dict__, "constexprs": {}})  # every constexpr missing
    [report] = aot.compile_all([broken], targets=("sm_90",), workers=1, cache_dir=None)
    assert not report["ok"] and "gives no value for constexpr" in report["error"]
    assert aot.defects(report)[0].startswith("does not compile")


def test_every_case_compiles_for_sm80_and_sm90(reports):
    assert len(reports) == 2 * len(aot.all_cases())
    failed = [f"{aot.describe(r)}: {r['error']}" for r in reports if not r["ok"]]
    assert not failed, f"{len(failed)} compile cases do not compile:\n" + "\n".join(failed[:40])
    for report in reports:  # the metadata the static table reports is there
        assert 0 < report["registers"] <= aot.MAX_REGISTERS and report["shared"] >= 0, aot.describe(report)
    matmuls = [r for r in reports if r["kernel"] == "_nf4_matmul_kernel" and r["dtype"] == "bf16"]
    # Hopper's asynchronous warpgroup MMA needs a warpgroup (4 warps); 2-warp tiles use mma.sync, as on Ampere
    assert all(r["wgmma"] for r in matmuls if r["target"] == "sm_90" and not r["config"].endswith("w2 s5"))
    assert all(r["mma"] and not r["wgmma"] for r in matmuls if r["target"] == "sm_80")
    assert any(r["config"].endswith("w2 s5") for r in matmuls)  # the exception above is a real config


# The kernels whose autotuners drop the configs kernels/spilling_configs.py lists (triton_support.spill_free).
PRUNED = {"_nf4_matmul_kernel": "nf4_matmul_kernel._nf4_matmul_autotuned",
          "_nf4_matmul_backward_input_kernel": "nf4_matmul_backward_kernel._nf4_backward_autotuned"}


def test_no_config_the_dispatcher_can_pick_spills_or_overflows_shared_memory(reports):
    import importlib

    from minift.kernels.spilling_configs import SPILLING

    table = aot.spilling_table(reports)
    assert table == SPILLING, ("kernels/spilling_configs.py no longer matches the compiler: rerun "
                               "python benchmarks/kernels_static.py")
    # Only the pruned autotuners may have defective configs; every other kernel's configs are all clean.
    assert set(table) <= set(PRUNED), {k: v for k, v in table.items() if k not in PRUNED}
    for kernel, autotuner in PRUNED.items():
        module, name = autotuner.split(".")
        prune = getattr(importlib.import_module(f"minift.kernels.{module}"), name).early_config_prune
        assert "tile_pruner" in prune.__qualname__  # it drops the listed configs
    # ... and they keep clean configs for every dtype and target (spill_free never falls back to all).
    for kernel in PRUNED:
        for target in aot.TARGETS:
            for dtype in {r["dtype"] for r in reports if r["kernel"] == kernel}:
                configs = {r["config"] for r in reports if (r["kernel"], r["dtype"]) == (kernel, dtype)}
                left = configs - set(table.get(kernel, {}).get(target, {}).get(dtype, ()))
                assert left, f"{kernel} has no clean config for {dtype} on {target}"


def test_spill_free_drops_the_listed_configs(monkeypatch):
    import torch

    from minift.kernels import spilling_configs, triton_support
    from minift.kernels.nf4_matmul_kernel import GEMM_TILES

    configs = triton_support.tile_configs(GEMM_TILES, ("BLOCK_N", "BLOCK_M", "BLOCK_K"))
    bad = aot.config_label(configs[0].kwargs, configs[0].num_warps, configs[0].num_stages)
    monkeypatch.setattr(spilling_configs, "SPILLING", {"k": {"sm_80": {"fp32-tf32": [bad]}}})

    class FakeCudaTensor:
        is_cuda, device, dtype = True, "cuda:0", torch.float32

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    kept = triton_support.spill_free(configs, "k", FakeCudaTensor(), "tf32")
    assert kept == configs[1:]
    assert triton_support.spill_free(configs, "k", FakeCudaTensor(), "ieee") == configs  # fp32 IEEE: not listed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert triton_support.spill_free(configs, "k", FakeCudaTensor(), "tf32") == configs  # listed for sm_80 only
    assert triton_support.spill_free(configs, "k", torch.zeros(1), "tf32") == configs  # CPU: interpreter


def test_compile_results_are_cached_by_source(tmp_path):
    case = next(c for c in aot.all_cases() if c.kernel == "_nf4_dequantize_kernel")
    [first] = aot.compile_all([case], targets=("sm_80",), workers=1, cache_dir=tmp_path)
    [second] = aot.compile_all([case], targets=("sm_80",), workers=1, cache_dir=tmp_path)
    assert first["ok"] and not first["cached"] and second["cached"]
    assert {k: v for k, v in second.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
    assert len(list(tmp_path.glob("*.json"))) == 1
