"""Decode functions for the service's worker processes in tests (imported in the workers).

Kept apart from the test modules so that a worker imports only this and the decoders, not
torch or the test client. Each one misbehaves for one upload name and decodes any other
upload as the service does.
"""

from __future__ import annotations

import os
import signal
import time

from cxr.errors import ImageError
from cxr.serve.decoding import decode_upload


class ImageTooLarge(ImageError):
    """Stands in for the size guard's error in cxr.data.images (matched by class name)."""


def misbehave_by_name(data: bytes, name: str):
    if name == "slow.png":
        if "CXR_TEST_DECODE_STARTED" in os.environ:  # tell a test that the job is under way
            open(os.environ["CXR_TEST_DECODE_STARTED"], "w").close()
        time.sleep(600)  # a decode that would outlive any request
    if name == "crash.png":
        os.kill(os.getpid(), signal.SIGKILL)  # a decoder library dying on its input
    if name == "rt-signal.png":
        os.kill(os.getpid(), signal.SIGRTMIN + 6)  # a signal without a name ends it
    if name == "huge.png":
        raise ImageTooLarge(f"{name}: image would need too much memory")
    if name == "bug.png":
        raise KeyError("a bug in the decoder")
    return decode_upload(data, name)
