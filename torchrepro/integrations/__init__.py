"""Optional integrations with training frameworks.

``torchrepro.integrations.lightning`` (PyTorch Lightning, extra ``[lightning]``) and
``torchrepro.integrations.transformers`` (Hugging Face ``Trainer``, extra ``[transformers]``).
Import the submodule you need; ``import torchrepro`` never imports them or their frameworks.
"""
