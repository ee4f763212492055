"""openpluto: whole-slide images to tiles, DINOv2-style pretraining, slide embeddings, benchmarks.

Data flows one way: ``slide`` -> ``ssl``/``train`` -> checkpoint -> ``embed`` -> ``eval``;
``model`` is shared by all of them and only ``cli`` imports everything.
"""

__version__ = "0.1.0"
