"""The C kernels are built once per machine, rebuilt when their cached library is torn, and where they cannot be
built the numba kernels take over, with the reason kept (QUANTDECK_KERNELS=c refuses to fall back)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.formats import cpu_kernels
from engine.formats.native import build
from engine.formats.nvfp4 import host


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTDECK_NATIVE_CACHE", str(tmp_path / "native"))
    monkeypatch.delenv("QUANTDECK_KERNELS", raising=False)
    build.forget()
    yield tmp_path / "native"
    build.forget()


def _quantize():
    w = np.arange(-64, 64, dtype=np.float32).reshape(4, 32) / 7
    return host.float_to_nvfp4(w, host.global_scale(np.abs(w).max()))


def test_built_once_then_loaded_from_the_cache(fresh):
    assert cpu_kernels.backend() == "c"
    libs = list(fresh.glob("kernels-*.so"))
    assert len(libs) == 1 and not list(fresh.glob(".build-*"))  # the temp file was renamed into place
    first = libs[0].stat().st_mtime_ns
    build.forget()
    assert cpu_kernels.backend() == "c" and libs[0].stat().st_mtime_ns == first  # not built again


def test_a_torn_cached_library_is_built_again(fresh):
    assert cpu_kernels.backend() == "c"
    lib = next(fresh.glob("kernels-*.so"))
    torn = lib.with_name("torn")
    torn.write_bytes(lib.read_bytes()[:100])  # a crash mid-copy, a full disk
    os.replace(torn, lib)  # a new file: this process keeps the library it has mapped
    code = ("from engine.formats import cpu_kernels; from engine.formats.nvfp4 import host; import numpy as np; "
            "p, s = host.float_to_nvfp4(np.ones((2, 32), np.float32), 1.0); print(cpu_kernels.backend(), p.shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "QUANTDECK_KERNELS": "c"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["c", "(2,", "16)"]
    assert lib.stat().st_size > 1000


def test_without_a_compiler_the_numba_kernels_give_the_same_bytes(fresh, monkeypatch):
    want = _quantize() if cpu_kernels.backend() == "c" else pytest.fail("C kernels should build here")
    build.forget()
    monkeypatch.setenv("PATH", str(fresh))  # no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    assert cpu_kernels.backend() == "numba"
    assert "no C compiler" in build.unavailable()
    got = _quantize()
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    monkeypatch.setenv("QUANTDECK_KERNELS", "c")
    with pytest.raises(build.BuildError, match="QUANTDECK_KERNELS=c.*no C compiler"):
        cpu_kernels.backend()


def test_a_failing_compiler_is_reported_with_its_output(fresh, tmp_path, monkeypatch):
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\necho 'kernels.c:1: error: this compiler is broken' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    assert cpu_kernels.backend() == "numba"
    assert "badcc failed on kernels.c" in build.unavailable() and "this compiler is broken" in build.unavailable()
    assert not list(fresh.glob("*.so")) and not list(fresh.glob(".build-*"))  # nothing half-built left


def test_without_platformdirs_the_cache_is_under_xdg_cache_home(fresh, tmp_path, monkeypatch):
    """`python -m engine.convert` on a machine with only torch, numpy and safetensors still gets the C kernels."""
    monkeypatch.delenv("QUANTDECK_NATIVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # import fails
    assert build.cache_dir() == tmp_path / "xdg" / "quantdeck" / "native"
    assert cpu_kernels.backend() == "c" and list((tmp_path / "xdg" / "quantdeck" / "native").glob("kernels-*.so"))


def test_a_foreign_library_at_the_cached_path_is_rebuilt_and_loaded_in_the_same_process(fresh, tmp_path):
    """The loader hands back a library it has mapped for a path: the rebuilt one is loaded under its own name."""
    fake = tmp_path / "fake.c"
    fake.write_text("int qd_abi_version(void) { return 99; }\n")
    cc = build.compiler()
    path = build.library_path(cc)
    path.parent.mkdir(parents=True)
    subprocess.run([*cc, "-shared", "-fPIC", "-o", str(path), str(fake)], check=True)
    assert cpu_kernels.backend() == "c"  # the foreign library was loaded, refused, rebuilt, loaded afresh
    packed, bs = _quantize()
    build.forget()
    assert cpu_kernels.backend() == "c"
    assert all(np.array_equal(a, b) for a, b in zip(_quantize(), (packed, bs), strict=True))
    assert not list(fresh.glob(".load-*")) and not list(fresh.glob(".build-*"))


def test_every_kernel_has_its_c_signature_on_each_load(fresh):
    from engine.formats.native import calls

    for _ in range(3):
        lib = build.library()
        for name, args in calls.SIGNATURES.items():
            assert getattr(lib, name).argtypes == args
        build.forget()


def test_a_compiler_command_with_arguments(fresh, monkeypatch):
    monkeypatch.setenv("CC", "env cc")  # as "ccache gcc" would be
    assert build.compiler()[1:] == ["cc"] and build.compiler()[0].endswith("env")
    assert cpu_kernels.backend() == "c"


def test_used_says_what_ran_without_building(fresh, monkeypatch):
    assert build.used() is None
    assert not list(fresh.glob("*.so"))  # asking built nothing
    cpu_kernels.backend()
    assert build.used() == "c"


def test_a_conversion_says_why_it_fell_back_to_numba(fresh, monkeypatch):
    from engine.convert.streaming import _cpu_kernels
    from engine.core.events import CallbackSink

    monkeypatch.setenv("PATH", str(fresh))  # no compiler
    monkeypatch.delenv("CC", raising=False)
    assert cpu_kernels.backend() == "numba"
    seen = []
    assert _cpu_kernels(CallbackSink(seen.append)) == "numba"
    assert [e.data["msg"] for e in seen] == [
        "CPU kernels: numba (the C kernels could not be built: no C compiler (cc, gcc or clang; or set CC))"]


def test_without_a_compiler_or_numba_the_error_says_how_to_get_either(fresh, tmp_path):
    """numba is an optional extra: where the C kernels cannot build and numba is absent, one clear error."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoNumba:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'numba' or name.startswith('numba.'):\n"
        "            raise ImportError('No module named numba')\n"
        "sys.meta_path.insert(0, _NoNumba())\n")
    code = ("from engine.core.errors import KernelsUnavailableError\n"
            "import numpy as np\n"
            "from engine.formats.nvfp4 import host\n"
            "try:\n"
            "    host.float_to_nvfp4(np.ones((2, 32), np.float32), 1.0)\n"
            "except KernelsUnavailableError as e:\n"
            "    print(e.one_line())\n")
    env = {**os.environ, "PATH": str(fresh), "QUANTDECK_NATIVE_CACHE": str(fresh),
           "PYTHONPATH": os.pathsep.join([str(hide), str(Path(__file__).resolve().parents[4])])}
    env.pop("CC", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert "the C kernels cannot be used (no C compiler" in line and "numba, the fallback, is not installed" in line
    assert "pip install 'quantdeck[numba]'" in line and "apt-get install gcc" in line


def test_pread_rows_reads_the_rows_and_says_where_the_file_ends(fresh, tmp_path):
    """qd_pread_rows: the rows at the offsets, in order; k > 0 when the file ends inside row k - 1; -errno when a
    read fails (a pipe: ESPIPE), with the advice refused there ignored."""
    import errno

    from engine.formats.native import calls

    lib = build.library()
    data = np.random.default_rng(5).integers(0, 256, 10_000, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    offsets = np.array([9_000, 0, 4_093, 300], np.int64)
    out = np.zeros((4, 700), np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert calls.pread_rows(lib, fd, offsets, out, advise=True) == 0
        assert all(out[j].tobytes() == data[o:o + 700].tobytes() for j, o in enumerate(offsets.tolist()))
        assert calls.pread_rows(lib, fd, np.array([0, 9_500], np.int64), out[:2], advise=False) == 2
        for bad_offsets, bad_out in ((offsets.astype(np.int32), out), (offsets, out[:, ::2]), (offsets, out[:3]),
                                     (offsets, out.view(np.int8))):
            with pytest.raises(ValueError, match="pread_rows"):  # never handed to C: it would write out of bounds
                calls.pread_rows(lib, fd, bad_offsets, bad_out, advise=False)
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        assert calls.pread_rows(lib, r, np.array([0], np.int64), out[:1], advise=True) == -errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)
