"""Preemption: SIGTERM to a training process makes the manager save at the next
step boundary and exit with the restartable code; a restarted run resumes there.
Then under torchrun with two gloo ranks, only one of which gets the signal: the
elastic agent restarts both, and they agree on the step to resume from."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from shardckpt.manager import OWNER_MARKER, CheckpointManager

TRAIN = textwrap.dedent("""
    import sys, time
    import torch
    from shardckpt.manager import CheckpointManager

    class Tiny:
        def __init__(self):
            self.w, self.step = torch.zeros(1000), 0
        def state_dict(self):
            return {"w": self.w, "step": self.step}
        def load_state_dict(self, sd):
            self.w, self.step = sd["w"], sd["step"]

    root, stop = sys.argv[1], int(sys.argv[2])
    state = Tiny()
    mgr = CheckpointManager(root, keep_last=2, save_interval_steps=5, async_save=True)
    mgr.install_signal_handlers()
    start = mgr.restore(state)
    print(f"start {start}", flush=True)
    for step in range((start or 0) + 1, stop + 1):
        state.w.fill_(step)
        print(f"step {step}", flush=True)
        time.sleep(0.02)
        if mgr.should_save(step):
            mgr.save(step, state, metrics={"loss": 1.0 / step})
    mgr.close()
""")


def test_sigterm_saves_at_next_boundary_and_exits_restartable(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    root = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), root, "100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(120, proc.kill)  # a hung child must fail the test, not block it
    watchdog.start()
    try:
        last = None
        for line in proc.stdout:
            if line.startswith("step"):
                last = int(line.split()[1])
                if last == 12:  # mid-interval, with the async save of step 10 done or in flight
                    proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    stderr = proc.stderr.read()
    assert rc == 128 + signal.SIGTERM == 143, stderr
    assert last is not None and last >= 12
    with CheckpointManager(root) as mgr:
        infos = mgr.list()
    assert [c.status for c in infos] == ["valid"] * len(infos)
    assert infos[-1].step == last, "the preemption save is the last step the loop reached"
    assert not os.path.exists(os.path.join(root, OWNER_MARKER))

    # The restarted run resumes from that step and finishes.
    out = subprocess.run([sys.executable, str(script), root, str(last + 3)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"start {last}"
    assert out.stdout.splitlines()[1] == f"step {last + 1}"


TORCHRUN_WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch, torch.distributed as dist
    from shardckpt import run_and_exit
    from shardckpt.manager import CheckpointManager, step_dirname

    class Tiny:
        def __init__(self):
            self.w, self.step = torch.zeros(100), 0
        def state_dict(self):
            return {"w": self.w, "step": self.step}
        def load_state_dict(self, sd):
            self.w, self.step = sd["w"], sd["step"]

    def main():
        # A per-attempt prefix: torchrun hands every attempt the same agent store, and a
        # plain init_process_group("gloo") after a restart may read the dead attempt's
        # gloo addresses from it (connection refused or a hang, about half the time here).
        attempt, root = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), sys.argv[1]
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt_{attempt}", store),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        rank = dist.get_rank()
        if attempt == 1 and rank == 0:
            # damage the preemption checkpoint: every rank must fall back to the same step
            data = os.path.join(root, step_dirname(7), "data")
            shard = max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)
            with open(shard, "r+b") as f:
                b = f.read(1); f.seek(0); f.write(bytes([b[0] ^ 1]))
        state = Tiny()
        mgr = CheckpointManager(root, keep_last=2, save_interval_steps=5, async_save=True)
        mgr.install_signal_handlers()
        start = mgr.restore(state)
        assert start is None or torch.equal(state.w, torch.full((100,), float(start)))
        print(f"rank {rank} attempt {attempt} start {start}", flush=True)
        for step in range(0 if start is None else start + 1, 12):
            state.w.fill_(step)
            if attempt == 0 and rank == 1 and step == 7:
                os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is told
            if mgr.should_save(step):
                mgr.save(step, state)
        mgr.close()
        print(f"rank {rank} finished", flush=True)
        dist.destroy_process_group()

    run_and_exit(main)
""")


def test_torchrun_restarts_after_one_ranks_sigterm_and_ranks_agree_on_fallback(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    root = str(tmp_path / "run")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "--max-restarts=1", "--monitor-interval=0.1", str(script), root],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "exitcode: 143" in log  # the agent saw the preemption exit as a failure ...
    for rank in (0, 1):  # ... and restarted both ranks, which resumed from the same step
        assert f"rank {rank} attempt 0 start None" in log
        assert f"rank {rank} attempt 1 start 5" in log, log
        assert f"rank {rank} finished" in log
    with CheckpointManager(root) as mgr:
        assert [(c.step, c.status) for c in mgr.list()] == [(5, "valid"), (10, "valid")]


@pytest.mark.parametrize(
    "body,code,stdout,stderr",
    [
        ("return 0", 0, "done", ""),
        ("return None", 0, "done", ""),
        ("raise SystemExit(143)", 143, "done", ""),
        ("raise ValueError('boom')", 1, "done", "ValueError: boom"),
    ],
)
def test_run_and_exit_keeps_the_exit_code_and_runs_atexit(tmp_path, body, code, stdout, stderr):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, sys
        from shardckpt import run_and_exit
        atexit.register(lambda: print("done", flush=True))
        def main():
            try:
                {body}
            finally:
                print("finally ran", end=" ")
        run_and_exit(main)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == code, out.stderr
    assert out.stdout.startswith("finally ran") and stdout in out.stdout
    assert stderr in out.stderr
