"""One writer per model folder: a second writer is refused with one line naming the holder,
a lock left by a killed process is taken over, and two ingests started together never
lose a shard or mix configurations."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from selfrepair import Store
from selfrepair.cli import main
from selfrepair.errors import StoreBusy
from selfrepair.store.lock import WriterLock
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import TABLES
from selfrepair.store.verify import verify

HOLD = textwrap.dedent("""
    import sys, time
    from selfrepair.store.lock import WriterLock
    WriterLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(tiny_model_dirs, tiny_stores, tmp_path):
    tiny_stores.copy("gpt2", tmp_path, tokens=62, seq_len=32, batch_size=2, ablations=("zero",), heads="L1", top_p=0.05,
                     neurons_top_k=2)  # test_hostile's store
    folder = tmp_path / "tiny-gpt2"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    proc = _holder(folder)
    try:
        res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(tmp_path),
                                        "--tokens", "124", "--seq-len", "32", "--batch-size", "2", "--corpus",
                                        "embedded", "--ablations", "zero", "--heads", "L0", "--quiet"])
        assert res.exit_code == 1
        lines = [line for line in res.output.splitlines() if line.startswith("Error")]
        assert lines == [f"Error: {folder} is being written by pid {proc.pid} on {socket.gethostname()} since "
                         + lines[0].split(" since ")[1]], res.output
        assert "wait for that ingest to finish" in lines[0]
        # Nothing changed but the lock file, which belongs to the holder.
        after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".writer.lock"}
        assert after == {p: b for p, b in before.items() if p.name != ".writer.lock"}
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    with pytest.raises(StoreBusy, match=f"pid {proc.pid}"):
        WriterLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = WriterLock(tmp_path).acquire()
    assert lock.stale_holder["pid"] == proc.pid  # it left its record; the kernel dropped its lock
    assert f'"pid": {os.getpid()}' in (tmp_path / ".writer.lock").read_text()
    lock.release()
    assert (tmp_path / ".writer.lock").read_bytes() == b""


def _args(model, store, heads):
    return ["ingest", "--model", str(model), "--store", str(store), "--tokens", "62", "--seq-len", "32",
            "--batch-size", "2", "--corpus", "embedded", "--ablations", "resample,zero", "--heads", heads,
            "--top-p", "0.05", "--neurons-top-k", "2", "--quiet"]


@pytest.mark.slow  # two ingest processes at once (forked from the session's fork server, tests/cli_fork.py)
def test_two_ingests_at_once_never_lose_a_shard(tiny_model_dirs, forks, tmp_path):
    model = tiny_model_dirs["neox"]
    procs = {heads: forks.cli(_args(model, tmp_path, heads)) for heads in ("L0", "L1")}
    outcome = {heads: (p.wait(timeout=300), p.stderr) for heads, p in procs.items()}
    for heads, (code, err) in outcome.items():
        # Each either ran (alone, holding the lock) or was refused with one line, changing nothing.
        assert code == 0 or (code == 1 and err.strip().splitlines()[-1].startswith(
            f"Error: {tmp_path / 'tiny-neox'} is being written by pid ")), (heads, code, err)
    assert any(code == 0 for code, _ in outcome.values())
    store = Store.open(tmp_path)
    for heads, (code, _) in outcome.items():
        if code == 0:  # every unit of a run that exited 0 is there
            layer = int(heads[1])
            n = store.sql(f"SELECT count(*) FROM ablation_effects WHERE layer = {layer}").item()
            assert n == 2 * 4 * 62, (heads, n)
    # The refused one runs again afterwards (alone: in this process): the store is then the union, with unique keys.
    for heads, (code, _) in outcome.items():
        if code != 0:
            res = CliRunner().invoke(main, _args(model, tmp_path, heads))
            assert res.exit_code == 0, res.output
    store = Store.open(tmp_path)
    assert store.sql("SELECT count(*) FROM ablation_effects").item() == 2 * 8 * 62
    for name, spec in TABLES.items():
        key = ", ".join(spec.key)
        assert store.sql(f"SELECT count(*) FROM (SELECT {key} FROM {name} GROUP BY ALL HAVING count(*) > 1)").item() == 0
    assert ModelStore(tmp_path / "tiny-neox").manifest().config.heads_runs == ("L0", "L1")
    assert verify(tmp_path).ok


@pytest.mark.parametrize("kind", ["symlink to a file", "dangling symlink", "FIFO", "folder"])
def test_lock_never_follows_a_link_or_blocks(kind, tmp_path):
    # issue 18: O_NOFOLLOW, O_NONBLOCK and a regular-file check; nothing outside is truncated or created.
    from selfrepair.errors import StoreError

    folder, outside = tmp_path / "m", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    victim = outside / "victim.txt"
    lock = folder / ".writer.lock"
    if kind == "symlink to a file":
        victim.write_text("precious")
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(victim)
    elif kind == "FIFO":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises(StoreError) as err:
        WriterLock(folder).acquire()
    assert "\n" not in str(err.value) and ".writer.lock" in str(err.value)
    if kind == "symlink to a file":
        assert victim.read_text() == "precious"
    else:
        assert not victim.exists()
