"""Data parallelism on the path a user takes: msrun, 2 ranks, the demo config's defaults (2 data workers per rank,
validation every epoch), EMA on, mid-epoch and epoch checkpoints under the keep policy.

The reference run goes through `python tests/test_dist_user_path.py job.json` (this file is the msrun worker
script), which trains with train_with_func.main after delaying rank 0's first checkpoint save by 45 s (longer than
MindSpore's default 30 s collective wait) and then validates the saved checkpoint with validate_with_func.main on
both ranks. A second run is the README's command itself (`msrun ... train_with_func.py ... --distribute True`),
killed with SIGKILL on rank 1 mid-epoch and relaunched with `--resume auto` and 4 data workers per rank. A third
runs the README's two-machine command: one msrun per network namespace, joined by a veth pair (needs root).
"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, free_port, launcher_env, tail

pytestmark = pytest.mark.slow

EPOCHS = 3
STEPS_PER_EPOCH = 4       # 8 classes x 4 train images over 2 ranks x batch 4
NUM_VAL_IMAGES = 23       # odd, so the two ranks' shards differ in size
SAVE_DELAY_SECONDS = 45   # MindSpore's own collective timeout is 30 s
KILL_AT = "epoch 2/3 step 2/4"  # mid-epoch, after the mid-epoch checkpoint of step 6 (ckpt_save_steps 2)


def train_args(data_dir, ckpt_dir):
    return ["--data_dir", str(data_dir), "--ckpt_save_dir", str(ckpt_dir), "--image_resize", "32",
            "--batch_size", "4", "--epoch_size", str(EPOCHS), "--warmup_epochs", "1", "--decay_epochs", "2",
            "--ema", "True", "--ema_decay", "0.9", "--ckpt_save_steps", "2", "--keep_checkpoint_max", "2",
            "--log_interval", "1", "--tensorboard", "False", "--distribute", "True"]


def msrun(log_dir, script_and_args):
    return [str(Path(sys.executable).parent / "msrun"), "--worker_num=2", "--local_worker_num=2",
            f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True", *script_and_args]


def run_job(command, cwd, log_dir, timeout=600):
    start = time.time()
    result = subprocess.run(command, cwd=cwd, env=launcher_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"msrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n"
                                    f"worker_0:\n{tail(Path(log_dir) / 'worker_0.log')}\n"
                                    f"worker_1:\n{tail(Path(log_dir) / 'worker_1.log')}")
    return time.time() - start


def checkpoint_arrays(path):
    from replknet_fn.checkpoint import read_checkpoint
    params, meta = read_checkpoint(path)
    return {name: param.asnumpy() for name, param in params.items()}, meta


def validation_lines(log_path):
    return [line for line in Path(log_path).read_text().splitlines() if " validation: " in line]


def summary(log_path):
    """The run's closing JSON line."""
    lines = [line for line in Path(log_path).read_text().splitlines() if line.startswith("[") and '"epochs"' in line]
    return json.loads(lines[-1].split("] ", 1)[1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from replknet_fn.demo_data import ensure_demo_dataset
    root = Path(ensure_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train_per_class=4,
                                    num_val_per_class=3, image_size=32))
    next(path for path in sorted((root / "val").rglob("*")) if path.is_file()).unlink()
    return root


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """Uninterrupted, rank 0's first save delayed; then validate_with_func on the saved checkpoint, 2 ranks."""
    out = tmp_path_factory.mktemp("reference")
    job = {"out": str(out), "train": train_args(data_dir, out / "ckpt"),
           "val": ["--data_dir", str(data_dir), "--ckpt_path", str(out / "ckpt" / "replknet_tiny-last.ckpt"),
                   "--image_resize", "32", "--batch_size", "4", "--distribute", "True"]}
    (out / "job.json").write_text(json.dumps(job))
    seconds = run_job(msrun(out / "logs", [str(Path(__file__).resolve()), str(out / "job.json")]), out,
                      out / "logs")
    print(f"reference run (with a {SAVE_DELAY_SECONDS} s save delay): {seconds:.0f} s")
    return out


def run_worker(job_path):
    """One rank of `reference_run` (run by msrun)."""
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    from replknet_fn import dist

    import train_with_func
    import validate_with_func
    save, delayed = train_with_func.save_train_state, []

    def slow_first_save(*args, **kwargs):
        if not delayed:
            delayed.append(time.time())
            time.sleep(SAVE_DELAY_SECONDS)
        return save(*args, **kwargs)

    train_with_func.save_train_state = slow_first_save  # only rank 0 saves
    state, metrics = train_with_func.main(job["train"])
    rank, world_size = dist.init_distributed(True, collective_timeout=600)
    np.savez(out / f"state_rank{rank}.npz", **{name: param.asnumpy() for name, param in state.parameters().items()})
    dist.barrier(world_size)  # rank 0 has written the checkpoint that everyone validates next
    result = {"in_loop": metrics, "saves_delayed": len(delayed),
              "validate": validate_with_func.main(job["val"]),
              "validate_ema": validate_with_func.main(job["val"] + ["--use_ema", "True"])}
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))


def worker_pid(msrun_pid, rank):
    """The pid of msrun's worker process of `rank` (not one of its forked data workers)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == msrun_pid and f"MS_NODE_ID={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def killed_and_resumed_run(data_dir, tmp_path_factory):
    """The README's msrun command, rank 1 SIGKILLed mid-epoch 2, then the same command with --resume auto."""
    out = tmp_path_factory.mktemp("killed")
    args = [str(ROOT / "train_with_func.py"), *train_args(data_dir, out / "ckpt")]
    with open(out / "first.out", "w") as output:
        launcher = subprocess.Popen(msrun(out / "logs1", args), cwd=out, env=launcher_env(), stdout=output,
                                    stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        log = out / "logs1" / "worker_0.log"
        while not (log.exists() and KILL_AT in log.read_text(errors="replace")):
            assert time.time() < deadline and launcher.poll() is None, \
                f"training did not reach {KILL_AT!r}:\n{tail(log)}\n{tail(out / 'first.out')}"
            time.sleep(0.2)
        pid = worker_pid(launcher.pid, 1)
        assert pid is not None, "rank 1's process not found"
        os.kill(pid, signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    killed_log = (out / "logs1" / "worker_0.log").read_text(errors="replace")
    assert f"epoch {EPOCHS} validation" not in killed_log, "the run finished before the kill"
    seconds = run_job(msrun(out / "logs2", args + ["--resume", "auto", "--num_parallel_workers", "4"]), out,
                      out / "logs2")
    print(f"resumed run: {seconds:.0f} s")
    return out


@contextlib.contextmanager
def two_machines():
    """Two network namespaces joined by a veth pair: [(namespace, address)] for "machine" 0 and 1."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("making network namespaces needs root and iproute2's `ip`")
    tag = f"rfn{os.getpid() % 100000}"
    machines = [(f"{tag}a", "10.213.0.1"), (f"{tag}b", "10.213.0.2")]
    links = [f"{tag}va", f"{tag}vb"]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for namespace, _ in machines:
            ip("netns", "add", namespace)
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for (namespace, address), link in zip(machines, links):
            ip("link", "set", link, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", link)
            ip("-n", namespace, "link", "set", link, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as error:
        for namespace, _ in machines:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {error.stderr.strip()}")
    try:
        yield machines
    finally:
        for namespace, _ in machines:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture(scope="module")
def two_machine_run(data_dir, tmp_path_factory):
    """The README's two-machine msrun command, one per namespace; rank r runs on machine r."""
    out = tmp_path_factory.mktemp("two_machines")
    args = [str(ROOT / "train_with_func.py"), *train_args(data_dir, out / "ckpt")]
    with two_machines() as machines:
        master = machines[0][1]
        launchers = []
        start = time.time()
        try:
            for node, (namespace, _) in enumerate(machines):
                command = ["ip", "netns", "exec", namespace, str(Path(sys.executable).parent / "msrun"),
                           "--worker_num=2", "--local_worker_num=1", f"--node_rank={node}", f"--master_addr={master}",
                           "--master_port=8118", f"--log_dir={out / f'logs{node}'}", "--join=True", *args]
                with open(out / f"machine{node}.out", "w") as output:
                    launchers.append(subprocess.Popen(command, cwd=out, env=launcher_env(), stdout=output,
                                                      stderr=subprocess.STDOUT))
            codes = [launcher.wait(timeout=600) for launcher in launchers]
        finally:
            for launcher in launchers:
                if launcher.poll() is None:
                    launcher.kill()
                    launcher.wait()
    logs = [out / f"logs{node}" / f"worker_{node}.log" for node in (0, 1)]
    assert codes == [0, 0], "\n".join(f"machine {node}:\n{tail(log)}\n{tail(out / f'machine{node}.out')}"
                                      for node, log in enumerate(logs))
    print(f"two-machine run: {time.time() - start:.0f} s")
    return out


def test_two_ranks_with_data_workers_validate_every_epoch_over_every_image(reference_run):
    lines = validation_lines(reference_run / "logs" / "worker_0.log")
    assert [int(re.match(r".*epoch (\d+) validation", line).group(1)) for line in lines] == list(range(1, EPOCHS + 1))
    for line in lines:
        assert f"num_samples {NUM_VAL_IMAGES}" in line and f"ema_num_samples {NUM_VAL_IMAGES}" in line


def test_a_save_slower_than_mindspores_collective_timeout_does_not_stop_the_run(reference_run):
    results = [json.loads((reference_run / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [result["saves_delayed"] for result in results] == [1, 0]
    assert summary(reference_run / "logs" / "worker_0.log")["epochs"] == EPOCHS


def test_every_rank_ends_holding_the_saved_state(reference_run):
    saved, _ = checkpoint_arrays(reference_run / "ckpt" / "replknet_tiny-last.ckpt")
    for rank in (0, 1):
        state = dict(np.load(reference_run / f"state_rank{rank}.npz"))
        assert set(state) == set(saved)
        for name, value in saved.items():
            np.testing.assert_array_equal(state[name], value, err_msg=f"rank {rank}: {name}")


def test_in_loop_validation_equals_validate_with_func_on_the_saved_checkpoint_bit_for_bit(reference_run):
    for rank in (0, 1):
        result = json.loads((reference_run / f"result_rank{rank}.json").read_text())
        in_loop = result["in_loop"]
        assert result["validate"] == {key: in_loop[key] for key in ("top1", "top5", "loss", "num_samples")}
        assert result["validate_ema"] == {key: in_loop["ema_" + key] for key in ("top1", "top5", "loss",
                                                                               "num_samples")}


def test_killed_mid_epoch_and_resumed_ends_bit_equal_to_the_uninterrupted_run(reference_run, killed_and_resumed_run):
    expected, expected_meta = checkpoint_arrays(reference_run / "ckpt" / "replknet_tiny-last.ckpt")
    actual, actual_meta = checkpoint_arrays(killed_and_resumed_run / "ckpt" / "replknet_tiny-last.ckpt")
    assert any(name.startswith("ema.") for name in expected) and any("moving_mean" in name for name in expected)
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
    assert actual_meta["host_state"] == expected_meta["host_state"]
    kept = sorted(path.name for path in (killed_and_resumed_run / "ckpt").glob("*.ckpt"))
    assert kept == sorted(path.name for path in (reference_run / "ckpt").glob("*.ckpt"))
    resumed_log = killed_and_resumed_run / "logs2" / "worker_0.log"
    assert "resumed from" in resumed_log.read_text()
    assert summary(resumed_log) == dict(summary(reference_run / "logs" / "worker_0.log"),
                                        seconds=summary(resumed_log)["seconds"])
    for line in validation_lines(resumed_log):
        assert f"num_samples {NUM_VAL_IMAGES}" in line


def test_the_two_machine_command_trains_the_same_weights_as_one_machine(reference_run, two_machine_run):
    expected, _ = checkpoint_arrays(reference_run / "ckpt" / "replknet_tiny-last.ckpt")
    actual, _ = checkpoint_arrays(two_machine_run / "ckpt" / "replknet_tiny-last.ckpt")
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
    log = two_machine_run / "logs0" / "worker_0.log"
    assert len(validation_lines(log)) == EPOCHS
    speeds = [float(match) for match in re.findall(r"([0-9.]+) img/s", log.read_text())]
    print(f"two machines: median {sorted(speeds)[len(speeds) // 2]:.1f} img/s over {len(speeds)} progress lines")


if __name__ == "__main__":
    run_worker(sys.argv[1])
