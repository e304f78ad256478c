"""The model's life after training, with no Dagster import: the deployment record, publish / promote /
rollback, and the A/B decision."""
