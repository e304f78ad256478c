"""The model's life after training, with no Dagster and no HTTP: the deployment record, publish / promote /
rollback, the serving-path check, how a server follows the record (watcher, routing, shadow), the A/B decision, and
what lands from feedback."""
