"""When assets update themselves: eagerly on new upstream data, never past a failed blocking check.

Plain `eager()` reacts to any new upstream materialization; ours reacts to a new upstream *data
version*, so re-materializing `raw_mnist_data` on unchanged files does not retrain.
"""

from __future__ import annotations

import dagster as dg

RETRAIN_ON_NEW_DATA = (
    dg.AutomationCondition.eager().replace("newly_updated", dg.AutomationCondition.data_version_changed())
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("eager on new data, blocking checks passed")
