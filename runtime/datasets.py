"""The data set a bundle trains on, by its task: images, audio clips, or text through its tokenizer.

One place for the dispatch, so ``edgepeft train``, ``edgepeft eval`` and the device agent read a data file
the same way (an image bundle's agent trains on an ``image,label`` .csv exactly as ``edgepeft train`` does).
"""

from __future__ import annotations

import os

from edgepeft.names import AUDIO_CLS, IMAGE_CLS
from edgepeft.runtime.images import Augment


def load_for_bundle(path: str | os.PathLike, bundle, augment: Augment | None = None, seed: int = 0):
    """The data set at ``path`` for ``bundle`` (an open Bundle); ``augment`` and ``seed`` apply to images only."""
    if bundle.manifest.task == IMAGE_CLS:
        from edgepeft.runtime.image_data import load_image_dataset

        return load_image_dataset(path, bundle.manifest, augment=augment, seed=seed)
    if bundle.manifest.task == AUDIO_CLS:
        from edgepeft.runtime.audio_data import load_audio_dataset

        return load_audio_dataset(path, bundle.manifest)
    from edgepeft.runtime.data import load_dataset
    from edgepeft.runtime.text import load_tokenizer

    return load_dataset(path, bundle.manifest, load_tokenizer(bundle), bundle_path=bundle.path)
