"""tools/triton_cache.py: kernels compiled here into Triton's cache, found by Triton's JIT there.

The build and its check compile real GPU code (in subprocesses, without Triton's interpreter), on one
cheap kernel (`--only`); packing, unpacking and the report are plain file work, tested here too."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tools import triton_cache as tc

ROOT = Path(__file__).resolve().parent.parent
ONLY = "^_scaled_copy_kernel$"  # the spectrogram layout kernel: four launches, quick to compile


def run_tool(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "tools.triton_cache", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=1200)


def fake_cache(root: Path, keys) -> Path:
    """A cache laid out as Triton's FileCacheManager writes it: one folder per key, a group file
    naming its files by absolute path."""
    for key in keys:
        folder = root / key
        folder.mkdir(parents=True)
        (folder / "k.cubin").write_bytes(os.urandom(64))
        (folder / "k.json").write_text("{}")
        (folder / "__grp__k.json").write_text(json.dumps(
            {"child_paths": {"k.cubin": str(folder / "k.cubin"), "k.json": str(folder / "k.json")}}))
    return root


def test_unpack_points_the_groups_at_where_it_unpacks_and_report_counts_what_is_new(tmp_path):
    built = fake_cache(tmp_path / "built", ["AAA", "BBB"])
    (built / tc.MANIFEST).write_text(json.dumps({"entries": ["AAA", "BBB"]}))
    tc.pack(built, tmp_path / "cache.tar.xz")
    dest = tmp_path / "there"
    assert tc.unpack(tmp_path / "cache.tar.xz", dest) == 2
    for key in ("AAA", "BBB"):
        paths = json.loads((dest / key / "__grp__k.json").read_text())["child_paths"]
        assert paths == {"k.cubin": str((dest / key / "k.cubin").resolve()),
                         "k.json": str((dest / key / "k.json").resolve())}
        assert (dest / key / "k.cubin").read_bytes() == (built / key / "k.cubin").read_bytes()
    assert "2 kernels carried, 0 compiled on this machine" in tc.report(dest)
    fake_cache(dest, ["CCC"])  # a kernel the carried cache did not have, compiled there
    assert "2 kernels carried, 1 compiled on this machine (k x1)" in tc.report(dest)


def test_unpack_refuses_entries_outside_its_folder(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="triton_cache/../../escaped")
    with pytest.raises(ValueError, match="unexpected entry"):
        tc.unpack(evil, tmp_path / "dest")
    assert not (tmp_path / "escaped").exists()


@pytest.mark.slow  # compiles GPU code
def test_a_built_cache_is_found_by_tritons_jit_after_it_moves(tmp_path):
    proc = run_tool("build", tmp_path / "cache", "--set", "default", "--only", ONLY, "--jobs", 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "cache" / tc.MANIFEST).read_text())
    n = manifest["launches"]
    assert n >= 2 and not manifest["compile_failures"]
    assert manifest["check"] == {"found": n, "missed": 0, "over_shared_memory": []}
    assert len(manifest["entries"]) == n
    # Only what a launch loads is kept: the cubin and the metadata, not the IRs.
    suffixes = {p.suffix for p in (tmp_path / "cache").glob("*/*")}
    assert suffixes == {".cubin", ".json"}, suffixes
    # Moved (packed and unpacked elsewhere): Triton's JIT finds every launch there, compiles none.
    tc.pack(tmp_path / "cache", tmp_path / "cache.tar.xz")
    assert tc.unpack(tmp_path / "cache.tar.xz", tmp_path / "there") == n
    proc = run_tool("check", tmp_path / "there", "--set", "default", "--only", ONLY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"found": n, "missed": 0, "over_shared_memory": []}

    # Keyed for another machine's libtriton.so: other keys, which that key's JIT finds and this
    # Python's JIT does not (it compiles every launch anew).
    other = tmp_path / "libtriton.so"
    other.write_bytes(os.urandom(1024))
    proc = run_tool("build", tmp_path / "other", "--set", "default", "--only", ONLY, "--jobs", 2, "--libtriton", other)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    theirs = json.loads((tmp_path / "other" / tc.MANIFEST).read_text())
    assert theirs["check"] == {"found": n, "missed": 0, "over_shared_memory": []}
    assert not set(theirs["entries"]) & set(manifest["entries"])
    proc = run_tool("check", tmp_path / "other", "--set", "default", "--only", ONLY)
    assert proc.returncode == 1
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"found": 0, "missed": n, "over_shared_memory": []}
