"""Sparse autoencoder variants: the base class and config (``base``), one module per variant, the sparse kernels, the
on-disk formats and pretrained-name resolution. Adding a variant is one module and one line of ``SAE_CLASSES``."""

from sae.saes.base import (INIT_BLOCK, SAE, SAE_CLASSES, ForwardOutput, SAEConfig, create_sae, dense_auxk,
                           failure_signs)
from sae.saes.batchtopk import BatchTopKSAE, MatryoshkaBatchTopKSAE
from sae.saes.jumprelu import JumpReLUSAE
from sae.saes.kernels import SparseActs, sparse_decode
from sae.saes.pretrained import SAEFormatError
from sae.saes.relu_l1 import ReLUL1SAE
from sae.saes.topk import TopKFamily, TopKSAE

SAE_CLASSES.update({
    "relu_l1": ReLUL1SAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "jumprelu": JumpReLUSAE,  # last of the SAELens "jumprelu" savers: SAE.load reads plain jumprelu folders as it
})

__all__ = [
    "INIT_BLOCK", "SAE", "SAE_CLASSES", "BatchTopKSAE", "ForwardOutput", "JumpReLUSAE", "MatryoshkaBatchTopKSAE",
    "ReLUL1SAE", "SAEConfig", "SAEFormatError", "SparseActs", "TopKFamily", "TopKSAE", "create_sae", "dense_auxk",
    "failure_signs",
    "sparse_decode",
]
