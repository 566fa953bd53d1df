"""``teacher.heap``: glibc keeps the collector's freed memory for the next answer (checked in a fresh process,
through glibc's own accounting)."""

from __future__ import annotations

import json
import subprocess

from tests.support import PYTHON, test_env

PROBE = """
import ctypes, json, platform
from teacher.heap import keep_freed_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

def state():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    block = libc.malloc(8 << 20)  # an answer's size: mapped by default, from the heap once tuned
    mapped = libc.mallinfo2().hblks
    libc.free(block)
    return {"mapped_while_held": mapped, "heap_top_after_free": libc.mallinfo2().keepcost}

before = state()
tuned = keep_freed_heap()
print(json.dumps({"glibc": platform.libc_ver()[0], "tuned": tuned, "again": keep_freed_heap(),
                  "before": before, "after": state()}))
"""


def test_freed_blocks_stay_in_the_heap() -> None:
    out = subprocess.run([PYTHON, "-c", PROBE], env=test_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["glibc"] == "glibc", seen  # the machines this project runs on
    assert seen["tuned"] is True and seen["again"] is True
    assert seen["before"]["mapped_while_held"] >= 1  # glibc's default maps an 8 MiB block...
    assert seen["after"]["mapped_while_held"] < seen["before"]["mapped_while_held"]  # ...tuned, it is heap
    assert seen["after"]["heap_top_after_free"] >= 8 << 20  # and freeing it keeps it for the next answer
