"""The benchmarks run end to end on tiny shapes and report what they promise in their one JSON line."""
import json
import resource
import time

import numpy as np

from replknet_fn import allocator, bench, kernels


def last_json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def assert_describes_the_machine(result):
    assert result["machine"]["cpu"] == kernels.cpu_model() and result["machine"]["isa"] == kernels.isa_level()
    assert result["machine"]["isa_levels"] == list(kernels.supported_isa_levels())
    assert result["machine"]["malloc"] == allocator.current()
    assert result["matmul_gflops"] > 0


def test_fast_functions_are_timed_back_to_back_and_reported_per_call():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1
        return np.zeros(1)

    def slow():
        calls["slow"] += 1
        time.sleep(bench.SAMPLE_SECONDS)
        return np.zeros(1)

    medians = bench.interleaved_medians({"fast": fast, "slow": slow}, repeat=3)
    assert calls["slow"] == 1 + 3  # the warm-up, then one call a sample
    assert calls["fast"] > 3 * 100  # a sample of ~SAMPLE_SECONDS of calls of a few microseconds each
    assert medians["slow"] >= bench.SAMPLE_SECONDS and medians["fast"] < bench.SAMPLE_SECONDS / 100


def test_dwconv_bench_reports_times_rates_and_speedups_for_each_build(capsys):
    bench.main(["dwconv", "--shape", "5,8,4", "--batch_size", "2", "--repeat", "1"])
    result = last_json_line(capsys)
    assert_describes_the_machine(result)
    assert result["isa"] == list(kernels.supported_isa_levels())
    (shape,) = result["results"]
    assert shape["shape"] == "K5@8x8x4"
    fast = [f"{impl}/{isa}" for isa in result["isa"] for impl in ("direct", "auto", "kernel")]
    assert set(shape["seconds"]) == {"native", *fast} and set(shape["speedup"]) == set(fast)
    # 8 output positions per axis meet 3, 4, 5, 5, 5, 5, 4, 3 taps of 5: 34; 2 x 4 planes; 2 flops each.
    assert shape["gflop"] == {"forward": 2 * 2 * 4 * 34 ** 2 / 1e9, "forward_backward": 3 * 2 * 2 * 4 * 34 ** 2 / 1e9}
    for variant, seconds in shape["seconds"].items():
        for mode in ("forward", "forward_backward"):
            assert seconds[mode] > 0
            assert shape["gflops"][variant][mode] == shape["gflop"][mode] / seconds[mode]
            fraction = shape["gflops"][variant][mode] / shape["matmul_gflops"]
            assert shape["fraction_of_matmul"][variant][mode] == fraction


def test_dwconv_bench_times_the_builds_asked_for(capsys):
    bench.main(["dwconv", "--shape", "3,4,2", "--batch_size", "1", "--repeat", "1", "--isa", "portable",
                "--impls", "direct"])
    (shape,) = last_json_line(capsys)["results"]
    assert set(shape["seconds"]) == {"native", "direct/portable"}


def test_step_bench_reports_every_part_for_each_impl_and_the_1x1_variant(capsys):
    bench.main(["step", "--model", "replknet_tiny", "--image_size", "32", "--batch_size", "2", "--repeat", "1"])
    result = last_json_line(capsys)
    assert_describes_the_machine(result)
    parts = {"train_step", "optimizer_and_clip", "eval_forward", "deploy_inference", "first_step"}
    assert parts <= set(result["seconds"]["auto"]) and parts <= set(result["seconds"]["native"])
    assert set(result["seconds"]["large_kernels_1"]) == {"train_step", "eval_forward"}
    assert set(result["speedup_vs_native"]["auto"]) == parts - {"first_step"}
    assert result["seconds"]["auto"]["first_step"] >= result["seconds"]["auto"]["train_step"] > 0
    assert result["compile_cache"] == {"auto": "off", "native": "off"}
    # Training's peak, taken before the native, eval and deploy networks were built: below the process's final peak.
    final_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 100e6 < result["training_max_rss_bytes"] <= final_peak
