"""Multi-host on one machine: two processes on 127.0.0.1 (2 CPU devices each, JAX's gloo CPU collectives)
form one engine with tensor parallelism over the 4 global devices. Process 0 generates; process 1 follows."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live_server import free_port
from tests.tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[1]
ENGINE = dict(tensor_parallel_size=4, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=64, skip_tokenizer_init=True)
PROMPTS = [[5, 17, 33, 2, 9], list(range(40, 75)), [150, 3], [7] * 12]

# One process of the job: argv = model, coordinator, process id, compilation cache, max_tokens, ignore_eos.
WORKER = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from jaxllm import LLM, SamplingParams
model, coordinator, pid, cache, max_tokens, ignore_eos = sys.argv[1:]
engine = json.loads({engine!r})
llm = LLM(model=model, distributed_coordinator=coordinator, num_processes=2, process_id=int(pid),
          distributed_heartbeat_timeout=10, compilation_cache_dir=cache, **engine)
print("READY", flush=True)
params = [SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=ignore_eos == "1"),
          SamplingParams(temperature=0.0, max_tokens=int(max_tokens), repetition_penalty=1.3,
                         ignore_eos=ignore_eos == "1")]
outputs = llm.generate({prompts!r}, [params[i % 2] for i in range({count})], use_tqdm=False)
print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outputs]), flush=True)
""".format(engine=json.dumps(ENGINE), prompts=PROMPTS, count=len(PROMPTS))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", path, num_key_value_heads=4)
    return path


def _start(model: Path, coordinator: str, pid: int, work: Path, max_tokens: int, ignore_eos: bool
           ) -> subprocess.Popen:
    """One process; its stderr (logs, progress bars) goes to `work/process{pid}.err`, so no pipe fills up."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(ROOT)}
    with open(work / f"process{pid}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-c", WORKER, str(model), coordinator, str(pid),
                                 str(work / "xla"), str(max_tokens), "1" if ignore_eos else "0"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)


def _job(model: Path, work: Path, max_tokens: int, ignore_eos: bool = False) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{free_port()}"
    return [_start(model, coordinator, pid, work, max_tokens, ignore_eos) for pid in (0, 1)]


def _stderr(work: Path, pid: int) -> str:
    return (work / f"process{pid}.err").read_text()[-3000:]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit status, stdout) of each process; any still running after `timeout` is killed."""
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_two_processes_generate_what_one_process_does(tiny_model, tmp_path):
    from jaxllm import LLM, SamplingParams

    (leader_rc, out), (follower_rc, _) = _finish(_job(tiny_model, tmp_path, 8), timeout=240)
    assert leader_rc == 0, _stderr(tmp_path, 0)
    assert follower_rc == 0, _stderr(tmp_path, 1)
    tokens = json.loads(next(line for line in out.splitlines() if line.startswith("TOKENS "))[len("TOKENS "):])

    llm = LLM(model=str(tiny_model), compilation_cache_dir=str(tmp_path / "single"), **ENGINE)
    params = [SamplingParams(temperature=0.0, max_tokens=8),
              SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3)]
    single = llm.generate(PROMPTS, [params[i % 2] for i in range(len(PROMPTS))], use_tqdm=False)
    assert tokens == [o.outputs[0].token_ids for o in single]
    assert all(len(t) == 8 for t in tokens)


def test_leader_exits_with_a_clear_error_when_a_follower_dies(tiny_model, tmp_path):
    leader, follower = _job(tiny_model, tmp_path, 80, ignore_eos=True)
    try:
        assert "READY\n" in iter(leader.stdout.readline, ""), _stderr(tmp_path, 0)
        time.sleep(0.5)  # the leader is generating now
        follower.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        out, _ = leader.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        _finish([leader, follower], timeout=5)
    err = _stderr(tmp_path, 0)
    assert "TOKENS" not in out, "the leader finished before the follower was killed"
    # Either the leader's step sees the lost peer (gloo fails the collective: our message, status 70), or
    # the collective waits and JAX's heartbeat (10 s here) ends the leader with its own message (SIGABRT).
    # Which one depends on where the leader was when the follower died; both are a clear, bounded exit.
    ours = leader.returncode == 70 and "process 0: step" in err and "process 1 is likely gone" in err
    jaxs = (leader.returncode == -signal.SIGABRT
            and "Terminating process because the JAX distributed service detected fatal errors" in err)
    assert ours or jaxs, (leader.returncode, err[-3000:])
    assert elapsed < 30
