"""The benchmarks run end to end on tiny shapes and report what they promise in their one JSON line."""
import json

from replknet_fn import bench


def last_json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dwconv_bench_reports_times_and_speedups_against_native(capsys):
    bench.main(["dwconv", "--shape", "5,8,4", "--batch_size", "2", "--repeat", "1"])
    result = last_json_line(capsys)
    (shape,) = result["results"]
    assert shape["shape"] == "K5@8x8x4"
    for impl in ("native", "direct", "auto"):
        assert shape["seconds"][impl]["forward"] > 0 and shape["seconds"][impl]["forward_backward"] > 0
    assert set(shape["speedup"]) == {"direct", "auto"}


def test_step_bench_reports_every_part_for_each_impl_and_the_1x1_variant(capsys):
    bench.main(["step", "--model", "replknet_tiny", "--image_size", "32", "--batch_size", "2", "--repeat", "1"])
    result = last_json_line(capsys)
    parts = {"train_step", "optimizer_and_clip", "eval_forward", "deploy_inference", "first_step"}
    assert parts <= set(result["seconds"]["auto"]) and parts <= set(result["seconds"]["native"])
    assert set(result["seconds"]["large_kernels_1"]) == {"train_step", "eval_forward"}
    assert set(result["speedup_vs_native"]["auto"]) == parts - {"first_step"}
    assert result["seconds"]["auto"]["first_step"] >= result["seconds"]["auto"]["train_step"] > 0
    assert result["compile_cache"] == {"auto": "off", "native": "off"}
