"""Autotuning configs that spill registers (or need too much shared memory) when compiled, per kernel,
target and dtype: written by benchmarks/kernels_static.py from kernels/aot.py's compiles, read by
triton_support.spill_free so the NF4 matmuls' autotuners never pick them. tests/test_aot_compile.py
checks that this table is what the compiler reports now (rerun the script when it is not)."""

SPILLING = {
    "_nf4_matmul_backward_input_kernel": {
        "sm_80": {
            "bf16": [
                "BLOCK_K=128 BLOCK_M=256 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=64 BLOCK_M=128 BLOCK_N=128 GROUP_M=8 w8 s3"
            ],
            "fp16": [
                "BLOCK_K=128 BLOCK_M=256 BLOCK_N=64 GROUP_M=8 w8 s3"
            ],
            "fp32": [
                "BLOCK_K=128 BLOCK_M=128 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=128 BLOCK_M=256 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=128 BLOCK_M=64 BLOCK_N=64 GROUP_M=8 w4 s4",
                "BLOCK_K=256 BLOCK_M=128 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=32 BLOCK_M=128 BLOCK_N=64 GROUP_M=8 w4 s4",
                "BLOCK_K=64 BLOCK_M=128 BLOCK_N=128 GROUP_M=8 w8 s3",
                "BLOCK_K=64 BLOCK_M=128 BLOCK_N=64 GROUP_M=8 w4 s4",
                "BLOCK_K=64 BLOCK_M=256 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=64 BLOCK_M=32 BLOCK_N=64 GROUP_M=8 w4 s4",
                "BLOCK_K=64 BLOCK_M=64 BLOCK_N=128 GROUP_M=8 w4 s3",
                "BLOCK_K=64 BLOCK_M=64 BLOCK_N=64 GROUP_M=8 w4 s4"
            ],
            "fp32-tf32": [
                "BLOCK_K=128 BLOCK_M=256 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=128 BLOCK_M=64 BLOCK_N=64 GROUP_M=8 w4 s4",
                "BLOCK_K=256 BLOCK_M=128 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=64 BLOCK_M=128 BLOCK_N=64 GROUP_M=8 w4 s4"
            ]
        },
        "sm_90": {
            "fp32": [
                "BLOCK_K=128 BLOCK_M=256 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=128 BLOCK_M=64 BLOCK_N=64 GROUP_M=8 w4 s4",
                "BLOCK_K=256 BLOCK_M=128 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=64 BLOCK_M=128 BLOCK_N=128 GROUP_M=8 w8 s3",
                "BLOCK_K=64 BLOCK_M=128 BLOCK_N=64 GROUP_M=8 w4 s4",
                "BLOCK_K=64 BLOCK_M=256 BLOCK_N=64 GROUP_M=8 w8 s3",
                "BLOCK_K=64 BLOCK_M=64 BLOCK_N=128 GROUP_M=8 w4 s3"
            ],
            "fp32-tf32": [
                "BLOCK_K=256 BLOCK_M=128 BLOCK_N=64 GROUP_M=8 w8 s3"
            ]
        }
    },
    "_nf4_matmul_kernel": {
        "sm_80": {
            "bf16": [
                "BLOCK_N=128 BLOCK_M=128 BLOCK_K=128 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=256 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=64 BLOCK_K=64 GROUP_M=8 w4 s4",
                "BLOCK_N=256 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3"
            ],
            "fp16": [
                "BLOCK_N=128 BLOCK_M=128 BLOCK_K=128 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=64 BLOCK_K=64 GROUP_M=8 w4 s4",
                "BLOCK_N=256 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3"
            ],
            "fp32": [
                "BLOCK_N=128 BLOCK_M=128 BLOCK_K=128 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=16 BLOCK_K=128 GROUP_M=8 w4 s4",
                "BLOCK_N=128 BLOCK_M=16 BLOCK_K=64 GROUP_M=8 w4 s4",
                "BLOCK_N=128 BLOCK_M=256 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=32 BLOCK_K=64 GROUP_M=8 w4 s4",
                "BLOCK_N=128 BLOCK_M=64 BLOCK_K=64 GROUP_M=8 w4 s4",
                "BLOCK_N=256 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=64 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w4 s4",
                "BLOCK_N=64 BLOCK_M=32 BLOCK_K=128 GROUP_M=8 w4 s4",
                "BLOCK_N=64 BLOCK_M=64 BLOCK_K=64 GROUP_M=8 w4 s4"
            ],
            "fp32-tf32": [
                "BLOCK_N=128 BLOCK_M=128 BLOCK_K=128 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=256 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=64 BLOCK_K=64 GROUP_M=8 w4 s4",
                "BLOCK_N=256 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=64 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w4 s4"
            ]
        },
        "sm_90": {
            "bf16": [
                "BLOCK_N=128 BLOCK_M=16 BLOCK_K=128 GROUP_M=8 w4 s4",
                "BLOCK_N=256 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3"
            ],
            "fp32": [
                "BLOCK_N=128 BLOCK_M=128 BLOCK_K=128 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=16 BLOCK_K=128 GROUP_M=8 w4 s4",
                "BLOCK_N=128 BLOCK_M=256 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=64 BLOCK_K=64 GROUP_M=8 w4 s4",
                "BLOCK_N=256 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3",
                "BLOCK_N=32 BLOCK_M=16 BLOCK_K=64 GROUP_M=8 w2 s5",
                "BLOCK_N=64 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w4 s4"
            ],
            "fp32-tf32": [
                "BLOCK_N=128 BLOCK_M=128 BLOCK_K=128 GROUP_M=8 w8 s3",
                "BLOCK_N=128 BLOCK_M=16 BLOCK_K=128 GROUP_M=8 w4 s4",
                "BLOCK_N=256 BLOCK_M=128 BLOCK_K=64 GROUP_M=8 w8 s3"
            ]
        }
    }
}
