"""Data arrival: a labelled batch added to, changed in or removed from `landing/` re-materializes
raw_mnist_data, and the declarative automation carries the change through processing, training,
evaluation and the deployment gate.

The sensor's cursor remembers every landed file's version, valid and rejected apart, so the same change
never launches twice and a malformed file is reported once, not on every tick.
"""

import hashlib
import json
from typing import NamedTuple

import dagster as dg

from mnist_dagster import ml
from mnist_dagster.layout import LANDING_PREFIX
from mnist_dagster.resources.storage import StorageResource

RAW_DATA = dg.AssetKey("raw_mnist_data")


class LandingCursor(NamedTuple):
    """What the sensor has seen in `landing/`: key -> `StoredObject.version`, valid and rejected apart."""

    valid: dict[str, str]
    rejected: dict[str, str]

    @classmethod
    def parse(cls, cursor: str | None) -> "LandingCursor":
        """An unreadable cursor counts as "seen nothing": at worst one extra run of raw_mnist_data,
        which retrains nothing if the data did not change (data versions)."""
        try:
            state = json.loads(cursor) if cursor else {}
            return cls(dict(state.get("valid", {})), dict(state.get("rejected", {})))
        except (ValueError, TypeError, AttributeError):
            return cls({}, {})

    def dump(self) -> str:
        return json.dumps({"valid": self.valid, "rejected": self.rejected}, sort_keys=True)

    def knows(self, key: str, version: str) -> bool:
        return self.valid.get(key) == version or self.rejected.get(key) == version

    def fingerprint(self) -> str:
        """Names the valid set, so a run key says "this change, from that state": removing a batch and
        landing it again later is a new change, while re-evaluating one tick repeats its key."""
        return hashlib.sha256(json.dumps(self.valid, sort_keys=True).encode()).hexdigest()[:12]


def _validation_error(payload: bytes) -> str | None:
    """Why a landed file cannot be used (the same check `raw_mnist_data` applies), or None. `ml.data`, and
    torch with it, loads at the first tick that finds a file to check, not with the code location."""
    try:
        ml.data.read_labelled_batch(payload)
    except ml.data.LabelledBatchError as error:
        return str(error)
    return None


@dg.sensor(
    name="new_labelled_data_sensor",
    target=[RAW_DATA],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description=(
        f"Watches `{LANDING_PREFIX}/*.npz` in storage and re-materializes raw_mnist_data when a labelled "
        "batch is added, changed or removed; malformed files are reported and skipped."
    ),
)
def new_labelled_data_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    store = storage.open()
    seen = LandingCursor.parse(context.cursor)
    listed = {item.key: item.version for item in store.list(LANDING_PREFIX) if item.key.endswith(".npz")}
    now = LandingCursor(
        valid={key: version for key, version in listed.items() if seen.valid.get(key) == version},
        rejected={key: version for key, version in listed.items() if seen.rejected.get(key) == version},
    )
    new_or_changed = sorted(key for key, version in listed.items() if not seen.knows(key, version))
    for key in new_or_changed:
        error = _validation_error(store.read_bytes(key))
        if error is None:
            now.valid[key] = listed[key]
        else:
            now.rejected[key] = listed[key]
            context.log.warning(f"Skipping landed file {key}: {error}")
    added = [key for key in new_or_changed if key in now.valid]
    removed = sorted(set(seen.valid) - set(listed))
    if not added and not removed:
        rejected = [key for key in new_or_changed if key in now.rejected]
        reason = f"Rejected malformed {', '.join(rejected)}" if rejected else f"Nothing new in {LANDING_PREFIX}/"
        return dg.SensorResult(skip_reason=reason, cursor=now.dump())
    change = [f"+{key}@{listed[key]}" for key in added] + [f"-{key}@{seen.valid[key]}" for key in removed]
    context.log.info(f"New labelled data: {', '.join(change)}")
    request = dg.RunRequest(
        run_key=f"landing:{seen.fingerprint()}:" + "|".join(change),  # the same change never launches twice
        asset_selection=[RAW_DATA],
        tags={"mnist/landing_added": str(len(added)), "mnist/landing_removed": str(len(removed))},
    )
    return dg.SensorResult(run_requests=[request], cursor=now.dump())


# Declarative automation: processed data, training, evaluation and deployment follow new data.

automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates the assets' automation conditions (RETRAIN_ON_NEW_DATA) and launches what they request.",
)
