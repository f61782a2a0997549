"""allocator.keep_freed_memory: a freed large block stays with the process, unless CLIP_DECODER_MALLOC=default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clip_decoder.allocator import ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc options (Linux)")

# Allocates, touches and frees a 16 MiB block (a tower activation's size) and reports what the process kept.
PROBE = """
import json, resource
from clip_decoder.allocator import keep_freed_memory

def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()

changed = keep_freed_memory()
before = resident()
block = bytearray(16 << 20)
for offset in range(0, len(block), 4096):
    block[offset] = 1
touched = resident()
del block
print(json.dumps({"changed": changed, "touched": touched - before, "kept": resident() - before}))
"""


def probe(**env: str) -> dict:
    """The probe's report, in a process whose environment has ``env`` and no setting of ENV otherwise."""
    inherited = {name: value for name, value in os.environ.items() if name != ENV}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={**inherited, **env})
    return json.loads(done.stdout)


def test_a_freed_block_stays_with_the_process() -> None:
    result = probe()
    assert result["changed"] is True
    assert result["touched"] >= 15 << 20
    assert result["kept"] >= 15 << 20  # from the heap, and kept there for the next batch


def test_glibc_defaults_give_it_back() -> None:
    result = probe(**{ENV: "default"})
    assert result["changed"] is False
    assert result["touched"] >= 15 << 20
    assert result["kept"] < 4 << 20  # mapped for the block alone and unmapped when freed
