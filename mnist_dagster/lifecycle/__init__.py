"""The model's life outside any framework (no Dagster, no HTTP): what lands from feedback, and how a model
moves into and out of production."""
