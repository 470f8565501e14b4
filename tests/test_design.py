"""Design helpers: indicator matrices (torch-openreml's DummyMatrix), interactions, group codes and
numeric design matrices (without torch-openreml's 2-D bug)."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn.design import design_matrix, indicator, indicator_codes, indicator_matrix, interaction

REP = ["rep1", "rep2", "rep2"]
BLOCK = ["block1", "block2", "block1"]


# -- indicator_matrix ---------------------------------------------------------------------------


def test_observed_dummy_matrix_values():
    """Inventory §4, observed on torch-openreml 0.4.0a0."""
    Z, names = indicator_matrix(REP, BLOCK)
    assert names == ["rep1⋈block1", "rep1⋈block2", "rep2⋈block1", "rep2⋈block2"]
    assert Z.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    assert Z.dtype == torch.get_default_dtype()


def test_single_factor_sorted_levels():
    Z, names = indicator_matrix(["b", "a", "c", "a"])
    assert names == ["a", "b", "c"]
    assert Z.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]]


def test_custom_levels_with_and_without_lex_order():
    labels = ["a", "b", "c"]
    _, names = indicator_matrix(labels, levels=["b", "a", "c"])
    assert names == ["a", "b", "c"]  # lex_order sorts even user-given levels (as torch-openreml)
    Z, names = indicator_matrix(labels, levels=[["b", "a", "c"]], lex_order=False)
    assert names == ["b", "a", "c"]
    assert Z.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]


def test_levels_per_argument_none_means_default():
    _, names = indicator_matrix(REP, BLOCK, levels=[None, ["block2", "block1"]], lex_order=False)
    assert names == ["rep1⋈block2", "rep1⋈block1", "rep2⋈block2", "rep2⋈block1"]


def test_drop_first_and_drop_empty_cols():
    Z, names = indicator_matrix(REP, BLOCK, drop_first=True)
    assert names == ["rep1⋈block2", "rep2⋈block1", "rep2⋈block2"]
    assert Z.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]
    Z, names = indicator_matrix(REP, BLOCK, drop_empty_cols=True)
    assert names == ["rep1⋈block1", "rep2⋈block1", "rep2⋈block2"]
    Z, names = indicator_matrix(REP, BLOCK, drop_first=True, drop_empty_cols=True)
    assert names == ["rep2⋈block1", "rep2⋈block2"]
    assert Z.tolist() == [[0, 0], [0, 1], [1, 0]]


def test_unknown_combination_warns_once_and_leaves_a_zero_row():
    with pytest.warns(RuntimeWarning, match=r"Unknown combination \('z',\) dropped!") as record:
        Z, names = indicator_matrix(["a", "z", "b", "z"], levels=["a", "b"])
    assert len(record) == 1
    assert names == ["a", "b"]
    assert Z.tolist() == [[1, 0], [0, 0], [0, 1], [0, 0]]


def test_unknown_combination_of_two_factors():
    with pytest.warns(RuntimeWarning, match=r"Unknown combination \('rep2', 'block2'\) dropped!"):
        Z, _ = indicator_matrix(REP, BLOCK, levels=[None, ["block1"]])
    assert Z.tolist() == [[1, 0], [0, 0], [0, 1]]


def test_label_containers_and_non_string_labels():
    expected, names = indicator_matrix(["1", "2", "2"])
    for labels in ([1, 2, 2], (1, 2, 2), np.array([1, 2, 2]), torch.tensor([1, 2, 2])):
        Z, got = indicator_matrix(labels)
        assert got == names and torch.equal(Z, expected)
    Z, got = indicator_matrix(np.array(REP), tuple(BLOCK))
    assert got == ["rep1⋈block1", "rep1⋈block2", "rep2⋈block1", "rep2⋈block2"]


def test_pandas_series_input():
    pd = pytest.importorskip("pandas")
    Z, names = indicator_matrix(pd.Series(REP), pd.Series(BLOCK))
    assert names[0] == "rep1⋈block1" and Z.tolist()[1] == [0, 0, 0, 1]


def test_dtype_device_and_separator():
    Z, names = indicator_matrix(REP, BLOCK, dtype=torch.float32, device="cpu", sep=":")
    assert Z.dtype == torch.float32 and Z.device.type == "cpu"
    assert names[0] == "rep1:block1"


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((), {}, ValueError, "at least one label sequence"),
        ((REP, ["b1", "b2"]), {}, ValueError, "argument 1 has 2 labels but argument 0 has 3"),
        (("abc",), {}, TypeError, "argument 0 must be a list"),
        (({"a", "b"},), {}, TypeError, "got set"),
        ((REP, 3), {}, TypeError, "argument 1 must be a list"),
        ((np.array([["a"], ["b"]]),), {}, ValueError, "one-dimensional"),
        ((REP,), {"levels": [["rep1"], ["x"]]}, ValueError, "one entry per label argument"),
        ((REP,), {"levels": ["rep1", "rep1"]}, ValueError, "repeat"),
        ((REP, BLOCK), {"levels": "rep1"}, TypeError, "levels must be a list"),
        ((REP, BLOCK), {"levels": [None, 3]}, TypeError, "levels of argument 1"),
    ],
)
def test_indicator_matrix_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        indicator_matrix(*args, **kwargs)


label_lists = st.integers(1, 3).flatmap(
    lambda k: st.integers(0, 12).flatmap(
        lambda n: st.lists(st.lists(st.sampled_from("abc"), min_size=n, max_size=n), min_size=k, max_size=k)
    )
)


@given(label_lists)
def test_indicator_properties(lists):
    """One 1 per row; Z Zᵀ is 'same combination'; column sums count the rows of each column."""
    Z, names = indicator_matrix(*lists)
    rows = list(zip(*lists))
    assert Z.sum(dim=1).tolist() == [1.0] * len(rows)
    same = torch.tensor([[float(a == b) for b in rows] for a in rows]).reshape(len(rows), len(rows))
    assert torch.equal(Z @ Z.T, same)
    assert Z.sum(dim=0).tolist() == [float(sum("⋈".join(r) == name for r in rows)) for name in names]
    assert names == sorted(names, key=lambda name: tuple(name.split("⋈")))
    kept, kept_names = indicator_matrix(*lists, drop_empty_cols=True)
    assert bool((kept.sum(dim=0) > 0).all()) and set(kept_names) == {"⋈".join(r) for r in rows}


# -- indicator, interaction, indicator_codes --------------------------------------------------


def test_indicator_is_a_fixed_structure():
    Z, names = indicator(["g1", "g2", "g1"])
    assert isinstance(Z, rf.Fixed) and names == ["g1", "g2"]
    V = rf.Propagate(Z=Z, G=rf.Scalar(2))
    assert torch.equal(V(), Z.matrix @ Z.matrix.T)


def test_interaction():
    assert interaction(REP, BLOCK) == ["rep1⋈block1", "rep2⋈block2", "rep2⋈block1"]
    assert interaction([1, 2], ("a", "b"), sep=":") == ["1:a", "2:b"]
    assert interaction(np.array(["x", "y"])) == ["x", "y"]
    with pytest.raises(ValueError, match="same length"):
        interaction(REP, ["b1"])  # torch-openreml silently truncated
    with pytest.raises(ValueError, match="at least one"):
        interaction()
    with pytest.raises(TypeError, match="sep must be a str"):
        interaction(REP, sep=1)


def test_indicator_codes():
    codes, levels = indicator_codes(["b", "a", "b", "c"])
    assert codes.dtype == torch.long and codes.tolist() == [1, 0, 1, 2] and levels == ["a", "b", "c"]
    codes, levels = indicator_codes([3, 1, 3], levels=[3, 1])
    assert codes.tolist() == [0, 1, 0] and levels == ["3", "1"]
    Z, names = indicator_matrix(["b", "a", "b", "c"])
    assert torch.equal(Z.argmax(dim=1), indicator_codes(["b", "a", "b", "c"])[0])
    with pytest.raises(ValueError, match=r"labels \['z'\] are not among the levels"):
        indicator_codes(["a", "z"], levels=["a"])


# -- design_matrix -----------------------------------------------------------------------------


def test_design_matrix_one_and_two_dimensional_columns():
    x1 = [1.0, 2.0, 3.0]
    x2 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    X = design_matrix(x1, x2)
    assert X.shape == (3, 3)
    assert X.tolist() == [[1, 0, 1], [2, 1, 0], [3, 1, 1]]
    X = design_matrix(x2, intercept=True)
    assert X.tolist() == [[1, 0, 1], [1, 1, 0], [1, 1, 1]]


def test_design_matrix_never_mutates_or_aliases_its_inputs():
    """torch-openreml's numeric_to_design_matrix unsqueezed a 2-D input in place and returned 4-D."""
    x2 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    before = x2.clone()
    X = design_matrix(x2)
    assert X.shape == (3, 2) and x2.shape == (3, 2) and torch.equal(x2, before)
    X[0, 0] = 99.0
    assert torch.equal(x2, before)


def test_design_matrix_dtype_rules():
    assert design_matrix([1, 2]).dtype == torch.get_default_dtype()
    assert design_matrix(torch.tensor([1.0, 2.0], dtype=torch.float32)).dtype == torch.float32
    mixed = design_matrix(torch.tensor([1.0, 2.0], dtype=torch.float32), np.array([1.0, 2.0]))
    assert mixed.dtype == torch.float64  # float64 data is never rounded to float32
    assert design_matrix([True, False], dtype=torch.float32).tolist() == [[1.0], [0.0]]


def test_design_matrix_pandas():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3, 4]})
    assert design_matrix(frame, pd.Series([5.0, 6.0])).tolist() == [[1, 3, 5], [2, 4, 6]]


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((), ValueError, "at least one column"),
        (([1.0, 2.0], [1.0]), ValueError, "argument 1 has 1 rows but argument 0 has 2"),
        ((["a", "b"],), TypeError, "argument 0 must be numeric"),
        ((torch.zeros(2, 2, 2),), ValueError, "1-D"),
        ((torch.zeros(2, dtype=torch.complex64),), TypeError, "must be real"),
    ],
)
def test_design_matrix_errors(args, error, match):
    with pytest.raises(error, match=match):
        design_matrix(*args)


def test_indicator_matrix_warning_is_not_emitted_for_known_labels():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        indicator_matrix(REP, BLOCK, levels=[["rep1", "rep2"], ["block1", "block2"]])
