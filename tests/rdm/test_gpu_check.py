"""The prepared GPU check (bench/gpu_check.py) runs end to end on the CPU with the tiny model, keeps going
when a mode fails, and says so in its exit status: a broken script would waste a lent GPU's only run."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_measures_every_mode_and_checks_eps(gpu_check, tmp_path, capsys):
    out = tmp_path / "rows.json"
    modes = "fp32 eager,bf16 + channels_last"
    assert gpu_check.main(["--smoke", "--modes", modes, "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["sampler"]) for r in rows] == [
        ("fp32 eager", "ddim"), ("fp32 eager", "dpmpp_2m"),
        ("bf16 + channels_last", "ddim"), ("bf16 + channels_last", "dpmpp_2m")]
    baseline, bf16 = rows[0], rows[2]
    # the baseline is the reference path at another batch size (2 of the reference's 4 rows): fp32 rounding may
    # differ (MKL sizes its threads to the machine's load), by ULPs, not by bf16's 1e-3..1e-2
    assert baseline["eps_error"] < 1e-5 and baseline["max_pixel_diff"] == 0 and baseline["speedup"] == 1
    assert 0 < bf16["eps_error"] < 0.05 and bf16["eps_ok"] and bf16["batch"] == 4 and baseline["batch"] == 2
    assert bf16["guided_eps_error"] > bf16["eps_error"]  # guidance scales up the rounding error
    out = capsys.readouterr().out
    assert "CLIP image embedding" in out and "out-of-memory split" in out and "needs CUDA" in out
    narrowing = next(line for line in out.splitlines() if line.startswith("callers leaving mid-batch"))
    assert "UNet batches [8, 4, 4] (guided)" in narrowing and "FAIL" not in narrowing  # 2 of 4 rows go on
    attention = [line for line in out.splitlines() if line.startswith("| all |")]
    assert len(attention) == 1 and len(attention[0].split("|")) == 12  # every kernel has a cell (CPU: some n/a)


def test_a_failing_mode_is_reported_and_the_rest_still_run(gpu_check, tmp_path, monkeypatch):
    real_prepare = gpu_check.Pipeline.__init__

    def init(self, model, *args, options=None, **kwargs):
        if options is not None and options.channels_last:
            raise RuntimeError("compiler exploded\nlong trace")
        real_prepare(self, model, *args, options=options, **kwargs)

    monkeypatch.setattr(gpu_check.Pipeline, "__init__", init)
    out = tmp_path / "rows.json"
    status = gpu_check.main(["--smoke", "--modes", "fp32 eager,bf16 + channels_last,bf16 autocast", "--repeats", "1",
                             "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert status == 1
    assert any(r["mode"] == "bf16 + channels_last" and r.get("skipped") == "failed: RuntimeError: compiler exploded"
               for r in rows)
    assert [r["sampler"] for r in rows if r["mode"] == "bf16 autocast"] == ["ddim", "dpmpp_2m"]


def test_modes_must_start_with_the_baseline(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.main(["--smoke", "--modes", "bf16 + channels_last"])


def test_the_fastest_attention_mode_resolves_to_the_kernel_the_table_found(gpu_check, tmp_path, monkeypatch):
    from rdm.acceleration import InferenceOptions

    flash = "bf16 + channels_last + compile + flash attention"
    monkeypatch.setitem(gpu_check.MODES, flash, InferenceOptions("bf16", attention="flash"))  # no compile: fast
    monkeypatch.setattr(gpu_check, "attention_bench", lambda *args: "flash")
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--smoke", "--modes", f"fp32 eager,{gpu_check.FASTEST}", "--repeats", "1",
                           "--json", str(out)]) == 0
    assert [r["mode"] for r in json.loads(out.read_text())["rows"]][2:] == [flash, flash]
    monkeypatch.setattr(gpu_check, "attention_bench", lambda *args: "auto")
    assert gpu_check.main(["--smoke", "--modes", f"fp32 eager,{gpu_check.FASTEST}", "--repeats", "1",
                           "--json", str(out)]) == 0
    assert "auto" in json.loads(out.read_text())["rows"][2]["skipped"]


def test_attention_table_cells_survive_unmeasurable_and_failed_kernels(gpu_check):
    """A kernel too fast for the timer (0 s) or one that failed (inf) must not end the table."""
    assert gpu_check.ms_cells({"auto": 0.00123, "cudnn": float("inf")}) == "1.23 | n/a"
    assert gpu_check.tflops(1e12, 0.5) == "2"
    assert gpu_check.tflops(1e12, 0.0) == gpu_check.tflops(1e12, float("inf")) == "n/a"


def test_the_eps_check_runs_a_shared_guidance_mode_as_it_samples(gpu_check, lively_tiny_model):
    """A shared-guidance mode's eps comes from the UNet call its sampler makes (x and the context once, split in
    the UNet), and equals the plain guided batch's."""
    import copy

    import torch

    from rdm.acceleration import InferenceOptions
    from rdm.conditioning import build_context
    from rdm.pipeline import Pipeline

    context = build_context(torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(1)),
                                                          dim=-1))
    plain = Pipeline(copy.deepcopy(lively_tiny_model))
    shared = Pipeline(copy.deepcopy(lively_tiny_model), options=InferenceOptions(shared_guidance=True))
    calls = []
    unet = shared.modules.unet
    shared.modules.unet = lambda x, t, context, **kwargs: calls.append((x.shape[0], kwargs)) or unet(x, t, context, **kwargs)
    for got, expected in zip(gpu_check.eps_pair(shared, context, 32), gpu_check.eps_pair(plain, context, 32), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert calls == [(2, {"null_first": True})]
    assert "bf16 + channels_last + compile + coordinate descent + shared guidance" in gpu_check.MODES


def test_a_mode_started_within_budget_keeps_its_rows_until_the_side_budget(gpu_check, tmp_path, monkeypatch, capsys):
    """A long compile (max-autotune: minutes) must not lose the rows it paid for: --budget-s stops new modes,
    --side-budget-s the rows and side checks. The compile is simulated by moving the script's clock 100 s."""
    import time as real_time
    from types import SimpleNamespace

    offset = [0.0]
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + offset[0]))
    real_eps_pair = gpu_check.eps_pair

    def slow_eps_pair(pipeline, *args):
        if not pipeline.modules.options.is_reference:
            offset[0] += 100.0
        return real_eps_pair(pipeline, *args)

    monkeypatch.setattr(gpu_check, "eps_pair", slow_eps_pair)
    out = tmp_path / "rows.json"
    modes = "fp32 eager,bf16 + channels_last,bf16 autocast"
    args = ["--smoke", "--no-attention-bench", "--modes", modes, "--repeats", "1", "--json", str(out), "--budget-s", "50"]
    assert gpu_check.main([*args, "--side-budget-s", "1000"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], "skipped" in r) for r in rows] == [
        ("fp32 eager", False), ("fp32 eager", False), ("bf16 + channels_last", False), ("bf16 + channels_last", False),
        ("bf16 autocast", True), ("bf16 autocast", True)]
    assert "CLIP image embedding (tiny" in capsys.readouterr().out

    assert gpu_check.main([*args, "--side-budget-s", "60"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r.get("skipped") for r in rows if r["mode"] == "bf16 + channels_last"] == ["past 60 s", "past 60 s"]
    printed = capsys.readouterr().out
    assert "CLIP image embedding: skipped (past 60 s)" in printed
    assert "callers leaving mid-batch: skipped (past 60 s)" in printed


def test_kernels_are_told_apart_by_kind(gpu_check):
    """Names as an H200's profile of the compiled bf16 UNet listed them (bench/results/gpu_check-h200-run5.log)."""
    kinds = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1":
            "convolution",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1": "attention",
        "fmha_cutlassF_bf16_aligned_32x128_gmem_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN": "matmul",
        "triton_red_fused__to_copy__unsafe_index_add_arange_clone_convolution_mul_native_group_norm_4":
            "norm / reduction (Triton)",
        "triton_poi_fused__to_copy__unsafe_index_add_arange_clone_convolution_mul_native_group_norm_9":
            "pointwise (Triton)",
        "Memcpy DtoH (Device -> Pageable)": "copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other",
    }
    assert {name: gpu_check.kernel_kind(name) for name in kinds} == kinds


def test_the_breakdown_says_it_needs_cuda_on_a_cpu(gpu_check, capsys):
    assert gpu_check.main(["--smoke", "--no-attention-bench", "--no-oom-check", "--modes", "fp32 eager,bf16 autocast",
                           "--repeats", "1", "--breakdown"]) == 0
    assert "kernel breakdown: needs CUDA" in capsys.readouterr().out


def test_a_dynamic_batch_mode_times_the_warm_up_of_each_smaller_size_once_within_the_budget(gpu_check):
    """After a dynamic-batch mode's rows, the sizes below its batch are warmed up one by one (a size that
    compiles again shows as a minute, not a second), each padded size once, until the side budget is spent."""

    class Fake:
        class modules:  # noqa: N801 -- stands in for PreparedModules
            batch_size = staticmethod(lambda n: max(n, 2))

        def __init__(self):
            self.calls = []

        def warm_up(self, sizes, **kwargs):
            self.calls.append(sizes)
            return {sizes[0]: 0.5 * sizes[0]}

    fake = Fake()
    assert gpu_check.other_sizes(fake, 32, 16, lambda: False) == "warm-up of batch sizes 2: 1.0 s; 4: 2.0 s; 8: 4.0 s"
    assert fake.calls == [[2], [4], [8]]
    budget = iter([False, True])
    line = gpu_check.other_sizes(Fake(), 32, 16, lambda: next(budget))
    assert line == "warm-up of batch sizes 2: 1.0 s; 4: skipped (past the budget)"
