"""The Triton paged-decode attention kernel compiles for an H100/H200 (sm_90) without a GPU, for
Mistral's (4 query heads per KV head) and Llama's (1) shapes in bf16, and does not spill."""

import json
import os
import subprocess
import sys

CODE = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lorabench.kernels.aot import _resources
from lorabench.model.paged_decode import _paged_decode_kernel
rows = []
for group, head_dim in [(4, 128), (1, 128)]:
    const = dict(GROUP=group, GROUP_P2=triton.next_power_of_2(group), HEAD_DIM=head_dim,
                 HEAD_DIM_P2=triton.next_power_of_2(head_dim), BLOCK_N=16)
    sig = dict(q_ptr="*bf16", storage_ptr="*bf16", k_table_ptr="*i64", v_table_ptr="*i64", ctx_lens_ptr="*i32",
               out_ptr="*bf16", stride_qb="i32", stride_qh="i32", stride_row="i32", stride_tb="i32",
               stride_ob="i32", stride_oh="i32", v_col="i32", sm_scale="fp32", **{k: "constexpr" for k in const})
    kernel = triton.compile(ASTSource(fn=_paged_decode_kernel, signature=sig, constexprs=const),
                            target=GPUTarget("cuda", 90, 32))
    rows.append(dict(group=group, **_resources(kernel.asm["cubin"])))
print(json.dumps(rows))
"""


def test_paged_decode_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["group"] for row in rows] == [4, 1]
    assert all(row["stack_bytes"] == 0 and row["registers"] > 0 for row in rows), rows
