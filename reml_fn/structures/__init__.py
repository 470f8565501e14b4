"""Base covariance structures (one family per module)."""

from reml_fn.structures.base import Parametric, Structure
from reml_fn.structures.correlation import AR1, CompoundSymmetric, Equicorrelation
from reml_fn.structures.custom import Custom, Reparam
from reml_fn.structures.fixed import Fixed
from reml_fn.structures.scalar import Diagonal, EqualEntry, Identity, Scalar
from reml_fn.structures.triangular import LowerTriangular, Unstructured
from reml_fn.structures.within_group import WithinGroup

__all__ = [
    "Structure",
    "Parametric",
    "Identity",
    "Scalar",
    "EqualEntry",
    "Diagonal",
    "Equicorrelation",
    "CompoundSymmetric",
    "AR1",
    "Unstructured",
    "LowerTriangular",
    "Fixed",
    "Custom",
    "Reparam",
    "WithinGroup",
]
