"""tf.data input pipelines and TFDS builders (the only place that imports TensorFlow)."""
