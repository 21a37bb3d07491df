"""The one feature schema every xmr_jax TFDS builder writes (one example per image).

image:       encoded image, decoded to uint8 [H, W, 3]
captions:    one or more captions (str)
pid:         person id; train splits relabelled to 0..N-1; caption data sets use the image id
image_index: 0-based index of the image within its split
path:        image path relative to the data set folder
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


def retrieval_features(encoding_format: str = "png") -> tfds.features.FeaturesDict:
    """Returns the FeaturesDict shared by the person and caption retrieval builders."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "pid": tfds.features.Scalar(dtype=np.int64),
            "image_index": tfds.features.Scalar(dtype=np.int64),
            "path": tfds.features.Text(),
        }
    )
