"""The suite's own machinery (tests/conftest.py): the model cache hands out independent copies,
a changed model folder is loaded again, shared stores are copies, loads are counted, the fork
server's children behave like subprocesses, and the run order keeps what it shares together."""

import os

import torch

from model_cache import LOAD_LOG, load_counts
from selfrepair.ingest import models


def test_the_model_cache_hands_out_independent_copies(model_cache, tiny_model_dirs):
    folder = str(tiny_model_dirs["gpt2"])
    assert models.load_model is model_cache  # what the runner calls
    a = models.load_model(folder, "cpu")
    b = models.load_model(folder, "cpu")
    assert a is not b and a.hf_model is not b.hf_model and a.bridge is not b.bridge
    pa, pb = next(a.hf_model.parameters()), next(b.hf_model.parameters())
    assert torch.equal(pa, pb) and pa.data_ptr() != pb.data_ptr()
    with torch.no_grad():
        pa.add_(1.0)  # an engine or a test that changes its model changes only its copy
    a.hf_model.register_forward_hook(lambda *args: None)
    c = models.load_model(folder, "cpu")
    assert torch.equal(next(c.hf_model.parameters()), pb)
    assert not c.hf_model._forward_hooks
    # The copy is a working model: the bridge and the Hugging Face model agree on the logits.
    rows = torch.tensor([[256, 1, 2, 3, 4]])
    with torch.no_grad():
        hf = c.hf_model(rows).logits
        tl = c.bridge(rows)
    hf, tl = hf - hf.mean(-1, keepdim=True), tl - tl.mean(-1, keepdim=True)  # the bridge centres the unembedding
    assert torch.allclose(hf, tl, atol=1e-3)


def test_a_changed_model_folder_is_loaded_again(model_cache, tmp_path):
    import tiny_models

    folder = tiny_models.save("gpt2", tmp_path / "tiny-gpt2")
    first = models.load_model(str(folder), "cpu")
    tiny_models.save("gpt2", folder, n_layers=3)  # the same folder, other weights
    again = models.load_model(str(folder), "cpu")
    assert first.hf_model.config.n_layer == 2 and again.hf_model.config.n_layer == 3


def test_a_patched_loader_bypasses_the_cache(model_cache, tiny_model_dirs, monkeypatch):
    import pytest
    import transformers

    from selfrepair.errors import ModelNotFound

    folder = str(tiny_model_dirs["gpt2"])
    models.load_model(folder, "cpu")  # cached now

    def broken(*args, **kwargs):
        raise RuntimeError("size mismatch")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ModelNotFound, match="size mismatch"):
        models.load_model(folder, "cpu")


def test_shared_stores_are_copies(tiny_stores, tmp_path):
    settings = dict(tokens=62, ablations=("zero",), heads="L1")
    a = tiny_stores.copy("gpt2", tmp_path / "a", **settings)
    b = tiny_stores.copy("gpt2", tmp_path / "b", **settings)
    (a / "tiny-gpt2" / "manifest.json").write_text("{}")  # damage one copy
    assert (b / "tiny-gpt2" / "manifest.json").read_text() != "{}"
    assert (tiny_stores.copy("gpt2", tmp_path / "c", **settings) / "tiny-gpt2" / "manifest.json").read_text() != "{}"


def test_loads_are_counted_in_process_and_in_subprocesses(tmp_path):
    log = tmp_path / "loads.log"
    log.write_text("1\tpytest\t\n1\t/m/tiny-gpt2\n2\t/m/tiny-gpt2\n1\tcached\t/m/tiny-gpt2\n3\tsmollm2-135m\n")
    n = load_counts(str(log))
    assert (n["loads"], n["in_process"], n["subprocess"], n["cached"]) == (3, 1, 2, 1)
    assert n["per_model"] == {"tiny-gpt2": 2, "smollm2-135m": 1}
    assert os.environ[LOAD_LOG]  # set for this session and inherited by subprocesses


def test_forked_processes_behave_like_subprocesses(forks, tmp_path):
    """tests/cli_fork.py: a child of the fork server has its own pid, environment, output and exit code,
    and a SIGKILL ends it alone (-9, as `subprocess` reports it)."""
    import signal

    code = "import os, sys; print(sys.argv[1], os.environ['WHO']); print('err', file=sys.stderr); sys.exit(3)"
    done = forks.python(code, ["hello"], env={"WHO": "child"})
    assert done.wait(timeout=60) == 3 and done.pid != os.getpid()
    assert (done.stdout, done.stderr) == ("hello child\n", "err\n")
    assert "WHO" not in os.environ
    sleeper = forks.python("import time; time.sleep(600)", [])
    assert sleeper.poll() is None
    sleeper.send_signal(signal.SIGKILL)
    assert sleeper.wait(timeout=60) == -9
    refused = forks.cli(["ingest", "--store", tmp_path, "--workers", "2"])  # a usage error: click's exit code 2
    assert refused.wait(timeout=60) == 2 and "--workers only apply with --executor ray" in refused.stderr


def test_run_order_keeps_files_together_and_the_shared_ray_tests_in_one_run(request):
    """The order tests/conftest.py gives (pytest-xdist keeps it): each file's tests one after another
    (module fixtures built once), and the tests on the shared Ray (`ray_cluster`) in one run (one Ray start)."""
    items = request.session.items
    files = [item.path for item in items]
    starts = [p for i, p in enumerate(files) if i == 0 or files[i - 1] != p]
    assert len(starts) == len(set(files)), "a file's tests are split"
    on_ray = [i for i, item in enumerate(items) if "ray_cluster" in item.fixturenames]
    if on_ray:
        assert on_ray == list(range(on_ray[0], on_ray[-1] + 1)), "the tests on the shared Ray are split"


def test_built_once_builds_once_and_again_after_a_failed_build(tmp_path):
    """model_cache.built_once: the first caller builds (the others find it built); a build that failed
    leaves no marker, so the next caller builds again from scratch."""
    import pytest

    from model_cache import built_once

    calls = []

    def build(folder):
        calls.append(folder)
        folder.mkdir()
        (folder / "x").write_text(str(len(calls)))

    assert built_once(tmp_path / "a", build) == tmp_path / "a"
    assert built_once(tmp_path / "a", build) == tmp_path / "a"
    assert len(calls) == 1 and (tmp_path / "a" / "x").read_text() == "1"

    def broken(folder):
        folder.mkdir()
        (folder / "half").write_text("")
        raise RuntimeError("ingest failed")

    with pytest.raises(RuntimeError):
        built_once(tmp_path / "b", broken)
    built_once(tmp_path / "b", build)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["x"]  # the half-built folder went


def test_tiny_stores_are_built_in_the_runs_shared_folder(tiny_stores, tiny_model_dirs, tmp_path_factory):
    """Every pytest-xdist worker of the run finds the same tiny models and pristine stores (model_cache.shared_root)."""
    from model_cache import shared_root

    root = shared_root(tmp_path_factory)
    assert all(d.parent == root / "models" for d in tiny_model_dirs.values())
    assert tiny_stores.root == root / "pristine"


def test_tree_hashes_see_every_change_to_a_sparse_file(tmp_path):
    """tree_hashes skips a sparse file's holes, yet a write into a hole, an edited byte, a truncation and an
    extension each change the hash, and the same content hashes the same."""
    from tiny_models import tree_hashes

    f = tmp_path / "t" / "sparse"
    f.parent.mkdir()

    def write(edit=None):
        with open(f, "wb") as out:
            out.write(b"head")
            out.seek(50 << 20)  # a 50 MB hole
            out.write(b"tail")
            if edit:
                edit(out)
        return tree_hashes(f.parent)

    base = write()
    assert write() == base
    changed = [write(lambda o: (o.seek(20 << 20), o.write(b"x"))),  # into the hole
               write(lambda o: (o.seek(1), o.write(b"E"))),  # an edited byte
               write(lambda o: o.truncate((50 << 20) + 2)),  # truncated
               write(lambda o: o.truncate(60 << 20))]  # extended by a hole
    assert all(h != base for h in changed) and len({h["sparse"] for h in changed}) == 4
