"""Data: the MVTec AD reader, tensors and augmentation, the noise protocol, and the embedded datasets.

Imports only the top-level modules (``config``, ``errors``, ``io``, ``utils``) and its own modules.
"""
