"""An independent judge of generated digits: an SVM trained on real sklearn digits only.

It never sees a generated image while training, so a generated "seven" counts as a
seven only if it looks like the real ones. It is trained on the same fixed train split
as the diffusion model and its accuracy is measured on the held-out real digits, so the
prompt-match rate of the generator can be read next to the judge's own error rate.
Training takes well under a second and is deterministic, so no weights are shipped.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lambdasplit.zoo.digits_data import downscale, load_split, upscale


class DigitClassifier:
    def __init__(self):
        from sklearn.svm import SVC

        train_x, train_y, self.test_x, self.test_y = load_split()
        # The classic sklearn settings for this data set (RBF kernel on raw 0..16 pixels).
        self.model = SVC(gamma=0.001, C=10.0).fit(train_x.reshape(len(train_x), -1), train_y)

    def predict8(self, x8: np.ndarray) -> np.ndarray:
        """Labels of (N, 8, 8) images in 0..16."""
        return self.model.predict(np.asarray(x8).reshape(len(x8), -1))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Labels of (N, 32, 32[, 1]) images in [0, 1] (the pipeline's output_type="np")."""
        return self.predict8(downscale(images))

    def held_out_accuracy(self) -> float:
        """Accuracy on the held-out real 8x8 digits."""
        return float((self.predict8(self.test_x) == self.test_y).mean())

    def held_out_accuracy_32(self) -> float:
        """Same, after the 32x32 round trip (upscale, then the downscale used on generations)."""
        images = (upscale(self.test_x).numpy()[:, 0] + 1) / 2
        return float((self.predict(images) == self.test_y).mean())


@lru_cache(maxsize=1)
def classifier() -> DigitClassifier:
    return DigitClassifier()
