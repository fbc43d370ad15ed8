"""How each shipped weight file in ``data/`` was made: one module per file, run with ``python -m``.

- :mod:`.mobilenet`: ``mobilenet_v2-imagenet-features.pt``, MobileNetV2's ImageNet weights.
- :mod:`.lite`: ``pixseek-lite.pt``, trained on Flickr8k (data/MODEL_CARD.md); ``--extra`` adds
  more folders of Flickr8k's layout, such as CC3M's.
- :mod:`.cc3m`: a CC3M folder of that layout, from a fetched git mirror (checked, deduplicated).
- :mod:`.captioner`: one training run of ``pixseek-captioner.pt`` (data/CAPTIONER_CARD.md); the
  shipped file took four, continuing one another: :mod:`.captioner_chain` runs them all.

``lite`` and ``captioner`` read the Flickr8k folder (``--data``) through caches of the frozen
towers' outputs (``--cache``, :mod:`.features`). The cards name the exact commands.
"""
