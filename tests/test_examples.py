"""The README's main job: the sleepstudy example runs and prints lme4's numbers."""

import pathlib
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sleepstudy_example_prints_lme4_summary(capsys):
    runpy.run_path(str(ROOT / "examples" / "sleepstudy.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "REML criterion at convergence: 1743.6283" in out
    assert "251.405" in out and "6.8246" in out
    assert "10.4673" in out and "1.5458" in out
    assert "converged" in out


@pytest.mark.parametrize("block", [0])
def test_readme_concept_snippets_run(block):
    import torch

    import reml_fn as rf

    s = rf.AR1(4)
    params = s.init_params()
    assert torch.equal(s.build(params), torch.eye(4))
    s = rf.Sum(time=rf.AR1(4), noise=rf.Scalar(4))
    grad, names = rf.jacobian_stack(s, torch.tensor([0.5, 1.0, 1.0]))
    assert grad.shape == (3, 4, 4) and names == rf.param_names(s)
    y = torch.tensor([1.0, 2.0, 4.0, 3.0])
    X = torch.ones(4, 1)
    p = s.init_params()
    Y = torch.stack([y, y + 1.0, y * 2.0])
    batched = torch.func.vmap(rf.reml_loglik, in_dims=(None, None, 0, None))(s, p, Y, X)
    assert batched.shape == (3,)
    assert torch.allclose(batched[0], rf.reml_loglik(s, p, y, X))
    score = torch.func.grad(lambda q: rf.reml_loglik(s, q, y, X))(p)
    assert torch.allclose(rf.flatten_params(s, score), rf.ai_terms(s, p, y, X).score)


def test_readme_formula_section_prints_what_it_shows():
    import reml_fn as rf

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Formulas: lme4's language") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = section.split("```", 4)[3]  # the block after the code: the printed summary
    namespace: dict = {}
    exec(code.replace("print(m)", ""), namespace)
    assert str(namespace["m"]).strip() == shown.strip()
    assert isinstance(namespace["m"], rf.LmerResult)
