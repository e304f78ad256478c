"""When assets update themselves: eagerly on new upstream data, never past a failed blocking check.

Plain `eager()` reacts to any new upstream materialization; ours reacts to a new upstream *data
version*, so re-materializing `raw_mnist_data` on unchanged files does not retrain. The swap also
applies inside eager's "since last handled" reset, where it is harmless: an asset's own
materialization counts as handled when its data version changed, and a request always does.
"""

import dagster as dg

RETRAIN_ON_NEW_DATA = (
    dg.AutomationCondition.eager().replace("newly_updated", dg.AutomationCondition.data_version_changed())
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("eager on new data, blocking checks passed")

#: For steps that talk to mirrors, S3 or MLflow, where a second attempt can succeed. Training and
#: evaluation get none: a crash or a model below the gate fails the same way the next time.
TRANSIENT_IO_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)
