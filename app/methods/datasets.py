"""How a job names its data: an uploaded dataset's id, or a built-in one (`builtin:<name>`) that every worker ships
(the engine's `builtin` module loads them)."""
from __future__ import annotations

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "digits")
#: A job's `dataset_id`: 32 hex digits, or builtin:<name>.
DATASET_REF_PATTERN = rf"^([0-9a-f]{{32}}|{BUILTIN_PREFIX}({'|'.join(BUILTIN_DATASETS)}))$"


def builtin_name(dataset_ref: str | None) -> str | None:
    """"digits" for "builtin:digits"; None for an uploaded dataset's id (or None)."""
    if dataset_ref is not None and dataset_ref.startswith(BUILTIN_PREFIX):
        return dataset_ref.removeprefix(BUILTIN_PREFIX)
    return None


def dataset_ref(dataset_id: str | None, builtin: str | None) -> str | None:
    """What a job shows as its dataset: builtin:<name> for a built-in, else the uploaded dataset's id."""
    return BUILTIN_PREFIX + builtin if builtin else dataset_id
