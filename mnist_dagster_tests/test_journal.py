"""The write path's parts on real files: the journal (append, seal, budget), the shipper (exactly once, even
when an upload is retried; adoption of a dead process's folder), and the signed prediction ids."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mnist_dagster.layout import SERVING_SECRET_KEY
from mnist_dagster.scoring.preprocess import InputError
from mnist_dagster.serving.feedback import FeedbackLog, FeedbackRecord, latest_labels, read_feedback
from mnist_dagster.serving.ids import IdSigner, MissingSecret, serving_secret
from mnist_dagster.storage import LocalStore
from mnist_dagster.storage.journal import Journal, JournalSettings
from mnist_dagster.storage.jsonl import read_json_lines
from mnist_dagster.storage.shipper import Shipper, ship_segment
from mnist_dagster_tests.support import wait_for

SECRET = b"a-test-secret-of-32-bytes-length"


def feedback_line(index: int, at: float = 1_700_000_000.0) -> bytes:
    record = {"time": f"2023-11-14T22:13:{index % 60:02d}.000000+00:00", "prediction_id": f"id-{index}",
              "label": index % 10, "arm": "production", "model_version": "1"}  # fmt: skip
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def stored_ids(store: LocalStore, prefix: str = "feedback") -> Counter:
    return Counter(line["prediction_id"] for line in read_json_lines(store, prefix))


def test_a_retried_upload_overwrites_the_same_objects_so_no_row_is_stored_twice(tmp_path):
    store = LocalStore(tmp_path / "store")
    journal = Journal(JournalSettings(tmp_path / "journal"), store.uri(""))
    assert journal.append("feedback", b"".join(feedback_line(index) for index in range(50)), rows=50)
    (segment,) = journal.seal(lambda s: True)
    ship_segment(store, segment, journal.name)  # the upload went through, then the process "died" before the delete
    ship_segment(store, segment, journal.name)  # the next attempt ships the same segment again
    assert stored_ids(store) == Counter({f"id-{index}": 1 for index in range(50)})
    keys = [item.key for item in store.list("feedback")]
    assert len(keys) == 1 and keys[0].startswith("feedback/date=2023-11-14/") and journal.name in keys[0]


def test_the_budget_refuses_appends_past_max_bytes_and_shipping_gives_the_room_back(tmp_path):
    store = LocalStore(tmp_path / "store")
    line = feedback_line(1)
    journal = Journal(JournalSettings(tmp_path / "journal", max_bytes=len(line) * 3), store.uri(""))
    assert [journal.append("feedback", line) for _ in range(4)] == [True, True, True, False]
    assert journal.status().full and journal.status().refused == {"feedback": 1}
    shipper = Shipper(store, journal)
    journal.seal(lambda s: True)
    assert shipper.ship_pending() and journal.held_bytes == 0 and not journal.full()
    assert journal.append("feedback", line)
    assert sum(stored_ids(store).values()) == 3


def test_a_sigkilled_writers_journal_is_adopted_and_shipped_by_the_next_process(tmp_path):
    """A real child process journals 300 rows (no fsync: write() reaching the kernel is what counts) and is
    killed with SIGKILL before any segment is sealed; a new journal on the same folder ships them all."""
    store = LocalStore(tmp_path / "store")
    folder = tmp_path / "journal"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), store.uri("")],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert child.stdout.readline().strip() == b"journaled 300"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=20)
    assert list(folder.glob("*/*.open")), "the dead process's open segment"
    shipper = Shipper(store, Journal(JournalSettings(folder), store.uri("")))
    shipper.adopt_leftovers()
    assert shipper.ship_pending()
    assert stored_ids(store) == Counter({f"id-{index}": 1 for index in range(300)})
    assert [path.name for path in folder.iterdir()] == [shipper.journal.name]  # the dead folder is gone


CHILD = """
import sys
import threading
from pathlib import Path
from mnist_dagster.storage.journal import Journal, JournalSettings
from mnist_dagster_tests.test_journal import feedback_line
journal = Journal(JournalSettings(Path(sys.argv[1]), fsync="off", segment_seconds=3600), sys.argv[2])
for index in range(300):
    assert journal.append("feedback", feedback_line(index))
print("journaled 300", flush=True)
threading.Event().wait()  # until the SIGKILL
"""


def test_a_living_processs_journal_is_not_adopted_and_another_stores_never(tmp_path):
    store = LocalStore(tmp_path / "store")
    folder = tmp_path / "journal"
    alive = Journal(JournalSettings(folder), store.uri(""))
    alive.append("feedback", feedback_line(1))
    other_store = Journal(JournalSettings(folder), "s3://another/store")
    other_store.append("feedback", feedback_line(2))
    shipper = Shipper(store, Journal(JournalSettings(folder), store.uri("")))
    shipper.adopt_leftovers()
    assert shipper.adopted_segments == 0 and shipper.ship_pending()
    assert stored_ids(store) == Counter()


def test_the_server_thread_seals_by_age_and_the_shipper_ships_without_being_asked(tmp_path):
    store = LocalStore(tmp_path / "store")
    journal = Journal(JournalSettings(tmp_path / "journal", segment_seconds=0.2), store.uri(""))
    shipper = Shipper(store, journal, poll_seconds=0.1)
    shipper.start()
    try:
        log = FeedbackLog(store, journal=journal)
        assert log.record(FeedbackRecord(time.time(), "id-a", 3, "production", "1"))
        assert log.record(FeedbackRecord(time.time() + 1, "id-a", 5, "production", "1"))
        lines = wait_for(lambda: len(read_feedback(store)) == 2 and read_feedback(store), message="two feedback lines")
    finally:
        shipper.stop()
    assert [line["repeat"] for line in lines] == [False, True]  # the second label for an id is kept, marked
    assert latest_labels(lines) == {"id-a": 5}  # and it is the one that counts
    assert not journal.folder.exists()  # shut down with nothing left: the folder is removed


# ----- prediction ids --------------------------------------------------------------------------------


def test_an_id_carries_what_answered_and_only_this_secret_makes_one():
    signer = IdSigner(SECRET)
    now = time.time()
    prediction_id = signer.mint("12", "challenger", 7, now)
    verified = signer.verify(prediction_id, now + 60)
    assert (verified.model_version, verified.arm, verified.digit) == ("12", "challenger", 7)
    assert abs(verified.issued_at - now) < 0.001
    assert signer.mint("12", "challenger", 7, now) != prediction_id  # same millisecond, a different id
    altered = prediction_id[:-3] + ("A" if prediction_id[-3] != "A" else "B") + prediction_id[-2:]
    forged = IdSigner(b"another-secret-another-secret!!").mint("12", "production", 7, now)
    for bad in (altered, forged, "0" * 32, "", "not base64 at all!"):
        with pytest.raises(InputError) as refused:
            signer.verify(bad, now)
        assert refused.value.status == 404, bad


def test_an_id_older_than_the_ttl_is_gone():
    signer = IdSigner(SECRET, ttl_days=30)
    now = time.time()
    signer.verify(signer.mint("1", "production", 3, now - 29 * 86_400), now)  # accepted
    with pytest.raises(InputError) as refused:
        signer.verify(signer.mint("1", "production", 3, now - 31 * 86_400), now)
    assert refused.value.status == 410


def test_prod_refuses_to_run_without_a_secret_and_dev_keeps_one_in_the_store(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(MissingSecret):
        serving_secret(store, {"DAGSTER_DEPLOYMENT": "prod"})
    assert not store.exists(SERVING_SECRET_KEY)
    assert serving_secret(store, {"DAGSTER_DEPLOYMENT": "prod", "MNIST_SERVING_SECRET": "s" * 20}) == b"s" * 20
    first = serving_secret(store, {})
    assert len(first) >= 32 and store.exists(SERVING_SECRET_KEY)
    assert serving_secret(store, {}) == first  # made once, then read back by every replica and restart


def test_settings_come_from_the_environment_and_a_bad_fsync_mode_stops_the_start(tmp_path):
    env = {"MNIST_JOURNAL_DIR": str(tmp_path), "MNIST_JOURNAL_FSYNC": "always", "MNIST_JOURNAL_MAX_BYTES": "1000"}
    settings = JournalSettings.from_env("s3://b/p", env)
    assert (settings.directory, settings.fsync, settings.max_bytes) == (Path(tmp_path), "always", 1000)
    assert JournalSettings.from_env("s3://b/p", {}).directory != JournalSettings.from_env("s3://b/q", {}).directory
    with pytest.raises(ValueError, match="MNIST_JOURNAL_FSYNC"):
        JournalSettings.from_env("s3://b/p", {"MNIST_JOURNAL_FSYNC": "sometimes"})
