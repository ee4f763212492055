"""openpluto.eval: benchmark protocols on frozen encoders (eva linear probe, DINO kNN, gated ABMIL,
ConvDecoderWithImage segmentation, HEST-1k ridge regression) and a Markdown results table.

The protocol functions work on arrays (``train_linear_probe``, ``knn_predict``, ``train_abmil``,
``train_segmentation``, ``ridge_fold``); ``openpluto.eval.runners`` ties them to data, encoders and
results JSON for the ``openpluto eval`` command. Heavy modules load lazily.
"""

from openpluto.eval.config import AbmilConfig, KnnConfig, LinearConfig, RegressionConfig, SegmentationConfig

__all__ = ["AbmilConfig", "KnnConfig", "LinearConfig", "RegressionConfig", "SegmentationConfig"]
