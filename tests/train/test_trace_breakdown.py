"""bench/trace_breakdown.py on a hand-made Chrome trace: kernel kinds, idle time and where it falls."""
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "trace_breakdown.py"
SPEC = importlib.util.spec_from_file_location("trace_breakdown", SCRIPT)
trace_breakdown = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(trace_breakdown)


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_qqtst_256x128_128x4_1x2_h_bz_coopA_TNT", "gemm fp8"),
    ("nvjet_sm90_qqsss_256x128_128x4_1x2_h_bz_coopA_TNT", "gemm fp8"),        # FP8 inputs, float32 output
    ("nvjet_sm90_qqsss_128x128_128x6_2x1_v_bz_ovscale_TNT", "gemm fp8"),      # rowwise scales
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", "gemm bf16"),
    ("triton_poi_fused__scaled_mm__to_copy_abs_add_clamp_4", "inductor, quantizing"),
    ("triton_poi_fused__unsafe_view_mul_silu_7", "inductor, other"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise / copy"),
    ("_quantize_pair_kernel", "triton, lowbit"),
])
def test_kernel_kinds(name, kind):
    assert trace_breakdown.kind_of(name) == kind


def test_idle_time_and_kinds_of_a_small_trace(tmp_path):
    # kernels (name, start us, duration us) over 1000 us: busy 0-100, 100-400 (overlapping 150-200), 900-1000
    kernels = [("nvjet_sm90_qqtst_a", 0, 100), ("triton_red_fused_abs_amax_1", 100, 300),
               ("cudnn_sdpa_flash_fprop", 150, 50), ("multi_tensor_apply_kernel<adam>", 900, 100)]
    events = [{"cat": "kernel", "name": n, "ts": t, "dur": d} for n, t, d in kernels]
    events.append({"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000})        # not a kernel: left out
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    loaded = trace_breakdown.load(path)
    assert [k["name"] for k in loaded] == [n for n, _, _ in kernels]
    text = trace_breakdown.breakdown(loaded, top=3)
    assert "4 kernels over 1.0 ms" in text
    assert "| inductor, quantizing | 0.3 | 54.5% |" in text           # 300 of 550 us of kernel time
    assert "GPU idle 0.5 ms of 1.0 (50.0%) in 1 gaps" in text         # 400-900 us, no kernel
    assert "by tenth of the step (ms): 0.0 0.0 0.0 0.0 0.5 0.0" in text  # the gap starts in the fifth tenth
    assert "| 500 | 0.4 | `triton_red_fused_abs_amax_1` | `multi_tensor_apply_kernel<adam>` |" in text
