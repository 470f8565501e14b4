"""torch-openreml's spelling on top of the functional core.

Code written for ``torch_openreml.covariance`` runs after changing only its import::

    from reml_fn.compat import AR1Matrix, ScalarMatrix, Sum   # was: from torch_openreml.covariance import …

Every class wraps one immutable functional structure (``.structure``): the numbers, the closed-form
Jacobians and the parameter names all come from :mod:`reml_fn`. See ``docs/compat.md`` for the
member-by-member mapping and the (few, deliberate) differences.

=========================  ==============================
torch-openreml             functional equivalent
=========================  ==============================
IdentityMatrix(n)          ``rf.Identity(n)``
ScalarMatrix(n)            ``rf.Scalar(n)``
EqualEntryMatrix(n, m)     ``rf.EqualEntry(n, m)``
DiagonalMatrix(n)          ``rf.Diagonal(n)``
EquicorrelationMatrix(n)   ``rf.Equicorrelation(n)``
CompoundSymmetricMatrix    ``rf.CompoundSymmetric(n)``
AR1Matrix(n)               ``rf.AR1(n)``
UnconstrainedMatrix(n)     ``rf.Unstructured(n)``
LowerTriangularMatrix      ``rf.LowerTriangular(n, m)``
SimpleMatrix               ``rf.Custom(function, k)``
Adapter                    ``rf.Reparam(child, param_map, k)``
DummyMatrix(*labels)       ``reml_fn.design.indicator(*labels)``
Sum                        ``rf.Sum``
BlockDiagonal              ``rf.BlockDiagonal``
CovariancePropagation      ``rf.Propagate``
KroneckerProduct           ``rf.Kronecker``
HadamardProduct            ``rf.Hadamard``
Product                    ``rf.Product``
Transpose                  ``rf.Transpose``
Gram                       ``rf.Gram``
Augment                    ``rf.Augment``
Stack                      ``rf.Stack``
Inverse                    ``rf.Inverse``
=========================  ==============================

Example (the seed page's):
    >>> import torch
    >>> from reml_fn.compat import AR1Matrix, ScalarMatrix, Sum
    >>> op = Sum(time=AR1Matrix(4), noise=ScalarMatrix(4))
    >>> grad, grad_names = op.manual_grad(torch.tensor([0.5, 1.0, 1.0]))
    >>> tuple(grad.shape), grad_names
    ((3, 4, 4), ['time/sigma^2', 'time/rho', 'noise/sigma^2'])
"""

from reml_fn.compat import transform
from reml_fn.compat.matrix import (
    Adapter,
    AR1Matrix,
    CompoundSymmetricMatrix,
    DiagonalMatrix,
    DummyMatrix,
    EqualEntryMatrix,
    EquicorrelationMatrix,
    IdentityMatrix,
    LowerTriangularMatrix,
    Matrix,
    ScalarMatrix,
    SimpleMatrix,
    UnconstrainedMatrix,
    simple_param_specs,
)
from reml_fn.compat.operator import (
    Augment,
    BlockDiagonal,
    CovariancePropagation,
    Gram,
    HadamardProduct,
    Inverse,
    KroneckerProduct,
    Operator,
    Product,
    Stack,
    Sum,
    Transpose,
)

__all__ = [
    "transform",
    "Matrix",
    "IdentityMatrix",
    "ScalarMatrix",
    "EqualEntryMatrix",
    "DiagonalMatrix",
    "EquicorrelationMatrix",
    "CompoundSymmetricMatrix",
    "AR1Matrix",
    "UnconstrainedMatrix",
    "LowerTriangularMatrix",
    "Operator",
    "Sum",
    "BlockDiagonal",
    "CovariancePropagation",
    "KroneckerProduct",
    "HadamardProduct",
    "Product",
    "Transpose",
    "Gram",
    "Augment",
    "Stack",
    "Inverse",
    "DummyMatrix",
    "Adapter",
    "SimpleMatrix",
    "simple_param_specs",
]
