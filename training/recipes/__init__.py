"""How each shipped weight file in ``data/`` was made: one module per file, run with ``python -m``.

- :mod:`.mobilenet`: ``mobilenet_v2-imagenet-features.pt``, MobileNetV2's ImageNet weights.
- :mod:`.lite`: ``pixseek-lite.pt``, trained on Flickr8k, and ``pixseek-lite-2.pt``, which
  continues it on Flickr8k plus CC3M (data/MODEL_CARD.md).
- :mod:`.cc3m`: the CC3M folder pixseek-lite 2 trains on, from a fetched git mirror.
- :mod:`.captioner`: ``pixseek-captioner.pt``, trained on Flickr8k (data/CAPTIONER_CARD.md).

``lite`` and ``captioner`` read the Flickr8k folder (``--data``) through caches of the frozen
towers' outputs (``--cache``, :mod:`.features`). The cards name the exact commands.
"""
