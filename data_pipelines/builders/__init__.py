"""One TFDS builder per data set, each in its own package folder."""
