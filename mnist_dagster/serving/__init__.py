"""Inference without Dagster: the serving bundle, MNIST-style preprocessing, batch scoring, the HTTP service.

Where things live in the store is `mnist_dagster.layout`, shared with the Dagster side.
"""
