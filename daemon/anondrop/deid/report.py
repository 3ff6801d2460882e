"""What was done to one instance, as the engine reports it to the pipeline (no pydicom here: the main process
reads these reports without importing pydicom)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Report:
    """What was done to one instance; holds only de-identified values (safe to log)."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    patient_id: str = ""
    modality: str = ""
    series_number: str = ""
    instance_number: int | None = None
    burned_in: str | None = None
    counts: Counter[str] = field(default_factory=Counter)
    values: dict[str, str] = field(default_factory=dict)  # output values the naming templates use
