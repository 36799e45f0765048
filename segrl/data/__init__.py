"""Data: synthetic scenes, file datasets, pools, manifests and joint transforms.

Every dataset yields ``{"image": float32 3xHxW (ImageNet-normalized), "mask": int64 HxW
(ignore 255), "id": str}`` and exposes ``classes`` and ``ignore_index``.

Import from the submodules (``segrl.data.datasets``, ``.labels``, ``.manifest``, ``.pool``,
``.synthetic``, ``.transforms``). This package imports none of them: the pool readers and
label codecs stay free of torch for the Ray Data tasks that use only them.
"""
