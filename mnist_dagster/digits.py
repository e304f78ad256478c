"""The MNIST image format every part shares: 28 x 28 grey pixels, ten digit classes. Plain Python."""

IMAGE_SIDE = 28
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE)
NUM_CLASSES = 10
#: Where MNIST puts a digit's centre of mass, in 0-based pixel indices (row and column): the mean over
#: the 10k test digits is 13.99 and 14.01, spread +-0.29 by rounding to whole pixels.
MASS_CENTRE = 14.0
