"""Data parallelism across processes, on 2 CPU workers over loopback.

One msrun job (module fixture) trains k steps on 2 ranks x batch B and then validates an odd-sized val set
sharded over both ranks; the tests compare it with one process on the same data. A second job kills a rank and
times the survivor. This file is also the msrun worker script: `python tests/test_dist.py job.json`.
"""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, free_port, launcher_env, tail

pytestmark = pytest.mark.slow

STEPS = 3                 # k: crosses an epoch boundary (2 steps per epoch), so the second epoch's order is used
BATCH_PER_RANK = 4        # B; the single process takes 2B
FAILURE_BOUND_SECONDS = 60  # measured ~31 s: MindSpore SIGTERMs the other ranks ~30 s after one stops answering

# One conv implementation for both sides: `auto` decides per input shape (the ranks' batch B and the single
# process's 2B are different shapes, measured apart), so the sides could run different implementations and compare
# two roundings (measured: 1.34e-5 with auto after its verdicts were re-measured, < 1e-5 with direct or native
# pinned). The user's path, auto and data workers included, is tests/test_dist_user_path.py.
EXACT_DATA = ["--model", "replknet_tiny", "--image_resize", "32", "--num_parallel_workers", "0",
              "--tensorboard", "False", "--auto_augment", "", "--color_jitter", "0", "--re_prob", "0",
              "--mixup", "0", "--cutmix", "0", "--label_smoothing", "0", "--drop_path_rate", "0", "--hflip", "0",
              "--scale", "1,1", "--ratio", "1,1", "--seed", "7", "--large_kernel_impl", "direct"]


def train_args(data_dir, ckpt_dir, batch_size):
    return ["--data_dir", str(data_dir), "--ckpt_save_dir", str(ckpt_dir), "--batch_size", str(batch_size),
            "--epoch_size", "2", "--warmup_epochs", "0", "--decay_epochs", "2", "--lr", "1e-3",
            "--max_steps", str(STEPS), "--val_while_train", "False", "--log_interval", "1", *EXACT_DATA]


def val_args(data_dir, ckpt_path):
    return ["--data_dir", str(data_dir), "--ckpt_path", str(ckpt_path), "--image_resize", "32",
            "--batch_size", str(BATCH_PER_RANK), "--num_parallel_workers", "0"]


def with_frozen_batch_norm(create_model):
    """BN normalizing with its running statistics, also in training. With batch statistics, rank r's BN sees
    only its B images while one process sees all 2B, so the two computations differ by design (BN statistics
    are per rank, as in the reference). Frozen, every image's loss depends on that image alone, the mean of the
    two ranks' mean gradients is exactly the 2B batch's mean gradient, and equal weights are the expected
    result rather than a near miss."""
    from mindspore import nn

    def create(*args, **kwargs):
        net = create_model(*args, **kwargs)
        for _, cell in net.cells_and_names():
            if isinstance(cell, nn.BatchNorm2d):
                cell.use_batch_statistics = False
        return net

    return create


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """8 classes x 2 train images (2 steps per epoch at 2B = 8); 8 x 3 - 1 = 23 val images: 12 and 11 per rank."""
    from replknet_fn.demo_data import ensure_demo_dataset
    root = Path(ensure_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train_per_class=2,
                                    num_val_per_class=3, image_size=32))
    next(path for path in sorted((root / "val").rglob("*")) if path.is_file()).unlink()
    return root


@pytest.fixture(scope="module")
def two_rank_job(data_dir, tmp_path_factory):
    """msrun, 2 workers: k train steps at batch B each, then validation of rank 0's checkpoint over both."""
    out = tmp_path_factory.mktemp("msrun")
    job = {"out": str(out), "train": train_args(data_dir, out / "ckpt", BATCH_PER_RANK),
           "val": val_args(data_dir, out / "ckpt" / "replknet_tiny-last.ckpt")}
    (out / "job.json").write_text(json.dumps(job))
    command = [str(Path(sys.executable).parent / "msrun"), "--worker_num=2", "--local_worker_num=2",
               f"--master_port={free_port()}", f"--log_dir={out / 'logs'}", "--join=True",
               str(Path(__file__).resolve()), str(out / "job.json")]
    start = time.time()
    result = subprocess.run(command, cwd=out, env=launcher_env(), capture_output=True, text=True, timeout=300)
    seconds = time.time() - start
    assert result.returncode == 0, (f"msrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n"
                                    f"worker_0:\n{tail(out / 'logs' / 'worker_0.log')}\n"
                                    f"worker_1:\n{tail(out / 'logs' / 'worker_1.log')}")
    print(f"msrun job: {seconds:.0f} s")
    return out


def run_worker(job_path):
    """One rank of `two_rank_job` (run by msrun)."""
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    from replknet_fn import dist

    import train_with_func
    import validate_with_func
    ranks = dist.init_distributed(True, collective_timeout=600)
    rank, world_size = ranks
    result = {"broadcast": broadcast_probe(ranks), "disagreement": disagreement_probe(ranks),
              "gradient_mean": gradient_mean_probe(rank, world_size)}
    train_with_func.create_model = with_frozen_batch_norm(train_with_func.create_model)
    state, _ = train_with_func.main(job["train"] + ["--distribute", "True"])
    np.savez(out / f"weights_rank{rank}.npz", **{name: param.asnumpy() for name, param in
                                                   state.net.parameters_and_names()})
    dist.barrier(world_size)  # rank 0 has written the checkpoint that everyone validates next
    result["val"] = validate_with_func.main(job["val"] + ["--distribute", "True"])
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))


def broadcast_probe(ranks):
    """Whether every rank holds rank 0's float and integer values after broadcast_parameters, bit for bit."""
    rank = ranks.rank
    import mindspore as ms
    from mindspore import Parameter

    from replknet_fn import dist
    floats = np.random.default_rng(rank).standard_normal(5).astype(np.float32)
    ints = np.array([-2 ** 31, 2 ** 31 - 1, 123456789 + rank], np.int32)
    params = [Parameter(ms.Tensor(floats), name="probe.floats"), Parameter(ms.Tensor(ints), name="probe.ints")]
    dist.broadcast_parameters(params, ranks)
    expected_floats = np.random.default_rng(0).standard_normal(5).astype(np.float32)
    return (np.array_equal(params[0].asnumpy(), expected_floats)
            and np.array_equal(params[1].asnumpy(), [-2 ** 31, 2 ** 31 - 1, 123456789]))


def gradient_mean_probe(rank, world_size):
    """Whether the jitted per-tensor and bucketed (3 buckets here) gradient means both equal the exact mean."""
    import mindspore as ms
    from mindspore import Parameter

    from replknet_fn import dist
    shapes = [(3, 4), (5,), (2, 2, 2), (7,), (1,)]
    params = [Parameter(ms.Tensor(np.zeros(shape, np.float32)), name=f"probe.p{i}") for i, shape in enumerate(shapes)]
    grads = [np.random.default_rng([r, i]).standard_normal(shape).astype(np.float32) for r in range(world_size)
             for i, shape in enumerate(shapes)]
    mine = tuple(ms.Tensor(grad) for grad in grads[rank * len(shapes):(rank + 1) * len(shapes)])
    expected = [(grads[i] + grads[len(shapes) + i]) * np.float32(0.5) for i in range(len(shapes))]
    means = [ms.jit(dist.make_gradient_mean(world_size))(mine),
             ms.jit(dist.make_gradient_mean(world_size, params, bucket_bytes=64))(mine)]
    return [all(np.array_equal(m.asnumpy(), e) for m, e in zip(mean, expected)) for mean in means]


def disagreement_probe(ranks):
    """The error each rank raises when the ranks resumed at different steps (rank 1 one step ahead)."""
    from replknet_fn import dist
    try:
        dist.check_same_on_all_ranks({"epoch": 1, "step": 10 + ranks.rank}, ranks)
    except dist.DistributedError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def one_process_weights(data_dir, tmp_path_factory):
    """k steps of one process at batch 2B on the same images, BN frozen the same way; and the initial weights."""
    import mindspore as ms

    from replknet_fn.config import parse_config

    import train_with_func
    args = train_args(data_dir, tmp_path_factory.mktemp("one_process"), 2 * BATCH_PER_RANK)
    original = train_with_func.create_model
    train_with_func.create_model = with_frozen_batch_norm(original)
    try:
        state, _ = train_with_func.main(args)
        final = {name: param.asnumpy().copy() for name, param in state.net.parameters_and_names()}
        config = parse_config(args, default_config=train_with_func.DEMO_CONFIG)
        ms.set_seed(config.seed)  # as main() does before building the state
        initial = {name: param.asnumpy().copy() for name, param in
                   train_with_func.build_train_state(config, 8).net.parameters_and_names()}
    finally:
        train_with_func.create_model = original
    return final, initial


def test_k_steps_on_2_ranks_of_batch_B_equal_k_steps_of_one_process_on_the_same_2B_images(
        two_rank_job, one_process_weights):
    """Rank r takes positions r, r + 2, ... of each epoch's order, so one global step's 2B images are the one
    process's batch of 2B; the gradient mean over ranks then equals that batch's mean gradient."""
    expected, initial = one_process_weights
    ranks = [dict(np.load(two_rank_job / f"weights_rank{rank}.npz")) for rank in (0, 1)]
    assert set(ranks[0]) == set(expected)
    moved = [name for name in expected if not np.allclose(expected[name], initial[name], rtol=0, atol=1e-4)]
    assert len(moved) > len(expected) // 2, "training hardly changed the weights: the comparison would be empty"
    for name, value in expected.items():
        scale = max(float(np.abs(value).max()), 1e-6)
        for rank, weights in enumerate(ranks):
            error = float(np.abs(weights[name] - value).max()) / scale
            assert error <= 1e-5, f"{name} on rank {rank}: relative difference {error:.2e}"
        np.testing.assert_array_equal(ranks[1][name], ranks[0][name], err_msg=f"ranks differ in {name}")


def test_distributed_validation_of_an_odd_val_set_counts_every_image_once(two_rank_job, data_dir):
    import validate_with_func
    expected = validate_with_func.main(val_args(data_dir, two_rank_job / "ckpt" / "replknet_tiny-last.ckpt"))
    assert expected["num_samples"] == 23
    for rank in (0, 1):
        actual = json.loads((two_rank_job / f"result_rank{rank}.json").read_text())["val"]
        assert actual["num_samples"] == expected["num_samples"]
        assert actual["top1"] == expected["top1"] and actual["top5"] == expected["top5"]
        assert actual["loss"] == pytest.approx(expected["loss"], abs=1e-6)


def test_broadcast_gives_every_rank_rank_0s_values_bit_for_bit(two_rank_job):
    for rank in (0, 1):
        assert json.loads((two_rank_job / f"result_rank{rank}.json").read_text())["broadcast"] is True


def test_gradient_mean_per_tensor_and_in_buckets_is_the_exact_mean(two_rank_job):
    for rank in (0, 1):
        assert json.loads((two_rank_job / f"result_rank{rank}.json").read_text())["gradient_mean"] == [True, True]


def test_ranks_that_resumed_at_different_steps_all_stop_naming_the_field(two_rank_job):
    for rank in (0, 1):
        message = json.loads((two_rank_job / f"result_rank{rank}.json").read_text())["disagreement"]
        assert message is not None and "disagree on step" in message and "rank 0: step=10" in message


def test_when_a_rank_is_killed_the_other_exits_non_zero_within_the_bound(data_dir, tmp_path):
    """Ranks started as mpirun starts them (OMPI_COMM_WORLD_* and friends; mpirun itself is not needed), which
    also covers dist's mapping of mpirun onto MindSpore's cluster. Not a single-node msrun: it SIGKILLs the
    survivors itself within ~1 s, which would test msrun rather than what a rank on another machine sees."""
    port = free_port()
    args = train_args(data_dir, tmp_path / "ckpt", BATCH_PER_RANK)
    args[args.index("--epoch_size") + 1] = "100"
    args[args.index("--max_steps") + 1] = "0"
    ranks = []
    try:
        for rank in (0, 1):
            env = dict(launcher_env(), OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2",
                       OMPI_COMM_WORLD_LOCAL_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_SIZE="2", OMPI_COMMAND="python",
                       PMIX_RANK=str(rank), MS_SCHED_PORT=str(port))
            with open(tmp_path / f"rank{rank}.out", "w") as stdout, open(tmp_path / f"rank{rank}.err", "w") as stderr:
                ranks.append(subprocess.Popen([sys.executable, str(ROOT / "train_with_func.py"), *args,
                                               "--distribute", "True"], cwd=tmp_path, env=env, stdout=stdout,
                                              stderr=stderr))
        deadline = time.time() + 240
        while "step 1/" not in (tmp_path / "rank0.out").read_text():
            assert time.time() < deadline and ranks[0].poll() is None and ranks[1].poll() is None, \
                f"training did not start:\n{tail(tmp_path / 'rank0.err')}\n{tail(tmp_path / 'rank1.err')}"
            time.sleep(0.5)
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.time()
        try:
            returncode = ranks[0].wait(timeout=FAILURE_BOUND_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {FAILURE_BOUND_SECONDS} s after rank 1 died")
        print(f"rank 0 exited with {returncode} {time.time() - killed:.1f} s after rank 1 was killed")
        assert returncode != 0
        assert re.search(r"error: rank 0\b", (tmp_path / "rank0.err").read_text()), tail(tmp_path / "rank0.err")
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()


if __name__ == "__main__":
    run_worker(sys.argv[1])
