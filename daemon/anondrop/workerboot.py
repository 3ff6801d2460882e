"""What the workers' fork server imports before it forks any worker: the pipeline and the engine, on a lean
pydicom."""

from anondrop.lean import import_pydicom

import_pydicom()

import anondrop.deid.engine  # noqa: E402
import anondrop.pipeline  # noqa: E402, F401
