"""How combined action codes (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) resolve so output stays conformant.

Table E.1-1a: "X unless Z is required to maintain IOD conformance (Type 3 versus Type 2)", and so on.
Which applies depends on the attribute's Type in the IOD of the instance. Without every IOD's module tables
at hand, anondrop uses the strongest Type the attribute has in any composite IOD of PS3.3 that contains it
(listed below for the attributes that carry a combined code):

  Type 1 somewhere  -> D (a dummy value valid for the VR)
  Type 2 somewhere  -> Z (zero length) where the code offers Z, else D
  Type 3 everywhere -> X (removed)
  X/Z/U*            -> U: the reference sequence is kept and every UID inside it is replaced consistently,
                       which keeps references between instances resolvable.

Keeping an empty or dummy value where some other IOD would allow removal costs nothing in confidentiality
(the value carries no information). A sequence is the exception: a Type 3 sequence, if present, needs at
least one item, so an empty one is an error; sequences are listed here only where an IOD makes them
Type 2 (e.g. Referenced Study Sequence is Type 3 in General Study and is removed). An attribute not listed
here is treated as Type 3. The dciodvfy conformance tests check these choices on real samples.
"""

from __future__ import annotations

from anondrop.dicomdict import tag_for_keyword

# Strongest Type (1 or 2) in any composite IOD, for attributes with a combined code in Table E.1-1.
_STRONGEST_TYPE: dict[str, int] = {
    "SeriesDate": 1,  # PET Series module
    "SeriesTime": 1,  # PET Series module
    "ContentDate": 1,  # SR Document General, Enhanced images (General Image: 2C)
    "ContentTime": 1,
    "AcquisitionDateTime": 1,  # Enhanced MR/CT/XA Image modules
    "AcquisitionDate": 2,
    "AcquisitionTime": 2,
    "DeviceSerialNumber": 1,  # Enhanced General Equipment module
    "ObservationDateTime": 1,  # SR content items
    "StartAcquisitionDateTime": 1,
    "EndAcquisitionDateTime": 1,
    "OperatorsName": 2,  # RT Series module
    "ReferencedPerformedProcedureStepSequence": 2,  # SR Document Series module
    "PatientSexNeutered": 2,  # 2C for animal patients
    "ContrastBolusAgent": 2,
    "InstructionPerformedDateTime": 2,
    "RequestedProcedureDescription": 2,
    "AcquisitionContextSequence": 2,
    "ContentCreatorName": 2,
    "LabelText": 2,
    "BarcodeValue": 2,
    "RTPlanDate": 2,  # RT General Plan module
    "RTPlanTime": 2,
    "TreatmentMachineName": 2,
    "ReviewerName": 2,  # 2C in RT approval
    "SourceSerialNumber": 2,
    "TreatmentDate": 2,
    "TreatmentTime": 2,
    "FirstTreatmentDate": 2,
    "MostRecentTreatmentDate": 2,
    "PatientID": 2,
}
STRONGEST_TYPE: dict[int, int] = {
    int(t): v for k, v in _STRONGEST_TYPE.items() if (t := tag_for_keyword(k)) is not None
}


def resolve_combined(tag: int, code: str) -> str:
    """Resolve a Table E.1-1 action code to a single action (X, Z, D, K, C or U)."""
    if "/" not in code:
        return code
    if code == "X/Z/U*":
        return "U"
    strongest = STRONGEST_TYPE.get(tag, 3)
    choices = code.split("/")
    if strongest == 1:
        return "D"
    if strongest == 2:
        return "Z" if "Z" in choices else "D"
    return "X" if "X" in choices else choices[0]
