"""What the workers' fork server imports before it forks any worker: the worker side (anondrop.work) and the
engine, on a lean pydicom.

The server ends when the process that started it ends (multiprocessing closes its pipe). It then has nothing
to flush or release, but a normal interpreter exit would tear down every module it imported, some tens of
milliseconds during which it still holds the command's stdout and stderr: a caller reading them (a pipe,
cron, `subprocess.run(capture_output=True)`) would wait that long for the command to finish. So it leaves
at once. (The workers it forks end by os._exit as multiprocessing's children always do, never by atexit.)
"""

import atexit
import concurrent.futures.process  # noqa: F401  # what every pool worker runs: imported once, here
import os

from anondrop.lean import import_pydicom

import_pydicom()

import anondrop.deid.engine  # noqa: E402
import anondrop.work  # noqa: E402, F401

atexit.register(os._exit, 0)  # runs first (last registered): skips the teardown
