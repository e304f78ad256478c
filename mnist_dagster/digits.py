"""The MNIST image format every part shares: 28 x 28 grey pixels, ten digit classes. Plain Python."""

IMAGE_SIDE = 28
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE)
NUM_CLASSES = 10
