"""Sparse-training methods. Importing this package registers them; :func:`available_methods` lists them."""

from prunekit.methods.acdc import ACDC, ACDCConfig
from prunekit.methods.base import Pruner, SparsityConfig
from prunekit.methods.constant import Constant, ConstantConfig
from prunekit.methods.cram import CrAM, CrAMConfig
from prunekit.methods.dpf import DPF, DPFConfig
from prunekit.methods.gap import GaP, GaPConfig
from prunekit.methods.gmp import GMP, GMPConfig
from prunekit.methods.imp import IMP, IMPConfig
from prunekit.methods.registry import available, available_methods, get_method, register_method
from prunekit.methods.rigl import RigL, RigLConfig

__all__ = [
    "ACDC",
    "DPF",
    "GMP",
    "IMP",
    "ACDCConfig",
    "Constant",
    "ConstantConfig",
    "CrAM",
    "CrAMConfig",
    "DPFConfig",
    "GMPConfig",
    "GaP",
    "GaPConfig",
    "IMPConfig",
    "Pruner",
    "RigL",
    "RigLConfig",
    "SparsityConfig",
    "available",
    "available_methods",
    "get_method",
    "register_method",
]
