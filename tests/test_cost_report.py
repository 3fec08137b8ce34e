"""The cost model (kernels/cost.py: its rules, and each op's costs) and the cost part of
`python -m kernels.report`: attention's figures checked by hand on small shapes (the fused
linear ops' in test_kernel_costs.py), the report's block
checked against the launches the model's block really makes, and the report run end to end."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.counts import DeviceWorkCounter
from kernels import attention, report
from kernels.cost import KernelCost, attention_costs

REPO = Path(__file__).resolve().parents[1]
BANDWIDTH, PEAK = 3.3e12, 790e12


def test_attention_whole_sequence_costs_by_hand():
    """B=2, N=65, 3 heads of 16, fp16: one program per (batch, head), 6 programs; 65 tokens as
    a 64-token lead and a 16-token tail: 80 x 80 tiles (head_dim 16 needs no column padding).
    One head's [65, 16] fp16 slice is 65 * 16 * 2 = 2080 bytes; its fp32 row statistics 260."""
    forward, backward = attention_costs(batch=2, seq_len=65, num_heads=3, head_dim=16, dtype=torch.float16)
    assert forward == KernelCost(
        op="attention", kernel="_attention_whole_forward_kernel", phase="forward", launches=1,
        bytes_read=37_440,  # q, k, v: 6 * 3 * 2080
        bytes_loaded=37_440,  # each program loads its own head once
        bytes_written=14_040,  # out and lse: 6 * (2080 + 260)
        useful_flops=1_622_400,  # Q K^T and P V: 6 * 2 * (2 * 65 * 65 * 16)
        executed_flops=2_457_600)  # 6 * 2 * (2 * 80 * 80 * 16)
    assert backward == KernelCost(
        op="attention", kernel="_attention_whole_backward_kernel", phase="backward", launches=1,
        bytes_read=51_480,  # q, k, v, dout and lse: 6 * (4 * 2080 + 260)
        bytes_loaded=51_480,
        bytes_written=37_440,  # dq, dk, dv: 6 * 3 * 2080
        useful_flops=3_244_800,  # dV, dP, dQ, dK: 6 * 4 * (2 * 65 * 65 * 16)
        executed_flops=6_144_000)  # those and Q K^T again: 6 * 5 * (2 * 80 * 80 * 16)
    # Memory-bound: (37440 + 14040) bytes at 3.3 TB/s against 2457600 FLOP at 790 TFLOP/s.
    assert forward.floor_seconds(BANDWIDTH, PEAK) == pytest.approx(51_480 / 3.3e12, rel=1e-12)
    assert backward.floor_seconds(BANDWIDTH, PEAK) == pytest.approx(88_920 / 3.3e12, rel=1e-12)


def test_attention_streaming_costs_by_hand():
    """B=1, N=129, 2 heads of 64, fp16: the forward's 128-query blocks (2 per head, 256 rows
    padded) each loop over 64-key blocks (3, 192 keys padded) and load every key and value.
    One head's [129, 64] fp16 slice is 16512 bytes."""
    forward = attention_costs(batch=1, seq_len=129, num_heads=2, head_dim=64, dtype=torch.float16)[0]
    assert forward == KernelCost(
        op="attention", kernel="_attention_forward_kernel", phase="forward", launches=1,
        bytes_read=99_072,  # q, k, v once: 2 * 3 * 16512
        bytes_loaded=165_120,  # q once, k and v by both query blocks: 2 * (16512 + 2 * 2 * 16512)
        bytes_written=34_056,  # out and lse: 2 * (16512 + 129 * 4)
        useful_flops=8_520_192,  # 2 * 2 * (2 * 129 * 129 * 64)
        executed_flops=25_165_824)  # 2 * 2 * (2 * 256 * 192 * 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_executes_at_most_twice_the_useful_work_at_65_tokens(dtype):
    for cost in attention_costs(batch=128, seq_len=65, num_heads=12, head_dim=32, dtype=dtype):
        assert cost.executed_flops <= 2 * cost.useful_flops, cost
        assert cost.launches == 1


def test_block_launches_match_the_models_block():
    """The report's block at fp32 (no autocast) launches what the model's Block really launches
    with the triton backend, Triton kernels and torch ops, forward and backward."""
    from vit.backends import get_backend
    from vit.model import Block, ViTConfig

    if not attention._INTERPRETED and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    device = "cpu" if attention._INTERPRETED else "cuda"
    config = ViTConfig(dim=32, heads=2, mlp_dim=48, backend="triton")
    block = Block(config, get_backend("triton")).to(device)
    x = torch.randn(2, 9, 32, device=device, requires_grad=True)
    with DeviceWorkCounter() as forward:
        y = block(x)
    grad = torch.randn_like(y)
    with DeviceWorkCounter() as backward:
        y.backward(grad)
    costs = report.block_costs(report.BlockShape(batch=2, seq_len=9, dim=32, heads=2, mlp_dim=48, depth=1,
                                                 matmul_dtype=torch.float32, residual_dtype=torch.float32))
    for phase, counter in (("forward", forward), ("backward", backward)):
        expected = {library: sum(c.launches for _, c in costs if c.phase == phase and c.library == library)
                    for library in ("triton", "torch")}
        assert counter.counts.triton_launches == expected["triton"], (phase, counter.counts.triton_by_kernel)
        assert counter.counts.aten_launches == expected["torch"], (phase, counter.counts.by_op)


def test_report_cost_part_end_to_end():
    finished = subprocess.run([sys.executable, "-m", "kernels.report", "--only", "cost"], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    printed = finished.stdout
    assert printed.startswith("Cost of one transformer block: B=128 N=65 C=384 heads=12x32 MLP=384 depth=7, "
                              "bf16 matmuls, fp32 residual stream; floor at 3.3 TB/s and 790 TFLOP/s")
    lines = printed.splitlines()
    forward, backward = attention_costs(batch=128, seq_len=65, num_heads=12, head_dim=32, dtype=torch.bfloat16)
    for cost in (forward, backward):
        row = next(line for line in lines if f" {cost.kernel} " in line).split()
        assert row == ["attention", cost.kernel, cost.phase, "ours", "1", f"{cost.bytes_read / 1e6:.2f}",
                       f"{cost.bytes_written / 1e6:.2f}", f"{cost.bytes_loaded / 1e6:.2f}",
                       f"{cost.useful_flops / 1e9:.3f}", f"{cost.executed_flops / 1e9:.3f}",
                       f"{cost.floor_seconds() * 1e6:.2f}"]
    # Every launch of the block is a row; the block's totals are their sums.
    costs = report.block_costs(report.BlockShape())
    table = lines[lines.index("") + 3:lines.index("", lines.index("") + 1)]  # below the header and its rule
    assert [line for line in table if not line.startswith("by:")] == \
        [line for line in table if line.split("  ")[0].strip() in {op.computes for op in report.BLOCK_OPS}]
    assert len(table) == len(costs) + 1
    block = report.Totals.of([cost for _, cost in costs], BANDWIDTH, PEAK)
    whole = next(line for line in lines if line.startswith("whole block") and " both " in line).split()
    assert whole[3:10] == [str(block.launches), f"{block.bytes / 1e6:.1f}", f"{block.useful_flops / 1e9:.3f}",
                           f"{block.executed_flops / 1e9:.3f}", f"{block.executed_per_useful:.2f}",
                           f"{block.floor_seconds * 1e6:.1f}", "floor"]
    assert f"Per training step (forward + backward of 7 blocks): {7 * block.launches} launches" in printed
    floor_met = "yes" if block.floor_seconds * 1e6 <= 50 else "no"
    ratio_met = "yes" if block.executed_per_useful <= 1.3 else "no"
    assert f"Targets met: block floor {floor_met}, executed/useful {ratio_met}, " in printed


def test_report_takes_the_shape_as_options(capsys):
    assert report.main(["--only", "cost", "--batch", "4", "--seq-len", "129", "--dim", "128", "--heads", "2",
                        "--mlp-dim", "256", "--depth", "3", "--matmul-dtype", "fp16", "--residual-dtype", "fp16",
                        "--bandwidth", "1", "--peak", "100"]) == 0
    printed = capsys.readouterr().out
    assert "B=4 N=129 C=128 heads=2x64 MLP=256 depth=3, fp16 matmuls, fp16 residual stream; floor at 1 TB/s" in printed
    # 129 tokens take the streaming attention: two backward launches; fp16 throughout: no casts.
    assert "_attention_backward_dq_kernel" in printed and "_attention_backward_dkdv_kernel" in printed
    assert "to fp16" not in printed and "_to_copy: w1" not in printed
    shape = report.BlockShape(batch=4, seq_len=129, dim=128, heads=2, mlp_dim=256, depth=3,
                              matmul_dtype=torch.float16, residual_dtype=torch.float16)
    block = report.Totals.of([cost for _, cost in report.block_costs(shape)], 1e12, 100e12)
    assert f"floor {block.floor_seconds * 3 * 1e3:.3f} ms." in printed
