"""A decoder for the process-pool tests: kills its worker process on any file named ``crash.png``.

It must live in an importable module (not a test function) because the
worker processes are spawned and import it by name.
"""

import os

from core.scoring.decode_processes import decode_chunk


def decode_or_die(sources, size, keep_images):
    if any(source.path.endswith("crash.png") for source in sources):
        os._exit(3)  # what a decoder's segmentation fault looks like to the pool
    return decode_chunk(sources, size, keep_images)
