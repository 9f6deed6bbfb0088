"""Every function moonforge hands to torch.compile traces as one graph, and the traced function computes what the
eager one does. A graph break would split a fused pass in two, with a full-size temporary between the halves: an
optimizer update that once broke on a pointer comparison spent 7 ms per step on one H100 re-reading its fp32
result to round it. Production compiles them with ``fullgraph=True`` on GPUs; this traces them on CPUs."""

import pytest
import torch

from moonforge import fp8
from moonforge import model as M
from moonforge.train import flat_adamw as F

BF16 = torch.bfloat16


def _cases():
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=BF16):
        return torch.randn(*shape, generator=g).to(dtype)

    tokens, hidden, k = 24, 16, 2
    order = torch.randperm(tokens * k, generator=g)
    inverse = M.inverse_order(order)
    routed = torch.tensor(tokens * k - 5)
    n = 257
    master = randn(n, dtype=torch.float32)
    moments = (randn(n).abs(), randn(n).abs())
    hi, lo = F.split_fp32(master)
    adam = (torch.tensor(0.5), torch.tensor(3.0), torch.tensor(1e-3), 0.9, 0.95, 1e-8, 0.1)
    return {
        "rms_norm": (M.rms_norm, (randn(tokens, hidden), randn(hidden), 1e-6)),
        "swiglu": (M.swiglu, (randn(tokens, hidden), randn(tokens, hidden))),
        "apply_rope": (M.apply_rope, (randn(1, 2, tokens, 8), randn(tokens, 4, dtype=torch.float32),
                                      randn(tokens, 4, dtype=torch.float32))),
        "combine": (M.combine, (randn(tokens * k, hidden), order, torch.rand(tokens, k, generator=g), routed)),
        "accumulate": (M.accumulate, (randn(n, dtype=torch.float32), randn(n))),
        "assign": (M.assign, (randn(n, dtype=torch.float32), randn(n))),
        "upcast": (M.upcast, (randn(n),)),
        "swiglu_backward": (M.swiglu_backward, (randn(tokens, hidden), randn(tokens, hidden), randn(tokens, hidden))),
        "sum_token_rows": (M.sum_token_rows, (randn(tokens * k, hidden), inverse, k, routed)),
        "lm head: chunk loss": (M._ce_chunk, (randn(tokens, 40), torch.randint(0, 40, (tokens,), generator=g), True)),
        "lm head: scaling": (M._scale, (randn(tokens, hidden), torch.tensor(0.3), BF16)),
        "fp8: weight quantisation": (fp8.quantize_weight, (randn(32, 64),)),
        "flat AdamW: bf16 parameters": (F._update, (master, *moments, randn(n), master.to(BF16), *adam)),
        "flat AdamW: fp32 parameters": (F._update, (master, *moments, randn(n), None, *adam)),
        "flat AdamW: offloaded halves": (F._update_split, (hi, lo, *moments, randn(n), *adam)),
    }


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):  # QuantizedWeight is a named tuple
        return [t for v in value for t in _flatten(v)]
    return []  # None, numbers, dtypes


def test_every_element_wise_kernel_is_covered():
    names = {name for name in _cases() if ":" not in name}
    assert names == set(M.KERNEL_NAMES)


@pytest.mark.parametrize("name", list(_cases()))
def test_compiled_function_is_one_graph_and_computes_the_same(name):
    import torch._dynamo

    fn, args = _cases()[name]
    torch._dynamo.reset()
    eager_args, traced_args = [_clone(a) for a in args], [_clone(a) for a in args]
    expected = fn(*eager_args)
    got = torch.compile(fn, backend="eager", fullgraph=True)(*traced_args)  # raises on a graph break
    for a, b in zip(_flatten(expected) + _flatten(eager_args), _flatten(got) + _flatten(traced_args)):
        assert torch.equal(a, b)
