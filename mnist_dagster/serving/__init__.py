"""The HTTP process: routes, their pydantic models, the draw-a-digit page, and the write path (the prediction log,
feedback, signed prediction ids). It follows the deployment record through `lifecycle` (watcher, routing, shadow),
scores with `scoring`, and journals through `storage`; no Dagster.
"""
