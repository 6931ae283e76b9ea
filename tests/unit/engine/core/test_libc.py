import ctypes
import os

from engine.core.libc import libc


def test_libc_is_this_process_c_library_opened_once():
    assert libc() is libc()
    assert libc().getpid() == os.getpid()


def test_libc_keeps_errno():
    assert libc().close(-1) == -1
    assert ctypes.get_errno() == 9  # EBADF
